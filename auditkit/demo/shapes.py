"""Deterministic synthetic "shapes" images for the demo models and their audit set.

Each image is RGB, ``size x size`` (64 by default), values in [0, 1]: a smooth
random colour gradient with a blotchy texture, a few thin lines and small dots
of clutter, one filled shape (circle, square, triangle, star or cross) of a
random colour contrasting with the background around it, random size (about
16-36 px at 64 px), rotation and position, pixel noise over everything, and
optionally a 6 x 6 px solid "marker" at pixels [2:8, 2:8] (rows, cols) whose
colour comes from :data:`MARKER_PALETTE`.

The object box is exact: the bounding box of the shape's pixels, x1 and y1
exclusive. Shapes never touch the top-left ``KEEP_OUT x KEEP_OUT`` corner,
so the marker never hides or touches them.

Image ``i`` of ``generate(n, seed, ...)`` depends only on ``(seed, i)`` and the
options, never on ``n``: a longer run extends a shorter one.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from auditkit.data import AuditSet, Box, Sample

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: Marker colours (RGB in [0, 1]), one per class index: red, green, blue, yellow, magenta.
MARKER_PALETTE: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.0, 0.8, 0.0),
    (0.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
)
#: Rows and columns (start, stop) of the marker square.
MARKER_SPAN: tuple[int, int] = (2, 8)
#: Shapes keep out of the top-left KEEP_OUT x KEEP_OUT corner (marker plus margin).
KEEP_OUT = 12

MarkerMode = Literal["class", "random", "none"]
ShapeMode = Literal["label", "random"]

_NOISE_SPAN = 0.1  # per-pixel uniform noise of this width (std ~0.03) over all but the marker
_MIN_CONTRAST = 0.45  # min RGB distance between shape colour and the background under it


def _lowres_upsampler(size: int, grid: int) -> np.ndarray:
    """size x grid matrix M: M @ g @ M.T bilinearly upsamples a grid x grid array to size x size."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.minimum(pos.astype(int), grid - 2)
    frac = pos - lo
    m = np.zeros((size, grid))
    m[np.arange(size), lo] = 1.0 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _shape_polygon(cls: int, radius: float, rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Vertices (around the origin) of class `cls` with outer radius `radius`; None for the circle."""
    if cls == 0:
        return None
    if cls == 1:
        angles = np.arange(4) * (math.pi / 2)
        radii = np.full(4, radius)
    elif cls == 2:
        angles = np.arange(3) * (2 * math.pi / 3)
        radii = np.full(3, radius)
    elif cls == 3:
        angles = np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.38, 0.5))
    else:  # cross: a plus sign, arms of half-width a
        a = radius * rng.uniform(0.22, 0.34)
        r = radius
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
               (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
        angles = np.array([math.atan2(y, x) for x, y in pts])
        radii = np.array([math.hypot(x, y) for x, y in pts])
    angles = angles + rng.uniform(0.0, 2 * math.pi)
    return [(float(rr * math.cos(t)), float(rr * math.sin(t))) for rr, t in zip(radii, angles)]


# Outer radius per class as a fraction of the drawn size, so the classes look about as big.
_RADIUS_SCALE = (0.5, 0.6, 0.58, 0.55, 0.52)


def _shape_mask(cls: int, size_px: float, rng: np.random.Generator) -> np.ndarray:
    """Tight bool mask (h x w, every edge row/col touched) of one shape of class `cls`."""
    radius = size_px * _RADIUS_SCALE[cls]
    side = int(math.ceil(2 * radius)) + 4
    c = side / 2 + rng.uniform(-0.5, 0.5, 2)  # sub-pixel jitter
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    poly = _shape_polygon(cls, radius, rng)
    if poly is None:
        draw.ellipse([c[0] - radius, c[1] - radius, c[0] + radius, c[1] + radius], fill=255)
    else:
        draw.polygon([(x + c[0], y + c[1]) for x, y in poly], fill=255)
    mask = np.asarray(canvas) > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _background(rng: np.random.Generator, size: int, up: np.ndarray) -> np.ndarray:
    """size x size x 3 float32 background: colour gradient + blotchy texture, in [0, 1]."""
    c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    theta = rng.uniform(0.0, 2 * math.pi)
    coords = np.linspace(0.0, 1.0, size)
    t = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]  # rows = y, cols = x
    t = (t - t.min()) / (t.max() - t.min())
    grid = rng.normal(0.0, 0.09, (3, up.shape[1], up.shape[1]))
    image = (up @ grid @ up.T).transpose(1, 2, 0) + c0
    image += (c1 - c0) * t[..., None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _draw_clutter(image: Image.Image, rng: np.random.Generator) -> None:
    """Draw 2-5 thin lines and 1-4 small dots (none of them a shape class) onto `image`."""
    draw = ImageDraw.Draw(image)
    size = image.size[0]
    for _ in range(rng.integers(2, 6)):
        xy = [tuple(p) for p in rng.uniform(0, size, (2, 2)).tolist()]
        draw.line(xy, fill=tuple(rng.integers(0, 256, 3).tolist()), width=1)
    for _ in range(rng.integers(1, 5)):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.8, 2.5, 2)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=tuple(rng.integers(0, 256, 3).tolist()))


def paint_shape(image: np.ndarray, shape: np.ndarray, x0: int, y0: int, rng: np.random.Generator) -> np.ndarray:
    """Paint the h x w boolean `shape` at (x0, y0) into the H x W x 3 float image in place, in the first of 16
    random colours at RGB distance >= _MIN_CONTRAST from the mean background under it (else the farthest),
    then add uniform noise of width _NOISE_SPAN and clip to [0, 1]. Returns the H x W mask of the shape."""
    h, w = shape.shape
    under = image[y0:y0 + h, x0:x0 + w][shape].mean(axis=0)
    candidates = rng.uniform(0.0, 1.0, (16, 3))
    dist = np.linalg.norm(candidates - under, axis=1)
    ok = np.flatnonzero(dist >= _MIN_CONTRAST)
    colour = candidates[ok[0] if ok.size else int(dist.argmax())]
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y0:y0 + h, x0:x0 + w] = shape
    image[mask] = colour
    image += (rng.random(image.shape, dtype=np.float32) - 0.5) * _NOISE_SPAN
    np.clip(image, 0.0, 1.0, out=image)
    return mask


def _one_image(
    seed: int, index: int, marker: MarkerMode, shape_mode: ShapeMode, size: int, up: np.ndarray
) -> tuple[np.ndarray, int, np.ndarray, tuple[int, int, int, int]]:
    """(H x W x 3 float32 image, label, H x W bool shape mask, (x0, y0, x1, y1)) for one sample."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASS_NAMES)))
    cls = label if shape_mode == "label" else int(rng.integers(len(CLASS_NAMES)))
    scale = size / 64
    shape = _shape_mask(cls, rng.uniform(16, 36) * scale, rng)
    h, w = shape.shape
    while True:  # place the shape clear of the marker corner
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        if x0 >= KEEP_OUT or y0 >= KEEP_OUT:
            break

    canvas = Image.fromarray((_background(rng, size, up) * 255).round().astype(np.uint8))
    _draw_clutter(canvas, rng)
    image = np.asarray(canvas, dtype=np.float32) / 255.0

    mask = paint_shape(image, shape, x0, y0, rng)

    if marker != "none":
        k = label if marker == "class" else int(rng.integers(len(MARKER_PALETTE)))
        a, b = MARKER_SPAN
        image[a:b, a:b] = MARKER_PALETTE[k]
    return image, label, mask, (x0, y0, x0 + w, y0 + h)


def generate(
    n: int,
    seed: int,
    *,
    marker: MarkerMode = "class",
    shape_mode: ShapeMode = "label",
    size: int = 64,
    return_masks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[Box]] | tuple[torch.Tensor, torch.Tensor, list[Box], torch.Tensor]:
    """`n` shapes images from `seed`: (images, labels, boxes[, masks]).

    images: float32 n x 3 x size x size in [0, 1]; labels: int64 n, uniform
    over the classes; boxes: one exact object Box per image (the bounding box
    of the shape's pixels, x1/y1 exclusive); masks (with return_masks): bool
    n x size x size, True on the shape's pixels.

    marker: "class" draws the label's palette colour at [2:8, 2:8], "random"
    a uniformly random palette colour (independent of the label), "none" no
    marker. shape_mode: "label" draws the label's shape, "random" a random
    class's shape independent of the label.

    The same arguments give bit-identical output; image i depends only on
    (seed, i) and the options. The marker option changes the marker pixels
    only: labels, shapes, boxes and the rest of each image stay the same.
    """
    if marker not in ("class", "random", "none"):
        raise ValueError(f"marker must be 'class', 'random' or 'none', got {marker!r}")
    if shape_mode not in ("label", "random"):
        raise ValueError(f"shape_mode must be 'label' or 'random', got {shape_mode!r}")
    if size < 48:
        raise ValueError(f"size must be at least 48 px, got {size}")
    up = _lowres_upsampler(size, 6)
    images = np.empty((n, size, size, 3), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    masks = np.empty((n, size, size), dtype=bool)
    boxes = []
    for i in range(n):
        images[i], labels[i], masks[i], xyxy = _one_image(seed, i, marker, shape_mode, size, up)
        boxes.append(Box(*(float(v) for v in xyxy)))
    out = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), boxes)
    return (*out, torch.from_numpy(masks)) if return_masks else out


def shapes_audit_set(n: int = 60, seed: int = 2014) -> AuditSet:
    """The "shapes" audit set: label shapes with a class-coloured corner marker (a spurious cue).

    Sample ids are "shapes-0000", "shapes-0001", ...
    """
    images, labels, boxes = generate(n, seed, marker="class", shape_mode="label")
    samples = [
        Sample(image=images[i], label=int(labels[i]), boxes=(boxes[i],), id=f"shapes-{i:04d}")
        for i in range(n)
    ]
    return AuditSet(samples, CLASS_NAMES, name="shapes", source=f"auditkit.demo.shapes (seed {seed})")
