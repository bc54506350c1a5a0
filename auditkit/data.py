"""Audit sets: images in pixel space with labels and object boxes.

Images are float tensors in [0, 1], shape C x H x W. Boxes are
(x0, y0, x1, y1) in pixels of that image, x1 and y1 exclusive, so a box
covering the whole of a W x H image is (0, 0, W, H).

Pixels are checked in one place, Sample (see _valid_pixels): every Sample,
built directly, by a loader or by resizing, holds a float C x H x W tensor
with 1 or 3 channels, H, W >= 1 and finite values in [0, 1].

Loaders (all raise AuditDataError, whose message names the file or dataset
and the entry at fault):

- AuditSet.from_folder(path): a folder with an ``annotations.json``;
- AuditSet.from_coco(annotation_json, images_dir): a COCO detection file;
- AuditSet.from_torchvision(dataset): any torchvision-style dataset.

AuditSet.resized(size) and AuditSet.for_model(class_names, input_size) bring
a set to a model's input size (boxes scaled along) and class order.
"""
from __future__ import annotations

import json
import math
import numbers
import operator
import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator, Sequence

import torch

#: Pixels of rounding a box may stick out of its image before it is an error.
BOX_SLACK = 0.5
#: How far a pixel value may stray outside [0, 1] (rounding) before it is an error; it is clamped.
PIXEL_SLACK = 1e-3
#: Channel counts an image may have: grey or RGB (what the loaders make and the evidence can draw).
CHANNELS = (1, 3)


class AuditDataError(ValueError):
    """An audit set could not be built; the message names the file and the entry."""


class _Bad(Exception):
    """Internal: a problem with one entry; the loader prefixes where it happened."""


def _valid_pixels(image: Any) -> torch.Tensor:
    """`image` when it holds pixels as auditkit expects them; else a _Bad saying what was expected.

    Expected: a floating-point torch.Tensor C x H x W with C in CHANNELS, H and
    W >= 1, every value finite and in [0, 1]. Values at most PIXEL_SLACK
    outside [0, 1] are rounding: they come back clamped, in a new tensor;
    otherwise the very same tensor comes back. Cost: one min/max pass.
    """
    if not isinstance(image, torch.Tensor):
        raise _Bad(f"image is a {type(image).__name__}, expected a float torch.Tensor C x H x W")
    shape = tuple(image.shape)
    if image.ndim != 3:
        raise _Bad(f"image has shape {shape}, expected C x H x W")
    if shape[0] not in CHANNELS:
        raise _Bad(f"image has shape {shape}, expected C x H x W with 1 or 3 channels")
    if shape[1] < 1 or shape[2] < 1:
        raise _Bad(f"image has shape {shape}, expected C x H x W with H, W >= 1")
    if not image.is_floating_point():
        hint = " (divide uint8 pixels by 255)" if image.dtype == torch.uint8 else ""
        raise _Bad(f"image has dtype {image.dtype}, expected a float tensor with values in [0, 1]{hint}")
    lo, hi = (float(v) for v in torch.aminmax(image.detach()))  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(image.detach())).sum())
        raise _Bad(f"image has {bad} pixel value(s) NaN or infinite, expected finite values in [0, 1]")
    if lo < -PIXEL_SLACK or hi > 1.0 + PIXEL_SLACK:
        raise _Bad(
            f"image values lie in [{lo:.3g}, {hi:.3g}], expected [0, 1]: divide 0-255 pixels by 255, and "
            f"leave normalisation (a Normalize transform) to the model spec's mean/std"
        )
    if lo < 0.0 or hi > 1.0:
        return image.clamp(0.0, 1.0)
    return image


@dataclass(frozen=True)
class Box:
    """An axis-aligned box (x0, y0, x1, y1) in pixels; x1, y1 exclusive."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise AuditDataError(
                f"box {self.as_tuple()} is empty: expected x0 < x1 and y0 < y1"
            )

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    def scaled(self, sx: float, sy: float) -> "Box":
        return Box(self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy)

    def within(self, width: float, height: float, slack: float = BOX_SLACK) -> bool:
        """True when the box lies inside a width x height image (`slack` px of rounding allowed)."""
        return (
            self.x0 >= -slack
            and self.y0 >= -slack
            and self.x1 <= width + slack
            and self.y1 <= height + slack
        )

    def clipped(self, width: float, height: float) -> "Box | None":
        """The box cut to the width x height image; None when nothing of it is left."""
        x0, y0 = max(0.0, self.x0), max(0.0, self.y0)
        x1, y1 = min(float(width), self.x1), min(float(height), self.y1)
        if x1 > x0 and y1 > y0:
            if (x0, y0, x1, y1) == self.as_tuple():
                return self
            return Box(x0, y0, x1, y1)
        return None

    def pixel_slices(self, width: int, height: int) -> tuple[slice, slice]:
        """(rows, cols) slices of the pixels whose centres lie in the box, clipped to the image."""
        c0 = max(0, min(width, math.floor(self.x0 + 0.5)))
        c1 = max(c0, min(width, math.floor(self.x1 + 0.5)))
        r0 = max(0, min(height, math.floor(self.y0 + 0.5)))
        r1 = max(r0, min(height, math.floor(self.y1 + 0.5)))
        return slice(r0, r1), slice(c0, c1)


@dataclass
class Sample:
    """One audit image: pixels (C x H x W in [0, 1]), class index, object boxes, an id.

    The image is checked by _valid_pixels when the sample is built and whenever
    `image` is assigned; bad pixels are an AuditDataError naming the sample.
    (Changing the tensor in place afterwards is not seen.)
    """

    image: torch.Tensor
    label: int
    boxes: tuple[Box, ...] = ()
    id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", self._checked(self.image))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "image" and "id" in self.__dict__:  # __init__ sets id last; __post_init__ checks then
            value = self._checked(value)
        object.__setattr__(self, name, value)

    def _checked(self, image: Any) -> torch.Tensor:
        try:
            return _valid_pixels(image)
        except _Bad as e:
            where = f"sample {self.id!r}" if self.id else "sample (no id)"
            error = AuditDataError(f"{where}: {e}")
            error.reason = str(e)  # without the sample's name: a loader names its entry instead
            raise error from None

    def box_mask(self) -> torch.Tensor:
        """H x W bool mask of the pixels inside any of the boxes."""
        _, h, w = self.image.shape
        mask = torch.zeros(h, w, dtype=torch.bool)
        for box in self.boxes:
            rows, cols = box.pixel_slices(w, h)
            mask[rows, cols] = True
        return mask

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in getattr(self.image, "shape", ()))
        return f"Sample(id={self.id!r}, label={self.label!r}, image={shape}, boxes={len(self.boxes)})"


@dataclass
class AuditSet:
    """A named, ordered collection of samples sharing one list of class names.

    Images may differ in size; images(), box_masks() and a model need one
    size, which resized() or for_model() give them.
    """

    samples: list[Sample]
    class_names: tuple[str, ...]
    name: str = "audit-set"
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        self.samples = list(self.samples)
        if not self.samples:
            raise AuditDataError(f"audit set {self.name!r} is empty: expected at least one sample")
        seen: dict[str, int] = {}
        for name in self.class_names:
            if name in seen:
                raise AuditDataError(f"audit set {self.name!r}: class name {name!r} appears twice in class_names")
            seen[name] = 1
        for i, sample in enumerate(self.samples):
            if not isinstance(sample, Sample):  # a Sample's pixels were checked when it was built
                raise AuditDataError(
                    f"audit set {self.name!r}, sample {i}: a {type(sample).__name__}, expected a Sample"
                )
            where = f"audit set {self.name!r}, sample {i} (id {sample.id!r})" if sample.id else (
                f"audit set {self.name!r}, sample {i} (no id)"
            )
            try:
                label = operator.index(sample.label)
            except TypeError:
                raise AuditDataError(f"{where}: label {sample.label!r} is not an integer class index") from None
            if isinstance(sample.label, bool) or not 0 <= label < len(self.class_names):
                raise AuditDataError(
                    f"{where}: label {sample.label!r} is not a class index 0..{len(self.class_names) - 1}"
                )
            if type(sample.label) is not int:
                sample.label = int(label)
            if not isinstance(sample.boxes, tuple):
                sample.boxes = tuple(sample.boxes)
            _, h, w = sample.image.shape
            for box in sample.boxes:
                if not isinstance(box, Box):
                    raise AuditDataError(f"{where}: box {box!r} is a {type(box).__name__}, expected a Box")
                if not box.within(w, h):
                    raise AuditDataError(
                        f"{where}: box {box.as_tuple()} lies outside the {w} x {h} image"
                    )

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def __repr__(self) -> str:
        size = self.image_size
        shown = f"{size[0]}x{size[1]}" if size else "mixed"
        return (
            f"AuditSet(name={self.name!r}, samples={len(self.samples)}, "
            f"classes={len(self.class_names)}, size={shown})"
        )

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) shared by all images, or None when they differ."""
        sizes = {s.size for s in self.samples}
        return next(iter(sizes)) if len(sizes) == 1 else None

    def _check_one_shape(self, what: str) -> None:
        shapes: dict[tuple[int, ...], str] = {}
        for s in self.samples:
            shapes.setdefault(tuple(s.image.shape), s.id)
        if len(shapes) > 1:
            listed = ", ".join(f"{'x'.join(map(str, k))} ({v!r})" for k, v in list(shapes.items())[:4])
            raise AuditDataError(
                f"audit set {self.name!r}: {what} needs images of one shape, found {len(shapes)} "
                f"(e.g. {listed}); use resized((H, W)) or for_model(...) first"
            )

    def images(self) -> torch.Tensor:
        """N x C x H x W float tensor of all images (they must share one size)."""
        self._check_one_shape("images()")
        return torch.stack([s.image for s in self.samples])

    def labels(self) -> torch.Tensor:
        """N int64 tensor of class indices."""
        return torch.tensor([s.label for s in self.samples], dtype=torch.long)

    def box_masks(self) -> torch.Tensor:
        """N x H x W bool tensor, True inside any box of the sample."""
        self._check_one_shape("box_masks()")
        return torch.stack([s.box_mask() for s in self.samples])

    def with_boxes(self) -> tuple[list[int], "AuditSet | None"]:
        """Indices of the samples that have at least one box, and the set of those (None when there are none)."""
        indices = [i for i, sample in enumerate(self.samples) if sample.boxes]
        return indices, (self.subset(indices) if indices else None)

    def subset(self, indices: Sequence[int]) -> "AuditSet":
        return replace(self, samples=[self.samples[i] for i in indices])

    # ------------------------------------------------------------------ resizing

    def resized(self, size: tuple[int, int]) -> "AuditSet":
        """A copy with every image resized to size = (H, W), boxes scaled along.

        Resizing is bilinear with antialiasing, values clamped to [0, 1]. A box
        of a w x h image is scaled by (W / w, H / h) and clipped to the new
        image. Samples already H x W are kept as they are (no copy).
        """
        target = _check_size(size, "resized(size)")
        return replace(self, samples=[_resize_sample(s, target) for s in self.samples], extra=dict(self.extra))

    def for_model(self, class_names: Sequence[str], input_size: tuple[int, int]) -> "AuditSet":
        """This set as a model sees it: images at input_size (H, W), labels in the model's class order.

        Labels are matched by class NAME: the audit set's class_names may be in
        a different order from the model's, or a subset of them. A sample whose
        class the model does not have is an AuditDataError. The result's
        class_names are the model's.
        """
        model_names = tuple(str(c) for c in class_names)
        if not model_names:
            raise AuditDataError(f"audit set {self.name!r}: for_model() got no model class names")
        index: dict[str, int] = {}
        for i, c in enumerate(model_names):
            if c in index:
                raise AuditDataError(f"audit set {self.name!r}: model class name {c!r} appears twice")
            index[c] = i
        target = _check_size(input_size, "for_model(input_size)")
        remap = {k: index.get(c) for k, c in enumerate(self.class_names)}
        bad = [s for s in self.samples if remap[s.label] is None]
        if bad:
            first = bad[0]
            more = f" (and {len(bad) - 1} more samples)" if len(bad) > 1 else ""
            raise AuditDataError(
                f"audit set {self.name!r}, sample {first.id!r}: class {self.class_names[first.label]!r} "
                f"is not a class of the model{more}; the model's classes are {list(model_names)}"
            )
        samples = []
        for s in self.samples:
            moved = _resize_sample(s, target)
            if remap[s.label] != s.label:
                moved = replace(moved, label=remap[s.label])
            samples.append(moved)
        return replace(self, samples=samples, class_names=model_names, extra=dict(self.extra))

    # ------------------------------------------------------------------ loaders

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        *,
        size: tuple[int, int] | None = None,
        name: str | None = None,
    ) -> "AuditSet":
        """Load a folder of images described by ``<path>/annotations.json``.

        The annotations file looks like this::

            {
              "classes": ["circle", "square", "triangle"],
              "images": [
                {"file": "img_000.png", "label": "circle", "boxes": [[12, 8, 40, 36]]},
                {"file": "sub/img_001.jpg", "label": 2, "boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "id": "optional-id"}
              ]
            }

        - ``classes``: the class names, unique; labels index into this list.
        - ``file``: the image path relative to the folder (subfolders allowed;
          absolute paths and paths leading out of the folder are errors).
        - ``label``: a class name, or an index into ``classes``.
        - ``boxes``: optional, object boxes ``[x0, y0, x1, y1]`` in pixels of
          the original file, x1 and y1 exclusive (a box covering a whole
          W x H image is ``[0, 0, W, H]``). Boxes may stick out of the image
          by 0.5 px (they are clipped); beyond that they are an error.
        - ``id``: optional, unique; defaults to ``file``.

        Other keys in an entry are an error (they are usually typos, such as
        "box"). Images are read with PIL as stored (EXIF orientation is not
        applied), converted to RGB, and become float C x H x W tensors in
        [0, 1]. With ``size=(H, W)`` every image is resized to it as it is
        read and its boxes are scaled along; without it images keep their own
        sizes, which may differ (resized() or for_model() unify them before
        images() is called). ``name`` defaults to the folder's name.

        ``path`` may also be the annotations file itself. Every problem is an
        AuditDataError naming the annotations file and the entry, e.g.
        ``.../annotations.json entry 3 (img_003.png): image file not found: /abs/path/img_003.png``.
        """
        given = Path(path).expanduser()
        if given.is_file() and given.suffix.lower() == ".json":
            ann_path, root = given, given.parent
        else:
            ann_path, root = given / "annotations.json", given
        root = root.resolve()
        ann_path = root / ann_path.name
        if not root.is_dir():
            raise AuditDataError(f"{given}: audit folder not found")
        if not ann_path.is_file():
            raise AuditDataError(
                f"{ann_path}: annotations file not found (from_folder expects <folder>/annotations.json)"
            )
        target = _check_size(size, "from_folder(size)") if size is not None else None
        data = _load_json(ann_path)
        if not isinstance(data, dict):
            raise AuditDataError(
                f'{ann_path}: expected a JSON object with "classes" and "images", got {_json_type(data)}'
            )
        for key, what in (("classes", "a list of class names"), ("images", "a list of image entries")):
            if key not in data:
                raise AuditDataError(f'{ann_path}: missing key "{key}" ({what})')
            if not isinstance(data[key], list):
                raise AuditDataError(f'{ann_path}: "{key}" must be {what}, got {_json_type(data[key])}')
        classes = data["classes"]
        if not classes:
            raise AuditDataError(f'{ann_path}: "classes" is empty: expected at least one class name')
        class_index: dict[str, int] = {}
        for k, c in enumerate(classes):
            if not isinstance(c, str) or not c:
                raise AuditDataError(f'{ann_path}: "classes"[{k}] must be a non-empty string, got {c!r}')
            if c in class_index:
                raise AuditDataError(
                    f'{ann_path}: class {c!r} appears twice in "classes" (at {class_index[c]} and {k})'
                )
            class_index[c] = k
        entries = data["images"]
        if not entries:
            raise AuditDataError(f'{ann_path}: "images" is empty: an audit set needs at least one image')

        allowed = ("file", "label", "boxes", "id")
        samples: list[Sample] = []
        ids: dict[str, int] = {}
        for i, entry in enumerate(entries):
            shown = entry.get("file") if isinstance(entry, dict) and isinstance(entry.get("file"), str) else "no file"
            where = f"{ann_path} entry {i} ({shown})"
            try:
                if not isinstance(entry, dict):
                    raise _Bad(f"expected an object with \"file\" and \"label\", got {_json_type(entry)}")
                unknown = sorted(set(entry) - set(allowed))
                if unknown:
                    raise _Bad(f"unknown key(s) {unknown}; an entry has {list(allowed)}")
                if "file" not in entry:
                    raise _Bad('missing "file" (the image path relative to the folder)')
                if "label" not in entry:
                    raise _Bad(f'missing "label" (a class name or an index into "classes": {list(classes)})')
                file_path = _inside(root, entry["file"], '"file"')
                label = _label_from(entry["label"], classes, class_index)
                sample_id = entry.get("id", entry["file"])
                if not isinstance(sample_id, str) or not sample_id:
                    raise _Bad(f'"id" must be a non-empty string, got {sample_id!r}')
                if sample_id in ids:
                    raise _Bad(f"id {sample_id!r} is used by entry {ids[sample_id]} too; ids must be unique")
                ids[sample_id] = i
                raw_boxes = entry.get("boxes")
                if raw_boxes is None:
                    raw_boxes = []
                if not isinstance(raw_boxes, list):
                    raise _Bad(f'"boxes" must be a list of [x0, y0, x1, y1], got {_json_type(raw_boxes)}')
                sample = _new_sample(_read_image(file_path, "RGB"), label, id=sample_id)
                _, h, w = sample.image.shape
                sample.boxes = tuple(_box_xyxy(b, w, h, f"box {k}") for k, b in enumerate(raw_boxes))
            except _Bad as e:
                raise AuditDataError(f"{where}: {e}") from None
            samples.append(_resize_sample(sample, target) if target else sample)
        return cls(
            samples=samples,
            class_names=tuple(classes),
            name=name or root.name,
            source=str(ann_path),
            extra={"format": "folder"},
        )

    @classmethod
    def from_coco(
        cls,
        annotation_json: str | os.PathLike,
        images_dir: str | os.PathLike,
        *,
        size: tuple[int, int] | None = None,
        name: str | None = None,
        category_names: Sequence[str] | None = None,
        min_area: float = 0.0,
    ) -> "AuditSet":
        """Load a COCO detection file as a classification audit set.

        Reads ``images`` (id, file_name, width, height), ``annotations``
        (image_id, category_id, bbox [x, y, w, h], iscrowd) and ``categories``
        (id, name); image files are ``images_dir / file_name``.

        - class_names are the category names in category-id order, or
          ``category_names`` (which must be category names): then only those
          classes, in that order, and annotations of other categories are
          ignored.
        - Each image gets ONE label: the category of its largest (by bbox
          area w * h) non-crowd annotation (the first one on a tie). Its boxes
          are all boxes of that category in the image, crowd boxes included,
          converted to (x0, y0, x1, y1).
        - Images are SKIPPED when they have no annotation left (none at all,
          only crowd ones, only other categories, or their largest is smaller
          than ``min_area`` px^2). ``extra["skipped"]`` counts them, and
          skipped image files are not read.
        - Boxes with zero width or height (real COCO files have a few) are
          ignored and counted in ``extra["degenerate_boxes"]``.
        - ``extra["image_ids"]`` holds the COCO image id of each sample;
          a sample's id is its file_name.

        Image files are read as in from_folder (RGB, [0, 1]); when the file's
        size differs from the width/height in the JSON it is an error. Use
        ``size=(H, W)`` to resize as images are read (recommended for big
        sets). Errors are AuditDataError naming the JSON file and the image
        (id and file_name) or annotation at fault.
        """
        json_path = Path(annotation_json).expanduser().resolve()
        root = Path(images_dir).expanduser().resolve()
        if not json_path.is_file():
            raise AuditDataError(f"{json_path}: COCO annotation file not found")
        if not root.is_dir():
            raise AuditDataError(f"{json_path}: images_dir {root} is not a folder")
        target = _check_size(size, "from_coco(size)") if size is not None else None
        if not _is_number(min_area) or not math.isfinite(min_area) or min_area < 0:
            raise AuditDataError(f"{json_path}: min_area must be a number >= 0, got {min_area!r}")
        data = _load_json(json_path)
        if not isinstance(data, dict):
            raise AuditDataError(f"{json_path}: expected a COCO JSON object, got {_json_type(data)}")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise AuditDataError(f'{json_path}: missing key "{key}" (not a COCO detection file?)')
            if not isinstance(data[key], list):
                raise AuditDataError(f'{json_path}: "{key}" must be a list, got {_json_type(data[key])}')

        # categories
        cat_names: dict[Any, str] = {}
        for k, cat in enumerate(data["categories"]):
            where = f'{json_path} categories[{k}]'
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise AuditDataError(f'{where}: expected an object with "id" and "name", got {cat!r}')
            if not _is_int(cat["id"]):
                raise AuditDataError(f'{where}: "id" must be an integer, got {cat["id"]!r}')
            if not isinstance(cat["name"], str) or not cat["name"]:
                raise AuditDataError(f'{where}: "name" must be a non-empty string, got {cat["name"]!r}')
            if cat["id"] in cat_names:
                raise AuditDataError(f"{where}: category id {cat['id']} appears twice")
            cat_names[cat["id"]] = cat["name"]
        if not cat_names:
            raise AuditDataError(f'{json_path}: "categories" is empty')
        all_names = [cat_names[c] for c in sorted(cat_names)]
        if category_names is None:
            dupes = sorted({n for n in all_names if all_names.count(n) > 1})
            if dupes:
                raise AuditDataError(
                    f"{json_path}: several categories share the name(s) {dupes}; pass category_names to merge them"
                )
            class_names = tuple(all_names)
        else:
            if isinstance(category_names, str):
                raise AuditDataError(f"{json_path}: category_names must be a list of names, got a string")
            class_names = tuple(category_names)
            if not class_names:
                raise AuditDataError(f"{json_path}: category_names is empty")
            for c in class_names:
                if c not in all_names:
                    raise AuditDataError(
                        f"{json_path}: category_names has {c!r}, which is not a category; "
                        f"the categories are {all_names}"
                    )
            if len(set(class_names)) != len(class_names):
                raise AuditDataError(f"{json_path}: category_names has duplicates: {list(class_names)}")
        name_index = {c: i for i, c in enumerate(class_names)}
        cat_index = {cid: name_index[n] for cid, n in cat_names.items() if n in name_index}

        # images
        images: dict[Any, dict] = {}
        for k, img in enumerate(data["images"]):
            if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
                raise AuditDataError(
                    f'{json_path} images[{k}]: expected an object with "id" and "file_name", got {_short(img)}'
                )
            where = f"{json_path} image {img['id']!r} ({img['file_name']})"
            if not isinstance(img["id"], (int, str)) or isinstance(img["id"], bool):
                raise AuditDataError(f'{where}: "id" must be an integer or a string')
            if img["id"] in images:
                raise AuditDataError(f"{where}: image id {img['id']!r} appears twice")
            for key in ("width", "height"):
                if key in img and not (_is_int(img[key]) and img[key] > 0):
                    raise AuditDataError(f'{where}: "{key}" must be a positive integer, got {img[key]!r}')
            images[img["id"]] = img
        if not images:
            raise AuditDataError(f'{json_path}: "images" is empty: an audit set needs at least one image')

        # annotations, grouped per image: (class index, Box, area, crowd)
        per_image: dict[Any, list[tuple[int, tuple[float, float, float, float], float, bool]]] = {}
        degenerate = 0
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise AuditDataError(f"{json_path} annotations[{k}]: expected an object, got {_json_type(ann)}")
            where = f"{json_path} annotation {k} (id {ann.get('id')!r}, image {ann.get('image_id')!r})"
            for key in ("image_id", "category_id", "bbox"):
                if key not in ann:
                    raise AuditDataError(f'{where}: missing "{key}"')
            img = images.get(ann["image_id"]) if isinstance(ann["image_id"], (int, str)) else None
            if img is None:
                raise AuditDataError(f"{where}: image_id {ann['image_id']!r} is not in \"images\"")
            where = f"{json_path} annotation {k} (id {ann.get('id')!r}, image {img['id']!r} ({img['file_name']}))"
            if not _is_int(ann["category_id"]) or ann["category_id"] not in cat_names:
                raise AuditDataError(f"{where}: category_id {ann['category_id']!r} is not in \"categories\"")
            if ann["category_id"] not in cat_index:
                continue
            bbox = ann["bbox"]
            if (
                not isinstance(bbox, list)
                or len(bbox) != 4
                or not all(_is_number(v) and math.isfinite(v) for v in bbox)
            ):
                raise AuditDataError(f"{where}: bbox {_short(bbox)} is not 4 numbers [x, y, w, h]")
            x, y, bw, bh = (float(v) for v in bbox)
            if bw <= 0 or bh <= 0:
                degenerate += 1
                continue
            xyxy = (x, y, x + bw, y + bh)
            if "width" in img and "height" in img and not Box(*xyxy).within(img["width"], img["height"]):
                raise AuditDataError(
                    f"{where}: bbox {bbox} lies outside the {img['width']} x {img['height']} image"
                )
            crowd = bool(ann.get("iscrowd", 0))
            per_image.setdefault(img["id"], []).append((cat_index[ann["category_id"]], xyxy, bw * bh, crowd))

        samples: list[Sample] = []
        image_ids: list[Any] = []
        skipped = 0
        seen_ids: set[str] = set()
        for img_id, img in images.items():
            anns = per_image.get(img_id, [])
            eligible = [a for a in anns if not a[3] and a[2] >= min_area]
            if not eligible:
                skipped += 1
                continue
            label = max(eligible, key=lambda a: a[2])[0]  # max() keeps the first on ties
            where = f"{json_path} image {img_id!r} ({img['file_name']})"
            sample_id = str(img["file_name"])
            if sample_id in seen_ids:
                sample_id = f"{sample_id}#{img_id}"
            seen_ids.add(sample_id)
            try:
                file_path = _inside(root, img["file_name"], "file_name")
                sample = _new_sample(_read_image(file_path, "RGB"), label, id=sample_id)
                _, h, w = sample.image.shape
                if "width" in img and "height" in img and (img["width"], img["height"]) != (w, h):
                    raise _Bad(
                        f"{file_path} is {w} x {h} but the JSON says {img['width']} x {img['height']}"
                    )
                sample.boxes = tuple(
                    _box_xyxy(list(a[1]), w, h, "bbox (as x0, y0, x1, y1)") for a in anns if a[0] == label
                )
            except _Bad as e:
                raise AuditDataError(f"{where}: {e}") from None
            samples.append(_resize_sample(sample, target) if target else sample)
            image_ids.append(img_id)
        if not samples:
            raise AuditDataError(
                f"{json_path}: no usable image: all {len(images)} images were skipped (no non-crowd "
                f"annotation of {list(class_names)} with bbox area >= {min_area})"
            )
        return cls(
            samples=samples,
            class_names=class_names,
            name=name or json_path.stem,
            source=str(json_path),
            extra={
                "format": "coco",
                "skipped": skipped,
                "degenerate_boxes": degenerate,
                "image_ids": image_ids,
                "images_dir": str(root),
            },
        )

    @classmethod
    def from_torchvision(
        cls,
        dataset: Any,
        *,
        class_names: Sequence[str] | None = None,
        size: tuple[int, int] | None = None,
        limit: int | None = None,
        name: str | None = None,
    ) -> "AuditSet":
        """Build an audit set from a torchvision-style dataset of (image, target) pairs.

        image: a PIL image (mode "L"/"1"/"LA" gives 1 channel, any other mode
        is converted to RGB), a C x H x W tensor (uint8 is divided by 255,
        float is kept and must lie in [0, 1], so leave Normalize out of the
        dataset's transform) or an H x W (x C) numpy array.

        target, one of:

        - an int: the label, no boxes;
        - a dict with "boxes" (N x 4, x0 y0 x1 y1; a tv_tensors.BoundingBoxes
          in another format is converted) and "labels" (N): the label of the
          largest box, with all boxes of that label;
        - a VOC dict ``{"annotation": {"object": [{"name": ..., "bndbox":
          {"xmin", "ymin", "xmax", "ymax"}}, ...]}}`` ("object" may be a
          single dict); VOC's 1-based inclusive coordinates become
          x0 = xmin - 1, x1 = xmax (y likewise); largest object as above;
        - a list of COCO dicts with "bbox" [x, y, w, h] and "category_id":
          the category of the largest non-crowd box, with all boxes of it
          (crowd ones too); zero-size boxes are ignored.

        Labels (ints, dict "labels", "category_id") are indices into
        class_names, or class names. When the dataset has a pycocotools
        ``coco`` attribute (torchvision's CocoDetection, wrapped or not),
        category ids are mapped by category name instead, and categories
        missing from class_names are ignored; otherwise a label that is not a
        class is an error. Items without any object (e.g. CocoDetection images
        with no annotations) are skipped and counted in ``extra["skipped"]``.

        class_names defaults to ``dataset.classes``, else to the COCO category
        names in id order; otherwise pass it. ``limit`` stops once that many
        samples are kept (skipped items do not count). ``size=(H, W)``
        resizes each image as it is read (boxes scaled along). Sample ids are
        the file path for ImageFolder-like datasets (``samples`` and
        ``root``), the file_name for CocoDetection, else the dataset index;
        ``extra["indices"]`` holds the dataset index of each sample. Errors
        are AuditDataError naming the dataset and the index.
        """
        ds_name = type(dataset).__name__
        if hasattr(dataset, "_dataset") and type(dataset).__name__.endswith("Wrapper"):
            ds_name = f"{ds_name}({type(dataset._dataset).__name__})"
        target = _check_size(size, "from_torchvision(size)") if size is not None else None
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise AuditDataError(f"dataset {ds_name}: limit must be a positive integer or None, got {limit!r}")
        coco_cats = _coco_categories(dataset)
        if class_names is None:
            classes = getattr(dataset, "classes", None)
            if classes is not None and not isinstance(classes, str):
                class_names = [str(c) for c in classes]
            elif coco_cats is not None:
                class_names = [coco_cats[c] for c in sorted(coco_cats)]
            else:
                raise AuditDataError(
                    f"dataset {ds_name} has no 'classes' attribute: pass class_names=[...] "
                    f"(one name per label index)"
                )
        elif isinstance(class_names, str):
            raise AuditDataError(f"dataset {ds_name}: class_names must be a list of names, got a string")
        names = tuple(str(c) for c in class_names)
        if not names:
            raise AuditDataError(f"dataset {ds_name}: class_names is empty")
        if len(set(names)) != len(names):
            raise AuditDataError(f"dataset {ds_name}: class_names has duplicates: {list(names)}")
        name_index = {c: i for i, c in enumerate(names)}
        resolver = _LabelResolver(names, name_index, coco_cats)

        samples: list[Sample] = []
        indices: list[int] = []
        skipped = 0
        for index, item in _dataset_items(dataset, ds_name):
            where = f"dataset {ds_name} index {index}"
            try:
                if isinstance(item, _ItemError):
                    raise AuditDataError(f"{where}: reading the item failed: {item.error}") from item.error
                if not isinstance(item, (tuple, list)) or len(item) < 2:
                    raise _Bad(f"expected an (image, target) pair, got {type(item).__name__}")
                sample = _new_sample(_image_to_tensor(item[0]), id=_torchvision_id(dataset, index))
                _, h, w = sample.image.shape
                found = _target_label_boxes(item[1], w, h, resolver)
            except _Bad as e:
                raise AuditDataError(f"{where}: {e}") from None
            if found is None:
                skipped += 1
                continue
            sample.label, sample.boxes = found
            samples.append(_resize_sample(sample, target) if target else sample)
            indices.append(index)
            if limit is not None and len(samples) >= limit:
                break
        if not samples:
            raise AuditDataError(
                f"dataset {ds_name}: no usable sample ({skipped} items skipped as they had no object "
                f"of {list(names)})" if skipped else f"dataset {ds_name} is empty"
            )
        root = getattr(dataset, "root", None)
        return cls(
            samples=samples,
            class_names=names,
            name=name or ds_name,
            source=f"torchvision {ds_name}" + (f" at {root}" if isinstance(root, (str, os.PathLike)) else ""),
            extra={"format": "torchvision", "skipped": skipped, "indices": indices},
        )


# ---------------------------------------------------------------------- helpers


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if _is_number(v) else type(v).__name__
    )


def _short(v: Any, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_size(size: Any, what: str) -> tuple[int, int]:
    try:
        parts = tuple(size)
    except TypeError:
        parts = ()
    if len(parts) != 2 or not all(_is_int(p) and p > 0 for p in parts):
        raise AuditDataError(f"{what} must be (height, width), two positive integers, got {size!r}")
    return int(parts[0]), int(parts[1])


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """C x H x W image resized to size (bilinear, antialiased, clamped to [0, 1]); same tensor if already that size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if not image.is_floating_point():
        image = image.to(torch.float32) / (255.0 if image.dtype == torch.uint8 else 1.0)
    out = torch.nn.functional.interpolate(
        image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]
    return out.clamp_(0.0, 1.0)


def _resize_sample(sample: Sample, size: tuple[int, int]) -> Sample:
    h, w = sample.size
    H, W = size
    if (h, w) == (H, W):
        return sample
    sx, sy = W / w, H / h
    boxes = []
    for box in sample.boxes:
        clipped = box.scaled(sx, sy).clipped(W, H)
        if clipped is not None:  # None only for a box lying wholly in the rounding slack
            boxes.append(clipped)
    return replace(sample, image=_resize_image(sample.image, size), boxes=tuple(boxes))


def _new_sample(image: torch.Tensor, label: int = 0, boxes: tuple[Box, ...] = (), id: str = "") -> Sample:
    """A Sample built by a loader: a refused image is a _Bad, which the loader prefixes with the entry."""
    try:
        return Sample(image=image, label=label, boxes=boxes, id=id)
    except AuditDataError as e:
        raise _Bad(getattr(e, "reason", str(e))) from None


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise AuditDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise AuditDataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AuditDataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _inside(root: Path, rel: Any, key: str) -> Path:
    """root / rel, refusing paths that are absolute or lead out of root."""
    if not isinstance(rel, str) or not rel.strip():
        raise _Bad(f"{key} must be a non-empty string (a path relative to the folder), got {rel!r}")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute():
        raise _Bad(f"{key} {rel!r} is an absolute path; give a path relative to {root}")
    joined = os.path.normpath(os.path.join(root, rel))
    if os.path.commonpath([joined, str(root)]) != str(root):
        raise _Bad(f"{key} {rel!r} leads outside the folder {root}")
    if joined == str(root):
        raise _Bad(f"{key} {rel!r} names the folder itself, not an image file in it")
    return Path(joined)


def _read_image(path: Path, mode: str) -> torch.Tensor:
    if not path.is_file():
        raise _Bad(f"image file not found: {path}")
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_tensor(img, mode)
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        raise _Bad(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _pil_to_tensor(img: Any, mode: str) -> torch.Tensor:
    import numpy as np

    if img.mode != mode:
        img = img.convert(mode)
    arr = np.array(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr /= 255.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _label_from(raw: Any, classes: Sequence[str], class_index: dict[str, int]) -> int:
    if isinstance(raw, str):
        if raw not in class_index:
            raise _Bad(f"unknown label {raw!r}: not one of the classes {list(classes)}")
        return class_index[raw]
    if _is_int(raw):
        if not 0 <= raw < len(classes):
            raise _Bad(f"label index {raw} is out of range: there are {len(classes)} classes (0..{len(classes) - 1})")
        return int(raw)
    raise _Bad(f"label must be a class name or an index into the classes, got {raw!r}")


def _box_xyxy(coords: Any, width: int, height: int, what: str) -> Box:
    """A validated Box from [x0, y0, x1, y1] in a width x height image, clipped to it."""
    if isinstance(coords, torch.Tensor):
        coords = coords.tolist()
    if (
        not isinstance(coords, (list, tuple))
        or len(coords) != 4
        or not all(_is_number(v) for v in coords)
    ):
        raise _Bad(f"{what} {_short(coords)} is not 4 numbers [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (float(v) for v in coords)
    shown = [v if isinstance(v, numbers.Integral) else float(v) for v in coords]
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise _Bad(f"{what} {shown} has a coordinate that is not finite")
    if x1 <= x0 or y1 <= y0:
        raise _Bad(f"{what} {shown} is empty: expected x0 < x1 and y0 < y1")
    box = Box(x0, y0, x1, y1)
    clipped = box.clipped(width, height) if box.within(width, height) else None
    if clipped is None:
        raise _Bad(f"{what} {shown} lies outside the {width} x {height} image")
    return clipped


# ---------------------------------------------------------------------- torchvision


class _ItemError:
    def __init__(self, error: Exception) -> None:
        self.error = error


def _dataset_items(dataset: Any, ds_name: str) -> Iterable[tuple[int, Any]]:
    indexable = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    if indexable and not isinstance(dataset, torch.utils.data.IterableDataset):
        try:
            n = len(dataset)
        except TypeError:
            n = None
        if n is not None:
            for i in range(n):
                try:
                    item = dataset[i]
                except Exception as e:  # the dataset's own failure, reported with its index
                    item = _ItemError(e)
                yield i, item
            return
    try:
        iterator = iter(dataset)
    except TypeError:
        raise AuditDataError(f"dataset {ds_name} is neither indexable (len + getitem) nor iterable") from None
    i = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            yield i, _ItemError(e)
            return
        yield i, item
        i += 1


def _coco_categories(dataset: Any) -> dict[Any, str] | None:
    """{category id: name} when the dataset carries a pycocotools COCO object."""
    try:
        coco = getattr(dataset, "coco", None)
        cats = getattr(coco, "cats", None)
        if isinstance(cats, dict) and cats:
            return {cid: str(c["name"]) for cid, c in cats.items()}
    except Exception:
        return None
    return None


def _torchvision_id(dataset: Any, index: int) -> str:
    try:
        samples = getattr(dataset, "samples", None)
        root = getattr(dataset, "root", None)
        if isinstance(samples, list) and root is not None and index < len(samples):
            entry = samples[index]
            if isinstance(entry, tuple) and entry and isinstance(entry[0], (str, os.PathLike)):
                return Path(os.path.relpath(entry[0], root)).as_posix()
        coco, ids = getattr(dataset, "coco", None), getattr(dataset, "ids", None)
        if coco is not None and ids is not None:
            return str(coco.imgs[ids[index]]["file_name"])
    except Exception:
        pass
    return str(index)


def _image_to_tensor(image: Any) -> torch.Tensor:
    import numpy as np

    from PIL import Image

    if isinstance(image, Image.Image):
        mode = "L" if image.mode in ("L", "1", "LA") else "RGB"
        return _pil_to_tensor(image, mode)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise _Bad(f"numpy image has shape {image.shape}, expected H x W or H x W x C")
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if not isinstance(image, torch.Tensor):
        raise _Bad(f"image is a {type(image).__name__}, expected a PIL image or a C x H x W tensor")
    image = image.as_subclass(torch.Tensor).detach().cpu()
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.dtype == torch.uint8:
        return image.to(torch.float32) / 255.0
    if not image.is_floating_point():
        raise _Bad(f"image tensor has dtype {image.dtype}, expected uint8 or float")
    return image.clone()  # a copy: a dataset may hand out one reused buffer; Sample checks the pixels


class _LabelResolver:
    def __init__(self, names: tuple[str, ...], name_index: dict[str, int], coco_cats: dict | None) -> None:
        self.names, self.name_index, self.coco_cats = names, name_index, coco_cats

    def plain(self, raw: Any) -> int:
        """A class index or name: must be one of the classes."""
        if isinstance(raw, torch.Tensor) and raw.numel() == 1:
            raw = raw.item()
        if isinstance(raw, str):
            if raw not in self.name_index:
                raise _Bad(f"unknown label {raw!r}: not one of the classes {list(self.names)}")
            return self.name_index[raw]
        if _is_int(raw):
            if not 0 <= raw < len(self.names):
                raise _Bad(
                    f"label {raw} is out of range: there are {len(self.names)} classes (0..{len(self.names) - 1})"
                )
            return int(raw)
        raise _Bad(f"label {raw!r} is neither a class index nor a class name")

    def detection(self, raw: Any) -> int | None:
        """A detection label: a COCO category id when the dataset has one (None: not a chosen class)."""
        if self.coco_cats is None:
            return self.plain(raw)
        if isinstance(raw, torch.Tensor) and raw.numel() == 1:
            raw = raw.item()
        if raw not in self.coco_cats:
            raise _Bad(f"category id {raw!r} is not a category of the dataset's COCO file")
        return self.name_index.get(self.coco_cats[raw])


def _pick_largest(
    objects: list[tuple[int | None, list[float], bool]], w: int, h: int, what: str
) -> tuple[int, tuple[Box, ...]] | None:
    """(label, boxes) from (label or None, xyxy, crowd) objects: the largest non-crowd one's label."""
    kept = [(lab, xyxy, crowd) for lab, xyxy, crowd in objects if lab is not None]
    eligible = [o for o in kept if not o[2]]
    if not eligible:
        return None
    area = lambda o: (o[1][2] - o[1][0]) * (o[1][3] - o[1][1])  # noqa: E731
    label = max(eligible, key=area)[0]
    boxes = tuple(_box_xyxy(o[1], w, h, f"{what} {k}") for k, o in enumerate(kept) if o[0] == label)
    return label, boxes


def _target_label_boxes(target: Any, w: int, h: int, res: _LabelResolver) -> tuple[int, tuple[Box, ...]] | None:
    """(label, boxes) for one target, or None when it has no object (the item is skipped)."""
    if isinstance(target, torch.Tensor) and target.numel() == 1 and not target.is_floating_point():
        target = target.item()
    if _is_int(target) or isinstance(target, str):
        return res.plain(target), ()
    if isinstance(target, dict):
        if "annotation" in target:
            return _voc_target(target, w, h, res)
        if "boxes" in target or "labels" in target:
            return _dict_target(target, w, h, res)
        if set(target) <= {"image_id"}:
            return None  # torchvision's wrapped CocoDetection for an image without annotations
        raise _Bad(f"target dict has keys {sorted(map(str, target))}; expected \"boxes\" and \"labels\", or \"annotation\" (VOC)")
    if isinstance(target, (list, tuple)):
        if not target:
            return None
        if all(isinstance(t, dict) and "bbox" in t and "category_id" in t for t in target):
            return _coco_list_target(target, w, h, res)
    raise _Bad(
        f"unsupported target {_short(target)}: expected an int label, a dict with \"boxes\" and \"labels\", "
        f"a VOC dict {{\"annotation\": ...}}, or a list of COCO annotations with \"bbox\" and \"category_id\""
    )


def _dict_target(target: dict, w: int, h: int, res: _LabelResolver) -> tuple[int, tuple[Box, ...]] | None:
    if "boxes" not in target or "labels" not in target:
        raise _Bad('target dict needs both "boxes" and "labels"')
    boxes, labels = target["boxes"], target["labels"]
    if isinstance(boxes, torch.Tensor):
        fmt = getattr(boxes, "format", None)
        if fmt is not None and getattr(fmt, "name", "XYXY") != "XYXY":
            from torchvision.ops import box_convert

            if fmt.name not in ("XYWH", "CXCYWH"):
                raise _Bad(f"target boxes have format {fmt.name}; expected XYXY, XYWH or CXCYWH")

            boxes = box_convert(boxes.as_subclass(torch.Tensor), fmt.name.lower(), "xyxy")
        boxes = boxes.as_subclass(torch.Tensor).tolist()
    if isinstance(labels, torch.Tensor):
        labels = labels.as_subclass(torch.Tensor).reshape(-1).tolist()
    if not isinstance(boxes, (list, tuple)) or not isinstance(labels, (list, tuple)):
        raise _Bad('target "boxes" and "labels" must be tensors or lists')
    if len(boxes) != len(labels):
        raise _Bad(f'target has {len(boxes)} boxes but {len(labels)} labels')
    if not boxes:
        return None
    objects = []
    for k, (box, lab) in enumerate(zip(boxes, labels)):
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise _Bad(f"box {k} {_short(box)} is not 4 numbers [x0, y0, x1, y1]")
        objects.append((res.detection(lab), [float(v) for v in box], False))
    for k, (_, box, _) in enumerate(objects):  # validate every box, not only the chosen label's
        _box_xyxy(box, w, h, f"box {k}")
    return _pick_largest(objects, w, h, "box")


def _voc_target(target: dict, w: int, h: int, res: _LabelResolver) -> tuple[int, tuple[Box, ...]] | None:
    ann = target["annotation"]
    if not isinstance(ann, dict):
        raise _Bad(f'VOC "annotation" must be a dict, got {type(ann).__name__}')
    objs = ann.get("object", [])
    if isinstance(objs, dict):
        objs = [objs]
    if not isinstance(objs, list):
        raise _Bad(f'VOC "object" must be a list or a dict, got {type(objs).__name__}')
    objects = []
    for k, obj in enumerate(objs):
        if not isinstance(obj, dict) or "name" not in obj or not isinstance(obj.get("bndbox"), dict):
            raise _Bad(f'VOC object {k} needs "name" and "bndbox", got {_short(obj)}')
        bb = obj["bndbox"]
        try:
            xmin, ymin, xmax, ymax = (float(bb[key]) for key in ("xmin", "ymin", "xmax", "ymax"))
        except (KeyError, TypeError, ValueError):
            raise _Bad(f'VOC object {k} ({obj["name"]!r}): bndbox {_short(bb)} needs numeric xmin, ymin, xmax, ymax') from None
        xyxy = [xmin - 1.0, ymin - 1.0, xmax, ymax]
        _box_xyxy(xyxy, w, h, f"VOC object {k} ({obj['name']!r}) box")
        objects.append((res.plain(str(obj["name"])), xyxy, False))
    return _pick_largest(objects, w, h, "VOC object") if objects else None


def _coco_list_target(target: Sequence[dict], w: int, h: int, res: _LabelResolver) -> tuple[int, tuple[Box, ...]] | None:
    objects = []
    for k, ann in enumerate(target):
        bbox = ann["bbox"]
        if isinstance(bbox, torch.Tensor):
            bbox = bbox.tolist()
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) and math.isfinite(v) for v in bbox):
            raise _Bad(f"annotation {k}: bbox {_short(bbox)} is not 4 numbers [x, y, w, h]")
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            continue
        label = res.detection(ann["category_id"])
        xyxy = [x, y, x + bw, y + bh]
        _box_xyxy(xyxy, w, h, f"annotation {k} bbox (as x0, y0, x1, y1)")
        objects.append((label, xyxy, bool(ann.get("iscrowd", 0))))
    return _pick_largest(objects, w, h, "annotation")
