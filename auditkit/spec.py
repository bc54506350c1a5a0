"""ModelSpec: how to run a user's model (its input size, normalisation, classes, layers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


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
