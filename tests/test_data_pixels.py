"""Audit sets validate their pixels: every constructor, the same rule as the loaders (issue 13, point 8)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from auditkit.data import AuditDataError, AuditSet, Box, Sample

BAD_IMAGES = [
    ("0-255 floats", torch.full((3, 8, 8), 200.0), r"image values lie in \[200, 200\], expected \[0, 1\]: divide 0-255"),
    ("uint8", torch.full((3, 8, 8), 200, dtype=torch.uint8), r"image has dtype torch.uint8, expected a float tensor .*\(divide uint8 pixels by 255\)"),
    ("int64", torch.zeros(3, 8, 8, dtype=torch.long), r"image has dtype torch.int64, expected a float tensor"),
    ("a NaN pixel", torch.zeros(3, 8, 8).index_put_((torch.tensor([1]), torch.tensor([2]), torch.tensor([3])), torch.tensor(float("nan"))),
     r"image has 1 pixel value\(s\) NaN or infinite, expected finite values in \[0, 1\]"),
    ("an inf pixel", torch.zeros(3, 8, 8).index_fill_(2, torch.tensor([0]), float("inf")), r"image has 24 pixel value\(s\) NaN or infinite"),
    ("0 x 0", torch.zeros(3, 0, 0), r"image has shape \(3, 0, 0\), expected .*H, W >= 1"),
    ("8 x 0", torch.zeros(3, 8, 0), r"image has shape \(3, 8, 0\), expected .*H, W >= 1"),
    ("4 channels", torch.zeros(4, 8, 8), r"image has shape \(4, 8, 8\), expected .*1 or 3 channels"),
    ("2-d", torch.zeros(8, 8), r"image has shape \(8, 8\), expected C x H x W"),
    ("numpy", np.zeros((3, 8, 8), dtype=np.float32), r"image is a ndarray, expected a float torch.Tensor"),
]


@pytest.mark.parametrize("what, image, message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_sample_built_directly_refuses_bad_pixels(what, image, message):
    with pytest.raises(AuditDataError, match=r"sample 'img-7': " + message):
        Sample(image, 0, (), "img-7")


@pytest.mark.parametrize("what, image, message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_assigning_bad_pixels_to_a_sample_is_refused(what, image, message):
    sample = Sample(torch.rand(3, 8, 8), 0, (), "img-7")
    good = sample.image
    with pytest.raises(AuditDataError, match=r"sample 'img-7': " + message):
        sample.image = image
    assert sample.image is good  # left as it was


def test_audit_set_of_x255_pixels_is_refused_before_any_check_runs():
    """The probe: five checks passed on pixels scaled by 255."""
    images = torch.rand(4, 3, 8, 8)
    with pytest.raises(AuditDataError, match=r"sample 's0': image values lie in \[.*\], expected \[0, 1\]"):
        AuditSet([Sample(img * 255, 0, (), f"s{i}") for i, img in enumerate(images)], ["a"], name="x255")


def test_audit_set_refuses_items_that_are_not_samples():
    with pytest.raises(AuditDataError, match=r"audit set 'odd', sample 1: a tuple, expected a Sample"):
        AuditSet([Sample(torch.rand(3, 4, 4), 0, (), "a"), (torch.rand(3, 4, 4), 0)], ["x"], name="odd")


def test_good_pixels_are_kept_as_they_are_and_rounding_is_clamped():
    image = torch.rand(3, 6, 5)
    assert Sample(image, 0).image is image  # no copy for a valid image
    grey = torch.rand(1, 6, 5, dtype=torch.float64)
    assert Sample(grey, 0).image is grey  # 1 channel, any float dtype
    rounding = torch.tensor([-4e-4, 0.5, 1 + 4e-4]).view(1, 1, 3)
    kept = Sample(rounding, 0).image
    assert kept.tolist() == [[[0.0, 0.5, 1.0]]]
    assert rounding.tolist()[0][0][0] < 0  # the caller's tensor is not modified
    just_out = torch.tensor([-2e-3, 0.5]).view(1, 1, 2)
    with pytest.raises(AuditDataError, match=r"values lie in \[-0.002, 0.5\]"):
        Sample(just_out, 0)


def test_resizing_and_replace_keep_samples_valid():
    aset = AuditSet([Sample(torch.rand(3, 10, 20), 0, (Box(0, 0, 5, 5),), "a")], ["x"])
    small = aset.resized((5, 5))
    assert small[0].image.shape == (3, 5, 5) and small[0].boxes
    from dataclasses import replace

    with pytest.raises(AuditDataError, match="sample 'a': image values lie"):
        replace(aset[0], image=aset[0].image * 255)


def _tail(excinfo) -> str:
    """The part of an AuditDataError message after its 'where' prefix."""
    return str(excinfo.value).split(": ", 1)[1]


@pytest.mark.parametrize("what, image", [(b[0], b[1]) for b in BAD_IMAGES if isinstance(b[1], torch.Tensor) and b[1].ndim == 3 and b[1].is_floating_point()])
def test_loaders_and_constructors_say_the_same_thing(what, image):
    """One rule, one message: the torchvision loader and Sample report a bad image in the same words."""

    class OneItem:
        classes = ["a"]

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return image, 0

    with pytest.raises(AuditDataError, match=r"^dataset OneItem index 0: ") as from_loader:
        AuditSet.from_torchvision(OneItem())
    with pytest.raises(AuditDataError, match=r"^sample 'x': ") as from_sample:
        Sample(image, 0, (), "x")
    assert _tail(from_loader) == _tail(from_sample)
