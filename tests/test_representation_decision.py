"""invariance-grows-with-depth decides per sample, top layer against the bottom layer (issue 14).

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
    """Each named layer sees the input itself; the logits come from the channel means."""

    def __init__(self, taps: dict[str, nn.Module]):
        super().__init__()
        self.names = list(taps)
        for name, module in taps.items():
            self.add_module(name, module)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        for name in self.names:
            getattr(self, name)(x)
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
