"""Layers of any vision model: which ones a depth-wise check uses, and how their outputs read as grids.

Discovery (discover_layers) follows one forward pass of a grey image, so it only ever picks modules
that run: a ModuleList or ModuleDict that the parent iterates (never called itself) stands for the
children it holds that ran. From the root it descends into the one child that holds nearly all the
weights (>= DESCEND_SHARE of the convolution, linear and attention parameters of the children that
output a feature map), or into the one child that is a stage (two or more such children of its own, or
through a chain of single ones) beside children that are not, as in a ViT's encoder, torchvision's `features` or RegNet's trunk, then takes
that module's children that output a feature map and hold weights, in the order they ran (resnet: conv1,
layer1 .. layer4; ViT: the encoder blocks; Hugging Face ViT: encoder.layer.0 ..). Between two stages
(children with two or more such children of their own) a module that is not a stage is dropped: the
downsampling between ConvNeXt, Swin or DenseNet stages.

A layer's output reads as N x C x h x w float32 (LayerView.grid): a 4-d output is channels-first
unless its last two dimensions cannot be the grid and its middle two can (Swin's N x h x w x C); a
3-d output N x L x C of tokens drops its first `prefix` tokens (class, distillation and register
tokens) and folds the rest into the h x w grid that the model's patch size gives at the input size
(h = H / p / 2^k for the k-th halving, as Swin's patch merging does); a tuple or list gives its first
tensor, a Hugging Face output its first tensor too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

#: Descend into a child holding at least this share of the weights of the children that output features.
DESCEND_SHARE = 0.9
#: At most this many leading tokens (class, distillation, register tokens) are dropped before the grid.
MAX_PREFIX_TOKENS = 16
#: How to name layers by hand; every error about a layer ends with it.
NAME_LAYERS_HINT = ("name the layers by hand with ModelSpec(layers=[...]), names as in "
                    "model.named_modules(), shallow to deep")


def first_tensor(out: object) -> torch.Tensor | None:
    """The tensor a module output stands for: itself, the first tensor of a tuple / list, or the first
    tensor value of a mapping (a Hugging Face ModelOutput); None when it holds no tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        values: Iterable = out
    elif isinstance(out, dict) or hasattr(out, "values") and hasattr(out, "keys"):
        values = out.values()
    else:
        return None
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


def _is_grid(h: int, w: int, size: tuple[int, int]) -> bool:
    """Can h x w be a feature grid of an input of `size` = (H, W): the input's aspect exactly, or one
    integer stride s with h the floor or ceiling of H / s and w that of W / s (a padded map, such as
    Swin's 13 x 14 at 200 x 224, rounds up)?"""
    height, width = size
    if not (1 <= h <= height and 1 <= w <= width):
        return False
    if h * width == w * height:  # the input's own aspect (a square map of a square input, whatever its size)
        return True
    low, high = height // (h + 1), (height // (h - 1) + 1) if h > 1 else max(height, width)
    for s in range(max(1, low), high + 1):
        if h in (height // s, -(-height // s)) and w in (width // s, -(-width // s)):
            return True
    return False


def patch_size(module: nn.Module) -> int | None:
    """The patch size of a transformer: the kernel of its first convolution whose stride equals its
    kernel (the patch embedding), None when it has none."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            kernel, stride = tuple(m.kernel_size), tuple(m.stride)
            if kernel == stride and kernel[0] == kernel[1] and kernel[0] > 1:
                return int(kernel[0])
            return None  # the first convolution is no patch embedding
    return None


def token_grid(tokens: int, size: tuple[int, int], patch: int | None) -> tuple[int, int, int] | None:
    """(prefix, h, w) for `tokens` tokens of an input of `size`: the grid the patch size gives, halved
    k times (h = H / (patch 2^k), rounded down or up: a padded stage rounds up), with prefix = tokens - h w
    leading tokens in [0, MAX_PREFIX_TOKENS], the fewest at the first k whose grid fits; without a patch
    size, the input's grid (as _is_grid) with the fewest leading tokens. None: no grid fits."""
    height, width = size
    if patch:
        stride = patch
        while stride <= max(height, width):
            grids = {(height // stride, width // stride), (-(-height // stride), -(-width // stride))}
            fits = sorted((tokens - h * w, h, w) for h, w in grids if h >= 1 and w >= 1 and h * w <= tokens)
            if fits:
                prefix, h, w = fits[0]
                return (prefix, h, w) if prefix <= MAX_PREFIX_TOKENS else None
            stride *= 2
    for prefix in range(0, min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        n = tokens - prefix
        for h in range(1, n + 1):
            if n % h == 0 and _is_grid(h, n // h, size):
                return prefix, h, n // h
    return None


@dataclass(frozen=True)
class LayerView:
    """How one layer's output reads as N x C x h x w: kind "grid" (channels first), "channels_last"
    (N x h x w x C), "tokens" (N x L x C with `prefix` leading tokens dropped) or "as_is" (any other
    tensor: N x C vectors, a 1-d sequence), at the model's input `size`."""

    kind: str
    size: tuple[int, int]
    prefix: int = 0
    grid_size: tuple[int, int] | None = None  # tokens: the (h, w) the leading-dropped tokens fold into

    def grid(self, out: object) -> object:
        """The output as N x C x h x w (autograd kept), half and bfloat16 read as float32; the output
        unchanged when it holds no tensor."""
        t = first_tensor(out)
        if t is None:
            return out
        if t.is_floating_point() and t.element_size() < 4:
            t = t.float()
        if self.kind == "channels_last" and t.ndim == 4:
            return t.permute(0, 3, 1, 2)
        if self.kind == "tokens" and t.ndim == 3 and self.grid_size is not None:
            h, w = self.grid_size
            if t.shape[1] - self.prefix == h * w:
                return t[:, self.prefix:, :].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
        return t

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"tokens ({self.prefix} leading dropped)" if self.prefix else "tokens"
        return {"grid": "N x C x h x w", "channels_last": "N x h x w x C"}.get(self.kind, "as returned")


def view_of(out: object, size: tuple[int, int], patch: int | None) -> LayerView:
    """The LayerView of one output seen on an input of `size` (see the module docstring)."""
    t = first_tensor(out)
    if t is not None and t.ndim == 4:
        if not _is_grid(t.shape[2], t.shape[3], size) and _is_grid(t.shape[1], t.shape[2], size):
            return LayerView("channels_last", size)
        return LayerView("grid", size)
    if t is not None and t.ndim == 3:
        fit = token_grid(int(t.shape[1]), size, patch)
        if fit is not None and fit[1] * fit[2] > 1:
            return LayerView("tokens", size, prefix=fit[0], grid_size=(fit[1], fit[2]))
    return LayerView("as_is", size)


# -- discovery --------------------------------------------------------------------------------
_ATTENTION = (nn.MultiheadAttention,)


def _weight(module: nn.Module) -> int:
    """Parameters of the convolutions, linear maps and attention modules inside `module`."""
    total = 0
    for m in module.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear) + _ATTENTION):
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


@dataclass
class _Seen:
    order: int
    features: bool  # its output is a feature map (N x C x h x w, channels-last) or tokens


def _record_forward(module: nn.Module, run: Callable[[], object], size: tuple[int, int],
                    patch: int | None) -> dict[str, _Seen]:
    """name -> (order of first call, does it output features) for every submodule that ran in run()."""
    seen: dict[str, _Seen] = {}
    handles = []

    def hook_for(name: str):
        def hook(_m, _inputs, out) -> None:
            if name not in seen:
                # a grid of any size counts (a deep stage is 1 x 1 at a small input; pooling holds no weights)
                seen[name] = _Seen(len(seen), view_of(out, size, patch).kind != "as_is")
        return hook

    try:
        for name, sub in module.named_modules():
            if name:
                handles.append(sub.register_forward_hook(hook_for(name)))
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def discover_layers(module: nn.Module, run: Callable[[], object], size: tuple[int, int]) -> list[str]:
    """The depth-wise layers of `module`, shallow to deep, found in the one forward run() makes (see the
    module docstring); [] when no module that ran outputs a feature map."""
    seen = _record_forward(module, run, size, patch_size(module))
    modules = dict(module.named_modules())

    def ran_children(name: str) -> list[str]:
        out = []
        for child, sub in modules[name].named_children():
            full = f"{name}.{child}" if name else child
            if full in seen:
                out.append(full)
            elif any(True for _ in sub.children()):  # a container the parent iterates
                out += ran_children(full)
        return sorted(out, key=lambda n: seen[n].order)

    def feature_children(name: str) -> list[str]:
        return [c for c in ran_children(name) if seen[c].features and _weight(modules[c]) > 0]

    def is_stage(name: str) -> bool:  # two or more feature children, through a chain of single ones
        kids = feature_children(name)
        while len(kids) == 1:
            kids = feature_children(kids[0])
        return len(kids) >= 2

    node = ""
    while True:
        kids = feature_children(node)
        if not kids:
            return []
        heaviest = max(kids, key=lambda n: _weight(modules[n]))
        stages = [i for i, k in enumerate(kids) if is_stage(k)]
        holds_most = _weight(modules[heaviest]) >= DESCEND_SHARE * sum(_weight(modules[k]) for k in kids)
        if (holds_most or [kids[i] for i in stages] == [heaviest]) and feature_children(heaviest):
            node = heaviest
            continue
        break
    if len(stages) >= 2:  # drop what lies between two stages and is no stage (downsampling)
        between = set(range(stages[0] + 1, stages[-1])) - set(stages)
        kids = [k for i, k in enumerate(kids) if i not in between]
    return kids


def unwrap(module: nn.Module) -> nn.Module:
    """The module a wrapper runs: DataParallel / DistributedDataParallel's .module, torch.compile's
    _orig_mod (audited eagerly, so hooks and gradients work); any other module as it is."""
    while True:
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module
