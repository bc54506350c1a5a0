"""Subject: one model under audit.

The Subject owns the device, eval mode, input normalisation, named layers,
hooks and a batched forward. Inputs are pixels in [0, 1], N x C x H x W;
the Subject feeds (x - mean) / std to the module.

It borrows the user's module: `open()` (or `with Subject(...)`) records its
state, moves it to the audit device, switches it to eval mode and turns off
requires_grad; `close()` puts back device, train/eval flags, requires_grad,
.grad, parameter and buffer values, and removes any hook left behind, even
after an exception. Between checks, `restore()` puts the module back in the
audit state open() established (a check that trained the model, moved its
batch-norm statistics or left a hook behind harms no later check).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from auditkit.spec import ModelSpec

log = logging.getLogger("auditkit")

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


class AuditModelError(ValueError):
    """The model cannot be audited as declared; the message names the model and what was expected."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks cuda when available, else cpu; 'cuda' / 'cuda:N' must exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise AuditModelError(f"device {device!r} is not valid: expected auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AuditModelError(f"device {device!r} asked for, but CUDA is not available here; use --audit-device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AuditModelError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type != "cpu":
        raise AuditModelError(f"device {device!r} is not supported: expected auto, cpu, cuda or cuda:N")
    return dev


@dataclass
class _Value:
    """One parameter or buffer as open() left it: the tensor object, its in-place version and a copy.

    Parameters are copied to the CPU and trusted to bump `_version` when edited in place (optimisers,
    no_grad edits do). Buffers are copied on their own device and compared by value, because batch norm
    updates its running statistics inside its kernel without bumping `_version`.
    """

    ref: torch.Tensor
    version: int
    value: torch.Tensor
    compare: bool  # True for buffers: changed means a different value, not a moved _version


_TABLES = (("_parameters", "parameters"), ("_buffers", "buffers"))


@dataclass
class _ModuleState:
    """What open() changes on the user's module, so close() can put it back, and the values restore() keeps."""

    training: dict[str, bool]
    requires_grad: dict[str, bool]
    grads: dict[str, torch.Tensor | None]
    device: torch.device | None
    hooks: dict[tuple[str, str], set] = field(default_factory=dict)
    values: dict[tuple[str, str, str], _Value] = field(default_factory=dict)  # (module, table, key)


def _is_uninitialized(t: torch.Tensor) -> bool:
    return isinstance(t, nn.parameter.UninitializedTensorMixin)


def _snapshot_values(module: nn.Module) -> dict[tuple[str, str, str], _Value]:
    """A copy of every parameter (on the CPU) and buffer (on its device), tied tensors sharing one, with the
    tensor object and its _version."""
    values: dict[tuple[str, str, str], _Value] = {}
    seen: dict[int, _Value] = {}
    for name, sub in module.named_modules():
        for table, _ in _TABLES:
            entries = getattr(sub, table)
            for key, t in entries.items():
                if t is None or _is_uninitialized(t):  # a lazy module materialises its own tensors later
                    continue
                if id(t) not in seen:
                    buffer = table == "_buffers"
                    value = t.detach().clone() if buffer else t.detach().to("cpu", copy=True)
                    seen[id(t)] = _Value(ref=t, version=t._version, value=value, compare=buffer)
                values[(name, table, key)] = seen[id(t)]
    return values


def _differ(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """For each (tensor, copy): do their values differ (NaN equal to NaN)? One device sync per device."""
    out: list[bool] = [True] * len(pairs)
    pending: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, (a, b) in enumerate(pairs):
        if a.shape == b.shape and a.dtype == b.dtype and a.device == b.device:
            if a.numel() == 0:
                out[i] = False
                continue
            same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
            pending.setdefault(a.device, []).append((i, (~same).any()))
    for items in pending.values():
        for (i, _), flag in zip(items, torch.stack([f for _, f in items]).tolist()):
            out[i] = bool(flag)
    return out


def _listed(kind: str, names: list[str], limit: int = 8) -> str:
    return f"{kind} " + ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


_CALL_HOOK_DICTS = _HOOK_DICTS[:7]  # forward / backward hooks: what runs when the module is called


def copy_without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose forward and backward hooks are cleared (on the copy only).

    copy.deepcopy keeps the hook tables and shares the hook functions, so the user's hooks would
    fire (and could rewrite outputs) while auditkit runs its private copies.
    """
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for attr in _CALL_HOOK_DICTS:
            table = getattr(sub, attr, None)
            if table:
                table.clear()
    return clone


def _hook_keys(module: nn.Module) -> dict[tuple[str, str], set]:
    keys = {}
    for name, sub in module.named_modules():
        for attr in _HOOK_DICTS:
            table = getattr(sub, attr, None)
            if table:
                keys[(name, attr)] = set(table.keys())
    return keys


def _single_device(module: nn.Module) -> torch.device | None:
    devices = {t.device for t in list(module.parameters()) + list(module.buffers())}
    return devices.pop() if len(devices) == 1 else None


def discover_layers(module: nn.Module) -> list[str]:
    """Default depth-wise layers: the top-level stages that contain a convolution.

    Descends while a single child holds all the convolutions (as in
    torchvision's `features` Sequentials), then returns the names of the
    children that contain one, in order (resnet18: conv1, layer1 .. layer4).
    """
    def has_conv(m: nn.Module) -> bool:
        return any(isinstance(s, nn.modules.conv._ConvNd) for s in m.modules())

    prefix, current = "", module
    while True:
        children = [(n, c) for n, c in current.named_children() if has_conv(c)]
        if len(children) == 1 and list(children[0][1].children()):
            name, current = children[0]
            prefix = f"{prefix}{name}."
            continue
        return [f"{prefix}{n}" for n, _ in children]


class Subject:
    """A model under audit: device, eval mode, normalisation, layers, hooks, batched forward."""

    def __init__(self, spec: ModelSpec, device: str | torch.device | None = "auto", batch_size: int = 64):
        if batch_size < 1:
            raise AuditModelError(f"model {spec.name!r}: batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self._state: _ModuleState | None = None
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        names = dict(spec.module.named_modules())
        layers = list(spec.layers) if spec.layers is not None else discover_layers(spec.module)
        for layer in layers:
            if layer not in names:
                raise AuditModelError(self._unknown_layer_message(layer))
        self.layers: tuple[str, ...] = tuple(layers)

    # -- lifecycle -------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self.spec.module

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_open(self) -> bool:
        return self._state is not None

    def open(self) -> "Subject":
        """Borrow the module: record its state, move it to the device, eval(), requires_grad off."""
        if self._state is not None:
            return self
        module = self.module
        state = _ModuleState(
            training={n: m.training for n, m in module.named_modules()},
            requires_grad={n: p.requires_grad for n, p in module.named_parameters()},
            grads={n: p.grad for n, p in module.named_parameters()},
            device=_single_device(module),
            hooks=_hook_keys(module),
        )
        self._state = state
        try:
            if state.device is not None and state.device != self.device:
                module.to(self.device)
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
            # the audit state: the tensors as they are on the audit device (a move does not change values)
            state.values = _snapshot_values(module)
        except BaseException:
            self.close()
            raise
        return self

    def restore(self) -> list[str]:
        """Put the module back in the audit state open() established; return what had to be put back.

        Device, eval mode on every submodule, requires_grad off, the .grad the user had, the values of
        parameters and buffers as at open() (a parameter is copied back when it was replaced or its
        in-place `_version` moved; a buffer when it was replaced or its value differs, since batch norm
        updates running statistics without moving `_version`; nothing is copied when nothing changed),
        and hooks added since open() removed. Not seen: edits of a parameter through `.data`, which
        bypass `_version`; tensors registered since open() are left alone (a model may cache buffers). Call it between checks, never inside a
        Subject.capture / forward_hook block (those hooks would be removed). Returns short items such as
        ["train mode", "buffers bn.running_mean, bn.num_batches_tracked"]; [] when nothing had changed.
        """
        state = self._state
        if state is None:
            return []
        module, done = self.module, []
        if state.device is not None and _single_device(module) != self.device:
            module.to(self.device)
            done.append("device")
        modules = dict(module.named_modules())
        if any(m.training for m in modules.values()):
            for m in modules.values():
                m.training = False
            done.append("train mode")
        named = list(module.named_parameters())
        if any(p.requires_grad for _, p in named):
            for _, p in named:
                p.requires_grad_(False)
            done.append("requires_grad")
        regrads = [n for n, p in named if n in state.grads and p.grad is not state.grads[n]]
        for n, p in named:
            if n in regrads:
                p.grad = state.grads[n]
        if regrads:
            done.append(_listed("grads", regrads))
        done += self._restore_values(state, modules)
        hooks = self._remove_new_hooks(modules, state.hooks)
        if hooks:
            done.append(_listed("hooks", hooks))
        return done

    def _restore_values(self, state: _ModuleState, modules: dict[str, nn.Module]) -> list[str]:
        """Copy back every snapshot whose tensor was replaced or changed; returns "parameters ..." / "buffers ..."."""
        changed: dict[str, list[str]] = {kind: [] for _, kind in _TABLES}
        kinds = dict(_TABLES)
        with torch.no_grad():
            present = [(k, v) for k, v in state.values.items() if k[0] in modules]
            buffers = list({id(v.ref): v for _, v in present if v.compare}.values())
            differs = _differ([(v.ref, v.value) for v in buffers])  # one sync for all buffers
            stale = {id(v.ref) for v, d in zip(buffers, differs) if d}
            for (name, table, key), v in present:
                entries, label = getattr(modules[name], table), f"{name}.{key}" if name else key
                moved = False
                if entries.get(key) is not v.ref:
                    entries[key] = v.ref
                    moved = True
                if id(v.ref) in stale or (not v.compare and v.ref._version != v.version):
                    v.ref.copy_(v.value)
                    v.version = v.ref._version
                    stale.discard(id(v.ref))
                    moved = True
                if moved:
                    changed[kinds[table]].append(label)
        return [_listed(kind, names) for kind, names in changed.items() if names]

    def close(self) -> None:
        """Give the module back exactly as open() found it (device, modes, flags, grads, values, hooks)."""
        state, self._state = self._state, None
        if state is None:
            return
        module = self.module
        modules = dict(module.named_modules())
        self._restore_values(state, modules)
        self._remove_new_hooks(modules, state.hooks)
        if state.device is not None and _single_device(module) != state.device:
            module.to(state.device)
        for name, m in modules.items():
            if name in state.training:
                m.training = state.training[name]
        for name, p in module.named_parameters():
            if name in state.requires_grad:
                p.requires_grad_(state.requires_grad[name])
                p.grad = state.grads[name]

    @staticmethod
    def _remove_new_hooks(modules: dict[str, nn.Module], before: dict[tuple[str, str], set]) -> list[str]:
        """Remove the hooks added since `before` was taken; returns "module.table" for each one removed."""
        removed = []
        for name, sub in modules.items():
            for attr in _HOOK_DICTS:
                table = getattr(sub, attr, None)
                if not table:
                    continue
                for key in set(table.keys()) - before.get((name, attr), set()):
                    log.warning("auditkit removed a hook left on %s.%s", name or "<root>", attr)
                    del table[key]
                    removed.append(f"{name or '<root>'}.{attr}")
        return removed

    def __enter__(self) -> "Subject":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._state is None:
            self.open()

    # -- forward ---------------------------------------------------------
    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(pixels - mean) / std, per channel."""
        return (pixels - self._mean.to(pixels.device)) / self._std.to(pixels.device)

    def _check_input(self, pixels: torch.Tensor) -> None:
        channels = len(self.spec.mean)
        if pixels.ndim != 4 or pixels.shape[1] != channels:
            raise AuditModelError(
                f"model {self.name!r}: input has shape {tuple(pixels.shape)}, expected N x {channels} x H x W pixels"
            )

    def _check_output(self, out: object, n: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise AuditModelError(
                f"model {self.name!r}: forward returned {type(out).__name__}, expected a tensor of "
                f"N x {self.spec.num_classes} class scores (logits)"
            )
        if out.shape != (n, self.spec.num_classes):
            raise AuditModelError(
                f"model {self.name!r}: output has shape {tuple(out.shape)}, expected ({n}, {self.spec.num_classes}) "
                f"= (batch, number of class_names)"
            )
        bad = ~torch.isfinite(out.detach()).all(dim=1)  # every call, with or without autograd
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            shown = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
            raise AuditModelError(f"model {self.name!r}: output holds NaN or infinite values for {len(rows)} of "
                                  f"{n} images in the batch (rows {shown})")
        return out

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits for one batch, autograd as the caller's context allows (no chunking)."""
        self._require_open()
        self._check_input(pixels)
        pixels = pixels.to(self.device, torch.float32)
        return self._check_output(self.module(self.normalise(pixels)), pixels.shape[0])

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Logits for any number of images, in chunks; the chunk halves on out-of-memory.

        Returns an N x classes float tensor on the CPU.
        """
        outs = [chunk for chunk in self.predict_chunks(iter([pixels]), batch_size)]
        return torch.cat(outs) if outs else torch.empty(0, self.spec.num_classes)

    @torch.no_grad()
    def predict_chunks(self, batches: Iterator[torch.Tensor], batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """Logits (on the CPU) for each chunk of at most batch_size images drawn from `batches`."""
        self._require_open()
        for pixels in batches:
            start = 0
            while start < pixels.shape[0]:
                size = batch_size or self.batch_size
                chunk = pixels[start : start + size]
                try:
                    out = self.forward(chunk)
                except torch.cuda.OutOfMemoryError:
                    self._shrink_batch(size)
                    continue
                except RuntimeError as exc:
                    if "out of memory" not in str(exc):
                        raise
                    self._shrink_batch(size)
                    continue
                yield out.float().cpu()
                start += chunk.shape[0]

    def _shrink_batch(self, size: int) -> None:
        if size <= 1:
            raise AuditModelError(f"model {self.name!r}: out of memory with a batch of 1 on {self.device}")
        self.batch_size = max(1, size // 2)
        log.warning("auditkit: out of memory on %s, batch size now %d", self.device, self.batch_size)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def probabilities(self, pixels: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """softmax(logits), N x classes, on the CPU."""
        return torch.softmax(self.predict(pixels, batch_size), dim=1)

    def class_probability(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p(label_i | x_i) for each image, N floats on the CPU."""
        probs = self.probabilities(pixels)
        return probs.gather(1, labels.view(-1, 1).cpu()).squeeze(1)

    # -- layers and hooks ------------------------------------------------
    def _unknown_layer_message(self, layer: str) -> str:
        names = [n for n, _ in self.spec.module.named_modules() if n]
        shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
        return f"model {self.spec.name!r} has no layer {layer!r}; available layers: {shown}"

    def layer(self, name: str) -> nn.Module:
        """The submodule called `name` (as in named_modules()); unknown names list the valid ones."""
        modules = dict(self.module.named_modules())
        if name not in modules:
            raise AuditModelError(self._unknown_layer_message(name))
        return modules[name]

    @contextlib.contextmanager
    def forward_hook(self, layer: str, fn: Callable[[nn.Module, tuple, object], object]) -> Iterator[None]:
        """Register a forward hook on `layer` for the duration of the block; always removed."""
        handle = self.layer(layer).register_forward_hook(fn)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def capture(self, layers: Sequence[str], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Record the outputs of `layers` on each forward inside the block.

        Yields a dict layer -> output of the latest forward (detached unless
        detach=False). Hooks are removed when the block ends, even on error.
        """
        captured: dict[str, torch.Tensor] = {}
        modules = [(name, self.layer(name)) for name in layers]
        handles = []
        try:
            for name, module in modules:
                def hook(_m: nn.Module, _inp: tuple, out: object, name: str = name) -> None:
                    if isinstance(out, torch.Tensor):
                        captured[name] = out.detach() if detach else out
                handles.append(module.register_forward_hook(hook))
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def describe(self) -> dict[str, object]:
        """Name, version, device and layers, for the report header."""
        return {"name": self.spec.name, "version": self.spec.version, "device": str(self.device),
                "layers": list(self.layers), "classes": list(self.spec.class_names)}
