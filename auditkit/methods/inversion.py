"""Feature inversion (Mahendran & Vedaldi, "Understanding deep image representations by inverting them", 2015).

Given images x0 and a layer l, find x* = argmin_x  E_feat(x) + lambda_alpha * R_alpha(x) + lambda_tv * R_TV(x):

- E_feat(x) = ||f_l(x) - f_l(x0)||^2 / ||f_l(x0)||^2, per image (the paper's normalised loss);
- R_alpha(x) = mean |x - 0.5|^alpha, the alpha-norm of the (centred) image;
- R_TV(x) = mean over pixels of (dx^2 + dy^2)^(beta / 2), the total variation of order beta.

All images are optimised at once (the loss is summed over the batch, so each image gets its own
gradient). The optimiser is Adam with a cosine learning-rate schedule decaying from `lr` to
`lr / 10` over `steps`, starting from noise.

Pixel validity: instead of clipping, the optimised variable is an unconstrained z with
x = sigmoid(z), so x stays in (0, 1) at every step and gradients never vanish at a clip
boundary. (The alpha-norm then only pulls pixels towards grey; it is kept for fidelity to
the paper and weighted lightly.)

Optional jitter rolls x by a random shift of up to `jitter` pixels in each direction before each
forward (the paper's jitter regulariser); the target features are those of the unshifted x0.

A non-finite loss stops the loop at that step: `diverged` marks the images whose loss was
NaN/inf and `diverged_step` the step. A layer whose output for x0 is all zeros (||f_l(x0)|| = 0)
makes E_feat 0/0: for those images `zero_norm` is set, the feature term falls back to the
unnormalised ||f_l(x) - f_l(x0)||^2, and `final_error` is NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from auditkit.subject import AuditModelError

#: Default weights, chosen so that the feature term dominates (it starts near 1 and should fall
#: below ~0.1) while TV keeps reconstructions free of high-frequency noise.
LAMBDA_ALPHA = 1e-3
LAMBDA_TV = 0.05


@dataclass
class InversionResult:
    """Reconstructions (N x C x H x W, pixels in [0, 1], CPU) and the loss curves of one inversion."""

    reconstructions: torch.Tensor
    curves: dict[str, torch.Tensor]  # term -> steps_done x N: "feature", "alpha", "tv", "total"
    final_error: torch.Tensor  # N: ||f(x*) - f(x0)|| / ||f(x0)|| (NaN where ||f(x0)|| = 0)
    zero_norm: torch.Tensor  # N bool: the layer output for x0 is all zeros
    diverged: torch.Tensor  # N bool: the loss became NaN / inf
    diverged_step: int | None = None  # the step at which the loop stopped, None if it ran to the end
    steps: int = 0  # steps run
    layer: str = ""
    params: dict[str, float] = field(default_factory=dict)


def alpha_norm(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per image: mean |x - 0.5|^alpha."""
    return (x - 0.5).abs().pow(alpha).flatten(1).mean(1)


def total_variation(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Per image: mean over pixels (and channels) of (dx^2 + dy^2)^(beta / 2), forward differences."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    sq = dx * dx + dy * dy
    if beta == 2:
        tv = sq
    else:
        tv = (sq + 1e-12).pow(beta / 2)  # the small offset keeps the gradient finite at 0 for beta < 2
    return tv.flatten(1).mean(1)


def _layer_output(subject, layer: str, pixels: torch.Tensor, detach: bool) -> torch.Tensor:
    """f_layer(pixels), N x ...; a model whose output is non-finite still yields the layer output."""
    with subject.capture([layer], detach=detach) as acts:
        try:
            subject.forward(pixels)
        except AuditModelError as exc:
            if layer not in acts or "NaN" not in str(exc):
                raise
    if layer not in acts:
        raise AuditModelError(f"model {subject.name!r}: layer {layer!r} returned no tensor during forward")
    return acts[layer].flatten(1).float()


def invert(subject, images: torch.Tensor, layer: str, *, steps: int = 200, lr: float = 0.1,
           lambda_alpha: float = LAMBDA_ALPHA, alpha: float = 6.0, lambda_tv: float = LAMBDA_TV,
           beta: float = 2.0, jitter: int = 0, seed: int = 0) -> InversionResult:
    """Reconstruct `images` (N x C x H x W pixels in [0, 1]) from their `layer` features; see the module doc."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    device = subject.device
    x0 = images.to(device, torch.float32)
    n = x0.shape[0]
    with torch.no_grad():
        target = _layer_output(subject, layer, x0, detach=True)
    norm2 = target.pow(2).sum(1)
    zero_norm = norm2 == 0
    denom = torch.where(zero_norm, torch.ones_like(norm2), norm2)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    z0 = 0.5 * torch.randn(x0.shape, generator=gen)
    z = z0.to(device).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 10)

    curves: dict[str, list[torch.Tensor]] = {k: [] for k in ("feature", "alpha", "tv", "total")}
    diverged = torch.zeros(n, dtype=torch.bool)
    diverged_step = None
    done = 0
    with torch.enable_grad():
        if not torch.isfinite(norm2).all():
            diverged = ~torch.isfinite(norm2).cpu()
            diverged_step = 0
        for step in range(steps if diverged_step is None else 0):
            x = torch.sigmoid(z)
            shifted = x
            if jitter:
                dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
                shifted = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            feats = _layer_output(subject, layer, shifted, detach=False)
            feature = (feats - target).pow(2).sum(1) / denom
            a = alpha_norm(x, alpha)
            tv = total_variation(x, beta)
            total = feature + lambda_alpha * a + lambda_tv * tv
            for key, value in (("feature", feature), ("alpha", a), ("tv", tv), ("total", total)):
                curves[key].append(value.detach().float().cpu())
            done = step + 1
            bad = ~torch.isfinite(total.detach()).cpu()
            if bad.any():
                diverged, diverged_step = bad, step
                break
            opt.zero_grad(set_to_none=True)
            total.sum().backward()
            opt.step()
            sched.step()

    with torch.no_grad():
        x_final = torch.sigmoid(z).detach()
        final = _layer_output(subject, layer, x_final, detach=True)
        err = (final - target).norm(dim=1) / norm2.sqrt()
        err = torch.where(zero_norm | diverged.to(err.device), torch.full_like(err, math.nan), err)
    stacked = {k: (torch.stack(v) if v else torch.empty(0, n)) for k, v in curves.items()}
    return InversionResult(
        reconstructions=x_final.cpu(), curves=stacked, final_error=err.float().cpu(), zero_norm=zero_norm.cpu(),
        diverged=diverged, diverged_step=diverged_step, steps=done, layer=layer,
        params={"steps": steps, "lr": lr, "lambda_alpha": lambda_alpha, "alpha": alpha, "lambda_tv": lambda_tv,
                "beta": beta, "jitter": jitter, "seed": seed},
    )
