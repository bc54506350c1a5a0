"""Tests for auditkit.demo: the shapes generator, the audit set, and the two trained demo models."""
from __future__ import annotations

import pytest
import torch

from auditkit.data import AuditSet
from auditkit.demo import WEIGHTS_DIR, demo_model, demo_shortcut_model, load_weights, shapes_dataset
from auditkit.demo.model import LAYERS, ShapesCNN
from auditkit.demo.shapes import CLASS_NAMES, KEEP_OUT, MARKER_PALETTE, MARKER_SPAN, generate

A, B = MARKER_SPAN


def corner(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x 6 x 6 marker area."""
    return images[:, :, A:B, A:B]


def palette_index(patch: torch.Tensor) -> int | None:
    """Index of the palette colour `patch` (3 x h x w) is filled with, or None."""
    for k, colour in enumerate(MARKER_PALETTE):
        if torch.equal(patch, torch.tensor(colour).view(3, 1, 1).expand_as(patch)):
            return k
    return None


# ---------------------------------------------------------------------- generator


def test_generate_shapes_and_types():
    images, labels, boxes = generate(6, 3)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.float32
    assert labels.shape == (6,) and labels.dtype == torch.int64
    assert len(boxes) == 6
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert set(labels.tolist()) <= set(range(len(CLASS_NAMES)))


def test_generate_is_deterministic():
    first, second = generate(8, 5), generate(8, 5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]
    other = generate(8, 6)
    assert not torch.equal(first[0], other[0])


def test_generate_image_depends_on_seed_and_index_only():
    short, long = generate(3, 9), generate(7, 9)
    assert torch.equal(short[0], long[0][:3]) and short[2] == long[2][:3]


def test_boxes_are_the_exact_bounding_boxes_of_the_shapes():
    images, labels, boxes, masks = generate(60, 11, return_masks=True, marker="none")
    for image, box, mask in zip(images, boxes, masks):
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        assert box.as_tuple() == (cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1)
        assert 10 <= box.width <= 48 and 10 <= box.height <= 48
        # the mask is the drawn shape: one colour plus the pixel noise (std about 0.03)
        assert float(image[:, mask].std(dim=1).max()) < 0.045
        # shapes keep out of the marker corner
        assert box.x0 >= KEEP_OUT or box.y0 >= KEEP_OUT


def test_marker_class_mode_paints_the_label_colour():
    images, labels, _ = generate(30, 12, marker="class")
    assert [palette_index(p) for p in corner(images)] == labels.tolist()


def test_marker_random_mode_is_independent_of_the_label():
    images, labels, _ = generate(200, 13, marker="random")
    found = [palette_index(p) for p in corner(images)]
    assert None not in found
    agree = sum(k == y for k, y in zip(found, labels.tolist())) / len(found)
    assert 0.05 < agree < 0.4
    assert len(set(found)) == len(MARKER_PALETTE)


def test_marker_none_mode_leaves_the_corner_textured():
    images, _, _ = generate(30, 14, marker="none")
    assert all(palette_index(p) is None for p in corner(images))
    assert float(corner(images).flatten(1).std(dim=1).min()) > 0.0


def test_marker_mode_changes_only_the_marker():
    runs = [generate(10, 16, marker=m) for m in ("class", "random", "none")]
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[A:B, A:B] = False
    for images, labels, boxes in runs[1:]:
        assert torch.equal(images[:, :, outside], runs[0][0][:, :, outside])
        assert torch.equal(labels, runs[0][1]) and boxes == runs[0][2]


def test_shape_mode_random_keeps_labels_and_markers():
    images, labels, _ = generate(30, 15, marker="class", shape_mode="random")
    assert [palette_index(p) for p in corner(images)] == labels.tolist()


@pytest.mark.parametrize(
    "kwargs", [{"marker": "corner"}, {"shape_mode": "none"}, {"size": 16}]
)
def test_generate_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        generate(2, 0, **kwargs)


def test_shapes_audit_set():
    audit = shapes_dataset()
    assert isinstance(audit, AuditSet)
    assert audit.name == "shapes" and len(audit) == 60 and audit.class_names == CLASS_NAMES
    assert audit.image_size == (64, 64)
    assert audit[7].id == "shapes-0007"
    assert all(len(s.boxes) == 1 for s in audit)
    assert [palette_index(p) for p in corner(audit.images())] == audit.labels().tolist()


# ---------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["demo", "demo-shortcut"])
def test_weights_are_small_and_load_weights_only(name):
    path = WEIGHTS_DIR / f"{name}.pt"
    assert path.stat().st_size < 2 * 1024 * 1024
    state = torch.load(path, map_location="cpu", weights_only=True)
    ShapesCNN().load_state_dict(state)


def test_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "demo.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_weights(ShapesCNN(), path)
    assert str(path) in str(info.value)
    assert "python -m auditkit.demo.train" in str(info.value)


def test_model_specs():
    for spec, name in ((demo_model(), "demo"), (demo_shortcut_model(), "demo-shortcut")):
        assert spec.name == name and spec.version == "1.0" and spec.dataset == "shapes"
        assert spec.class_names == CLASS_NAMES and spec.input_size == (64, 64)
        assert spec.layers == LAYERS
        assert set(LAYERS) <= dict(spec.module.named_modules()).keys()
        assert not spec.module.training


def accuracy(spec, images: torch.Tensor, labels: torch.Tensor) -> float:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        preds = spec.module((images - mean) / std).argmax(dim=1)
    return float((preds == labels).float().mean())


@pytest.fixture(scope="module")
def random_marker_set() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = generate(200, 31, marker="random")
    return images, labels


def test_demo_model_reads_the_shapes(random_marker_set):
    spec, audit = demo_model(), shapes_dataset()
    assert accuracy(spec, audit.images(), audit.labels()) >= 0.9
    assert accuracy(spec, *random_marker_set) >= 0.9


def test_demo_shortcut_model_reads_the_marker_only(random_marker_set):
    spec, audit = demo_shortcut_model(), shapes_dataset()
    assert accuracy(spec, audit.images(), audit.labels()) >= 0.9
    assert accuracy(spec, *random_marker_set) <= 0.4
