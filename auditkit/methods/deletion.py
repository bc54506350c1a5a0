"""Deletion and insertion curves (Petsiuk, Das & Saenko 2018, "RISE", section 4.1).

Pixels are ranked by a saliency map (most salient first). For k = 0 .. steps
the top c_k = round(k / steps * H * W) pixels are

- deletion:  replaced by the deletion baseline (0.5 grey by default; Petsiuk use zero),
- insertion: revealed, starting from the insertion baseline (a heavy blur of the image, as RISE does),

and the softmax probability of the target class is recorded. A good map makes
the deletion curve fall fast (low AUC) and the insertion curve rise fast (high AUC).

Every perturbed image is built on the fly from a rank tensor (mask = rank < c_k)
and goes through the Subject's batched forward, chunk by chunk; nothing loops
over pixels in Python.
"""
from __future__ import annotations

from typing import Sequence

import torch

from auditkit.methods.numerics import constant_rows, require_finite
from auditkit.methods.occlusion import baseline_images


def step_counts(steps: int, pixels: int) -> torch.Tensor:
    """c_k = round(k / steps * pixels) for k = 0 .. steps (halves round up), steps + 1 ints."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = torch.arange(steps + 1, dtype=torch.long)
    return (2 * k * pixels + steps) // (2 * steps)


def pixel_ranks(maps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N x H x W long: 0 for each map's largest value, H*W - 1 for its smallest.

    Ties (and NaN, ranked last) are broken by one fixed random permutation of the
    pixels, drawn from `generator` (seed 0 when None), the same for every map. A map
    constant up to rounding (numerics.constant_rows) is all ties: its rounding noise
    does not get to choose the order.
    """
    n, h, w = maps.shape
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(h * w, generator=generator)
    raw = maps.detach().float().cpu().flatten(1)
    flat = torch.nan_to_num(raw, nan=-float("inf"))
    flat[constant_rows(raw) & torch.isfinite(raw).all(1)] = 0.0
    # a stable sort of the permuted pixels: equal values keep the permutation's order
    idx = torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices
    order = perm[idx]  # N x HW: pixel indices, most salient first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w).expand(n, -1).contiguous())
    return ranks.view(n, h, w)


def random_order_maps(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """N x H x W maps of uniform noise: a random pixel order, the reference a real map must beat."""
    return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed))


def deletion_insertion_curves(
    subject,
    images: torch.Tensor,
    targets: torch.Tensor,
    maps: torch.Tensor,
    *,
    steps: int = 32,
    deletion_baseline: str = "grey",
    insertion_baseline: str = "blur",
    generator: torch.Generator | None = None,
    sample_ids: Sequence[object] | None = None,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves of p(target | perturbed image), each N x (steps + 1).

    Returns {"deletion", "insertion"} (N x (steps + 1), on the CPU), "counts"
    (pixels removed / revealed at each step) and "fractions" (k / steps, the x of auc()).
    Column 0 of deletion is the intact image's probability; its last column the
    all-baseline image's. Insertion runs the other way (baseline -> intact image).
    A map holding NaN or inf has no pixel order: NonFiniteError, naming the samples (by `sample_ids`
    when given).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if maps.shape != (n, h, w):
        raise ValueError(f"maps must be N x H x W = {(n, h, w)}, got {tuple(maps.shape)}")
    require_finite(maps, "saliency map", method="deletion-insertion", sample_ids=sample_ids)
    images = images.detach().float().cpu()
    targets = targets.view(-1).long().cpu()
    counts = step_counts(steps, h * w)
    ranks = pixel_ranks(maps, generator)
    # sources per pixel: [0] deletion baseline, [1] the image, [2] insertion baseline
    bank = torch.stack([baseline_images(images, deletion_baseline), images,
                        baseline_images(images, insertion_baseline)])
    # the ends of both curves do not depend on the order: the intact image (deletion's first point,
    # insertion's last) and the two baselines; Subject.class_probability keeps them by content, so a
    # second order on the same images (the random control) does not run them again
    ends = [subject.class_probability(source, targets) for source in bank]
    inner = steps - 1  # k = 1 .. steps - 1 of each curve
    per_curve = n * inner
    total = 2 * per_curve

    def perturbed(rows: slice) -> torch.Tensor:
        g = torch.arange(rows.start, rows.stop)
        insertion = g >= per_curve
        rem = g % per_curve
        img, k = rem // inner, rem % inner + 1
        top = (ranks[img] < counts[k].view(-1, 1, 1))[:, None]  # B x 1 x H x W: the top c_k pixels
        # deletion: top pixels from the deletion baseline, the rest from the image;
        # insertion: top pixels from the image, the rest from the insertion baseline
        ins = insertion.long()
        return torch.where(top, bank[ins, img], bank[ins + 1, img])

    p = torch.empty(2, n, steps + 1)
    p[0, :, 0], p[0, :, steps] = ends[1], ends[0]
    p[1, :, 0], p[1, :, steps] = ends[2], ends[1]
    if inner:
        logits = subject.predict_rows(total, perturbed)
        probs = torch.softmax(logits, dim=1)
        owner = (torch.arange(total) % per_curve) // inner
        p[:, :, 1:steps] = probs[torch.arange(total), targets[owner]].view(2, n, inner)
    return {
        "deletion": p[0].clone(),
        "insertion": p[1].clone(),
        "counts": counts,
        "fractions": torch.arange(steps + 1, dtype=torch.float32) / steps,
    }


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under each row of `curve` (N x (steps + 1)) by the trapezoid rule on x = k / steps in [0, 1]."""
    curve = torch.as_tensor(curve, dtype=torch.float32)
    if curve.ndim == 1:
        curve = curve[None]
    if curve.shape[1] < 2:
        raise ValueError("a curve needs at least two points (steps >= 1)")
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)
