import dataclasses
import math

import pytest
import torch
from torch import nn

from auditkit import Box, ModelSpec
from auditkit.checks.base import Status
from auditkit.checks.occlusion import OcclusionDrop
from auditkit.methods import occlusion as occ
from auditkit.subject import Subject
from tests.toys import halves_set, region_spec


class PixelProbe(nn.Module):
    """Two classes: logit_0 = gain * x[0, py, px], logit_1 = 0, so p_0 = sigmoid(gain * pixel)."""

    def __init__(self, py: int, px: int, gain: float = 4.0):
        super().__init__()
        self.py, self.px, self.gain = py, px, gain

    def forward(self, x):
        a = self.gain * x[:, 0, self.py, self.px]
        return torch.stack([a, torch.zeros_like(a)], 1)


def probe_subject(py=5, px=7, size=12):
    spec = ModelSpec(module=PixelProbe(py, px), class_names=["on", "off"], input_size=(size, size), name="probe")
    return Subject(spec, device="cpu", batch_size=7).open()


def reference_map(subject, image, label, patch, stride, baseline):
    """Captum-style occlusion by explicit loops over windows (test reference only)."""
    _, h, w = image.shape
    base = occ.baseline_images(image[None], baseline)[0]
    p0 = subject.probabilities(image[None])[0, label]
    total, count = torch.zeros(h, w), torch.zeros(h, w)
    for y in occ.window_starts(h, patch, stride).tolist():
        for x in occ.window_starts(w, patch, stride).tolist():
            img = image.clone()
            img[:, y : y + patch, x : x + patch] = base[:, y : y + patch, x : x + patch]
            drop = p0 - subject.probabilities(img[None])[0, label]
            total[y : y + patch, x : x + patch] += drop
            count[y : y + patch, x : x + patch] += 1
    return total / count


@pytest.mark.parametrize("baseline", ["grey", "zero", "mean", "blur"])
def test_occlusion_map_matches_window_loop(baseline):
    subject = probe_subject()
    torch.manual_seed(1)
    images = torch.rand(3, 3, 12, 12)
    labels = torch.tensor([0, 1, 0])
    maps = occ.occlusion_map(subject, images, labels, patch=4, stride=3, baseline=baseline)
    for i in range(3):
        ref = reference_map(subject, images[i], int(labels[i]), 4, 3, baseline)
        assert torch.allclose(maps[i], ref, atol=1e-6)


def test_occlusion_map_closed_form_for_a_single_pixel_model():
    subject = probe_subject(py=5, px=7)
    image = torch.ones(1, 3, 12, 12)
    maps = occ.occlusion_map(subject, image, torch.tensor([0]), patch=3, stride=3, baseline="zero")
    drop = 1 / (1 + math.exp(-4.0)) - 0.5  # p(on | pixel 1) - p(on | pixel 0)
    # windows start at 0, 3, 6, 9: only the window [3, 6) x [6, 9) covers (5, 7)
    expected = torch.zeros(12, 12)
    expected[3:6, 6:9] = drop
    assert torch.allclose(maps[0], expected, atol=1e-6)


def test_window_starts_cover_the_image():
    assert occ.window_starts(10, 4, 3).tolist() == [0, 3, 6]
    assert occ.window_starts(11, 4, 3).tolist() == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="larger than the image"):
        occ.window_starts(3, 4, 1)


def test_control_boxes_avoid_the_object_and_keep_its_size():
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[10:20, 4:12] = True
    boxes = occ.control_boxes(mask, Box(4, 10, 12, 20), 4)
    assert len(boxes) == 4
    for b in boxes:
        assert (b.width, b.height) == (8, 10)
        r, c = b.pixel_slices(32, 32)
        assert not mask[r, c].any()
    assert occ.control_boxes(torch.ones(8, 8, dtype=torch.bool), Box(0, 0, 4, 4), 2) == []


def test_baselines():
    images = torch.rand(2, 3, 16, 16)
    assert torch.all(occ.baseline_images(images, "grey") == 0.5)
    assert torch.all(occ.baseline_images(images, "zero") == 0)
    mean = occ.baseline_images(images, "mean")
    assert torch.allclose(mean[:, :, 3, 5], images.mean(dim=(2, 3)))
    blurred = occ.baseline_images(images, "blur")
    assert blurred.shape == images.shape and blurred.std() < images.std()
    assert torch.allclose(occ.baseline_images(torch.full((1, 3, 16, 16), 0.3), "blur"), torch.full((1, 3, 16, 16), 0.3), atol=1e-6)
    with pytest.raises(ValueError, match="unknown occlusion baseline 'fog'"):
        occ.baseline_images(images, "fog")


def test_check_drops_match_closed_form():
    """RegionScore: logits = 100 (mean(half) - 0.05) for left/right, 0 for 'empty'."""
    data = halves_set(8)
    with Subject(region_spec(), device="cpu") as subject:
        result = OcclusionDrop(baseline="zero").execute(subject, data)
    assert result.status is Status.PASSED
    assert result.decision["p_value"] == pytest.approx(0.5 ** 8)  # 8 of 8 margins positive: exact signed rank
    # object (6 x 8 white pixels in a 16 x 8 half): mean 48 / 128 = 0.375
    logits = torch.tensor([100 * (0.375 - 0.05), -5.0, 0.0])
    p = torch.softmax(logits, 0)[0]
    p_occluded = torch.softmax(torch.tensor([-5.0, -5.0, 0.0]), 0)[0]
    row = result.rows[0]
    assert row["p"] == pytest.approx(float(p), rel=1e-5)
    assert row["p_object_occluded"] == pytest.approx(float(p_occluded), rel=1e-5)
    assert row["drop_object"] == pytest.approx(float((p - p_occluded) / p), rel=1e-5)
    assert row["drop_control"] == pytest.approx(0.0, abs=1e-6)  # the background is already zero
    assert result.value == pytest.approx(float((p - p_occluded) / p), rel=1e-5)  # every sample alike: the mean margin
    assert result.evidence and result.evidence[0].media_type == "image/png"


def test_check_fails_when_the_model_ignores_the_object():
    """Grey over a white object leaves mean(half) > offset: the model still answers 'left'."""
    data = halves_set(8)
    with Subject(region_spec(gain=100.0, offset=0.0), device="cpu") as subject:
        result = OcclusionDrop(baseline="grey").execute(subject, data)
    assert result.status is Status.FAILED
    assert result.value < 0.1 and "below the minimum" in result.message
    assert all(r["margin"] < 0.1 for r in result.rows)


def test_check_without_boxes_is_an_error_not_a_pass():
    from auditkit import AuditSet, Sample

    data = AuditSet([Sample(torch.rand(3, 16, 16), 0, (), "nobox")], ["left", "right", "empty"])
    with Subject(region_spec(), device="cpu") as subject:
        result = OcclusionDrop().execute(subject, data)
    assert result.status is Status.ERROR and "no sample with an object box" in result.message


def test_check_crash_is_an_error_with_traceback():
    data = halves_set()
    with Subject(region_spec(), device="cpu") as subject:
        subject.spec.module.forward = lambda x: (_ for _ in ()).throw(RuntimeError("kaput"))
        result = OcclusionDrop().execute(subject, data)
    assert result.status is Status.ERROR
    assert "RuntimeError: kaput" in result.message and "Traceback" in result.error


# -- boxes that shrink under a pixel, and too few judged samples (issue 13, point 10) --------------


def test_control_boxes_of_a_box_narrower_than_a_pixel_are_none_not_an_error():
    """A 0.1 px wide box (1 px in a 640 px file, resized to 64) used to raise 'box ... is empty'."""
    mask = torch.zeros(64, 64, dtype=torch.bool)
    assert occ.control_boxes(mask, Box(10.0, 10.0, 10.1, 30.0), 4) == []
    assert occ.control_boxes(mask, Box(10.0, 10.0, 30.0, 10.2), 4) == []


def test_control_boxes_take_the_size_of_the_pixels_the_box_covers():
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[10:20, 4:10] = True
    (box,) = occ.control_boxes(mask, Box(3.6, 10, 10.4, 20), 1)  # 6.8 px wide, covers the 6 pixels 4..9
    assert (box.width, box.height) == (6, 10)  # as many pixels as the object's mask, not round(6.8) = 7


def thin_box_set():
    """The halves set (16 px) plus one 160 px image whose 1 px wide box is 0.1 px wide at 16 px."""
    from auditkit import AuditSet, Sample

    big = torch.zeros(3, 160, 160)
    big[:, 40:120, 10:11] = 1.0
    thin = Sample(big, 0, (Box(10, 40, 11, 120),), "thin-line")
    halves = halves_set(8)
    return AuditSet([thin] + list(halves.samples), halves.class_names, name="mixed").resized((16, 16))


def test_a_box_under_a_pixel_after_resizing_skips_its_sample_and_says_so():
    data = thin_box_set()
    assert data[0].boxes[0].width == pytest.approx(0.1)  # valid in the file, under a pixel now
    with Subject(region_spec(), device="cpu") as subject:
        result = OcclusionDrop(baseline="zero").execute(subject, data)
    assert result.status is Status.PASSED, result.message  # the check keeps running on the others
    assert result.details["samples_judged"] == 8
    assert "thin-line" in result.message and "covers no pixel" in result.message
    (skipped,) = result.details["skipped"]
    assert skipped["sample"] == "thin-line" and "covers no pixel at 16 x 16" in skipped["reason"]
    assert "thin-line" not in [row["sample"] for row in result.rows]


def test_every_box_under_a_pixel_is_inconclusive_naming_the_samples():
    # before: ERROR "audit set 'thin' is empty", a set of 3 samples the user never emptied
    from auditkit import AuditSet

    one = thin_box_set()[0]
    data = AuditSet([dataclasses.replace(one, id=f"thin{i}") for i in range(3)], ["left", "right"], name="thin")
    with Subject(region_spec(), device="cpu") as subject:
        result = OcclusionDrop(baseline="zero").execute(subject, data)
    assert result.status is Status.INCONCLUSIVE, result.summary()
    assert "3 sample(s) skipped" in result.message and "thin0, thin1, thin2" in result.message
    assert result.details["samples_judged"] == 0 and len(result.details["skipped"]) == 3


def mostly_unjudgeable_set(judgeable: int, total: int = 60):
    """`judgeable` halves samples, the rest with a box covering the whole image (no room for a control)."""
    from auditkit import AuditSet, Sample

    halves = halves_set(n=judgeable).samples if judgeable else []
    full = [Sample(torch.rand(3, 16, 16), 2, (Box(0, 0, 16, 16),), f"full{i}") for i in range(total - judgeable)]
    return AuditSet(list(halves) + full, ["left", "right", "empty"], name="mostly-full")


def test_one_judged_sample_of_sixty_cannot_decide():
    data = mostly_unjudgeable_set(1)
    with Subject(region_spec(), device="cpu") as subject:
        result = OcclusionDrop(baseline="zero").execute(subject, data)
        assert result.status is Status.INCONCLUSIVE
        assert "only 1 sample(s) could be judged" in result.message and "needs at least 7" in result.message
        assert result.details["samples_judged"] == 1 and result.decision["needed"] == 7
        # the need follows alpha, a stated parameter: at alpha 0.3 two samples would do, one still cannot
        loose = OcclusionDrop(baseline="zero", alpha=0.3).execute(subject, data)
        assert loose.status is Status.INCONCLUSIVE and loose.decision["needed"] == 2
        # no judged sample at all is the same rule, not a pass
        none = OcclusionDrop(baseline="zero").execute(subject, mostly_unjudgeable_set(0, total=8))
    assert none.status is Status.INCONCLUSIVE and "only 0 sample(s) could be judged" in none.message


def test_enough_judged_samples_are_judged_as_before():
    data = mostly_unjudgeable_set(8, total=20)
    with Subject(region_spec(), device="cpu") as subject:
        result = OcclusionDrop(baseline="zero").execute(subject, data)
    assert result.status is Status.PASSED and result.details["samples_judged"] == 8
    assert result.decision["n"] == 8
    assert "12 sample(s) with no room for a control box not judged" in result.message


def test_alpha_and_margin_are_validated():
    from auditkit.checks.base import CheckConfigError

    with pytest.raises(CheckConfigError, match="alpha must be a significance level in"):
        OcclusionDrop(alpha=0.0)
    with pytest.raises(CheckConfigError, match="min_margin must be in"):
        OcclusionDrop(min_margin=-0.5)


# -- the occlusion map on one stated scale, with a colour bar (issue 13, point 10) ----------------


def _evidence_pixels(result) -> "np.ndarray":
    import io

    import numpy as np
    from PIL import Image

    (evidence,) = result.evidence
    return np.asarray(Image.open(io.BytesIO(evidence.data)).convert("RGB")).astype(int)


def _find(big, small) -> tuple[int, int] | None:
    """(y, x) where the picture `small` appears pixel for pixel in `big`, or None."""
    import numpy as np

    h, w = small.shape[:2]
    ys, xs = np.nonzero((big[: big.shape[0] - h + 1, : big.shape[1] - w + 1] == small[0, 0]).all(axis=2))
    return next(((y, x) for y, x in zip(ys, xs) if (big[y : y + h, x : x + w] == small).all()), None)


def test_a_near_zero_occlusion_map_is_drawn_near_the_zero_colour_with_a_colour_bar():
    """gain 1e-3: covering anything moves p by about 1e-5. Scaled to its own range that looked hot."""
    import numpy as np

    from auditkit import evidence as ev
    from auditkit.checks.occlusion import MAP_SCALE

    data = halves_set(n=8)
    with Subject(region_spec(gain=1e-3), device="cpu") as subject:
        result = OcclusionDrop(baseline="zero", evidence_samples=1).execute(subject, data)
    assert result.status is Status.FAILED and result.evidence
    pixels = _evidence_pixels(result)
    assert MAP_SCALE == (-1.0, 1.0)
    bar = np.asarray(ev.colorbar(*MAP_SCALE, height=16 * 12, label="drop in p")).astype(int)
    where = _find(pixels, bar)
    assert where is not None, "the evidence shows no colour bar of the map's scale"
    pixels = pixels.copy()
    pixels[where[0] : where[0] + bar.shape[0], where[1] : where[1] + bar.shape[1]] = 255  # the bar itself is all colours
    # hot colours of either colour map blended over the black and the white of these images
    hot = [np.array(ev.colormap(torch.tensor([[v]]), cmap=cmap, vmin=0.0, vmax=1.0)[:, 0, 0].tolist()) * 255
           for cmap in ("inferno", "coolwarm") for v in (0.7, 0.85, 1.0)]
    blended = [0.5 * 255 * base + 0.5 * colour for colour in hot for base in (0.0, 1.0)]
    for colour in blended:
        assert np.abs(pixels - colour).sum(axis=2).min() > 12, f"a hot pixel {colour} in a near-zero map"
    caption = result.evidence[0].caption
    assert "-1" in caption and "+1" in caption and "every image" in caption


class _RightOnBackground(torch.nn.Module):
    """'left' reads the left half; 'right' has a fixed logit 5: the model answers 'right' on an empty image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([100 * (left - 0.05), torch.full_like(left, 5.0), 0 * self.conv(x).mean(dim=(1, 2, 3))], 1)


def test_the_per_class_breakdown_names_the_class_the_model_predicts_on_background():
    from auditkit import ModelSpec

    spec = ModelSpec(module=_RightOnBackground(), class_names=["left", "right", "empty"], input_size=(16, 16),
                     layers=["conv"], name="right-on-background")
    with Subject(spec, device="cpu") as subject:
        result = OcclusionDrop(baseline="zero", evidence_samples=0).execute(subject, halves_set(8))
    by_class = {g["class"]: g for g in result.decision["by_class"]}
    assert by_class["left"]["effect"] > 0.9 and by_class["left"]["model_wins"] == 4
    assert by_class["right"]["effect"] == pytest.approx(0.0, abs=1e-6) and by_class["right"]["model_wins"] == 0
    # half the samples carry no effect: 4 untied pairs cannot reach alpha, so the whole check fails
    assert result.status is Status.FAILED and "not significant" in result.message


def test_relative_drop_is_clipped_so_a_tiny_p_cannot_dominate():
    from auditkit.checks.occlusion import relative_drop

    p = torch.tensor([0.8, 1e-6, 0.5])
    occluded = torch.tensor([0.2, 0.3, 0.5])
    assert relative_drop(p, occluded).tolist() == pytest.approx([0.75, -1.0, 0.0])  # unclipped: -299999
