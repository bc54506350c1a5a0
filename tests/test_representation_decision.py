"""invariance-grows-with-depth decides per sample, top against the bottom layer (issue 14).

The top is the penultimate features (the input of the final nn.Linear) when the model has one, else the
last named layer. The `Taps` toys have no nn.Linear, so they are judged on their last named layer (the
old rule, which they test); `PooledHead` has a Linear after global pooling.

The toys tap the input through parallel layers whose invariance is known: `pixels` (the identity), `pool`
(the channel means: exactly invariant to a shift of content that stays inside a zero border) and `Mix(a)`
(a * pixels beside the channel means: the smaller a, the more invariant).
"""
import numpy as np
import pytest
import torch
from torch import nn

from auditkit import AuditSet, ModelSpec, Sample
from auditkit.checks import build_checks
from auditkit.checks.base import CheckConfigError, Status
from auditkit.checks.representation import InvarianceGrowsWithDepth
from auditkit.methods import features as fe
from auditkit.subject import Subject

SIZE = 32
SHIFTS = (2.0, 4.0, 8.0)  # the default translate magnitudes


class Pool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class Mix(nn.Module):
    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x):
        return torch.cat([self.a * x.flatten(1), x.mean(dim=(2, 3))], 1)


class Constant(nn.Module):
    def forward(self, x):
        return torch.ones(x.shape[0], 5)


class Taps(nn.Module):
    """Each named layer sees the input itself; the logits are two of the channel means (no nn.Linear, so
    the check's top is the last named layer)."""

    def __init__(self, taps: dict[str, nn.Module]):
        super().__init__()
        self.names = list(taps)
        for name, module in taps.items():
            self.add_module(name, module)

    def forward(self, x):
        for name in self.names:
            getattr(self, name)(x)
        return x.mean(dim=(2, 3))[:, :2]


class PooledHead(nn.Module):
    """A small CNN: its last named layer `conv2` is a spatial map, its head pools globally before its
    nn.Linear, so the penultimate features are the channel means of conv2's ReLU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def _images(n: int = 12) -> torch.Tensor:
    """Random content in columns 10..21 of a zero image: a shift by <= 8 px keeps it inside, and the
    reflected border is zero, so the channel means do not move."""
    gen = torch.Generator().manual_seed(0)
    out = torch.zeros(n, 3, SIZE, SIZE)
    for i in range(n):
        out[i, :, 4:28, 10:22] = torch.rand(3, 24, 12, generator=gen) * (0.5 + 0.5 * (i % 2))
    return out


def _set(n: int = 12) -> AuditSet:
    images = _images(n)
    return AuditSet([Sample(images[i], i % 2, (), f"s{i}") for i in range(n)], ["dim", "bright"], name="stripes")


def _run(taps: dict[str, nn.Module], n: int = 12, **params):
    spec = ModelSpec(module=Taps(taps), class_names=["dim", "bright"], input_size=(SIZE, SIZE), layers=list(taps),
                     name="taps")
    with Subject(spec, device="cpu") as subject:
        return InvarianceGrowsWithDepth(**params).execute(subject, _set(n))


def _pixel_invariance(images: torch.Tensor, shift: float) -> np.ndarray:
    """Closed form of the identity layer: 1 - ||x_i - T x_i|| / mean_{j != k} ||x_j - x_k||."""
    a = images.double().numpy().reshape(len(images), -1)
    b = fe.translate(images, shift).double().numpy().reshape(len(images), -1)
    spread = np.mean([np.linalg.norm(a[j] - a[k]) for j in range(len(a)) for k in range(len(a)) if j != k])
    return 1.0 - np.linalg.norm(a - b, axis=1) / spread


# -- the per-sample method ------------------------------------------------------------------------


def test_invariance_per_sample_closed_form_identity_invariant_and_constant_layers():
    images = _images(6)
    moved = fe.translate(images, 4)
    got = fe.invariance_per_sample(images, moved)
    assert got.dtype == torch.float64 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), _pixel_invariance(images, 4), rtol=1e-9)
    # its mean is the layer's invariance; the spread may be passed in
    assert fe.invariance_from_features(images, moved) == pytest.approx(float(got.mean()), rel=1e-12)
    torch.testing.assert_close(fe.invariance_per_sample(images, moved, fe.mean_pairwise_distance(images)), got)
    # the channel means do not move: exactly 1 per sample, up to float32 summation order
    pooled, pooled_moved = images.mean(dim=(2, 3)), moved.mean(dim=(2, 3))
    np.testing.assert_allclose(fe.invariance_per_sample(pooled, pooled_moved).numpy(), 1.0, atol=1e-5)
    assert fe.invariance_per_sample(pooled, pooled).tolist() == [1.0] * 6  # nothing moved: exactly 1
    # a constant layer cannot be measured: NaN for every sample, never 1
    assert torch.isnan(fe.invariance_per_sample(torch.ones(6, 5), torch.ones(6, 5))).all()
    with pytest.raises(ValueError, match="at least 2 images"):
        fe.invariance_per_sample(images[:1], moved[:1])


# -- the decision ---------------------------------------------------------------------------------


def test_the_check_decides_per_sample_top_against_bottom_in_closed_form():
    result = _run({"pixels": nn.Identity(), "pool": Pool()})
    images = _images(12)
    gain = np.mean([1.0 - _pixel_invariance(images, m) for m in SHIFTS], axis=0)  # inv_pool = 1
    d = result.decision
    assert result.status is Status.PASSED, result.summary()
    assert d["effect_kind"] == "difference" and d["n"] == 12 and d["min_effect"] == 0.1
    assert d["effect"] == pytest.approx(gain.mean(), abs=1e-5) and result.value == d["effect"]
    assert d["p_value"] == pytest.approx(0.5 ** 12)  # every sample gains: the exact signed-rank p-value
    assert d["ci"][0] <= d["effect"] <= d["ci"][1]
    assert d["labels"] == {"value": "invariance of pool (top)", "control": "invariance of pixels (bottom)"}
    # no nn.Linear: the last named layer is the top, as before, and the message says so
    assert result.details["top_kind"] == "last named layer" and result.details["head"] == ""
    assert "the last named layer 'pool' against the first named layer 'pixels', as before" in result.message
    assert "has no nn.Linear" in result.message
    per = result.details["per_sample"]
    assert [p["sample"] for p in per] == [f"s{i}" for i in range(12)]
    np.testing.assert_allclose([p["gain"] for p in per], gain, atol=1e-5)
    np.testing.assert_allclose([p["inv_top"] for p in per], 1.0, atol=1e-5)
    # the per-class breakdown names the classes
    assert [(g["class"], g["n"], g["model_wins"]) for g in d["by_class"]] == [("dim", 6, 6), ("bright", 6, 6)]
    assert "Wilcoxon" in d["rule"] and "p <= 0.01" in d["rule"]


def test_a_local_swap_of_two_middle_layers_passes():
    """Before: one swapped pair of four layers gives Spearman 0.8 - 1 ulp < min_rho = 0.8, and the check
    FAILED whatever the gain from bottom to top (issue 14: a residual CNN failed with a gain of +0.44)."""
    result = _run({"pixels": nn.Identity(), "mid1": Mix(0.01), "mid2": Mix(0.03), "pool": Pool()})
    assert result.status is Status.PASSED, result.summary()
    for m in SHIFTS:  # the curve: mid1 is more invariant than mid2, both above the bottom, below the top
        inv = result.details["invariance"][f"{m:g}"]
        assert inv["pixels"] < inv["mid2"] < inv["mid1"] < inv["pool"], inv
    assert result.details["rho_per_magnitude"] == pytest.approx([0.8] * 3)
    assert result.details["mean_rho"] < 0.8 and result.details["rho_judged"] is False
    assert "shown, not judged: Spearman" in result.message
    assert result.decision["effect"] > 0.5 and result.decision["p_value"] == pytest.approx(0.5 ** 12)


def test_a_trend_below_the_old_rank_rule_passes_on_its_gain():
    """Two local swaps (depth ranks 2, 1, 4, 3: Spearman 0.6) and the top still gains on the bottom."""
    result = _run({"bottom": Mix(0.03), "pixels": nn.Identity(), "pool": Pool(), "top": Mix(0.01)})
    assert result.details["rho_per_magnitude"] == pytest.approx([0.6] * 3)
    assert result.status is Status.PASSED, result.summary()
    assert result.decision["ci"][0] >= 0.1


def test_a_top_layer_less_invariant_than_the_bottom_fails():
    result = _run({"pool": Pool(), "pixels": nn.Identity()})
    images = _images(12)
    loss = np.mean([_pixel_invariance(images, m) - 1.0 for m in SHIFTS], axis=0)
    d = result.decision
    assert result.status is Status.FAILED, result.summary()
    assert d["effect"] == pytest.approx(loss.mean(), abs=1e-5) and d["effect"] < 0
    assert d["p_value"] == 1.0  # every sample loses: P(T+ >= 0) = 1
    assert "below the minimum 0.1" in result.message and "not significant" in result.message


def test_a_constant_top_layer_fails_and_a_constant_middle_layer_is_only_shown():
    dead_top = _run({"pixels": nn.Identity(), "dead": Constant()})
    assert dead_top.status is Status.FAILED, dead_top.summary()
    assert "layer(s) dead give the same output for every image" in dead_top.message
    assert dead_top.decision["n"] == 0 and dead_top.decision["status"] == "failed"
    dead_middle = _run({"pixels": nn.Identity(), "dead": Constant(), "pool": Pool()})
    assert dead_middle.status is Status.PASSED, dead_middle.summary()
    assert "layer(s) dead give the same output for every image" in dead_middle.message


@pytest.mark.parametrize("n", [1, 6])
def test_too_few_samples_are_inconclusive(n):
    """6 samples, all in the top layer's favour, give p = 0.5^6 > 0.01: the data cannot decide."""
    result = _run({"pixels": nn.Identity(), "pool": Pool()}, n=n)
    assert result.status is Status.INCONCLUSIVE, result.summary()
    assert result.decision["needed"] == 7
    assert ("needs at least 7" if n == 6 else "needs at least 2") in result.message


def test_seven_samples_decide():
    assert _run({"pixels": nn.Identity(), "pool": Pool()}, n=7).status is Status.PASSED


def test_min_rho_is_gone_and_alpha_is_validated():
    with pytest.raises(CheckConfigError, match="unknown parameter.*min_rho"):
        build_checks([{"kind": "invariance-grows-with-depth", "min_rho": 0.8}])
    with pytest.raises(CheckConfigError, match="alpha must be a significance level"):
        InvarianceGrowsWithDepth(alpha=0.5)
    (check,) = build_checks([{"kind": "invariance-grows-with-depth"}])
    assert (check.min_gain, check.alpha, check.samples) == (0.1, 0.01, 32)


# -- the penultimate features are the top -------------------------------------------------------


def _run_pooled(**params):
    spec = ModelSpec(module=PooledHead(), class_names=["dim", "bright"], input_size=(SIZE, SIZE),
                     layers=["conv1", "conv2"], name="pooled")
    with Subject(spec, device="cpu") as subject:
        return InvarianceGrowsWithDepth(**params).execute(subject, _set(12))


def test_a_cnn_with_a_pooled_linear_head_passes_on_its_penultimate_features():
    """The last named layer conv2 is a spatial map: it moves with the shift about as much as conv1 (the old
    rule, conv2 against conv1, measured 0.0275 < min_gain 0.1 with p = 0.088 and FAILED). The input of the
    head is conv2's channel means, which a shift of content inside the zero border hardly moves."""
    result = _run_pooled()
    label = "penultimate (input of head)"
    assert result.status is Status.PASSED, result.summary()
    details, d = result.details, result.decision
    assert (details["top"], details["top_kind"], details["head"], details["bottom"]) == (
        label, "penultimate", "head", "conv1")
    assert details["points"] == ["conv1", "conv2", label] and details["layers"] == ["conv1", "conv2"]
    assert d["labels"] == {"value": f"invariance of {label} (top)", "control": "invariance of conv1 (bottom)"}
    assert d["effect"] >= 0.5 and d["p_value"] == pytest.approx(0.5 ** 12)
    assert min(p["inv_top"] for p in details["per_sample"]) > 0.95  # not exactly 1: conv2 reaches the border
    assert "the penultimate features (the input of the final nn.Linear 'head', depth 3) against the first " \
           "named layer 'conv1'" in result.message
    # what the old rule judged: the last named layer against the first, per sample, gains below min_gain
    old = np.mean([[inv["conv2"] - inv["conv1"]] for inv in details["invariance"].values()])
    assert old < 0.1, old
    assert "vs judged top" in result.evidence[1].title and label in result.evidence[1].data.decode()


def test_the_penultimate_point_is_the_last_row_of_the_curve():
    result = _run_pooled(compare=("rotate",))
    label = "penultimate (input of head)"
    for transform in ("translate", "rotate"):
        rows = [r for r in result.rows if r["transform"] == transform]
        assert [(r["layer"], r["depth"]) for r in rows if r["magnitude"] == rows[0]["magnitude"]] == [
            ("conv1", 1), ("conv2", 2), (label, 3)]
        assert len(rows) == 3 * 3
    for m in SHIFTS:
        row = next(r for r in result.rows if r["layer"] == label and r["magnitude"] == m)
        assert row["invariance"] == pytest.approx(result.details["invariance"][f"{m:g}"][label])
    assert f"3={label}" in result.evidence[0].data.decode()  # the chart's depth axis names it
    assert label in result.details["compare"]["rotate"]["invariance"]["20"]
