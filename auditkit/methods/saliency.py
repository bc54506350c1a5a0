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
from torch import nn

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
METHODS: tuple[str, ...] = tuple(_REDUCE) + ("grad_cam",)  # saliency_map also takes "auto" (auto_method)
#: Linear children whose names mark a self-attention's query / key / value projections (timm, torchvision's
#: Swin and many hand-written ViTs: qkv; Hugging Face: query, key, value, or q_proj, k_proj, v_proj since
#: transformers 5; others: q, k, v).
_QKV_NAMES = ({"qkv"}, {"query", "key", "value"}, {"q_proj", "k_proj", "v_proj"}, {"q", "k", "v"})


def holds_attention(module: nn.Module) -> bool:
    """True when `module` or one of its submodules is a self-attention: an nn.MultiheadAttention, or a module
    with nn.Linear children named as query / key / value projections (_QKV_NAMES)."""
    for sub in module.modules():
        if isinstance(sub, nn.MultiheadAttention):
            return True
        linear = {name for name, child in sub.named_children() if isinstance(child, nn.Linear)}
        if any(names <= linear for names in _QKV_NAMES):
            return True
    return False


def auto_method(subject, layer: str | None = None) -> tuple[str, str]:
    """(method, why) for method "auto": Grad-CAM on `layer` (default Subject.map_layer()), unless
    that layer holds a self-attention (holds_attention) or the model names no layer; then the pixel gradient.

    Grad-CAM weighs each position of the layer's map by the class gradient and reads the result as a map
    of the image, which assumes each position still describes its own image region. Attention mixes every
    token with every other, so a transformer block's positions need not: on the calibration ViT (85 %
    accurate, occluding the object drops its score 0.59 more than occluding clutter) Grad-CAM put less
    energy on the object than a centre prior at every block (0.33x-0.84x), while the gradient put 1.68x.
    """
    if subject.scripted:
        return "gradient", (f"auto: model {subject.name!r} is TorchScript, whose layers take no hooks, so the pixel "
                            "gradient is used")
    name = layer or subject.map_layer()
    if name is None:
        return "gradient", f"auto: model {subject.name!r} names no layer for Grad-CAM, so the pixel gradient is used"
    if holds_attention(subject.layer(name)):
        return "gradient", (f"auto: layer {name!r} holds a self-attention, whose positions mix the whole image, "
                            f"so Grad-CAM's map would not say where; the pixel gradient is used")
    return "grad_cam", ""


def saliency_map(subject, images: torch.Tensor, targets: torch.Tensor, method: str = "grad_cam",
                 layer: str | None = None, sample_ids: Sequence[object] | None = None, **options) -> torch.Tensor:
    """The N x H x W map of `method` (one of METHODS; "auto" as auto_method picks) for the target classes,
    on the CPU.

    Always finite: each method checks its own map, so a NaN or inf raises NonFiniteError naming the
    method, the layer (Grad-CAM) and the samples (by `sample_ids`, one per image, when given).
    """
    from auditkit.methods import cam, gradients

    if method == "auto":
        method = auto_method(subject, layer)[0]
    if method == "grad_cam":
        return cam.grad_cam(subject, images, targets, layer=layer or None, sample_ids=sample_ids, **options)
    if method not in _REDUCE:
        raise ValueError(f"unknown saliency method {method!r}; expected one of {', '.join(METHODS)} or auto")
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
