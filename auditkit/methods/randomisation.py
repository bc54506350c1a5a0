"""Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

An explanation that still looks the same after the model's weights were
replaced by random ones does not explain the model. `cascade` re-initialises
the layers of a COPY of the module from the output layer down, one layer per
step and cumulatively; `spearman` / `spearman_rows` compare maps by rank.

Spearman's rho here is the Pearson correlation of the ranks, with ranks from
argsort(argsort(x)): tied values get distinct (order-of-appearance) ranks, not
the average rank that scipy.stats.spearmanr gives them. Without ties the two
agree; saliency maps are real-valued so ties are rare, except in flat regions
(e.g. the zeros of a ReLU'd Grad-CAM), where this version is slightly noisier.
A constant map has no ranking to compare: its correlation is NaN. "Constant" is up to rounding
(numerics.constant_rows: max - min <= rtol * max |value|), so a map whose spread is float rounding
(relative 1e-7) is not ranked by its noise.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from auditkit.methods.numerics import constant_rows
from auditkit.subject import copy_without_hooks

__all__ = ["parameter_layers", "cascade_blocks", "reinitialise", "cascade", "spearman", "spearman_rows"]


def parameter_layers(module: nn.Module) -> list[str]:
    """Names (as in named_modules()) of the modules that own parameters directly, in registration order.

    Convolutions, linear layers, normalisation layers... A container whose
    parameters all live in its children is not listed; a module holding a bare
    nn.Parameter of its own is ("" for the root module itself).
    """
    return [name for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


def reinitialise(layer: nn.Module, seed: int = 0) -> None:
    """Re-initialise the parameters (and running statistics) of one layer, in place, deterministically.

    Uses the layer's own `reset_parameters()` where it has one (batch-norm's
    also resets the running statistics and the affine weight / bias to 1 / 0),
    else draws every directly-owned parameter from N(0, 0.01^2). The global
    random state is forked, so the caller's RNG streams are left as they were.
    """
    devices = sorted({p.device.index or 0 for p in layer.parameters(recurse=False) if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(layer, "reset_running_stats"):
            layer.reset_running_stats()
        if callable(getattr(layer, "reset_parameters", None)):
            layer.reset_parameters()
        else:
            for p in layer.parameters(recurse=False):
                p.normal_(0.0, 0.01)


def _runs(names: list[str], depth: int) -> list[tuple[str, list[str]]]:
    """Consecutive runs of `names` with equal first `depth` name components: (that prefix, the names)."""
    out: list[tuple[str, list[str]]] = []
    for name in names:
        key = ".".join(name.split(".")[:depth])
        if out and out[-1][0] == key:
            out[-1][1].append(name)
        else:
            out.append((key, [name]))
    return out


def _finer(members: list[str], depth: int) -> tuple[list[tuple[str, list[str]]], int] | None:
    """The runs of a block's members at the next depth that splits them, with that depth; None if none does."""
    deepest = max(len(n.split(".")) for n in members)
    for d in range(depth + 1, deepest + 1):
        runs = _runs(members, d)
        if len(runs) > 1:
            return runs, d
    return None


def _merged(runs: list[tuple[str, list[str]]], count: int) -> list[tuple[str, list[str]]]:
    """Consecutive runs merged into `count` groups of near-equal numbers of runs, each named by its first run."""
    bounds = [round(k * len(runs) / count) for k in range(count + 1)]
    return [(runs[a][0], [n for _, members in runs[a:b] for n in members]) for a, b in zip(bounds, bounds[1:])]


def cascade_blocks(module: nn.Module, max_steps: int = 0) -> list[tuple[str, list[str]]]:
    """parameter_layers(module) in registration order, grouped into at most `max_steps` contiguous blocks:
    (block name, its layers). 0, or no more layers than steps: one block per layer.

    Otherwise blocks follow the module tree: start from the runs of equal first name components (conv1,
    layer1, ..., fc); split the block holding the most layers into its children's runs while the count
    stays <= max_steps, and stop at the first split that does not fit. If that leaves fewer than
    2/3 max_steps blocks (one child holding most of the model, as a ViT's encoder.layers), that block's
    children are merged into the steps left. torchvision's resnet18 (41 layers) gives 11 blocks: conv1,
    bn1, layer1.0 ... layer4.1, fc. A block is named by its prefix (for a merged one, its first, lowest
    child's), so "randomised down to X" means X and everything above it; "" is the root's own.
    """
    names = parameter_layers(module)
    if max_steps <= 0 or len(names) <= max_steps:
        return [(name, [name]) for name in names]
    blocks = [(key, members, 1) for key, members in _runs(names, 1)]
    if len(blocks) > max_steps:  # a flat Sequential: consecutive layers merged
        return _merged([(key, members) for key, members, _ in blocks], max_steps)
    while True:
        splittable = [(len(b[1]), -i, i, split) for i, b in enumerate(blocks)
                      if (split := _finer(b[1], b[2])) is not None]
        if not splittable:
            break
        _, _, i, (runs, depth) = max(splittable)
        if len(blocks) - 1 + len(runs) <= max_steps:
            blocks[i:i + 1] = [(key, members, depth) for key, members in runs]
            continue
        left = max_steps - len(blocks) + 1
        if len(blocks) < 2 * max_steps / 3 and left >= 2:
            blocks[i:i + 1] = [(key, members, depth) for key, members in _merged(runs, left)]
        break
    return [(key, members) for key, members, _ in blocks]


def cascade(module: nn.Module, seed: int = 0, max_steps: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Cascading randomisation of a deep copy of `module`, from the top (output) layer down.

    Yields (name of the block just re-initialised, the copy in that state), one step per block of
    cascade_blocks(module, max_steps) (default: one per parameter layer), in reverse order: step k has the
    top k+1 blocks randomised. The SAME copy object is yielded each time, changed in place; `module`
    itself is never changed. Each layer's seed is drawn from a torch.Generator seeded with `seed` (large
    numbers, so they do not coincide with the small seeds a model was built with), one per layer whatever
    the blocks, so a run is reproducible and the fully random copy does not depend on `max_steps`.
    """
    names = parameter_layers(module)
    clone = copy_without_hooks(module)
    layers = dict(clone.named_modules())
    seeds = torch.randint(2**62, (len(names),), generator=torch.Generator().manual_seed(seed)).tolist()
    seed_of = dict(zip(reversed(names), seeds))
    for block, members in reversed(cascade_blocks(module, max_steps)):
        for name in reversed(members):
            reinitialise(layers[name], int(seed_of[name]))
        yield block, clone


def random_copy(module: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of `module` with every parameter layer re-initialised: the cascade's last state, in eval mode."""
    clone = module
    for _, clone in cascade(module, seed):
        pass
    return (copy_without_hooks(module) if clone is module else clone).eval()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..D-1 along the last dimension (ties broken by position), float64."""
    return x.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).to(torch.float64)


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho of each row of a (N x ...) with the same row of b: N float64 values.

    Rows are flattened; NaN where either row is constant up to rounding (numerics.constant_rows).
    Ties: see the module docstring.
    """
    a = torch.as_tensor(a).detach().cpu()
    b = torch.as_tensor(b).detach().cpu()
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"spearman_rows: {a.shape[0]} rows against {b.shape[0]}")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"spearman_rows: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    constant = constant_rows(a) | constant_rows(b)
    ra, rb = _ranks(a), _ranks(b)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    rho = (ra * rb).sum(1) / torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return torch.where(constant, torch.full_like(rho, math.nan), rho)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two maps (flattened); NaN when either is constant."""
    a = torch.as_tensor(a).reshape(1, -1)
    b = torch.as_tensor(b).reshape(1, -1)
    return float(spearman_rows(a, b)[0])
