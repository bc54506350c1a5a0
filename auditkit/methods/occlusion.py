"""Occlusion (Zeiler & Fergus 2014): grey out part of the image, watch the class score.

All perturbations are built chunk by chunk on the fly and go through the
Subject's batched forward; nothing loops over pixels in Python.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from auditkit.data import Box

Baseline = Literal["grey", "mean", "blur", "zero"]
BASELINES: tuple[str, ...] = ("grey", "mean", "blur", "zero")


def baseline_images(images: torch.Tensor, kind: str = "grey") -> torch.Tensor:
    """The replacement pixels for each image, N x C x H x W.

    grey: 0.5 everywhere; zero: 0; mean: the image's per-channel mean;
    blur: a Gaussian blur with sigma = min(H, W) / 8 (reflect padding).
    """
    if kind == "grey":
        return torch.full_like(images, 0.5)
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone()
    if kind == "blur":
        return gaussian_blur(images, sigma=min(images.shape[-2:]) / 8.0)
    raise ValueError(f"unknown occlusion baseline {kind!r}; expected one of {', '.join(BASELINES)}")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (kernel radius 3 sigma, reflect padding), N x C x H x W."""
    h, w = images.shape[-2:]
    radius = max(1, min(int(3 * sigma), h - 1, w - 1))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def occlude(images: torch.Tensor, masks: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Pixels where masks (N x H x W, bool) is True replaced by the baseline's."""
    return torch.where(masks[:, None], baseline, images)


def window_starts(size: int, patch: int, stride: int) -> torch.Tensor:
    """Start offsets of a sliding window that covers [0, size), last window flush with the edge."""
    if patch > size:
        raise ValueError(f"occlusion patch {patch} is larger than the image side {size}")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return torch.tensor(starts)


def _indicator(starts: torch.Tensor, patch: int, size: int) -> torch.Tensor:
    """K x size float matrix, row k is 1 on [starts[k], starts[k] + patch)."""
    pos = torch.arange(size)
    return ((pos[None] >= starts[:, None]) & (pos[None] < starts[:, None] + patch)).float()


def occlusion_map(
    subject,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    patch: int = 12,
    stride: int = 4,
    baseline: str = "grey",
) -> torch.Tensor:
    """Occlusion sensitivity, N x H x W.

    For each window w (patch x patch, moved by `stride`), d_w = p(y | x) -
    p(y | x with w replaced by the baseline). A pixel's value is the mean
    of d_w over the windows that cover it (Zeiler & Fergus figure 7; the
    averaging is Captum's Occlusion). Windows of all images are batched
    together (Subject.predict_rows builds them chunk by chunk).
    """
    n, _, h, w = images.shape
    ys, xs = window_starts(h, patch, stride), window_starts(w, patch, stride)
    in_row, in_col = _indicator(ys, patch, h), _indicator(xs, patch, w)  # ny x H, nx x W
    per_image = len(ys) * len(xs)
    total = n * per_image
    labels = labels.view(-1).cpu()
    base = baseline_images(images, baseline)
    original = subject.class_probability(images, labels)

    def occluded_images(rows: slice) -> torch.Tensor:
        g = torch.arange(rows.start, rows.stop)
        img, k = g // per_image, g % per_image
        masks = in_row[k // len(xs)].bool()[:, :, None] & in_col[k % len(xs)].bool()[:, None, :]
        return occlude(images[img], masks, base[img])

    logits = subject.predict_rows(total, occluded_images)
    probs = torch.softmax(logits, dim=1)
    owner = torch.arange(total) // per_image
    occluded = probs[torch.arange(total), labels[owner]]
    drops = (original[owner] - occluded).view(n, len(ys), len(xs))
    # map = R^T D C / R^T 1 C: sum of window drops over covering windows, divided by their count
    summed = torch.einsum("yh,nyx,xw->nhw", in_row, drops, in_col)
    count = torch.einsum("yh,yx,xw->hw", in_row, torch.ones(len(ys), len(xs)), in_col)
    return summed / count


def box_union(boxes: tuple[Box, ...]) -> Box:
    """The smallest box holding all of `boxes`."""
    return Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes))


def pixel_size(box: Box, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the pixels whose centres lie in the box (Box.pixel_slices); 0 when it covers none."""
    rows, cols = box.pixel_slices(width, height)
    return rows.stop - rows.start, cols.stop - cols.start


def control_boxes(object_mask: torch.Tensor, box: Box, count: int, max_overlap: float = 0.0) -> list[Box]:
    """Up to `count` boxes of box's size in pixels, spread apart, each covering at
    most `max_overlap` of its area with object pixels (0: they touch no object).

    The size is that of the pixels the box covers (pixel_size), so a control
    occludes as many rows and columns as the object's mask does. Candidates lie
    on a grid of step max(1, side / 4); the first is the one farthest from the
    object's box centre, each next one the farthest from those already chosen
    (farthest-point sampling). Empty when none fits, or when the box covers no
    pixel (a box under a pixel wide after resizing).
    """
    h, w = object_mask.shape
    bh, bw = pixel_size(box, h, w)
    if bh < 1 or bw < 1 or bh > h or bw > w or count <= 0:
        return []
    ys = window_starts(h, bh, max(1, bh // 4))
    xs = window_starts(w, bw, max(1, bw // 4))
    # object pixels inside each candidate window via an integral image
    integral = F.pad(object_mask.float().cumsum(0).cumsum(1), (1, 0, 1, 0))
    y0, x0 = ys[:, None], xs[None, :]
    inside = integral[y0 + bh, x0 + bw] - integral[y0, x0 + bw] - integral[y0 + bh, x0] + integral[y0, x0]
    free = (inside <= max_overlap * bh * bw).nonzero()
    if len(free) == 0:
        return []
    centres = torch.stack([ys[free[:, 0]] + bh / 2, xs[free[:, 1]] + bw / 2], dim=1).float()
    target = torch.tensor([[(box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2]])
    nearest = torch.cdist(centres, target).squeeze(1)
    chosen: list[int] = []
    for _ in range(min(count, len(free))):
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, torch.cdist(centres, centres[pick : pick + 1]).squeeze(1))
        nearest[chosen] = -1.0
    return [Box(float(xs[free[i, 1]]), float(ys[free[i, 0]]), float(xs[free[i, 1]] + bw), float(ys[free[i, 0]] + bh)) for i in chosen]


def box_masks(boxes: list[Box], height: int, width: int) -> torch.Tensor:
    """len(boxes) x H x W bool masks, one per box."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for i, box in enumerate(boxes):
        r, c = box.pixel_slices(width, height)
        masks[i, r, c] = True
    return masks
