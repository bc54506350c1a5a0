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
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar, Union

import torch
from torch import nn

from auditkit.cache import ResultCache, content_digest
from auditkit.config import parse_memory
from auditkit.errors import AuditModelError, NotApplicable
from auditkit.layers import NAME_LAYERS_HINT, LayerView, discover_layers, first_tensor, patch_size, unwrap, view_of
from auditkit.progress import report
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


T = TypeVar("T")
#: A forward + backward holds every activation for the backward, several times what a no-grad forward of
#: the same rows holds at once; Subject.backward_cost measures how many times for the model at hand, and
#: falls back on this where its probe cannot run (5.7x for resnet18 and 7.8x for resnet50 at 64 px,
#: measured in RSS, made a quarter of the batch before the probe).
BACKWARD_COST = 4
#: The largest backward cost Subject.backward_cost gives (a chunk of one row at batch_size 256).
MAX_BACKWARD_COST = 256
#: An objective of the chunked forward + backward: (pixels of some rows, those rows) -> one value per row,
#: or a dict of such tensors with a "total".
Objective = Callable[[torch.Tensor, slice], Union[torch.Tensor, dict]]


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError of an allocator that could not allocate
    ("out of memory" on CUDA and others, "can't allocate memory" from the CPU's DefaultCPUAllocator)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def value_and_gradient(objective: Objective, pixels: torch.Tensor, rows: slice,
                       device: torch.device) -> tuple[torch.Tensor, object]:
    """(d sum(v) / d x, v detached) for v = objective(x, rows), x a fresh leaf copy of `pixels` on `device`
    (float32); v is a tensor of one value per row, or a dict of them whose "total" is differentiated."""
    x = pixels.detach().to(device, torch.float32).clone().requires_grad_(True)
    with torch.enable_grad():
        value = objective(x, rows)
        total = value["total"] if isinstance(value, dict) else value
        if not isinstance(total, torch.Tensor) or total.ndim != 1 or total.shape[0] != x.shape[0]:
            got = tuple(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__
            raise ValueError(f"the objective must give one value per row ({x.shape[0]}), got {got}")
        # an objective that does not depend on the pixels has a zero gradient
        grad = torch.autograd.grad(total.sum(), x)[0] if total.requires_grad else torch.zeros_like(x)
    detached = {k: v.detach() for k, v in value.items()} if isinstance(value, dict) else value.detach()
    return grad, detached


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


def device_for_worker(device: str | None, worker_id: str | None, cuda_count: int | None = None) -> str:
    """The device one process audits on, given the device text (--audit-device or `device = ...`).

    `device` is auto (or None), cpu, cuda, cuda:N, or a comma-separated list of cpu / cuda:N entries.
    `worker_id` is pytest-xdist's PYTEST_XDIST_WORKER ("gw0", "gw1", ...): worker i is gw<i>; None
    (or any other text) is a process without xdist, or xdist's controller. `cuda_count` is the number
    of usable CUDA devices, 0 without CUDA; None asks torch.

    - cpu: cpu, in every process.
    - cuda: without xdist, cuda (the default CUDA device); worker i gets cuda:(i mod cuda_count).
    - auto: cpu when cuda_count is 0, else as cuda.
    - cuda:N: that device, in every process.
    - a list: without xdist its first entry; worker i gets entry i mod len(list).

    Returns "cpu", "cuda" or "cuda:N". Raises AuditModelError naming the text and the entry at fault
    when an entry has none of these forms (in a list: cpu or cuda:N), an index is not below
    cuda_count, or CUDA is asked for where cuda_count is 0. The whole text is checked, whichever
    entry this process gets, so the controller and every worker agree on an error.
    """
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    text = "auto" if device is None else str(device).strip()
    entries = [entry.strip() for entry in text.split(",")]
    listed = len(entries) > 1
    for entry in entries:
        number = entry[5:] if entry.startswith("cuda:") else None
        indexed = number is not None and number.isascii() and number.isdigit()
        if not (entry == "cpu" or indexed or (not listed and entry in ("auto", "cuda"))):
            if listed:
                raise AuditModelError(f"device {text!r} has the entry {entry!r}, which is not a device: "
                                      "expected cpu or cuda:N in a comma-separated list")
            raise AuditModelError(f"device {text!r} is not valid: expected auto, cpu, cuda, cuda:N "
                                  "or a comma-separated list of cpu / cuda:N")
        if (indexed or entry == "cuda") and cuda_count == 0:
            raise AuditModelError(f"device {text!r} asks for {entry!r}, but CUDA is not available here: "
                                  "expected cpu or auto")
        if indexed and int(number) >= cuda_count:
            raise AuditModelError(f"device {text!r} asks for {entry!r}, but only {cuda_count} CUDA device(s) "
                                  f"exist here: expected cuda:0 to cuda:{cuda_count - 1}")
    # worker i of xdist is "gw<i>"; anything else (no xdist, the controller) takes the first choice
    suffix = worker_id[2:] if worker_id and worker_id.startswith("gw") else ""
    worker = int(suffix) if suffix.isascii() and suffix.isdigit() else None
    if listed:
        return entries[0 if worker is None else worker % len(entries)]
    if entries[0] == "auto":
        if cuda_count == 0:
            return "cpu"
        entries[0] = "cuda"
    if entries[0] == "cuda" and worker is not None:
        return f"cuda:{worker % cuda_count}"
    return entries[0]


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


class Subject:
    """A model under audit: device, eval mode, normalisation, layers, hooks, batched forward."""

    def __init__(self, spec: ModelSpec, device: str | torch.device | None = "auto", batch_size: int = 64,
                 memory: int | None = None):
        if batch_size < 1:
            raise AuditModelError(f"model {spec.name!r}: batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.device = resolve_device(device)
        self.batch_size = batch_size
        # results of clean forwards, reused by every check (auditkit.cache); `memory` bytes, None: the default
        self.cache = ResultCache(parse_memory(None) if memory is None else memory)
        self.progress = None  # a progress sink (auditkit.progress); Check.execute then tracks each check
        self.tracker = None  # the running check's progress.Tracker, which chunks() and the optimiser update
        self._state: _ModuleState | None = None
        self._backward_cost: int | None = None  # measured once per open (backward_cost)
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._views: dict[tuple, LayerView] = {}  # how each layer's output reads as a grid (layer_view)
        self._patch: int | None = None  # the model's patch size, 0 for none (layers.patch_size), found once
        self._probing = False  # True during the layer probe: the hooks of forward_hook stay quiet
        self._layers: tuple[str, ...] | None = None
        self._map_layer: str | None = None  # map_layer(), found once
        self._dtype: torch.dtype | None = None  # dtype, read once per open (it is asked on every forward)
        if spec.layers is not None:
            self._layers = tuple(self._own_name(layer) for layer in spec.layers)
            names = dict(self.module.named_modules())
            for layer in self._layers:
                if layer not in names:
                    raise AuditModelError(self._unknown_layer_message(layer))

    # -- lifecycle -------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The module audited: spec.module, unwrapped from DataParallel / DDP / torch.compile (layers.unwrap)."""
        return unwrap(self.spec.module)

    @property
    def layers(self) -> tuple[str, ...]:
        """The depth-wise layers, shallow to deep: spec.layers, else found by layers.discover_layers in one
        forward of a grey image (made once, opening the Subject for it when closed)."""
        if self._layers is None:
            self.require_hooks("finding its layers")
            with self._opened():
                found = discover_layers(self.module, self._probe_forward, self.spec.input_size)
            self._layers = tuple(found)
        return self._layers

    def map_layer(self) -> str | None:
        """Grad-CAM's default layer: the deepest named layer whose output, read as a grid (layer_view), has
        more than one position (a 1 x 1 map is the same everywhere: at 32 px resnet's layer4), else the
        deepest named layer; None without layers. Found once, by one forward of a grey image."""
        if not self.layers:
            return None
        if self._map_layer is None:
            positions: dict[str, int] = {}
            with contextlib.ExitStack() as stack:
                for name in self.layers:
                    def hook(_m, _i, out, name=name) -> None:
                        grid = self.layer_view(name, out).grid(out)
                        if isinstance(grid, torch.Tensor) and grid.ndim == 4:
                            positions.setdefault(name, grid.shape[2] * grid.shape[3])
                    handle = self.layer(name).register_forward_hook(hook)
                    stack.callback(handle.remove)
                with self._opened():
                    self._probe_forward()
            self._map_layer = next((n for n in reversed(self.layers) if positions.get(n, 0) > 1), self.layers[-1])
        return self._map_layer

    @property
    def scripted(self) -> bool:
        """Is the audited module TorchScript (scripted or traced)? Its submodules cannot be hooked."""
        return isinstance(self.module, torch.jit.ScriptModule)

    def require_hooks(self, what: str) -> None:
        """NotApplicable (naming the model and `what`) when the module cannot be hooked (TorchScript)."""
        if self.scripted:
            raise NotApplicable(
                f"model {self.name!r} is TorchScript ({type(self.module).__name__}), whose submodules take no "
                f"hooks, so {what} cannot be done; checks that need only the model's output and its pixel "
                "gradient run (occlusion-drop; saliency-in-box, saliency-sanity and deletion-insertion with the "
                "pixel gradient, which method = 'auto' picks); "
                "audit the eager nn.Module for the others")

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype (its first floating parameter or buffer; float32 when it has none):
        the Subject feeds it pixels of that dtype and reads every output back as float32. Read once per open
        (and again after restore() had to put something back)."""
        if self._dtype is None:
            tensors = [*self.module.parameters(), *self.module.buffers()]
            self._dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
        return self._dtype

    def _own_name(self, layer: str) -> str:
        """A layer name relative to the audited module: a wrapper's prefix ("module.", "_orig_mod.") dropped."""
        if self.module is not self.spec.module and layer not in dict(self.module.named_modules()):
            for prefix in ("module.", "_orig_mod."):
                while layer.startswith(prefix):
                    layer = layer[len(prefix):]
        return layer

    @contextlib.contextmanager
    def _opened(self) -> Iterator[None]:
        """The Subject open for the block: as it was when already open, else opened and closed again."""
        if self.is_open:
            yield
            return
        self.open()
        try:
            yield
        finally:
            self.close()

    def _probe_forward(self) -> object:
        """One forward of a grey image at the input size, no grad; what the module returned."""
        image = torch.full((1, len(self.spec.mean), *self.spec.input_size), 0.5, device=self.device)
        self._probing = True
        try:
            with torch.no_grad():
                return self.module(self.normalise(image).to(self.dtype))
        finally:
            self._probing = False

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
        if done:  # kept results were computed by a model that may have differed from the audit state
            self._dtype = None
            self.cache.clear()
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
                if (entries[key] if key in entries else None) is not v.ref:  # TorchScript's tables have no get
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
        self.cache.clear()
        self._backward_cost = None
        self._dtype = None
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

    def _check_output(self, out: torch.Tensor, n: int) -> torch.Tensor:
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
        """Logits for one batch as float32, autograd as the caller's context allows (no chunking). The
        model gets (pixels - mean) / std in its own dtype (Subject.dtype); its output goes through
        spec.output (ModelSpec.select_output)."""
        self._require_open()
        self._check_input(pixels)
        pixels = pixels.to(self.device, torch.float32)
        out = self.spec.select_output(self.module(self.normalise(pixels).to(self.dtype)))
        return self._check_output(out, pixels.shape[0]).float()

    # -- batching: the one chunk loop, with the out-of-memory fallback ------------------
    def chunks(self, total: int, work: Callable[[slice], T], *, cost: int = 1) -> Iterator[T]:
        """Yield work(rows) for consecutive slices `rows` covering range(total), in order.

        This is the Subject's one batching loop: every method goes through it. A chunk has at most
        max(1, batch_size // cost) rows, `cost` being the model rows one row makes (SmoothGrad's samples
        per image). Out of memory inside work (CUDA's OutOfMemoryError, or an allocator's RuntimeError)
        halves batch_size until a chunk is smaller than the one that failed (later calls keep it) and
        retries the same rows; out of memory with a
        chunk of one row is an AuditModelError. A retried work must give the same result: it returns its
        result or writes it into the rows it owns, and never accumulates before it returns.
        """
        if cost < 1:
            raise ValueError(f"cost must be >= 1 model row per row, got {cost}")
        self._require_open()
        start = 0
        while start < total:
            rows = slice(start, min(start + max(1, self.batch_size // cost), total))
            try:
                result = work(rows)
            except Exception as exc:  # noqa: BLE001 - re-raised unless it is an out-of-memory
                if not is_out_of_memory(exc):
                    raise
                failed = rows.stop - rows.start
            else:
                report(self, "inputs", rows.stop, total)
                yield result
                start = rows.stop
                continue
            self._shrink_batch(failed, cost)  # outside the except block: the failed chunk's tensors are freed

    def _shrink_batch(self, rows: int, cost: int) -> None:
        if rows <= 1:
            raise AuditModelError(f"model {self.name!r}: out of memory on {self.device} with a chunk of one image; "
                                  "audit on a device with more memory, or at a smaller input size")
        size = self.batch_size
        while size > 1 and max(1, size // cost) >= rows:  # halve until the next chunk is smaller than the one that failed
            size //= 2
        self.batch_size = size
        log.warning("auditkit: out of memory on %s, batch size now %d", self.device, self.batch_size)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits for any number of images (pixels in [0, 1]), N x classes float32 on the CPU, in chunks;
        kept (Subject.remembered), so the same images are not run twice."""
        return self.remembered(("logits",), pixels, lambda: self.predict_rows(pixels.shape[0], lambda rows: pixels[rows]))

    # -- results kept for reuse --------------------------------------------------
    def remembered(self, what: tuple, pixels: torch.Tensor, compute: Callable[[], T]) -> T:
        """compute(), or the result kept from an earlier call with the same `what` on the same pixels
        (by content, auditkit.cache), within the Subject's memory budget. Kept only while the model is as
        open() left it: open, in eval mode, no hook added, no parameter edited in place; restore() drops
        everything when it had to put something back. The result is shared: do not change it in place."""
        token = self._cache_token(pixels)
        if token is None:
            return compute()
        key = (what, token)
        kept = self.cache.get(key)
        if kept is not None:
            return kept
        value = compute()
        self.cache.put(key, value)
        return value

    def keep(self, what: tuple, pixels: torch.Tensor, value: object) -> None:
        """Keep `value` as remembered() would have for (what, pixels): a result that came for free with
        another (the logits of a feature sweep)."""
        token = self._cache_token(pixels)
        if token is not None:
            self.cache.put((what, token), value)

    def _cache_token(self, pixels: torch.Tensor) -> tuple | None:
        state = self._state
        if state is None or self.cache.budget == 0:
            return None
        module = self.module
        if any(m.training for m in module.modules()) or _hook_keys(module) != state.hooks:
            return None
        digest = content_digest(pixels)
        if digest is None:
            return None
        return digest, tuple(p._version for p in module.parameters())

    @torch.no_grad()
    def predict_rows(self, total: int, build: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """Logits of `total` images made chunk by chunk by build(rows) (perturbed images are never all
        built at once): total x classes float32 on the CPU."""
        outs = list(self.chunks(total, lambda rows: self.forward(build(rows)).float().cpu()))
        return torch.cat(outs) if outs else torch.empty(0, self.spec.num_classes)

    def gradients(self, total: int, build: Callable[[slice], torch.Tensor], objective: Objective, *,
                  cost: int = 1) -> Iterator[tuple[slice, torch.Tensor, object]]:
        """The Subject's one chunked forward + backward.

        A chunk holds batch_size // (cost * backward_cost()) rows, so that it holds about the memory of a
        plain forward of batch_size rows: the backward keeps every activation.
        For each chunk of rows: x = build(rows) (pixels) as a leaf that requires grad, on the device;
        v = objective(x, rows) with autograd on: one value per model row, or a dict of such tensors whose
        "total" is the one differentiated. Yields (rows, d sum(v) / d x on the device, v detached). In
        eval mode the model's rows are independent, so row i's gradient is d v_i / d x_i alone.
        """
        return self.chunks(total, lambda rows: (rows, *value_and_gradient(objective, build(rows), rows, self.device)),
                           cost=cost * self.backward_cost())

    def backward_cost(self) -> int:
        """How many rows of a plain (no-grad) forward one row of a forward + backward weighs in memory:
        ceil((S + P) / P), with S the bytes autograd saves for the backward of one image (the model's
        parameters and buffers left out: they are not per row) and P the largest input + output of one leaf
        module for one image (what a no-grad forward holds at once; the backward's transient gradients
        are about as large), between 1 and MAX_BACKWARD_COST. Measured once per open Subject, on one grey
        image (two forwards of one row; hooks removed after); BACKWARD_COST, with a warning naming the
        model and the reason, where that probe cannot run (a leaf module that refuses hooks, a model that
        fails on one image). At 224 px: resnet18 S = 21.2 MB, P = 6.1 MB, cost 5 (a chunk of 12 at
        batch_size 64); resnet50 S = 81.9 MB, cost 15 (a chunk of 4)."""
        if self._backward_cost is None:
            self._require_open()
            if self.scripted:  # the probe hooks leaf modules, which TorchScript refuses
                self._backward_cost = BACKWARD_COST
                return self._backward_cost
            try:
                self._backward_cost = _measure_backward_cost(self)
            except (RuntimeError, ValueError, TypeError, AuditModelError) as exc:
                log.warning("auditkit: model %r: the forward + backward memory probe failed (%s); backward "
                            "chunks are batch_size // %d", self.name, exc, BACKWARD_COST)
                self._backward_cost = BACKWARD_COST
        return self._backward_cost

    def target_logits(self, targets: torch.Tensor) -> Objective:
        """The objective (x, rows) -> f_t(x): the logit of targets[rows] for each image, through this Subject."""
        targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)

        def objective(x: torch.Tensor, rows: slice) -> torch.Tensor:
            return self.forward(x).gather(1, targets[rows].to(x.device).view(-1, 1)).squeeze(1)
        return objective

    # -- copies ------------------------------------------------------------
    def derived(self, module: nn.Module) -> "Subject":
        """A Subject for another module (a randomised or stripped copy of this one): the same spec otherwise,
        layers, device, batch size and memory budget (its own, empty cache). Use it as a context manager,
        like any Subject."""
        layers = self._layers if self._layers is not None else (() if self.scripted else self.layers)
        spec = dataclasses.replace(self.spec, module=module, layers=list(layers))
        other = Subject(spec, device=self.device, batch_size=self.batch_size, memory=self.cache.budget)
        other.tracker = self.tracker  # its work is the running check's
        return other

    def randomised(self, seed: int = 0) -> "Subject":
        """derived() on a copy of the module with every parameter layer re-initialised
        (methods.randomisation.random_copy); the user's module is not touched."""
        from auditkit.methods.randomisation import random_copy

        return self.derived(random_copy(self.module, seed))

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """softmax(logits), N x classes, on the CPU."""
        return torch.softmax(self.predict(pixels), dim=1)

    def class_probability(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p(label_i | x_i) for each image, N floats on the CPU."""
        probs = self.probabilities(pixels)
        return probs.gather(1, labels.view(-1, 1).cpu()).squeeze(1)

    # -- layers and hooks ------------------------------------------------
    def _unknown_layer_message(self, layer: str) -> str:
        names = [n for n, _ in self.spec.module.named_modules() if n]
        shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
        return f"model {self.spec.name!r} has no layer {layer!r}; available layers: {shown}; {NAME_LAYERS_HINT}"

    def layer(self, name: str) -> nn.Module:
        """The submodule called `name` (as in named_modules()); unknown names list the valid ones."""
        modules = dict(self.module.named_modules())
        name = self._own_name(name)
        if name not in modules:
            raise AuditModelError(self._unknown_layer_message(name))
        return modules[name]

    def layer_view(self, name: str, out: object) -> LayerView:
        """How `out`, an output of layer `name`, reads as N x C x h x w float32 (layers.view_of at the
        input size: tokens folded into their grid, channels-last transposed, a tuple's first tensor);
        decided once per layer and output shape."""
        t = first_tensor(out)
        key = (name, None if t is None else tuple(t.shape[1:]))
        if key not in self._views:
            if self._patch is None:
                self._patch = patch_size(self.module) or 0
            self._views[key] = view_of(out, self.spec.input_size, self._patch or None)
        return self._views[key]

    @contextlib.contextmanager
    def forward_hook(self, layer: str, fn: Callable[[nn.Module, tuple, object], object], *,
                     raw: bool = False) -> Iterator[None]:
        """Call fn(module, inputs, output) after each forward of `layer` inside the block; always removed.

        `output` is the layer's output as layer_view reads it (N x C x h x w float32 for a feature map,
        tokens or channels-last; the output itself when it holds no tensor); such a hook must return None
        (TypeError otherwise: the view cannot stand for the output). With raw=True, fn gets the output as
        the module returned it and may replace it by returning a value, as with register_forward_hook.
        """
        self.require_hooks(f"reading layer {layer!r}")
        module = self.layer(layer)

        def hook(m: nn.Module, inputs: tuple, out: object) -> object:
            if self._probing:
                return None
            if raw:
                return fn(m, inputs, out)  # a raw hook may replace the output, as torch's own do
            if fn(m, inputs, self.layer_view(layer, out).grid(out)) is not None:
                raise TypeError(f"a forward_hook on layer {layer!r} returned a value: a hook given the grid "
                                "view cannot replace the layer's output; use raw=True to replace it")
            return None
        handle = module.register_forward_hook(hook)
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
        with contextlib.ExitStack() as stack:
            for name in layers:
                def hook(_m: nn.Module, _inp: tuple, out: object, name: str = name) -> None:
                    if isinstance(out, torch.Tensor):
                        captured[name] = out.detach() if detach else out
                stack.enter_context(self.forward_hook(name, hook))
            yield captured

    def describe(self) -> dict[str, object]:
        """Name, version, device, dtype and layers (with how each is read, where not N x C x h x w), for the
        report header."""
        try:
            layers = list(self.layers)
        except Exception:  # noqa: BLE001 - the header must not fail a run: a model its probe cannot run
            layers = []
        read = {name: view.describe() for (name, _), view in self._views.items()
                if view.kind != "grid" and name in layers}
        out = {"name": self.spec.name, "version": self.spec.version, "device": str(self.device),
               "dtype": str(self.dtype).replace("torch.", ""), "layers": layers,
               "classes": list(self.spec.class_names)}
        if read:
            out["layers_read_as"] = read
        if self.module is not self.spec.module:
            out["audited_through"] = type(self.module).__name__ + " inside " + type(self.spec.module).__name__
        if self.scripted:
            out["torchscript"] = True
        return out


def _measure_backward_cost(subject: "Subject") -> int:
    """Subject.backward_cost's probe: S and P for one grey image, ceil((S + P) / P) clamped."""
    module = subject.module
    image = torch.full((1, len(subject.spec.mean), *subject.spec.input_size), 0.5, device=subject.device)
    shared = {t.data_ptr() for t in [*module.parameters(), *module.buffers()]}
    largest = [0]

    def nbytes(t: object) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    def leaf_hook(_m: nn.Module, inputs: tuple, out: object) -> None:
        largest[0] = max(largest[0], sum(nbytes(t) for t in inputs) + nbytes(out))

    leaves = [name for name, m in module.named_modules() if name and next(m.children(), None) is None]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for name in leaves:
            stack.enter_context(subject.forward_hook(name, leaf_hook, raw=True))
        subject.forward(image)
    if largest[0] == 0:
        raise ValueError("no leaf module reported a tensor input or output")
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in shared:  # one storage saved twice (a view, or by two ops) counts once
            saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), nbytes(t))
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        subject.forward(image.clone().requires_grad_(True))
    cost = math.ceil((sum(saved.values()) + largest[0]) / largest[0])
    return max(1, min(MAX_BACKWARD_COST, cost))
