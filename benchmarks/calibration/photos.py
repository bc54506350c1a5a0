"""Real photographs with hand-drawn boxes, and composites, for the ImageNet-pretrained model.

The photographs ship inside scikit-image (``skimage.data``; no download). The boxes below were drawn by
hand on a 50 px grid over each picture and are in pixels of the picture as shipped (x0, y0, x1, y1,
x1/y1 exclusive). Labels are coarse classes; models.GroupedHead sums the ImageNet classes of each.

- ``photos_set()``: the 4 photographs as they are (objects 4 % to 90 % of the picture). One image per
  class and 4 images in all: fewer than the 7 samples a one-sided test at alpha = 0.01 needs, so the
  judged checks cannot decide on it.
- ``composites_set()``: each object cut out along its box and pasted, small (8 % to 35 % of the image) and
  at a random place, onto backgrounds that hold none of the classes (scikit-image's grass, gravel and brick
  textures, tinted; the Hubble deep field; the wooden table and the night sky cut from the photographs
  where no object is), at 224 x 224. The box is the pasted rectangle. Localisation can be measured on
  these: the object is small, off centre, and the same backgrounds appear under every class.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from auditkit import AuditSet, Box, Sample


@dataclass(frozen=True)
class Photo:
    name: str  # skimage.data function
    label: str  # coarse class (models.IMAGENET_GROUPS)
    box: tuple[int, int, int, int]  # hand-drawn, pixels of the picture as shipped
    why: str


PHOTOS: tuple[Photo, ...] = (
    Photo("chelsea", "cat", (0, 0, 405, 300), "Chelsea the cat, 451 x 300: the head fills the frame (90 %)"),
    Photo("coffee", "cup", (75, 15, 482, 392), "an espresso cup on its saucer, 600 x 400 (64 %)"),
    Photo("stereo_motorcycle", "motorbike", (90, 95, 685, 450), "a motorcycle in a garage, 741 x 500 (57 %)"),
    Photo("rocket", "rocket", (300, 122, 342, 412), "a rocket on its launch pad at dusk, 640 x 427 (4.5 %)"),
)

#: Object classes pasted into composites (the rocket, 42 px wide, is read as a water tower once cut out).
COMPOSITE_CLASSES: tuple[str, ...] = ("cat", "cup", "motorbike")


def _picture(name: str) -> np.ndarray:
    """H x W x 3 uint8 picture from skimage.data (stereo_motorcycle: the left view)."""
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError("the photo audit sets need `pip install scikit-image`") from exc
    out = getattr(data, name)()
    if name == "stereo_motorcycle":
        out = out[0]
    if out.ndim == 2:
        out = np.stack([out] * 3, axis=-1)
    return np.ascontiguousarray(out[..., :3])


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def photos_set(classes: tuple[str, ...]) -> AuditSet:
    """The photographs at their own sizes (the audit resizes them to 224 x 224, boxes along)."""
    samples = [Sample(image=_tensor(_picture(p.name)), label=classes.index(p.label), boxes=(Box(*map(float, p.box)),),
                      id=f"photo-{p.name}") for p in PHOTOS]
    return AuditSet(samples, classes, name="photos", source="skimage.data, boxes drawn by hand (photos.PHOTOS)")


def _backgrounds(size: int) -> list[tuple[str, np.ndarray]]:
    """size x size x 3 uint8 backgrounds without any of the classes."""
    def fit(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))

    def tint(grey: np.ndarray, rgb: tuple[float, float, float]) -> np.ndarray:
        g = grey.astype(np.float32)[..., None] / 255.0
        return np.clip(g * np.asarray(rgb) * 255.0, 0, 255).astype(np.uint8)

    out = [
        ("grass", fit(tint(_picture("grass")[..., 0], (0.55, 1.0, 0.45)))),
        ("gravel", fit(_picture("gravel"))),
        ("brick", fit(tint(_picture("brick")[..., 0], (1.0, 0.6, 0.45)))),
        ("hubble", fit(_picture("hubble_deep_field")[:600, :600])),
        ("table", fit(_picture("coffee")[:, 482:])),  # the wooden table right of the saucer
        ("sky", fit(_picture("rocket")[:120, 90:290])),  # dusk sky between the towers, above the pad
    ]
    return out


def composites_set(classes: tuple[str, ...], per_class: int = 12, size: int = 224, area: tuple[float, float] = (0.08, 0.35),
                   seed: int = 7) -> AuditSet:
    """`per_class` composites of each COMPOSITE_CLASSES object, cycling through the backgrounds."""
    rng = np.random.default_rng(seed)
    crops = {}
    for p in PHOTOS:
        if p.label in COMPOSITE_CLASSES:
            x0, y0, x1, y1 = p.box
            crops[p.label] = Image.fromarray(_picture(p.name)[y0:y1, x0:x1])
    backgrounds = _backgrounds(size)
    samples = []
    for k in range(per_class):
        for label in COMPOSITE_CLASSES:
            bg_name, bg = backgrounds[(k + COMPOSITE_CLASSES.index(label)) % len(backgrounds)]
            crop = crops[label]
            share = rng.uniform(*area)
            scale = np.sqrt(share * size * size / (crop.width * crop.height))
            w, h = min(size, max(8, round(crop.width * scale))), min(size, max(8, round(crop.height * scale)))
            if rng.random() < 0.5:
                crop_now = crop.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                crop_now = crop
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            canvas = Image.fromarray(bg.copy())
            canvas.paste(crop_now.resize((w, h), Image.BILINEAR), (x0, y0))
            samples.append(Sample(image=_tensor(np.asarray(canvas)), label=classes.index(label),
                                  boxes=(Box(float(x0), float(y0), float(x0 + w), float(y0 + h)),),
                                  id=f"composite-{label}-{k:02d}-{bg_name}"))
    return AuditSet(samples, classes, name="composites",
                    source=f"skimage.data objects pasted at {area[0]:.0%}-{area[1]:.0%} on backgrounds, seed {seed}")
