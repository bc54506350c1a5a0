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

__all__ = ["parameter_layers", "reinitialise", "cascade", "spearman", "spearman_rows"]


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


def cascade(module: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Cascading randomisation of a deep copy of `module`, from the top (output) layer down.

    Yields (name of the layer just re-initialised, the copy in that state), one
    step per entry of parameter_layers(module), in reverse order: step k has the
    top k+1 parameter layers randomised. The SAME copy object is yielded each
    time, changed in place; `module` itself is never changed. The per-step
    seeds are drawn from a torch.Generator seeded with `seed` (large numbers,
    so they do not coincide with the small seeds a model was built with), so
    a run is reproducible.
    """
    names = parameter_layers(module)
    clone = copy_without_hooks(module)
    layers = dict(clone.named_modules())
    seeds = torch.randint(2**62, (len(names),), generator=torch.Generator().manual_seed(seed)).tolist()
    for step_seed, name in zip(seeds, reversed(names)):
        reinitialise(layers[name], int(step_seed))
        yield name, clone


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
