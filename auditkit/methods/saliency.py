"""Saliency maps by method name, and how well a map points at the object.

Formulas (after the energy-based pointing game and Quantus' localisation metrics):
    energy_in_box = sum(max(m, 0) * inside) / sum(max(m, 0))
    area_fraction = |inside| / (H * W)
    lift          = energy_in_box / area_fraction   (1.0: no better than a uniform map)
    pointing hit  = the arg-max pixel's centre lies within tolerance_px of a box
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from auditkit.data import Box

# method -> how its N x C x H x W attribution becomes an N x H x W map
_REDUCE = {
    "gradient": "max_abs",  # Simonyan et al.: max over channels of |d score / d x|
    "smoothgrad": "max_abs",
    "guided_backprop": "max_abs",
    "deconvnet": "max_abs",
    "input_x_gradient": "sum",
    "integrated_gradients": "sum",
}
METHODS: tuple[str, ...] = tuple(_REDUCE) + ("grad_cam",)


def saliency_map(subject, images: torch.Tensor, targets: torch.Tensor, method: str = "grad_cam",
                 layer: str | None = None, sample_ids: Sequence[object] | None = None, **options) -> torch.Tensor:
    """The N x H x W map of `method` (one of METHODS) for the target classes, on the CPU.

    Always finite: each method checks its own map, so a NaN or inf raises NonFiniteError naming the
    method, the layer (Grad-CAM) and the samples (by `sample_ids`, one per image, when given).
    """
    from auditkit.methods import cam, gradients

    if method == "grad_cam":
        return cam.grad_cam(subject, images, targets, layer=layer or None, sample_ids=sample_ids, **options)
    if method not in _REDUCE:
        raise ValueError(f"unknown saliency method {method!r}; expected one of {', '.join(METHODS)}")
    fn: Callable = getattr(gradients, method)
    return gradients.to_map(fn(subject, images, targets, sample_ids=sample_ids, **options), _REDUCE[method])


def energy_in_box(maps: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Share of the positive map inside the boxes, N values; NaN where the map has no positive part."""
    positive = maps.clamp_min(0).flatten(1)
    total = positive.sum(1)
    share = (positive * inside.flatten(1).float()).sum(1) / total
    return torch.where(total > 0, share, torch.full_like(share, float("nan")))


def area_fraction(inside: torch.Tensor) -> torch.Tensor:
    """Share of the image's pixels inside the boxes, N values."""
    return inside.flatten(1).float().mean(1)


def argmax_points(maps: torch.Tensor) -> torch.Tensor:
    """N x 2 (x, y) pixel indices of each map's maximum (first one in raster order)."""
    flat = maps.flatten(1).argmax(1)
    return torch.stack([flat % maps.shape[-1], flat // maps.shape[-1]], 1)


def distance_to_boxes(point: tuple[float, float], boxes: Sequence[Box]) -> float:
    """Euclidean distance in pixels from a point to the nearest box (0 inside one); inf without boxes."""
    x, y = point
    best = float("inf")
    for b in boxes:
        dx = max(b.x0 - x, 0.0, x - b.x1)
        dy = max(b.y0 - y, 0.0, y - b.y1)
        best = min(best, (dx * dx + dy * dy) ** 0.5)
    return best


def pointing_hits(maps: torch.Tensor, boxes: Sequence[Sequence[Box]], tolerance_px: float) -> torch.Tensor:
    """N bools: the centre of each map's arg-max pixel lies within tolerance_px of one of its boxes."""
    points = argmax_points(maps).float() + 0.5
    return torch.tensor([distance_to_boxes((float(p[0]), float(p[1])), b) <= tolerance_px for p, b in zip(points, boxes)])


def centre_prior(n: int, height: int, width: int, sigma: float = 0.25) -> torch.Tensor:
    """N x H x W Gaussian maps centred on the image, std sigma * side: the "looks at the centre" baseline."""
    ys = (torch.arange(height) + 0.5 - height / 2) / (sigma * height)
    xs = (torch.arange(width) + 0.5 - width / 2) / (sigma * width)
    prior = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return prior.expand(n, height, width).clone()
