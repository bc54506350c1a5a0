"""Tests for auditkit.data: Box/Sample/AuditSet, resizing, and the audit-set loaders."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from auditkit.data import AuditDataError, AuditSet, Box, Sample


# ---------------------------------------------------------------------- helpers


def make_image(path: Path, width: int, height: int, color=(255, 0, 0), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = color if mode == "RGB" else color[0]
    Image.new(mode, (width, height), fill).save(path)
    return path


def write_folder(root: Path, images: list, classes=("circle", "square", "triangle")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotations.json").write_text(json.dumps({"classes": list(classes), "images": images}))
    return root


def tensor_image(h: int, w: int, c: int = 3, value: float = 0.5) -> torch.Tensor:
    return torch.full((c, h, w), value)


def esc(text: str) -> str:
    return re.escape(text)


# ---------------------------------------------------------------------- from_folder


def test_from_folder_happy_path(tmp_path):
    root = tmp_path / "shapes"
    make_image(root / "img_000.png", 40, 30, (255, 0, 0))
    make_image(root / "sub" / "img_001.png", 40, 30, (0, 255, 0))
    make_image(root / "img_002.jpg", 20, 10, (0, 0, 255))
    make_image(root / "gray.png", 8, 6, (128,), mode="L")
    write_folder(
        root,
        [
            {"file": "img_000.png", "label": "circle", "boxes": [[12, 8, 40, 30]]},
            {"file": "sub/img_001.png", "label": 2, "boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "id": "optional-id"},
            {"file": "img_002.jpg", "label": "square"},
            {"file": "gray.png", "label": 0, "boxes": []},
        ],
    )
    aset = AuditSet.from_folder(root)
    assert aset.class_names == ("circle", "square", "triangle")
    assert aset.name == "shapes"
    assert aset.source.endswith("annotations.json")
    assert len(aset) == 4
    assert aset.labels().tolist() == [0, 2, 1, 0]
    assert [s.id for s in aset] == ["img_000.png", "optional-id", "img_002.jpg", "gray.png"]
    assert aset[0].boxes == (Box(12, 8, 40, 30),)
    assert aset[1].boxes == (Box(0, 0, 10, 10), Box(20, 20, 30, 30))
    assert aset[2].boxes == ()
    first = aset[0].image
    assert first.shape == (3, 30, 40) and first.dtype == torch.float32
    assert torch.equal(first[0], torch.ones(30, 40)) and torch.equal(first[1], torch.zeros(30, 40))
    assert aset[1].image[1].min() == 1.0  # the subfolder image is green
    assert aset[2].image.shape == (3, 10, 20)
    gray = aset[3].image
    assert gray.shape == (3, 6, 8)  # converted to RGB
    assert torch.allclose(gray, torch.full_like(gray, 128 / 255))
    assert all(0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0 for s in aset)
    assert aset.image_size is None  # mixed sizes are allowed...
    with pytest.raises(AuditDataError, match="one shape.*resized"):
        aset.images()  # ...but images() needs one size
    assert aset[0].box_mask()[8:30, 12:40].all() and aset[0].box_mask().sum() == 22 * 28


def test_from_folder_accepts_the_annotations_file_and_a_name(tmp_path):
    make_image(tmp_path / "a.png", 4, 4)
    write_folder(tmp_path, [{"file": "a.png", "label": "square"}])
    aset = AuditSet.from_folder(tmp_path / "annotations.json", name="mine")
    assert aset.name == "mine" and aset.labels().tolist() == [1]


def test_from_folder_size_scales_boxes(tmp_path):
    make_image(tmp_path / "wide.png", 100, 50)
    write_folder(tmp_path, [{"file": "wide.png", "label": 0, "boxes": [[10, 10, 60, 40]]}])
    aset = AuditSet.from_folder(tmp_path, size=(50, 50))
    assert aset[0].image.shape == (3, 50, 50)
    assert aset[0].boxes[0].as_tuple() == pytest.approx((5, 10, 30, 40))
    assert aset.image_size == (50, 50)


def test_box_within_slack_is_clipped(tmp_path):
    make_image(tmp_path / "a.png", 40, 30)
    write_folder(tmp_path, [{"file": "a.png", "label": 0, "boxes": [[-0.4, 0, 40.4, 30.5]]}])
    assert AuditSet.from_folder(tmp_path)[0].boxes == (Box(0, 0, 40, 30),)


GOOD = {"file": "good.png", "label": "circle"}


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"file": "bad.png", "label": 0}, "image file not found: .*bad.png"),
        ({"file": "corrupt.png", "label": 0}, "cannot read image .*corrupt.png"),
        ({"file": "bad.png", "label": "hexagon"}, "unknown label 'hexagon': not one of the classes"),
        ({"file": "bad.png", "label": 3}, "label index 3 is out of range"),
        ({"file": "bad.png", "label": -1}, "label index -1 is out of range"),
        ({"file": "bad.png", "label": 1.5}, "label must be a class name or an index"),
        ({"file": "bad.png"}, 'missing "label"'),
        ({"file": "bad.png", "label": 0, "boxes": [[1, 2, 3]]}, r"box 0 \[1, 2, 3\] is not 4 numbers"),
        ({"file": "bad.png", "label": 0, "boxes": [["a", 1, 2, 3]]}, "box 0 .* is not 4 numbers"),
        ({"file": "bad.png", "label": 0, "boxes": [[1, 1, 5, 5], [10, 10, 5, 20]]}, r"box 1 \[10, 10, 5, 20\] is empty"),
        ({"file": "bad.png", "label": 0, "boxes": [[4, 4, 4, 9]]}, r"box 0 \[4, 4, 4, 9\] is empty"),
        ({"file": "bad.png", "label": 0, "boxes": [[0, 0, 41, 10]]}, r"box 0 \[0, 0, 41, 10\] lies outside the 40 x 30 image"),
        ({"file": "bad.png", "label": 0, "boxes": [[-1, 0, 10, 10]]}, r"box 0 \[-1, 0, 10, 10\] lies outside the 40 x 30 image"),
        ({"file": "bad.png", "label": 0, "boxes": "0 0 1 1"}, '"boxes" must be a list'),
        ({"file": "bad.png", "label": 0, "box": [[0, 0, 1, 1]]}, r"unknown key\(s\) \['box'\]"),
        ({"file": "bad.png", "label": 0, "id": "good.png"}, "id 'good.png' is used by entry 0 too"),
    ],
)
def test_from_folder_entry_errors_name_file_and_entry(tmp_path, entry, message):
    make_image(tmp_path / "good.png", 40, 30)
    if entry["file"] == "bad.png" and "image file not found" not in message:
        make_image(tmp_path / "bad.png", 40, 30)
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png")
    write_folder(tmp_path, [GOOD, entry])
    where = f"{tmp_path.resolve() / 'annotations.json'} entry 1 ({entry['file']}): "
    with pytest.raises(AuditDataError, match=esc(where) + message):
        AuditSet.from_folder(tmp_path)


def test_missing_image_message_has_absolute_path(tmp_path):
    for k in range(3):
        make_image(tmp_path / f"img_00{k}.png", 4, 4)
    write_folder(tmp_path, [{"file": f"img_00{k}.png", "label": 0} for k in range(4)])
    with pytest.raises(AuditDataError) as info:
        AuditSet.from_folder(tmp_path)
    assert str(info.value) == (
        f"{tmp_path.resolve() / 'annotations.json'} entry 3 (img_003.png): "
        f"image file not found: {tmp_path.resolve() / 'img_003.png'}"
    )


@pytest.mark.parametrize(
    "file, message",
    [
        ("../x.png", "\"file\" '../x.png' leads outside the folder"),
        ("sub/../../x.png", "\"file\" 'sub/../../x.png' leads outside the folder"),
        ("/etc/x.png", "\"file\" '/etc/x.png' is an absolute path"),
        (".", "\"file\" '.' names the folder itself"),
        ("", "\"file\" must be a non-empty string"),
    ],
)
def test_from_folder_refuses_paths_outside_the_folder(tmp_path, file, message):
    root = tmp_path / "set"
    make_image(tmp_path / "x.png", 4, 4)  # exists, but outside the folder
    write_folder(root, [{"file": file, "label": 0}])
    with pytest.raises(AuditDataError, match=esc(f"annotations.json entry 0 ({file}): {message}")):
        AuditSet.from_folder(root)


def test_from_folder_entry_not_an_object(tmp_path):
    write_folder(tmp_path, ["img.png"])
    with pytest.raises(AuditDataError, match=r"annotations\.json entry 0 \(no file\): expected an object"):
        AuditSet.from_folder(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"classes": ["a"],\n "images": [\n  {"file": "a.png",}\n]}', r"invalid JSON at line 3, column \d+"),
        ('{"images": []}', 'missing key "classes"'),
        ('{"classes": ["a"]}', 'missing key "images"'),
        ('{"classes": "a", "images": []}', '"classes" must be a list of class names, got a string'),
        ('{"classes": ["a"], "images": {"file": "a.png"}}', '"images" must be a list of image entries, got an object'),
        ('{"classes": ["a"], "images": []}', '"images" is empty'),
        ('{"classes": [], "images": []}', '"classes" is empty'),
        ('{"classes": ["a", "a"], "images": []}', "class 'a' appears twice"),
        ('{"classes": ["a", 3], "images": []}', r'"classes"\[1\] must be a non-empty string'),
        ('[1, 2]', 'expected a JSON object with "classes" and "images", got a list'),
    ],
)
def test_from_folder_file_errors(tmp_path, content, message):
    (tmp_path / "annotations.json").write_text(content)
    with pytest.raises(AuditDataError, match=esc(str(tmp_path.resolve() / "annotations.json")) + ": " + message):
        AuditSet.from_folder(tmp_path)


def test_from_folder_missing_annotations(tmp_path):
    with pytest.raises(AuditDataError, match=r"annotations\.json: annotations file not found"):
        AuditSet.from_folder(tmp_path)
    with pytest.raises(AuditDataError, match="audit folder not found"):
        AuditSet.from_folder(tmp_path / "nope")


# ---------------------------------------------------------------------- AuditSet


def test_resized_scales_boxes_and_keeps_same_size_images():
    keep = Sample(tensor_image(50, 50), 0, (Box(0, 0, 50, 50),), "keep")
    wide = Sample(tensor_image(50, 100), 1, (Box(10, 10, 60, 40),), "wide")
    aset = AuditSet([keep, wide], ("a", "b"), name="s", extra={"k": 1})
    out = aset.resized((50, 50))
    assert out[0] is keep and out[0].image is keep.image  # no copy
    assert out[1].image.shape == (3, 50, 50)
    assert out[1].boxes[0].as_tuple() == pytest.approx((5, 10, 30, 40))
    assert torch.allclose(out[1].image, torch.full((3, 50, 50), 0.5))
    assert out.images().shape == (2, 3, 50, 50) and out.box_masks().shape == (2, 50, 50)
    assert out.class_names == aset.class_names and out.name == "s" and out.extra == {"k": 1}
    assert aset[1].image.shape == (3, 50, 100)  # the original is untouched
    with pytest.raises(AuditDataError, match="resized.*two positive integers"):
        aset.resized((0, 10))


def test_resized_antialiases_and_clamps():
    stripes = torch.zeros(3, 8, 64)
    stripes[:, :, ::2] = 1.0
    out = AuditSet([Sample(stripes, 0)], ("a",)).resized((8, 8))
    assert float(out[0].image.min()) >= 0.0 and float(out[0].image.max()) <= 1.0
    assert torch.allclose(out[0].image, torch.full((3, 8, 8), 0.5), atol=0.05)  # averaged, not aliased


def test_for_model_remaps_labels_by_name_and_resizes():
    aset = AuditSet(
        [Sample(tensor_image(20, 40), 0, (Box(0, 0, 20, 20),), "c"), Sample(tensor_image(10, 10), 1, (), "d")],
        ("cat", "dog"),
    )
    out = aset.for_model(["bird", "dog", "cat"], (10, 20))
    assert out.class_names == ("bird", "dog", "cat")
    assert out.labels().tolist() == [2, 1]
    assert out.images().shape == (2, 3, 10, 20)
    assert out[0].boxes[0].as_tuple() == pytest.approx((0, 0, 10, 10))
    assert aset.labels().tolist() == [0, 1]  # the original is untouched
    same = aset.subset([1]).for_model(("dog",), (10, 10))
    assert same[0].label == 0 and same[0].image is aset[1].image


def test_for_model_unknown_class_names_sample_class_and_model_classes():
    aset = AuditSet(
        [Sample(tensor_image(4, 4), 1, (), "ok"), Sample(tensor_image(4, 4), 0, (), "the-cat")], ("cat", "dog")
    )
    with pytest.raises(AuditDataError, match=r"sample 'the-cat'.*class 'cat' is not a class of the model.*\['dog', 'bird'\]"):
        aset.for_model(["dog", "bird"], (4, 4))


def test_post_init_messages_name_the_sample_id():
    with pytest.raises(AuditDataError, match=r"sample 1 \(id 'b'\): label 2 is not a class index 0\.\.1"):
        AuditSet([Sample(tensor_image(4, 4), 0, (), "a"), Sample(tensor_image(4, 4), 2, (), "b")], ("x", "y"))
    with pytest.raises(AuditDataError, match=r"sample 0 \(id 'a'\): box .* lies outside the 4 x 4 image"):
        AuditSet([Sample(tensor_image(4, 4), 0, (Box(0, 0, 5, 5),), "a")], ("x",))
    with pytest.raises(AuditDataError, match=r"sample 'a': image has shape \(4, 4\), expected C x H x W"):
        Sample(torch.zeros(4, 4), 0, (), "a")  # a Sample checks its own pixels (tests/test_data_pixels.py)
    with pytest.raises(AuditDataError, match="is empty"):
        AuditSet([], ("x",))
    with pytest.raises(AuditDataError, match="appears twice"):
        AuditSet([Sample(tensor_image(4, 4), 0, (), "a")], ("x", "x"))
    aset = AuditSet([Sample(tensor_image(4, 4), torch.tensor(1), [Box(0, 0, 1, 1)], "a")], ("x", "y"))
    assert type(aset[0].label) is int and aset[0].boxes == (Box(0, 0, 1, 1),)
    assert "samples=1" in repr(aset) and "id='a'" in repr(aset[0])


@settings(max_examples=150, deadline=None)
@given(
    w=st.integers(1, 48),
    h=st.integers(1, 48),
    W=st.integers(1, 48),
    H=st.integers(1, 48),
    xs=st.tuples(st.floats(0, 1), st.floats(0, 1)).filter(lambda t: abs(t[0] - t[1]) > 1e-3),
    ys=st.tuples(st.floats(0, 1), st.floats(0, 1)).filter(lambda t: abs(t[0] - t[1]) > 1e-3),
)
def test_resize_then_scale_back_keeps_boxes(w, h, W, H, xs, ys):
    box = Box(min(xs) * w, min(ys) * h, max(xs) * w, max(ys) * h)
    aset = AuditSet([Sample(torch.rand(3, h, w), 0, (box,), "s")], ("a",))
    out = aset.resized((H, W))
    assert out[0].image.shape == (3, H, W)
    assert 0.0 <= float(out[0].image.min()) and float(out[0].image.max()) <= 1.0
    (new,) = out[0].boxes
    assert 0.0 <= new.x0 < new.x1 <= W and 0.0 <= new.y0 < new.y1 <= H
    back = new.scaled(w / W, h / H)
    assert back.as_tuple() == pytest.approx(box.as_tuple(), rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------- from_coco


def coco_files(tmp_path: Path, annotations=None, images=None, categories=None) -> tuple[Path, Path]:
    images_dir = tmp_path / "images"
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        make_image(images_dir / name, 60, 40)
    data = {
        "images": images
        if images is not None
        else [
            {"id": 1, "file_name": "a.png", "width": 60, "height": 40},
            {"id": 2, "file_name": "b.png", "width": 60, "height": 40},
            {"id": 3, "file_name": "c.png", "width": 60, "height": 40},
            {"id": 4, "file_name": "sub/d.png", "width": 60, "height": 40},
        ],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 0, "area": 100},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 20], "iscrowd": 0, "area": 400},
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [40, 30, 5, 4], "iscrowd": 0, "area": 20},
            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [0, 0, 60, 40], "iscrowd": 1, "area": 2400},
            {"id": 14, "image_id": 3, "category_id": 3, "bbox": [0, 0, 30, 30], "iscrowd": 1, "area": 900},
            {"id": 15, "image_id": 4, "category_id": 3, "bbox": [1.5, 2, 10, 8], "iscrowd": 0, "area": 80},
            {"id": 16, "image_id": 4, "category_id": 3, "bbox": [5, 5, 0, 8], "iscrowd": 0, "area": 0},
        ],
        "categories": categories
        if categories is not None
        else [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 9, "name": "bird"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images_dir


def test_from_coco_largest_box_rule_crowd_and_skipped(tmp_path):
    ann, images = coco_files(tmp_path)
    aset = AuditSet.from_coco(ann, images)
    assert aset.class_names == ("cat", "dog", "bird")  # category-id order: 3, 7, 9
    assert [s.id for s in aset] == ["a.png", "sub/d.png"]
    assert aset.labels().tolist() == [1, 0]  # a.png: the largest non-crowd box is a dog; the crowd cat is ignored
    assert aset[0].boxes == (Box(10, 5, 30, 25), Box(40, 30, 45, 34))  # all dog boxes, as x0 y0 x1 y1
    assert aset[1].boxes == (Box(1.5, 2, 11.5, 10),)  # the zero-width box is ignored
    assert aset.extra["skipped"] == 2  # b.png has no annotation, c.png only a crowd one
    assert aset.extra["image_ids"] == [1, 4] and aset.extra["degenerate_boxes"] == 1
    assert aset.name == "instances" and aset[0].image.shape == (3, 40, 60)


def test_from_coco_category_names_restrict_and_order(tmp_path):
    ann, images = coco_files(tmp_path)
    only_dog = AuditSet.from_coco(ann, images, category_names=["dog"])
    assert only_dog.class_names == ("dog",) and [s.id for s in only_dog] == ["a.png"]
    assert only_dog.extra["skipped"] == 3
    reordered = AuditSet.from_coco(ann, images, category_names=["dog", "cat"], size=(20, 30), name="x")
    assert reordered.labels().tolist() == [0, 1] and reordered.name == "x"
    assert reordered.images().shape == (2, 3, 20, 30)
    assert reordered[0].boxes[0].as_tuple() == pytest.approx((5, 2.5, 15, 12.5))
    only_cat = AuditSet.from_coco(ann, images, category_names=["cat"])
    assert only_cat[0].id == "a.png" and only_cat[0].boxes == (Box(0, 0, 10, 10), Box(0, 0, 60, 40))  # crowd box kept
    big = AuditSet.from_coco(ann, images, min_area=200)
    assert [s.id for s in big] == ["a.png"] and big.extra["skipped"] == 3
    with pytest.raises(AuditDataError, match=r"category_names has 'horse', which is not a category.*\['cat', 'dog', 'bird'\]"):
        AuditSet.from_coco(ann, images, category_names=["horse"])


def test_from_coco_errors_name_json_and_image(tmp_path):
    ann, images = coco_files(tmp_path)
    prefix = esc(str(ann.resolve()))
    (images / "a.png").unlink()
    with pytest.raises(AuditDataError, match=prefix + esc(" image 1 (a.png): image file not found")):
        AuditSet.from_coco(ann, images)
    make_image(images / "a.png", 61, 40)
    with pytest.raises(AuditDataError, match=prefix + esc(" image 1 (a.png): ") + ".*is 61 x 40 but the JSON says 60 x 40"):
        AuditSet.from_coco(ann, images)


@pytest.mark.parametrize(
    "annotation, message",
    [
        ({"id": 5, "image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1]}, r"annotation 0 \(id 5, image 99\): image_id 99 is not in"),
        ({"id": 5, "image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}, r"annotation 0 \(id 5, image 1 \(a.png\)\): category_id 4 is not in"),
        ({"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1]}, r"annotation 0 .*: bbox \[0, 0, 1\] is not 4 numbers"),
        ({"id": 5, "image_id": 1, "category_id": 3, "bbox": [50, 0, 20, 10]}, r"annotation 0 .*: bbox .* lies outside the 60 x 40 image"),
        ({"id": 5, "image_id": 1, "category_id": 3}, r'annotation 0 .*: missing "bbox"'),
    ],
)
def test_from_coco_annotation_errors(tmp_path, annotation, message):
    ann, images = coco_files(tmp_path, annotations=[annotation])
    with pytest.raises(AuditDataError, match=esc(str(ann.resolve())) + " " + message):
        AuditSet.from_coco(ann, images)


def test_from_coco_file_errors(tmp_path):
    ann, images = coco_files(tmp_path)
    ann.write_text('{"images": [\n1,]}')
    with pytest.raises(AuditDataError, match=r"instances\.json: invalid JSON at line 2"):
        AuditSet.from_coco(ann, images)
    ann.write_text('{"images": [], "annotations": []}')
    with pytest.raises(AuditDataError, match=r'instances\.json: missing key "categories"'):
        AuditSet.from_coco(ann, images)
    with pytest.raises(AuditDataError, match="COCO annotation file not found"):
        AuditSet.from_coco(tmp_path / "none.json", images)
    ann, images = coco_files(tmp_path, annotations=[])
    with pytest.raises(AuditDataError, match=r"no usable image: all 4 images were skipped"):
        AuditSet.from_coco(ann, images)
    ann, images = coco_files(tmp_path, images=[{"id": 1, "file_name": "../x.png"}],
                             annotations=[{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(AuditDataError, match=esc(" image 1 (../x.png): file_name '../x.png' leads outside")):
        AuditSet.from_coco(ann, images)


# ---------------------------------------------------------------------- from_torchvision


class FakeDataset:
    """A map-style dataset of (image, target) pairs, like torchvision's."""

    def __init__(self, items, classes=None):
        self.items = items
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        if isinstance(item, Exception):
            raise item
        return item


def pil(w=20, h=10, color=(255, 255, 255), mode="RGB"):
    return Image.new(mode, (w, h), color if mode == "RGB" else color[0])


def test_from_torchvision_int_targets():
    ds = FakeDataset(
        [(pil(), 1), (torch.full((3, 10, 20), 255, dtype=torch.uint8), 0), (torch.full((3, 10, 20), 0.25), 2)],
        classes=["a", "b", "c"],
    )
    aset = AuditSet.from_torchvision(ds)
    assert aset.class_names == ("a", "b", "c") and aset.labels().tolist() == [1, 0, 2]
    assert [s.id for s in aset] == ["0", "1", "2"] and aset.name == "FakeDataset"
    assert torch.equal(aset[0].image, torch.ones(3, 10, 20)) and torch.equal(aset[1].image, torch.ones(3, 10, 20))
    assert torch.equal(aset[2].image, torch.full((3, 10, 20), 0.25))
    assert all(s.boxes == () for s in aset)
    assert len(AuditSet.from_torchvision(ds, limit=2)) == 2
    small = AuditSet.from_torchvision(ds, size=(5, 5), class_names=["x", "y", "z"], name="n")
    assert small.images().shape == (3, 3, 5, 5) and small.class_names == ("x", "y", "z") and small.name == "n"
    gray = AuditSet.from_torchvision(FakeDataset([(pil(mode="L", color=(51,)), 0)], classes=["a"]))
    assert gray[0].image.shape == (1, 10, 20) and torch.allclose(gray[0].image, torch.full((1, 10, 20), 0.2))


def test_from_torchvision_dict_targets():
    boxes = torch.tensor([[0, 0, 5, 5], [2, 2, 18, 9], [10, 0, 12, 3]], dtype=torch.float32)
    ds = FakeDataset([(pil(), {"boxes": boxes, "labels": torch.tensor([1, 0, 1])}),
                      (pil(), {"boxes": [[0, 0, 4, 4], [1, 1, 2, 2]], "labels": ["b", "b"]}),
                      (pil(), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}),
                      (pil(), {"image_id": 7})])  # a wrapped CocoDetection image without annotations
    aset = AuditSet.from_torchvision(ds, class_names=["a", "b"])
    assert aset.labels().tolist() == [0, 1]  # largest box wins
    assert aset[0].boxes == (Box(2, 2, 18, 9),)
    assert aset[1].boxes == (Box(0, 0, 4, 4), Box(1, 1, 2, 2))
    assert aset.extra["skipped"] == 2 and aset.extra["indices"] == [0, 1]


def test_from_torchvision_bounding_boxes_in_xywh_are_converted():
    from torchvision import tv_tensors

    bb = tv_tensors.BoundingBoxes([[2, 3, 10, 4]], format="XYWH", canvas_size=(10, 20))
    aset = AuditSet.from_torchvision(FakeDataset([(pil(), {"boxes": bb, "labels": torch.tensor([0])})]), class_names=["a"])
    assert aset[0].boxes == (Box(2, 3, 12, 7),)


def test_from_torchvision_voc_targets():
    def obj(name, xmin, ymin, xmax, ymax):
        return {"name": name, "bndbox": {"xmin": str(xmin), "ymin": str(ymin), "xmax": str(xmax), "ymax": str(ymax)}}

    ds = FakeDataset([
        (pil(), {"annotation": {"object": [obj("dog", 1, 1, 5, 5), obj("cat", 2, 2, 20, 10), obj("dog", 10, 1, 20, 2)]}}),
        (pil(), {"annotation": {"object": obj("dog", 1, 1, 20, 10)}}),  # a single object may be a dict
    ])
    aset = AuditSet.from_torchvision(ds, class_names=["cat", "dog"])
    assert aset.labels().tolist() == [0, 1]
    assert aset[0].boxes == (Box(1, 1, 20, 10),)  # xmin - 1, ymin - 1, xmax, ymax
    assert aset[1].boxes == (Box(0, 0, 20, 10),)
    with pytest.raises(AuditDataError, match=r"dataset FakeDataset index 0: unknown label 'cat'"):
        AuditSet.from_torchvision(ds, class_names=["dog"])
    with pytest.raises(AuditDataError, match=r"index 0: VOC object 1 \('cat'\) box \[1.0, 1.0, 21.0, 10.0\] lies outside"):
        AuditSet.from_torchvision(FakeDataset([(pil(), {"annotation": {"object": [obj("dog", 1, 1, 5, 5), obj("cat", 2, 2, 21, 10)]}})]),
                                  class_names=["cat", "dog"])


def test_from_torchvision_coco_list_targets():
    target = [
        {"bbox": [0, 0, 20, 10], "category_id": 1, "iscrowd": 1},
        {"bbox": [1, 1, 4, 4], "category_id": 0, "iscrowd": 0},
        {"bbox": [5, 5, 5, 5], "category_id": 1, "iscrowd": 0},
        {"bbox": [6, 1, 2, 2], "category_id": 1, "iscrowd": 0},
    ]
    ds = FakeDataset([(pil(), target), (pil(), [])], classes=["a", "b"])
    aset = AuditSet.from_torchvision(ds)
    assert aset.labels().tolist() == [1]  # the crowd box does not choose; 5x5 beats 4x4
    assert aset[0].boxes == (Box(0, 0, 20, 10), Box(5, 5, 10, 10), Box(6, 1, 8, 3))
    assert aset.extra["skipped"] == 1


def test_from_torchvision_maps_coco_category_ids_by_name():
    class Coco:
        cats = {1: {"id": 1, "name": "person"}, 18: {"id": 18, "name": "dog"}}
        imgs = {100: {"file_name": "x.jpg"}, 101: {"file_name": "y.jpg"}}

    ds = FakeDataset([(pil(), [{"bbox": [0, 0, 5, 5], "category_id": 18}]),
                      (pil(), [{"bbox": [0, 0, 5, 5], "category_id": 1}])])
    ds.coco, ds.ids = Coco(), [100, 101]
    aset = AuditSet.from_torchvision(ds)
    assert aset.class_names == ("person", "dog") and aset.labels().tolist() == [1, 0]
    assert [s.id for s in aset] == ["x.jpg", "y.jpg"]
    dogs = AuditSet.from_torchvision(ds, class_names=["dog"])
    assert dogs.labels().tolist() == [0] and dogs.extra["skipped"] == 1


@pytest.mark.parametrize(
    "item, message",
    [
        ((pil(), 5), "label 5 is out of range"),
        ((pil(), 1.5), "unsupported target 1.5"),
        ((pil(), {"boxes": [[0, 0, 30, 5]], "labels": [0]}), r"box 0 \[0.0, 0.0, 30.0, 5.0\] lies outside the 20 x 10 image"),
        ((pil(), {"boxes": [[0, 0, 3, 5]], "labels": [0, 1]}), "target has 1 boxes but 2 labels"),
        ((pil(), {"boxes": [[0, 0, 3]], "labels": [0]}), "box 0 .* is not 4 numbers"),
        ((pil(), {"masks": 1}), "target dict has keys"),
        ((torch.full((3, 4, 4), -1.0), 0), r"image values lie in \[-1, -1\].*Normalize"),
        (("not an image", 0), "image is a str"),
        (pil(), "expected an \\(image, target\\) pair"),
        (OSError("disk on fire"), "reading the item failed: disk on fire"),
    ],
)
def test_from_torchvision_errors_name_the_index(item, message):
    ds = FakeDataset([(pil(), 0), item], classes=["a", "b"])
    with pytest.raises(AuditDataError, match="dataset FakeDataset index 1: " + message):
        AuditSet.from_torchvision(ds)


def test_from_torchvision_needs_class_names():
    with pytest.raises(AuditDataError, match="no 'classes' attribute: pass class_names"):
        AuditSet.from_torchvision(FakeDataset([(pil(), 0)]))


def test_from_torchvision_iterable_dataset():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(pil(), 0), (pil(), 1), (pil(), 0)])

    aset = AuditSet.from_torchvision(Stream(), class_names=["a", "b"], limit=2)
    assert aset.labels().tolist() == [0, 1]


def test_from_torchvision_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    make_image(tmp_path / "cat" / "1.png", 8, 8)
    make_image(tmp_path / "dog" / "2.png", 8, 8)
    aset = AuditSet.from_torchvision(ImageFolder(tmp_path))
    assert aset.class_names == ("cat", "dog") and aset.labels().tolist() == [0, 1]
    assert [s.id for s in aset] == ["cat/1.png", "dog/2.png"]
