"""Synthetic calibration tasks: one filled shape per image, exact box, variable image and object size,
optionally a planted shortcut that gives the label away.

A task is a `TaskSpec`; `generate(spec, n, seed)` draws `n` images from it and `audit_set(spec, n, seed)`
wraps them as an auditkit.AuditSet. Image i depends only on (spec, seed, i).

Each image (RGB, `size` x `size`, values in [0, 1]):

- a background: by default a smooth random two-colour gradient with a blotchy low-frequency texture;
  with shortcut="background" a flat colour from BACKGROUND_PALETTE[label] (jittered) with the same blotches;
  with shortcut="texture" stripes at the angle TEXTURE_ANGLES[label] (random colours, period and phase);
- clutter: 2-5 thin lines and 1-4 small dots (so pixel-space neighbours are not trivially right);
- the object: a filled circle, triangle, star or cross of one random colour that contrasts with the
  background under it, rotated at random, its tight bounding box covering a share of the image drawn
  uniformly from `object_area` (3 % to 60 % in this benchmark), placed at random clear of the top-left
  corner; the Box is the bounding box of the shape's pixels (x1, y1 exclusive);
- uniform pixel noise of width 0.1;
- with shortcut="watermark", a solid square (size/64 * 6 px) at the top-left corner whose colour is
  WATERMARK_PALETTE[label].

shape="label" draws the label's shape. shape="random" draws a shape independent of the label: training a
model on that with a shortcut leaves the shortcut as the only thing that predicts the label (as the demo's
demo-shortcut is made). The audit sets of flawed models use shape="label" with the shortcut present, as
leaked data would be: the flawed model is accurate on them, and only where it looks tells it apart.

The square is left out of the classes on purpose: occlusion covers an object with a flat grey square, so a
square's class evidence would survive its own occlusion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from auditkit import AuditSet, Box, Sample
from auditkit.demo.shapes import paint_shape

CLASSES: tuple[str, ...] = ("circle", "triangle", "star", "cross")

Shortcut = Literal["none", "watermark", "background", "texture"]

#: Watermark colour per class index (red, green, blue, yellow).
WATERMARK_PALETTE = ((1.0, 0.0, 0.0), (0.0, 0.8, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0))
#: Background colour per class index (muted red, green, blue, ochre), jittered by +-0.06 per channel.
BACKGROUND_PALETTE = ((0.70, 0.30, 0.30), (0.30, 0.62, 0.32), (0.30, 0.36, 0.72), (0.72, 0.62, 0.25))
#: Stripe angle (degrees) per class index, jittered by +-6 degrees.
TEXTURE_ANGLES = (0.0, 45.0, 90.0, 135.0)
#: Objects keep out of the top-left KEEP_OUT * size / 64 px square (where a watermark goes).
KEEP_OUT = 12


@dataclass(frozen=True)
class TaskSpec:
    """One synthetic task: image size, object size range (box area / image area), shortcut, shape mode."""

    size: int = 64
    object_area: tuple[float, float] = (0.05, 0.3)
    shortcut: Shortcut = "none"
    shape: Literal["label", "random"] = "label"

    def __post_init__(self) -> None:
        lo, hi = self.object_area
        if not 0.005 <= lo <= hi <= 0.7:
            raise ValueError(f"object_area must satisfy 0.005 <= lo <= hi <= 0.7, got {self.object_area}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32, got {self.size}")

    def training(self) -> "TaskSpec":
        """The training distribution: with a shortcut, shapes independent of the label."""
        return replace(self, shape="random") if self.shortcut != "none" else self

    def describe(self) -> str:
        lo, hi = self.object_area
        cue = "" if self.shortcut == "none" else f", {self.shortcut} gives the label"
        return f"{self.size} px, objects {lo:.0%}-{hi:.0%} of the image{cue}"


# -- drawing -----------------------------------------------------------------------------------------------

def _upsampler(size: int, grid: int) -> np.ndarray:
    """size x grid matrix M: M @ g @ M.T bilinearly upsamples a grid x grid array to size x size."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.minimum(pos.astype(int), grid - 2)
    frac = pos - lo
    m = np.zeros((size, grid))
    m[np.arange(size), lo] = 1.0 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _blotches(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    up = _upsampler(size, 6)
    grid = rng.normal(0.0, amplitude, (3, 6, 6))
    return (up @ grid @ up.T).transpose(1, 2, 0)


def _background(rng: np.random.Generator, size: int, label: int, shortcut: Shortcut) -> np.ndarray:
    coords = np.linspace(0.0, 1.0, size)
    if shortcut == "background":
        base = np.asarray(BACKGROUND_PALETTE[label]) + rng.uniform(-0.06, 0.06, 3)
        image = np.broadcast_to(base, (size, size, 3)) + _blotches(rng, size, 0.04)
    elif shortcut == "texture":
        c0, c1 = rng.uniform(0.15, 0.85, 3), rng.uniform(0.15, 0.85, 3)
        while np.linalg.norm(c0 - c1) < 0.35:
            c1 = rng.uniform(0.15, 0.85, 3)
        theta = math.radians(TEXTURE_ANGLES[label] + rng.uniform(-6.0, 6.0))
        period = rng.uniform(5.0, 8.0) * size / 64
        y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        phase = rng.uniform(0.0, 2 * math.pi)
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period + phase)
        image = c0 + (c1 - c0) * wave[..., None] + _blotches(rng, size, 0.03)
    else:
        c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
        theta = rng.uniform(0.0, 2 * math.pi)
        t = math.cos(theta) * coords[None, :] + math.sin(theta) * coords[:, None]
        t = (t - t.min()) / (t.max() - t.min())
        image = c0 + (c1 - c0) * t[..., None] + _blotches(rng, size, 0.09)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _clutter(canvas: Image.Image, rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(canvas)
    size = canvas.size[0]
    scale = size / 64
    for _ in range(rng.integers(2, 6)):
        xy = [tuple(p) for p in rng.uniform(0, size, (2, 2)).tolist()]
        draw.line(xy, fill=tuple(rng.integers(0, 256, 3).tolist()), width=max(1, round(scale)))
    for _ in range(rng.integers(1, 5)):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.8, 2.5, 2) * scale
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=tuple(rng.integers(0, 256, 3).tolist()))


def _polygon(cls: int, radius: float, angle: float, spikes: float, arm: float) -> list[tuple[float, float]] | None:
    """Vertices around the origin of class `cls` (CLASSES order); None for the circle."""
    if cls == 0:
        return None
    if cls == 1:
        angles, radii = np.arange(3) * (2 * math.pi / 3), np.full(3, radius)
    elif cls == 2:
        angles = np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * spikes)
    else:
        a, r = radius * arm, radius
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
               (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
        angles = np.array([math.atan2(y, x) for x, y in pts])
        radii = np.array([math.hypot(x, y) for x, y in pts])
    angles = angles + angle
    return [(float(rr * math.cos(t)), float(rr * math.sin(t))) for rr, t in zip(radii, angles)]


def _mask(cls: int, radius: float, rng_values: tuple[float, float, float, float, float]) -> np.ndarray:
    """Tight bool mask of one shape (every edge row and column touched)."""
    angle, spikes, arm, jx, jy = rng_values
    side = int(math.ceil(2 * radius)) + 4
    c = (side / 2 + jx, side / 2 + jy)
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    poly = _polygon(cls, radius, angle, spikes, arm)
    if poly is None:
        draw.ellipse([c[0] - radius, c[1] - radius, c[0] + radius, c[1] + radius], fill=255)
    else:
        draw.polygon([(x + c[0], y + c[1]) for x, y in poly], fill=255)
    mask = np.asarray(canvas) > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _shape(cls: int, area: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of class `cls` whose tight box covers about `area` of a size x size image (one rescale)."""
    values = (rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 0.5), rng.uniform(0.24, 0.34),
              rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5))
    target = area * size * size
    radius = math.sqrt(target) / 2
    mask = _mask(cls, radius, values)
    radius *= math.sqrt(target / mask.size)
    radius = min(radius, (size - 2) / 2)
    mask = _mask(cls, radius, values)
    if max(mask.shape) > size:  # never larger than the image
        mask = mask[:size, :size]
    return mask


def _one(spec: TaskSpec, seed: int, index: int) -> tuple[np.ndarray, int, tuple[int, int, int, int]]:
    rng = np.random.default_rng([seed, index, spec.size])
    size, k = spec.size, len(CLASSES)
    label = int(rng.integers(k))
    cls = label if spec.shape == "label" else int(rng.integers(k))
    mask = _shape(cls, float(rng.uniform(*spec.object_area)), size, rng)
    h, w = mask.shape
    keep = round(KEEP_OUT * size / 64)
    for _ in range(100):  # clear of the watermark corner
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        if x0 >= keep or y0 >= keep:
            break
    canvas = Image.fromarray((_background(rng, size, label, spec.shortcut) * 255).round().astype(np.uint8))
    _clutter(canvas, rng)
    image = np.asarray(canvas, dtype=np.float32) / 255.0
    paint_shape(image, mask, x0, y0, rng)  # the demo's painting: contrasting colour, noise, clip
    if spec.shortcut == "watermark":
        a, b = round(2 * size / 64), round(8 * size / 64)
        image[a:b, a:b] = WATERMARK_PALETTE[label]
    return image, label, (x0, y0, x0 + w, y0 + h)


def generate(spec: TaskSpec, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[Box]]:
    """`n` images of `spec` from `seed`: (float32 n x 3 x size x size in [0, 1], int64 labels, boxes)."""
    images = np.empty((n, spec.size, spec.size, 3), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    boxes: list[Box] = []
    for i in range(n):
        images[i], labels[i], xyxy = _one(spec, seed, i)
        boxes.append(Box(*(float(v) for v in xyxy)))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), boxes


def audit_set(spec: TaskSpec, n: int = 48, seed: int = 2014, name: str = "") -> AuditSet:
    """`n` images of `spec` as an AuditSet (ids "<name>-0000", ...)."""
    images, labels, boxes = generate(spec, n, seed)
    name = name or f"shapes-{spec.size}"
    samples = [Sample(image=images[i], label=int(labels[i]), boxes=(boxes[i],), id=f"{name}-{i:04d}")
               for i in range(n)]
    return AuditSet(samples, CLASSES, name=name, source=f"benchmarks.calibration.tasks {spec} seed {seed}")


def box_area_shares(data: AuditSet) -> list[float]:
    """Each sample's box area over its image area (what `object_area` bounds)."""
    out = []
    for s in data.samples:
        h, w = s.size
        out.append(sum(b.area for b in s.boxes) / (h * w))
    return out
