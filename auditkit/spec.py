"""ModelSpec: how to run a user's model (its input size, normalisation, classes, layers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch

from auditkit.errors import AuditModelError


@dataclass
class ModelSpec:
    """A model under audit and what the audit needs to know about it.

    module: the torch module; it maps normalised N x C x H x W inputs to
        N x len(class_names) logits.
    input_size: (height, width) the model sees; audit images are resized to it.
    mean, std: per-channel normalisation; the Subject feeds (x - mean) / std
        for pixels x in [0, 1].
    class_names: one name per output; audit-set labels are matched by name.
    layers: ordered names of modules (as in named_modules()) for depth-wise
        checks, shallow to deep; None discovers them.
    name, version: shown in the report.
    dataset: the audit set to use when neither --audit-dataset nor the config names one.
    output: which part of what the module returns holds the logits (select_output): None for a
        tensor, the first element of a tuple or list, or the "logits" of a dict or of an object (a
        Hugging Face ModelOutput); a key or attribute name, a tuple index, or a callable
        (output -> tensor) to pick another.
    """

    module: torch.nn.Module
    class_names: Sequence[str]
    input_size: tuple[int, int]
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    layers: Sequence[str] | None = None
    name: str = ""
    version: str = ""
    dataset: str | None = None
    extra: dict = field(default_factory=dict)
    output: Union[str, int, Callable[[Any], Any], None] = None

    def __post_init__(self) -> None:
        if not isinstance(self.module, torch.nn.Module):
            raise TypeError(
                f"ModelSpec {self.name or '(unnamed)'}: module must be a torch.nn.Module, got {type(self.module).__name__}"
            )
        self.class_names = tuple(str(c) for c in self.class_names)
        if not self.class_names:
            raise ValueError(f"ModelSpec {self.name or '(unnamed)'}: class_names is empty")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"ModelSpec {self.name or '(unnamed)'}: class_names has duplicates")
        size = tuple(int(s) for s in self.input_size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(
                f"ModelSpec {self.name or '(unnamed)'}: input_size must be (height, width), got {self.input_size!r}"
            )
        self.input_size = size  # type: ignore[assignment]
        if len(self.mean) != len(self.std):
            raise ValueError(f"ModelSpec {self.name or '(unnamed)'}: mean and std differ in length")
        if any(s == 0 for s in self.std):
            raise ValueError(f"ModelSpec {self.name or '(unnamed)'}: std has a zero")
        if self.layers is not None:
            self.layers = tuple(self.layers)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def select_output(self, out: object) -> "torch.Tensor":
        """The logits tensor in what the module returned, as `output` says (see the class docstring).
        Raises AuditModelError naming the model, what it returned and what `output` expected."""
        selector, picked = self.output, out
        try:
            if callable(selector):
                picked = selector(out)
            elif isinstance(selector, int) and not isinstance(selector, bool):
                picked = out[selector]  # type: ignore[index]
            elif isinstance(selector, str):
                picked = out[selector] if isinstance(out, dict) and selector in out else getattr(out, selector)
            elif selector is None and not isinstance(out, torch.Tensor):
                if isinstance(out, (tuple, list)) and out:
                    picked = out[0]
                elif isinstance(out, dict) and "logits" in out:
                    picked = out["logits"]
                elif hasattr(out, "logits"):
                    picked = out.logits
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise AuditModelError(f"model {self.name!r}: output={selector!r} does not pick from what the model "
                                   f"returned, {_returned(out)} ({type(exc).__name__}: {exc})") from exc
        if not isinstance(picked, torch.Tensor):
            how = "output=None takes a tensor, a tuple's first element or a 'logits' key / attribute" \
                if selector is None else f"output={selector!r} gave {type(picked).__name__}"
            raise AuditModelError(f"model {self.name!r}: forward returned {_returned(out)}; {how}, expected a "
                                   f"tensor of N x {self.num_classes} class scores (logits): set "
                                   "ModelSpec(output=...) to a key, an attribute, an index or a callable")
        return picked


def _returned(out: object) -> str:
    """What a forward returned, in a few words: its type and its keys or length."""
    kind = type(out).__name__
    if isinstance(out, dict):
        return f"{kind} with keys {', '.join(map(repr, list(out)[:8]))}"
    if isinstance(out, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in list(out)[:4])
        return f"{kind} of {len(out)} ({inner}{', ...' if len(out) > 4 else ''})"
    return kind
