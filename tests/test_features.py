import copy

import numpy as np
import pytest
import torch
from torch import nn

from auditkit import AuditSet, ModelSpec, Sample
from auditkit.checks.base import CheckConfigError, Status, spread_indices
from auditkit.checks.representation import (
    DeadUnits,
    InvarianceGrowsWithDepth,
    normalise_filters,
)
from auditkit.demo import demo_model, shapes_dataset
from auditkit.methods import features as fe
from auditkit.subject import AuditModelError, Subject, _hook_keys
from tests.toys import NaNFeatures


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


class Net(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.boom = Boom() if fail else nn.Identity()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.boom(self.act(self.conv(x))).mean(dim=(2, 3)))


class Ident(nn.Module):
    """The 'model' whose layer `feat` outputs the input itself."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.feat(x).mean(dim=(2, 3)))


def _spec(module, size=8, layers=("conv",)):
    return ModelSpec(module=module, class_names=["a", "b"], input_size=(size, size), layers=list(layers), name="toy")


def _images(n=6, size=8, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- layer_features -----------------------------------------------------------


def test_hooks_removed_even_when_forward_raises():
    module = Net(fail=True)
    state = copy.deepcopy(module.state_dict())
    hooks = _hook_keys(module)
    with Subject(_spec(module), device="cpu", batch_size=2) as subject:
        with pytest.raises(RuntimeError, match="boom"):
            fe.layer_features(subject, _images(), ["conv", "act"])
        assert _hook_keys(module) == hooks
        assert all(not m._forward_hooks for m in module.modules())
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


def test_layer_features_independent_of_batch_size():
    module, images = Net(), _images(n=7)
    with Subject(_spec(module), device="cpu", batch_size=1) as subject:
        one = fe.layer_features(subject, images, ["conv", "act"])
    with Subject(_spec(module), device="cpu", batch_size=64) as subject:
        many = fe.layer_features(subject, images, ["conv", "act"], flatten=True)
        unflat = fe.layer_features(subject, images, ["conv"], flatten=False)
    assert one["conv"].shape == (7, 4 * 8 * 8) and unflat["conv"].shape == (7, 4, 8, 8)
    for name in ("conv", "act"):
        torch.testing.assert_close(one[name], many[name], rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for m in module.modules())


class InplaceNet(nn.Module):
    """conv -> ReLU(inplace=True): the ReLU overwrites the conv's output tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_layer_features_records_the_output_before_an_inplace_op():
    module, images = InplaceNet(), _images(n=5)
    with Subject(_spec(module, layers=("conv", "act")), device="cpu", batch_size=2) as subject:
        got = fe.layer_features(subject, images, ["conv", "act"], flatten=False)
        expected = module.conv(subject.normalise(images)).detach()
    assert (got["conv"] < 0).any()  # the pre-ReLU values, not the ReLU's overwrite
    torch.testing.assert_close(got["conv"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["act"], expected.clamp_min(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_layer_features_keeps_only_the_requested_features(batch_size):
    """Each result owns exactly N x D float32 values: no view into a larger chunk or a concatenation."""
    module, images = Net(), _images(n=7)
    with Subject(_spec(module), device="cpu", batch_size=batch_size) as subject:
        flat = fe.layer_features(subject, images, ["act"])
        maps = fe.layer_features(subject, images, ["conv"], flatten=False)
    for tensor, shape in ((flat["act"], (7, 4 * 64)), (maps["conv"], (7, 4, 8, 8))):
        assert tensor.shape == shape and tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert tensor.untyped_storage().nbytes() == tensor.numel() * 4
    assert all(not m._forward_hooks for m in module.modules())


def test_layer_features_names_a_layer_without_tensor_output():
    class TupleOut(nn.Module):
        def forward(self, x):
            return ("no tensor", x.shape)

    class Net2(Net):
        def __init__(self):
            super().__init__()
            self.pair = TupleOut()

        def forward(self, x):
            self.pair(x)
            return super().forward(x)

    module = Net2()
    with Subject(_spec(module), device="cpu") as subject, \
            pytest.raises(ValueError, match="'pair' produced no tensor output"):
        fe.layer_features(subject, _images(), ["conv", "pair"])
    assert all(not m._forward_hooks for m in module.modules())


# -- transforms ---------------------------------------------------------------


def test_translate_zero_is_identity_and_round_trip_away_from_borders():
    x = _images(n=2, size=12)
    assert torch.equal(fe.translate(x, 0, 0), x)
    for dx, dy in ((3, 0), (0, -2), (2, 3)):
        back = fe.translate(fe.translate(x, dx, dy), -dx, -dy)
        mx, my = abs(dx), abs(dy)
        torch.testing.assert_close(back[..., my : 12 - my, mx : 12 - mx], x[..., my : 12 - my, mx : 12 - mx])


def test_translate_reflection_fill_closed_form():
    row = torch.arange(5.0).view(1, 1, 1, 5)
    assert fe.translate(row, 2, 0).flatten().tolist() == [2, 1, 0, 1, 2]  # out[x] = in[|x - 2|]
    assert fe.translate(row, -2, 0).flatten().tolist() == [2, 3, 4, 3, 2]  # mirrored about the last pixel
    col = row.view(1, 1, 5, 1)
    assert fe.translate(col, 0, 1).flatten().tolist() == [1, 0, 1, 2, 3]
    with pytest.raises(ValueError):
        fe.translate(row, 5, 0)


def test_scale_one_and_rotate_zero_are_identity():
    x = _images(n=2, size=10)
    torch.testing.assert_close(fe.scale(x, 1.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(fe.rotate(x, 0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(fe.rotate(x, 360), x, atol=1e-5, rtol=0)  # the sampling path itself
    assert fe.scale(x, 1.3).shape == x.shape and fe.rotate(x, 17).shape == x.shape


def test_rotate_90_matches_rot90():
    # align_corners=False: a 90 degree turn maps pixel centres onto pixel centres
    x = _images(n=2, size=9)
    torch.testing.assert_close(fe.rotate(x, 90), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fe.rotate(x, -90), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_scale_enlarges_about_the_centre():
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4, 4] = 1.0
    y = fe.scale(x, 2.0)
    assert int(y.flatten().argmax()) == 4 * 9 + 4  # the centre stays put


# -- invariance ---------------------------------------------------------------


def test_invariance_of_identity_is_exactly_one():
    with Subject(_spec(Net()), device="cpu") as subject:
        images = _images()
        for name in ("translate", "rotate"):
            inv = fe.invariance(subject, images, ["conv", "act"], name, 0)
            assert inv == {"conv": 1.0, "act": 1.0}
        assert fe.invariance(subject, images, ["conv"], "scale", 1.0) == {"conv": 1.0}


def test_invariance_formula_against_numpy():
    images = _images(n=5, size=6, seed=4)
    with Subject(_spec(Ident(), size=6, layers=("feat",)), device="cpu", batch_size=2) as subject:
        got = fe.invariance(subject, images, ["feat"], "translate", 2)["feat"]
    a = images.double().numpy().reshape(5, -1)
    b = fe.translate(images, 2, 0).double().numpy().reshape(5, -1)
    num = np.mean(np.linalg.norm(a - b, axis=1))
    pairs = [np.linalg.norm(a[i] - a[j]) for i in range(5) for j in range(5) if i != j]
    assert got == pytest.approx(1 - num / np.mean(pairs), rel=1e-6)


def test_dead_units_flags_the_channel_with_negative_bias():
    """Dead = constant over every image and position: after the ReLU the negative-bias channel is all zeros
    (dead); before it, the conv output is negative but varies (alive). Before: dead in both."""
    module = Net()
    with torch.no_grad():
        module.conv.bias[2] = -100.0
    with Subject(_spec(module), device="cpu", batch_size=4) as subject:
        dead = fe.dead_units(subject, _images(n=9), ["conv", "act"])
    assert dead["conv"].tolist() == [False, False, False, False]
    assert dead["act"].tolist() == [False, False, True, False]


# -- on the demo model --------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    spec = demo_model()
    data = shapes_dataset().for_model(spec.class_names, spec.input_size)
    with Subject(spec, device="cpu") as subject:
        yield subject, data


def test_demo_invariance_per_layer(demo):
    subject, data = demo
    images = data.subset(list(range(0, len(data), 2))).images()
    base = fe.layer_features(subject, images, subject.layers)
    for name, magnitude in (("translate", 4), ("scale", 0.8)):
        inv = fe.invariance(subject, images, subject.layers, name, magnitude, base=base)
        print(name, magnitude, {k: round(v, 3) for k, v in inv.items()})
        assert inv["stage4"] > inv["stage1"]


@pytest.fixture(scope="module")
def translate_results(demo):
    """The default translate check on the demo, judged alone and with rotation shown beside it."""
    subject, data = demo
    plain = InvarianceGrowsWithDepth(transform="translate").execute(subject, data)
    shown = InvarianceGrowsWithDepth(transform="translate", compare=("rotate",)).execute(subject, data)
    return plain, shown


@pytest.mark.parametrize("transform", ["translate", "scale"])
def test_demo_invariance_check_passes(demo, translate_results, transform):
    subject, data = demo
    if transform == "translate":
        result = translate_results[0]
    else:
        result = InvarianceGrowsWithDepth(transform=transform).execute(subject, data)
    print(result.summary())
    assert result.status is Status.PASSED, result.summary()
    assert result.decision["ci"][0] >= 0.2 and result.decision["p_value"] < 1e-6  # by far, not by a tuned edge
    assert result.decision["n"] == 32 and result.decision["min_effect"] == 0.1
    assert len(result.rows) == 5 * 3 and result.evidence  # 4 named layers and the penultimate features and result.evidence[0].media_type == "image/svg+xml"
    assert result.title == {"translate": "Invariance to translation grows with depth",
                            "scale": "Invariance to scaling grows with depth"}[transform]  # told apart in the report


def test_demo_invariance_check_fails_on_gain(demo):
    subject, data = demo
    result = InvarianceGrowsWithDepth(transform="translate", min_gain=0.99).execute(subject, data)
    assert result.status is Status.FAILED and "effect 0.649 below the minimum 0.99" in result.message
    assert result.decision["p_value"] <= 0.01  # significant, but not by the minimum gain
    assert result.value == pytest.approx(result.details["mean_gain"], abs=1e-9)
    assert result.details["mean_rho"] >= 0.8  # the trend holds, and is shown, not judged


def test_rotation_is_measured_and_shown_but_not_judged(demo, translate_results):
    import xml.etree.ElementTree as ET

    subject, data = demo
    plain, shown = translate_results
    # the verdict is the translate check's alone
    assert shown.status is plain.status is Status.PASSED
    assert shown.value == plain.value and shown.details["mean_gain"] == plain.details["mean_gain"]
    assert shown.details["rho_per_magnitude"] == plain.details["rho_per_magnitude"]
    # rotation measured at its default magnitudes, as the method computes it on the same images
    rotate = shown.details["compare"]["rotate"]
    assert rotate["magnitudes"] == [10.0, 20.0, 40.0] and rotate["judged"] is False
    images = data.subset(spread_indices(len(data), 32)).images()
    direct = fe.invariance(subject, images, subject.layers, "rotate", 20.0)
    for layer in subject.layers:
        assert rotate["invariance"]["20"][layer] == pytest.approx(direct[layer], abs=1e-9)
    print("rotate, not judged:", rotate["mean_rho"], rotate["mean_gain"])
    # figure 5's p(true class) comes from the sweep's own forward passes: same as a separate predict
    labels = data.subset(spread_indices(len(data), 32)).labels()
    for m, p in ((0.0, images), (4.0, fe.translate(images, 4))):
        assert shown.details["p_true_class"][f"{m:g}"] == pytest.approx(
            float(subject.class_probability(p, labels).double().mean()), abs=1e-6)
    # rows: 15 judged translate rows and 15 rotate rows marked as shown only
    assert [r["judged"] for r in shown.rows].count("yes") == 15  # 4 named layers and the penultimate features
    assert sorted({r["magnitude"] for r in shown.rows if r["transform"] == "rotate"}) == [10.0, 20.0, 40.0]
    assert all(r["judged"].startswith("no") for r in shown.rows if r["transform"] == "rotate")
    # evidence: the plain check's charts unchanged, plus one chart with a line per transform
    assert [e.title for e in shown.evidence[:-1]] == [e.title for e in plain.evidence]
    chart = shown.evidence[-1]
    ET.fromstring(chart.data.decode())
    assert "rotate 20deg (not judged)" in chart.data.decode() and "translate 4px (judged)" in chart.data.decode()
    assert "rotate" in shown.message and "not judged" in shown.message


@pytest.mark.parametrize("compare, match", [(("spin",), "unknown transform 'spin'"),
                                            (("translate",), "must not repeat"),
                                            (("rotate", "rotate"), "twice")])
def test_invariance_compare_is_validated(compare, match):
    with pytest.raises(CheckConfigError, match=match):
        InvarianceGrowsWithDepth(transform="translate", compare=compare)
    assert InvarianceGrowsWithDepth(compare="rotate").compare == ("rotate",)


def test_demo_dead_units(demo):
    subject, data = demo
    result = DeadUnits().execute(subject, data)
    print(result.summary())
    assert result.status is Status.PASSED and result.value == 0.0
    assert [r["channels"] for r in result.rows] == [16, 32, 64, 96]


def test_invariance_check_draws_figure5_evidence():
    """Zeiler & Fergus figure 5: feature change (first vs last layer) and p(true class) against magnitude."""
    import xml.etree.ElementTree as ET

    from auditkit.checks import build_checks
    from auditkit.demo import demo_model, shapes_dataset
    from auditkit.subject import Subject

    spec = demo_model()
    data = shapes_dataset().for_model(spec.class_names, spec.input_size)
    (check,) = build_checks([{"kind": "invariance-grows-with-depth", "transform": "rotate", "samples": 8}])
    with Subject(spec, device="cpu") as subject:
        result = check.execute(subject, data)
    titles = [e.title for e in result.evidence]
    assert titles[1:] == ["Feature change under rotate: bottom vs judged top", "True-class probability under rotate"]
    for item in result.evidence:
        ET.fromstring(item.data.decode())  # valid SVG
    change_svg = result.evidence[1].data.decode()
    assert "stage1" in change_svg and "penultimate (input of head)" in change_svg  # the two judged ones


# -- dead-units evidence ------------------------------------------------------


def test_dead_units_table_lists_dead_channels_and_draws_maps_and_filters():
    import io

    from PIL import Image

    from auditkit.data import AuditSet, Sample

    module = Net()
    with torch.no_grad():
        module.conv.bias[2] = -100.0
    images = _images(n=5)
    data = AuditSet(name="toy", class_names=("a", "b"),
                    samples=[Sample(image=images[i], label=i % 2, id=f"s{i}") for i in range(5)])
    with Subject(_spec(module, layers=("conv", "act")), device="cpu") as subject:
        result = DeadUnits(max_dead=0.5, sample=3, max_maps=3, min_images=5).execute(subject, data)
        out_of_range = DeadUnits(sample=5).execute(subject, data)
    assert result.status is Status.PASSED and result.value == 1 / 8  # 0 + 1 of 4 + 4 channels
    assert [(r["layer"], r["dead"], r["dead_channels"]) for r in result.rows] == [("conv", 0, ""), ("act", 1, "2")]
    assert result.details["dead_channels"] == {"conv": [], "act": [2]}
    titles = [e.title for e in result.evidence]
    assert titles == ["Dead channels per layer", "Activation maps of conv for sample 3",
                      "Activation maps of act for sample 3", "First-layer filters (conv, RGB)"]
    assert "the first 3 of 4 channels" in result.evidence[1].caption and "'s3'" in result.evidence[1].caption
    for item in result.evidence[1:]:
        assert item.media_type == "image/png"
        Image.open(io.BytesIO(item.data)).verify()
    assert result.details["filters"] == {"layer": "conv", "shape": [4, 3, 3, 3], "shown": 3}
    assert "enlarged 9x" in result.evidence[-1].caption  # 3 x 3 kernels shown 27 px wide
    assert out_of_range.status is Status.ERROR and "sample 5 is out of range" in out_of_range.message
    assert "valid 0..4" in out_of_range.message
    assert all(not m._forward_hooks for m in module.modules())


def test_dead_units_without_rgb_conv_skips_filters_with_a_note():
    from auditkit.data import AuditSet, Sample

    images = _images(n=3, size=6)
    data = AuditSet(name="toy", class_names=("a", "b"),
                    samples=[Sample(image=images[i], label=0, id=f"s{i}") for i in range(3)])
    with Subject(_spec(Ident(), size=6, layers=("feat",)), device="cpu") as subject:
        result = DeadUnits(max_dead=1.0, min_images=3).execute(subject, data)
    assert result.status is Status.PASSED
    assert [e.title for e in result.evidence] == ["Dead channels per layer", "Activation maps of feat for sample 0"]
    assert "no nn.Conv2d with 3 input channels" in result.details["filters"]
    with pytest.raises(CheckConfigError, match="sample must be an index >= 0"):
        DeadUnits(sample=-1)


def test_normalise_filters_closed_form():
    weight = torch.stack([torch.arange(27.0).view(3, 3, 3) - 5, torch.full((3, 3, 3), 2.0)])
    scaled = normalise_filters(weight)
    torch.testing.assert_close(scaled[0], torch.arange(27.0).view(3, 3, 3) / 26)  # (w - min) / (max - min)
    assert torch.all(scaled[1] == 0.5)  # a constant filter is mid grey


class _Zero(nn.Module):
    def forward(self, x):
        return x * 0


class _DeadTop(nn.Module):
    """A conv, then a layer whose output is zero for every image (a dead last stage)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dead = _Zero()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.dead(self.conv(x)).mean(dim=(2, 3)))


def test_a_constant_layer_has_no_invariance_and_fails_the_check():
    """0/0 must not read as perfect invariance: a dead top layer would otherwise make the check pass."""
    zeros = torch.zeros(4, 10)
    assert np.isnan(fe.invariance_from_features(zeros, zeros))
    spec = ModelSpec(module=_DeadTop(), class_names=["a", "b"], input_size=(16, 16), layers=["conv", "dead"], name="dead")
    data = AuditSet([Sample(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)), i % 2, (), f"s{i}")
                     for i in range(8)], ["a", "b"], name="noise")
    with Subject(spec, device="cpu") as subject:
        result = InvarianceGrowsWithDepth().execute(subject, data)
    assert result.status is Status.FAILED
    assert "layer(s) dead and the penultimate features (input of head) give the same output for every image" \
        in result.message


# -- near-constant is constant; magnitudes that measure nothing (issue 13) ----------------------------


class _AlmostConstant(nn.Module):
    """1 + 1e-7 x: the same for every image up to float32 rounding (a few ulps of 1)."""

    def forward(self, x):
        return 1.0 + 1e-7 * x


class _AlmostDeadTop(_DeadTop):
    def __init__(self):
        super().__init__()
        self.dead = _AlmostConstant()


def _noise_set(n=8, size=16):
    return AuditSet([Sample(torch.rand(3, size, size, generator=torch.Generator().manual_seed(i)), i % 2, (), f"s{i}")
                     for i in range(n)], ["a", "b"], name="noise")


def test_a_layer_constant_up_to_rounding_has_no_invariance_and_fails_the_check():
    gen = torch.Generator().manual_seed(0)
    base = (1.0 + 1e-7 * torch.randn(6, 10, generator=gen)).float()
    moved = (1.0 + 1e-7 * torch.randn(6, 10, generator=gen)).float()
    assert fe.mean_pairwise_distance(base) > 0  # not exactly constant
    assert fe.rows_all_equal(base) and not fe.rows_all_equal(torch.randn(6, 10, generator=gen))
    assert np.isnan(fe.invariance_from_features(base, moved))
    spec = ModelSpec(module=_AlmostDeadTop(), class_names=["a", "b"], input_size=(16, 16), layers=["conv", "dead"],
                     name="almost-dead")
    with Subject(spec, device="cpu") as subject:
        result = InvarianceGrowsWithDepth(min_gain=-2.0).execute(subject, _noise_set())
    assert result.status is Status.FAILED, result.summary()
    assert "layer(s) dead and the penultimate features (input of head) give the same output" in result.message
    assert all(np.isnan(row["invariance"]) for row in result.rows if row["layer"] == "dead")


class _Scaled(nn.Module):
    def forward(self, x):
        return 3.0 * x


class _ConvThenScaled(nn.Module):
    """Layer `triple` is 3 x layer `conv`: the same invariance, up to rounding, at both depths. No nn.Linear
    (the logits are two channel means), so the check judges `triple` against `conv`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.triple = _Scaled()

    def forward(self, x):
        return self.triple(self.conv(x)).mean(dim=(2, 3))[:, :2]


def test_invariances_tied_up_to_rounding_have_no_rank_correlation():
    spec = ModelSpec(module=_ConvThenScaled(), class_names=["a", "b"], input_size=(16, 16),
                     layers=["conv", "triple"], name="scaled")
    with Subject(spec, device="cpu") as subject:
        result = InvarianceGrowsWithDepth(min_gain=-2.0).execute(subject, _noise_set())
    per_layer = {(r["magnitude"], r["layer"]): r["invariance"] for r in result.rows}
    for m in (2.0, 4.0, 8.0):
        assert per_layer[m, "conv"] == pytest.approx(per_layer[m, "triple"], abs=1e-9)
    assert all(np.isnan(rho) for rho in result.details["rho_per_magnitude"]), result.details["rho_per_magnitude"]
    # per sample too the two layers tie up to rounding: ties carry no direction, so it cannot pass
    assert result.status is Status.FAILED, result.summary()
    assert result.decision["effect"] == 0.0 and result.decision["p_value"] == 1.0 and result.decision["n"] == 8


@pytest.mark.parametrize("transform, magnitudes, match", [
    ("translate", (-4, 0), r"magnitudes: translate needs whole, nonzero pixel shifts.*got 0"),
    ("translate", (2.5,), r"magnitudes: translate needs whole, nonzero pixel shifts.*got 2.5"),
    ("translate", (4, 4), r"magnitudes: 4 is listed twice"),
    ("scale", (0.8, 1.0), r"magnitudes: scale needs zoom factors > 0 and != 1.*got 1"),
    ("scale", (0.0,), r"magnitudes: scale needs zoom factors > 0 and != 1.*got 0"),
    ("scale", (-0.5,), r"magnitudes: scale needs zoom factors > 0 and != 1.*got -0.5"),
    ("rotate", (0,), r"magnitudes: rotate needs angles in degrees that are not a multiple of 360.*got 0"),
    ("rotate", (10, 360), r"magnitudes: rotate needs angles in degrees that are not a multiple of 360.*got 360"),
    ("rotate", (float("nan"),), r"magnitudes: .*got nan"),
])
def test_magnitudes_that_measure_nothing_are_config_errors(transform, magnitudes, match):
    """Before: magnitudes = [-4, 0] was accepted, and the identity shift made the check's Spearman NaN."""
    with pytest.raises(CheckConfigError, match=match):
        InvarianceGrowsWithDepth(transform=transform, magnitudes=magnitudes)


def test_negative_magnitudes_mean_the_other_direction(demo):
    subject, data = demo
    images = data.subset(list(range(0, len(data), 6))).images()
    torch.testing.assert_close(fe.translate(images, -4)[..., :-4], images[..., 4:])  # content moves left
    for transform, magnitudes in (("translate", (-4, 4)), ("rotate", (-20, 20))):
        result = InvarianceGrowsWithDepth(transform=transform, magnitudes=magnitudes, samples=8).execute(subject, data)
        assert result.status is not Status.ERROR, result.summary()
        assert all(np.isfinite(rho) for rho in result.details["rho_per_magnitude"]), result.summary()


def test_non_finite_layer_output_is_an_error_naming_the_layer():
    spec = ModelSpec(module=NaNFeatures(), class_names=["a", "b"], input_size=(16, 16), layers=["conv", "odd"],
                     name="nan")
    with Subject(spec, device="cpu") as subject:
        result = InvarianceGrowsWithDepth().execute(subject, _noise_set())
    assert result.status is Status.ERROR, result.summary()
    assert "NonFiniteError" in result.message and "layer 'odd'" in result.message and "'s" in result.message


def test_transient_features_are_one_sweep_of_what_the_kept_functions_give_and_keep_nothing():
    """A transformed copy serves one measurement: its layer outputs, logits and the head's input come from
    one forward per chunk (invariance made two before), equal to the kept functions' results, and the
    Subject keeps none of it."""
    from auditkit.methods.embedding import penultimate_features

    spec = ModelSpec(module=Net(), class_names=["a", "b"], input_size=(8, 8), layers=["conv", "act"], name="net")
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    spec.module.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    with Subject(spec, device="cpu", batch_size=2) as subject:
        feats, logits, inputs = fe.transient_features(subject, images, ["conv", "act"], input_of="head")
        assert calls == [2, 2, 1] and len(subject.cache) == 0  # one forward per chunk, nothing kept
        kept, kept_logits = fe.features_and_logits(subject, images, ["conv", "act"])
        kept_inputs = penultimate_features(subject, images, "head")
    assert set(feats) == {"conv", "act"} and feats["conv"].shape == (5, 4 * 8 * 8)
    for name in feats:
        assert torch.allclose(feats[name], kept[name])
    assert torch.allclose(logits, kept_logits) and torch.allclose(inputs, kept_inputs) and inputs.shape == (5, 4)
    with Subject(spec, device="cpu") as subject:
        assert fe.transient_features(subject, images, ["conv"])[2] is None
        with pytest.raises(Exception, match="'nope'"):
            fe.transient_features(subject, images, ["conv"], input_of="nope")

    class Twice(Net):  # the head runs twice per forward: its input is not one row per image
        def forward(self, x):
            pooled = self.act(self.conv(x)).mean(dim=(2, 3))
            return self.head(pooled) + self.head(pooled)

    twice = ModelSpec(module=Twice(), class_names=["a", "b"], input_size=(8, 8), layers=["conv"], name="twice")
    with Subject(twice, device="cpu") as subject:
        with pytest.raises(AuditModelError, match=r"layer 'head' gave 10 input rows for 5 images .*pass layer="):
            fe.transient_features(subject, images, ["conv"], input_of="head")
