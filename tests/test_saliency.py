import math

import pytest
import torch
from torch import nn

from auditkit import Box
from auditkit.checks.base import Status
from auditkit.methods import saliency as sal


def test_energy_and_lift_closed_form():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0:2, 0:5] = 1.0  # 10 units inside the box
    maps[0, 9, :] = 1.0  # 10 units outside
    maps[0, 5, 5] = -50.0  # negative attribution is ignored
    inside = torch.zeros(2, 10, 10, dtype=torch.bool)
    inside[:, 0:5, 0:5] = True  # a quarter of the image
    energy = sal.energy_in_box(maps, inside)
    assert energy[0] == pytest.approx(0.5)
    assert torch.isnan(energy[1])  # an all-zero map has no positive energy
    lift = energy / sal.area_fraction(inside)
    assert lift[0] == pytest.approx(2.0)


def test_uniform_map_has_lift_one():
    inside = torch.zeros(1, 8, 8, dtype=torch.bool)
    inside[0, 2:6, 1:4] = True
    energy = sal.energy_in_box(torch.ones(1, 8, 8), inside)
    assert float(energy / sal.area_fraction(inside)) == pytest.approx(1.0)


def test_pointing_hits_use_distance_to_the_nearest_box():
    maps = torch.zeros(2, 20, 20)
    maps[0, 3, 12] = 1.0  # centre (12.5, 3.5)
    maps[1, 19, 0] = 1.0  # centre (0.5, 19.5)
    boxes = [(Box(10, 0, 15, 5),), (Box(10, 0, 15, 5), Box(4, 16, 8, 20))]
    assert sal.argmax_points(maps).tolist() == [[12, 3], [0, 19]]
    assert sal.pointing_hits(maps, boxes, 0).tolist() == [True, False]
    assert sal.pointing_hits(maps, boxes, 3.5).tolist() == [True, True]  # 3.5 px left of the second box
    assert sal.distance_to_boxes((0.0, 0.0), ()) == float("inf")


def test_centre_prior_peaks_in_the_middle_and_is_symmetric():
    prior = sal.centre_prior(2, 9, 12)
    assert prior.shape == (2, 9, 12)
    assert sal.argmax_points(prior)[0].tolist() in ([5, 4], [6, 4])
    assert torch.allclose(prior, prior.flip(-1)) and torch.allclose(prior, prior.flip(-2))


def test_unknown_method_and_bad_parameters_are_errors():
    from auditkit.checks import build_checks
    from auditkit.checks.base import CheckConfigError

    with pytest.raises(CheckConfigError, match="method"):
        build_checks([{"kind": "saliency-in-box", "method": "magic"}])
    with pytest.raises(CheckConfigError, match="layer applies to methods 'grad_cam' and 'auto' only"):
        build_checks([{"kind": "saliency-in-box", "method": "gradient", "layer": "stage2"}])
    with pytest.raises(ValueError, match="unknown saliency method 'magic'"):
        sal.saliency_map(None, torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), "magic")


@pytest.fixture(scope="module")
def demo_results():
    """The default suite's saliency-in-box check (Grad-CAM) and the opt-in gradient one on both demo models."""
    from auditkit.checks import build_checks
    from auditkit.demo import demo_model, demo_shortcut_model, shapes_dataset
    from auditkit.subject import Subject

    data = shapes_dataset()
    defaults = [c for c in build_checks() if c.kind == "saliency-in-box"]
    assert [c.method for c in defaults] == ["auto"]  # Grad-CAM on a CNN; pixel gradients are opt-in (README)
    checks = defaults + build_checks([{"kind": "saliency-in-box", "name": "gradient", "method": "gradient"}])
    out = {}
    for factory in (demo_model, demo_shortcut_model):
        spec = factory()
        with Subject(spec, device="cpu") as subject:
            for check in checks:
                result = check.execute(subject, data.for_model(spec.class_names, spec.input_size))
                out[spec.name, result.details["method"]] = result
    return out


@pytest.mark.parametrize("method", ["grad_cam", "gradient"])
def test_demo_passes_saliency_in_box(demo_results, method):
    result = demo_results["demo", method]
    assert result.status is Status.PASSED, result.summary()
    assert result.details["mean_energy"] > result.details["prior_mean_energy"]
    d = result.decision
    assert d["value"] > d["control"] and d["ci"][0] > 1.0  # more energy in the box than the best control map
    assert d["p_value"] <= d["alpha"] and d["n"] >= d["needed"]


@pytest.mark.parametrize("method", ["grad_cam", "gradient"])
def test_demo_shortcut_fails_saliency_in_box(demo_results, method):
    result = demo_results["demo-shortcut", method]
    assert result.status is Status.FAILED, result.summary()
    assert result.details["mean_lift"] < 1.0  # no better than a uniform map: it looks at the corner marker


# -- the decision against the control maps (issue 14) ---------------------------------------------


def _region_check(data, **params):
    from auditkit.checks.saliency import SaliencyInBox
    from auditkit.subject import Subject
    from tests.toys import region_spec

    with Subject(region_spec(), device="cpu") as subject:
        return SaliencyInBox(method="gradient", evidence_samples=0, **params).execute(subject, data)


def test_gradient_of_a_half_mean_gives_the_closed_form_ratio():
    """RegionScore's true-class gradient is uniform over its half (128 px): energy = box 48 px / 128."""
    from tests.toys import halves_set

    data = halves_set(8)
    result = _region_check(data)
    inside = data.box_masks()
    prior = sal.energy_in_box(sal.centre_prior(8, 16, 16), inside)
    control = torch.maximum(prior, sal.area_fraction(inside))
    expected = torch.exp(torch.log(0.375 / control).mean())
    assert [r["energy"] for r in result.rows] == pytest.approx([0.375] * 8, rel=1e-5)
    assert result.value == pytest.approx(float(expected), rel=1e-5)
    assert result.status is (Status.PASSED if float(expected) >= 1.25 else Status.FAILED)


def test_boxes_a_centre_prior_already_fills_cannot_decide():
    """Objects covering the middle 80% of the image: the prior alone puts most energy inside."""
    from auditkit import AuditSet, Sample

    samples = [Sample(torch.rand(3, 16, 16), i % 2, (Box(2, 2, 14, 14),), f"big{i}") for i in range(10)]
    result = _region_check(AuditSet(samples, ["left", "right", "empty"], name="big"))
    assert result.status is Status.INCONCLUSIVE
    assert "no localisation verdict is possible" in result.message
    assert result.details["samples_too_large"] == 10 and result.decision["n"] == 0


def test_a_box_under_a_pixel_is_skipped_and_named():
    from auditkit import AuditSet
    from tests.toys import halves_set

    halves = halves_set(8)
    big = torch.zeros(3, 160, 160)
    big[:, 40:120, 10:11] = 1.0
    from auditkit import Sample

    thin = Sample(big, 0, (Box(10, 40, 11, 120),), "thin-line")
    data = AuditSet([thin] + list(halves.samples), halves.class_names, name="mixed").resized((16, 16))
    result = _region_check(data)
    assert "thin-line" in result.message and "covers no pixel" in result.message
    assert result.decision["n"] == 8 and not math.isnan(result.value)


def test_min_ratio_must_be_reachable():
    from auditkit.checks.base import CheckConfigError
    from auditkit.checks.saliency import SaliencyInBox

    with pytest.raises(CheckConfigError, match=r"min_ratio must be in \[1, 1 / max_control_energy = 2\]"):
        SaliencyInBox(min_ratio=3.0, max_control_energy=0.5)


# -- method "auto": Grad-CAM on convolutional layers, the pixel gradient on attention ----------------


class _TokenBlock(nn.Module):
    """A pre-norm attention block on an N x D x h x w grid; `style` names its query / key / value projections
    as torchvision does (nn.MultiheadAttention), as timm does (qkv) or as Hugging Face does (query, key, value)."""

    def __init__(self, dim: int, style: str):
        super().__init__()
        self.style, self.norm = style, nn.LayerNorm(dim)
        if style == "mha":
            self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        elif style == "qkv":
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, grid):
        n, d, h, w = grid.shape
        x = self.norm(grid.flatten(2).transpose(1, 2))
        if self.style == "mha":
            mixed = self.attn(x, x, x, need_weights=False)[0]
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1) if self.style == "qkv" else (self.query(x), self.key(x), self.value(x))
            mixed = torch.softmax(q @ k.transpose(1, 2) / d ** 0.5, dim=-1) @ v
        return grid + mixed.transpose(1, 2).reshape(n, d, h, w)


class _TinyTransformer(nn.Module):
    def __init__(self, style: str = "qkv", classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.block = _TokenBlock(8, style)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.block(self.embed(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("style", ["mha", "qkv", "query_key_value"])
def test_holds_attention_finds_each_style_of_self_attention(style):
    model = _TinyTransformer(style)
    assert sal.holds_attention(model.block) and sal.holds_attention(model)
    assert not sal.holds_attention(model.embed) and not sal.holds_attention(model.head)


def test_holds_attention_is_false_for_convolutional_blocks():
    from tests.toys import SmallNet

    assert not sal.holds_attention(SmallNet())


def test_auto_uses_grad_cam_on_a_cnn_and_the_gradient_on_attention():
    from auditkit import ModelSpec
    from auditkit.checks.saliency import SaliencyInBox
    from auditkit.methods import gradients
    from auditkit.subject import Subject
    from tests.toys import halves_set, region_spec

    data = halves_set(8)
    with Subject(region_spec(), device="cpu") as cnn:
        assert sal.auto_method(cnn) == ("grad_cam", "")
        cnn_result = SaliencyInBox().execute(cnn, data)
    assert cnn_result.details["method"] == "grad_cam" and cnn_result.details["method_requested"] == "auto"
    assert "Grad-CAM" in cnn_result.title

    spec = ModelSpec(module=_TinyTransformer("qkv"), class_names=["left", "right", "empty"], input_size=(16, 16),
                     layers=["embed", "block"], name="tiny-vit")
    with Subject(spec, device="cpu") as vit:
        method, why = sal.auto_method(vit)
        assert method == "gradient" and "layer 'block' holds a self-attention" in why
        assert sal.auto_method(vit, "embed") == ("grad_cam", "")  # a named layer before the attention
        images, labels = data.images(), data.labels()
        auto_maps = sal.saliency_map(vit, images, labels, "auto")
        expected = gradients.to_map(gradients.gradient(vit, images, labels), "max_abs")
        result = SaliencyInBox().execute(vit, data)
    assert torch.equal(auto_maps, expected)
    assert result.status is not Status.ERROR, result.summary()
    assert result.details["method"] == "gradient" and result.details["method_requested"] == "auto"
    assert "holds a self-attention" in result.message and "gradient" in result.title
