"""Feature inversion (Mahendran & Vedaldi, "Understanding deep image representations by inverting them", 2015).

Given images x0 and a layer l, find x* = argmin_x  E_feat(x) + lambda_alpha * R_alpha(x) + lambda_tv * R_TV(x):

- E_feat(x) = ||f_l(x) - f_l(x0)||^2 / ||f_l(x0)||^2, per image (the paper's normalised loss);
- R_alpha(x) = mean |x - 0.5|^alpha, the alpha-norm of the (centred) image;
- R_TV(x) = mean over pixels of (dx^2 + dy^2)^(beta / 2), the total variation of order beta.

Two errors of the result, per image i of the N inverted together:

- relative error    ||f(x*_i) - f(x0_i)|| / ||f(x0_i)||  (`final_error`);
- normalised error  e_i = ||f(x*_i) - f(x0_i)|| / mean_{j != i} ||f(x0_j) - f(x0_i)||  (`normalised_error`):
  the distance to the target in units of the distance between different images at that layer, so e < 1
  means closer to its own image's features than the average other image is, whatever the layer's scale
  (a layer that maps every image to nearly the same features has a small relative error and says
  little; its normalised error shows it). NaN with fewer than 2 images or a zero spread.

The optimisation is methods.optimise.optimise (x = sigmoid(z) from noise, L-BFGS, or Adam with a cosine
schedule from lr to lr * final_lr_ratio, `steps` as a budget with an early stop once the loss settled
(`plateau`, `window`), optional jitter, NaN detection); this module supplies only the objective.
`invert_layers` inverts several layers at once: with Adam it stacks (layers x images) copies into one
batch, layer-major; with L-BFGS, whose one line search would couple every row's loss, it runs one
optimisation per layer. Either way each forward (in the Subject's chunks) runs layer g's rows only up to
layer g, where its feature term is taken, so a shallow layer's inversion never pays for the deeper layers.
Under jitter the target features stay those of the unshifted x0 (the paper's regulariser).

Pixel validity: x = sigmoid(z) stays in (0, 1), so the alpha-norm only pulls pixels towards grey; it is
kept for fidelity to the paper and weighted lightly.

A layer whose output for x0 is all zeros (||f_l(x0)|| = 0) makes E_feat 0/0: for those images
`zero_norm` is set, the feature term falls back to the unnormalised ||f_l(x) - f_l(x0)||^2, and
`final_error` is NaN; so it is for a layer output constant up to rounding (`constant`,
numerics.constant_rows: any image matches it). Diverged images (non-finite loss or gradient, or features of the final image that
are not finite) also get a NaN `final_error`. Features of the images to invert that are not finite raise
NonFiniteError (numerics.require_finite): there is nothing to invert towards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from auditkit.methods.numerics import constant_rows, require_finite
from auditkit.methods.optimise import forward_to, layer_outputs, optimise

#: Default weights, chosen so that the feature term dominates (it starts near 1 and should fall
#: below ~0.1) while TV keeps reconstructions free of high-frequency noise.
LAMBDA_ALPHA = 1e-3
LAMBDA_TV = 0.05


@dataclass
class InversionResult:
    """Reconstructions (N x C x H x W, pixels in [0, 1], CPU) and the loss curves of one layer's inversion."""

    reconstructions: torch.Tensor
    curves: dict[str, torch.Tensor]  # term -> steps_done x N: "feature", "alpha", "tv", "total"
    final_error: torch.Tensor  # N: ||f(x*) - f(x0)|| / ||f(x0)|| (NaN where ||f(x0)|| = 0 or diverged)
    normalised_error: torch.Tensor  # N: ||f(x*_i) - f(x0_i)|| / spread_i (NaN where final_error is, or no spread)
    spread: torch.Tensor  # N: mean_{j != i} ||f(x0_j) - f(x0_i)|| (float64; NaN with fewer than 2 images)
    zero_norm: torch.Tensor  # N bool: the layer output for x0 is all zeros
    constant: torch.Tensor  # N bool: the layer output for x0 is constant up to rounding (zeros included)
    diverged: torch.Tensor  # N bool: the loss became NaN / inf
    diverged_step: int | None = None  # the step at which the loop stopped, None if it ran to the end
    steps: int = 0  # steps run
    settled_step: int | None = None  # the step at which every image's loss had settled (optimise's plateau)
    budget: int = 0  # the steps allowed
    layer: str = ""
    params: dict[str, float] = field(default_factory=dict)


def alpha_norm(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per image: mean |x - 0.5|^alpha."""
    return (x - 0.5).abs().pow(alpha).flatten(1).mean(1)


def total_variation(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Per image: mean over pixels (and channels) of (dx^2 + dy^2)^(beta / 2), forward differences
    (the last row and column, which have no forward neighbour, are left out). An image less than 2 pixels
    high or wide has no such pair: 0."""
    if min(x.shape[-2:]) < 2:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    sq = dx * dx + dy * dy
    if beta == 2:
        tv = sq
    else:
        tv = (sq + 1e-12).pow(beta / 2)  # the small offset keeps the gradient finite at 0 for beta < 2
    return tv.flatten(1).mean(1)


def spread_to_others(features: torch.Tensor) -> torch.Tensor:
    """Per row i of N x ... features: mean_{j != i} ||f_j - f_i|| (Euclidean, float64, on features' device),
    the unit of the normalised error; all NaN when N < 2."""
    f = features.detach().flatten(1).double()
    n = f.shape[0]
    if n < 2:
        return torch.full((n,), math.nan, dtype=torch.float64, device=f.device)
    return torch.cdist(f, f).sum(1) / (n - 1)


def normalised(error_norm: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """error_norm / spread per image (float64); NaN where the spread is not > 0 (or NaN)."""
    e = error_norm.double().to(spread.device) / spread
    return torch.where(spread > 0, e, torch.full_like(e, math.nan))


def invert_layers(subject, images: torch.Tensor, layers: Sequence[str], *, steps: int = 150, lr: float = 0.1,
                  final_lr_ratio: float = 0.01, lambda_alpha: float = LAMBDA_ALPHA, alpha: float = 6.0,
                  lambda_tv: float = LAMBDA_TV, beta: float = 2.0, jitter: int = 0,
                  parametrisation: str = "sigmoid", seed: int = 0, plateau: float = 0.0, window: int = 10,
                  optimiser: str = "adam", sample_ids: Sequence[object] | None = None) -> dict[str, InversionResult]:
    """Reconstruct `images` (N x C x H x W pixels in [0, 1]) from the features of each of `layers`.

    All layers and images are optimised together, len(layers) * N images (with L-BFGS, one layer's N at a
    time); see the module doc.
    `plateau` > 0 stops early once every image's loss settled over `window` steps (methods.optimise).
    Returns layer -> InversionResult, in the order of `layers`. Features of `images` that are not finite
    (or whose squared norm overflows) leave nothing to invert towards: NonFiniteError naming the layer and
    the samples (by `sample_ids` when given).
    """
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ValueError("invert_layers needs at least one layer")
    for layer in layers:
        subject.layer(layer)  # unknown layers fail here, listing the valid ones
    device = subject.device
    x0 = images.to(device, torch.float32)
    n, groups = x0.shape[0], len(layers)
    acts = layer_outputs(subject, x0, layers)
    targets = [acts[layer].flatten(1).float() for layer in layers]
    for layer, target in zip(layers, targets):
        require_finite(target, "layer output of the images to invert", method="inversion", layer=layer,
                       sample_ids=sample_ids)
        require_finite(target.pow(2).sum(1), "squared norm of the layer output (overflow)", method="inversion",
                       layer=layer, sample_ids=sample_ids)
    norm2 = torch.stack([t.pow(2).sum(1) for t in targets])  # groups x N
    zero_norm = norm2 == 0
    # a feature map constant up to rounding (numerics.constant_rows) says nothing about the image: any image
    # matches it, so its inversion "converges" trivially; a single number per image is not a map
    constant = torch.stack([constant_rows(t) & (t.shape[1] > 1) for t in targets]) | zero_norm
    denom = torch.where(zero_norm, torch.ones_like(norm2), norm2)

    def objective(x: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        # row r of the batch reconstructs image r % n from layer r // n
        # (rows are layer-major: a chunk holds one layer's rows, or the end and start of two); each
        # layer's rows run forward only to that layer
        parts = []
        for g in range(rows.start // n, (rows.stop - 1) // n + 1):
            lo, hi = max(rows.start, g * n), min(rows.stop, (g + 1) * n)  # this layer's rows of the chunk
            out = forward_to(subject, x[lo - rows.start:hi - rows.start], [layers[g]])[layers[g]]
            diff = out.flatten(1).float() - targets[g][lo - g * n:hi - g * n]
            parts.append(diff.pow(2).sum(1) / denom[g][lo - g * n:hi - g * n])
        feature = torch.cat(parts)  # the layers' rows are consecutive, so in the chunk's order
        a, tv = alpha_norm(x, alpha), total_variation(x, beta)
        return {"feature": feature, "alpha": a, "tv": tv, "total": feature + lambda_alpha * a + lambda_tv * tv}

    settings = dict(steps=steps, lr=lr, final_lr_ratio=final_lr_ratio, jitter=jitter, parametrisation=parametrisation,
                    seed=seed, plateau=plateau, window=window, optimiser=optimiser, device=device, subject=subject)
    per_layer = optimiser == "lbfgs"  # L-BFGS's one line search would couple the layers' losses
    ids = list(sample_ids) if sample_ids is not None else list(range(n))
    if per_layer:
        runs = [optimise(lambda x, rows, g=g: objective(x, slice(rows.start + g * n, rows.stop + g * n)),
                         (n, *x0.shape[1:]), method="inversion", layer=layers[g], row_names=ids, **settings)
                for g in range(groups)]
    else:  # Adam's steps are per coordinate: one run for every layer's rows
        runs = [optimise(objective, (groups * n, *x0.shape[1:]), method="inversion", layer=", ".join(layers),
                         row_names=[f"{i} at {layer}" for layer in layers for i in ids], **settings)] * groups

    def rows_of(g: int) -> slice:  # layer g's rows of its run
        return slice(0, n) if per_layer else slice(g * n, (g + 1) * n)

    recon = [runs[g].images[rows_of(g)] for g in range(groups)]
    diverged = [runs[g].diverged[rows_of(g)].clone() for g in range(groups)]
    diverged_step = [runs[g].diverged_step for g in range(groups)]
    final = {layer: layer_outputs(subject, recon[g].to(device), [layer])[layer] for g, layer in enumerate(layers)}
    params = {"steps": steps, "lr": lr, "final_lr_ratio": final_lr_ratio, "lambda_alpha": lambda_alpha,
              "alpha": alpha, "lambda_tv": lambda_tv, "beta": beta, "jitter": jitter,
              "parametrisation": parametrisation, "seed": seed, "plateau": plateau, "window": window,
              "optimiser": optimiser,
              "evaluations": sum(run.evaluations for run in runs) if per_layer else runs[0].evaluations}
    distances = [(final[layer].flatten(1).float() - targets[g]).norm(dim=1)
                 for g, layer in enumerate(layers)]
    errors = [d / norm2[g].sqrt() for g, d in enumerate(distances)]
    # the last step moved the images after their loss was checked: features that are not finite
    # there diverged at the step after the last one
    for g in range(groups):
        late = ~torch.isfinite(errors[g]).cpu() & ~diverged[g] & ~constant[g].cpu()
        if bool(late.any()):
            diverged[g] = diverged[g] | late
            diverged_step[g] = runs[g].steps if diverged_step[g] is None else diverged_step[g]
    results = {}
    for g, layer in enumerate(layers):
        run, rows = runs[g], rows_of(g)
        err = errors[g]
        bad = constant[g] | diverged[g].to(err.device)
        err = torch.where(bad, torch.full_like(err, math.nan), err)
        spread = spread_to_others(targets[g])
        norm_err = normalised(distances[g], spread)
        norm_err = torch.where(bad.to(norm_err.device), torch.full_like(norm_err, math.nan), norm_err)
        results[layer] = InversionResult(
            reconstructions=recon[g].clone(), curves={k: v[:, rows].clone() for k, v in run.curves.items()},
            final_error=err.float().cpu(), normalised_error=norm_err.cpu(), spread=spread.cpu(),
            zero_norm=zero_norm[g].cpu(), constant=constant[g].cpu(), diverged=diverged[g],
            diverged_step=diverged_step[g], steps=run.steps, settled_step=run.settled_step, budget=steps,
            layer=layer, params=dict(params))
    return results


def invert(subject, images: torch.Tensor, layer: str, **kwargs) -> InversionResult:
    """Reconstruct `images` from the features of one `layer`; keyword arguments as for invert_layers."""
    return invert_layers(subject, images, [layer], **kwargs)[layer]
