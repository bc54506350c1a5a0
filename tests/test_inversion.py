import math

import pytest
import torch
from torch import nn

from auditkit import AuditSet, ModelSpec, Sample
from auditkit.checks.base import CheckConfigError, Status
from auditkit.checks.inversion import (CANNOT_TELL, CONSTANT_REASON, FAILED_LAYER, NOT_COMPARED, PASSED_LAYER,
                                       UNDECIDED, ZERO_NORM_REASON, InversionConverges)
from auditkit.methods.inversion import invert, invert_layers, normalised, spread_to_others
from auditkit.methods.numerics import NonFiniteError
from auditkit.subject import AuditModelError, Subject


class Probe(nn.Module):
    """`feat` is the layer under test: identity, times zero, sqrt(pixel - 0.3) (NaN below 0.3), or flat
    (0.7 + 1e-7 * pixel: constant up to rounding)."""

    def __init__(self, mode: str = "identity"):
        super().__init__()
        self.mode = mode
        self.feat = nn.Identity()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():  # the same head whatever the tests before did to torch's global generator
            self.head.weight.copy_(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
            self.head.bias.zero_()

    def forward(self, x):
        x = x * 0.25 + 0.5  # undo normalisation with mean 0.5, std 0.25: the layer sees pixels
        if self.mode == "zero":
            x = x * 0
        elif self.mode == "nan":
            x = torch.sqrt(x - 0.3)
        elif self.mode == "flat":  # constant up to rounding: a relative spread of 1e-7
            x = 0.7 + 1e-7 * x
        f = self.feat(x)
        return self.head(torch.nan_to_num(f).mean(dim=(2, 3)))


def probe_spec(mode: str = "identity") -> ModelSpec:
    return ModelSpec(module=Probe(mode), class_names=["a", "b"], input_size=(8, 8), mean=(0.5,) * 3,
                     std=(0.25,) * 3, layers=["feat"], name=f"probe-{mode}")


def smooth_images(n: int = 2, size: int = 8) -> torch.Tensor:
    """n smooth images with pixels in [0.35, 0.95] (the NaN probe's sqrt(pixel - 0.3) stays finite on them):
    image i has a horizontal and a vertical ramp (0.35 to 0.85, each flipped by a bit of i) and a flat third
    channel that differs per image, so different images lie far apart compared with a good reconstruction
    (the normalised error's unit)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    imgs = []
    for i in range(n):
        ramp_x = 1 - xs if i & 1 else xs
        ramp_y = 1 - ys if i & 2 else ys
        imgs.append(torch.stack([0.35 + 0.5 * ramp_x, 0.35 + 0.5 * ramp_y, 0.35 + 0.6 * ((0.37 * i) % 1) + 0 * xs]))
    return torch.stack(imgs)


def probe_set(n: int = 2) -> AuditSet:
    return AuditSet([Sample(img, i % 2, (), f"s{i}") for i, img in enumerate(smooth_images(n))], ["a", "b"],
                    name="probe")


def test_identity_layer_is_recovered_and_the_feature_curve_falls():
    images = smooth_images()
    with Subject(probe_spec(), device="cpu") as subject:
        res = invert(subject, images, "feat", steps=150, lr=0.1)
    rmse = ((res.reconstructions - images) ** 2).flatten(1).mean(1).sqrt()
    assert (rmse < 0.05).all(), rmse
    feature = res.curves["feature"]
    assert feature.shape == (150, 2) and set(res.curves) == {"feature", "alpha", "tv", "total"}
    assert (feature[-1] < 0.01 * feature[0]).all()
    assert (res.final_error < 0.1).all() and not res.diverged.any() and res.diverged_step is None
    assert res.reconstructions.min() >= 0 and res.reconstructions.max() <= 1


def test_pixels_stay_valid_with_jitter_and_large_steps():
    images = smooth_images()
    with Subject(probe_spec(), device="cpu") as subject:
        res = invert(subject, images, "feat", steps=20, lr=5.0, jitter=2)
    assert res.reconstructions.min() >= 0 and res.reconstructions.max() <= 1
    assert res.reconstructions.shape == images.shape and res.reconstructions.device.type == "cpu"


def test_model_is_unchanged_after_inversion():
    spec = probe_spec()
    module = spec.module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    with Subject(spec, device="cpu") as subject:
        invert(subject, smooth_images(), "feat", steps=5)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    assert all(p.grad is None for p in module.parameters())
    for sub in module.modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks and not sub._backward_hooks


def test_constant_layer_fails_the_check_with_a_clear_reason():
    check = InversionConverges(steps=20, samples=2)
    with Subject(probe_spec("zero"), device="cpu") as subject:
        result = check.execute(subject, probe_set())
    assert result.status is Status.FAILED, result.error
    assert result.rows[0]["reason"] == ZERO_NORM_REASON + " for 2 of 2 samples"
    assert ZERO_NORM_REASON in result.message


def test_near_constant_layer_fails_the_check_instead_of_passing_trivially():
    # before: PASSED, any image matches a constant feature map, so the "inversion" converged at once
    with Subject(probe_spec("flat"), device="cpu") as subject:
        res = invert(subject, smooth_images(), "feat", steps=20)
        result = InversionConverges(steps=150, samples=2, random_baseline=False).execute(subject, probe_set())
    assert res.constant.all() and not res.zero_norm.any() and torch.isnan(res.final_error).all()
    assert result.status is Status.FAILED, result.summary()
    assert result.rows[0]["reason"] == CONSTANT_REASON + " for 2 of 2 samples"


def test_nan_layer_at_the_starting_images_is_an_error_naming_layer_and_samples():
    """The layer is NaN wherever a pixel is below 0.3, as at the optimiser's noise start: nothing has moved
    yet, so it is the model's NaN (ERROR naming method, layer and samples), where it was FAILED "diverged"."""
    with Subject(probe_spec("nan"), device="cpu") as subject:
        with pytest.raises(NonFiniteError, match=r"step 0\) \(method 'inversion', layer 'feat'\)"):
            invert(subject, smooth_images(), "feat", steps=20)
        result = InversionConverges(steps=20, samples=2).execute(subject, probe_set())
    assert result.status is Status.ERROR, result.summary()
    assert "layer 'feat'" in result.message and "2 of 2 sample(s)" in result.message


def test_identity_probe_inverts_exactly_as_random_weights_so_it_is_evidence_not_a_pass():
    """The probe's layer has no weights, so its random-weights copy inverts it identically: the inversion
    measures the optimiser, not the model. Before: PASSED (the layer converged)."""
    with Subject(probe_spec(), device="cpu") as subject:
        result = InversionConverges(steps=150, samples=8).execute(subject, probe_set(8))
    assert result.status is Status.INFO, result.summary()
    row = result.rows[0]
    assert row["verdict"] == CANNOT_TELL and row["passed"] is None and CANNOT_TELL in result.message
    assert row["normalised_error"] == row["random_normalised_error"] < 0.1  # converged, both, identically
    assert row["random_over_trained"] == 1.0 and row["p_value"] == 1.0
    assert result.decision["status"] == "info" and result.decision["n"] == 8
    assert row["pixel_rmse"] < 0.05 and {"relative_error", "random_relative_error", "random_pixel_rmse"} <= set(row)
    assert [e.title for e in result.evidence] == ["Feature inversion", "Inversion loss curves",
                                                  "Pixel distance to the original"]
    assert result.evidence[1].media_type == "image/svg+xml" and b"<svg" in result.evidence[1].data


class Wavy(nn.Module):
    """f(x) = sin(w * x) per channel: w = 1 as trained (monotonic on pixels, easy to invert); its random
    initialisation (reset_parameters, what random_copy calls) is w = 40, which folds every pixel value
    onto many others."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, 3, 1, 1))

    def reset_parameters(self):
        with torch.no_grad():
            self.w.fill_(40.0)

    def forward(self, x):
        return torch.sin(self.w * x)


def wavy_spec() -> ModelSpec:
    module = Probe()
    module.feat = Wavy()
    return ModelSpec(module=module, class_names=["a", "b"], input_size=(8, 8), mean=(0.5,) * 3, std=(0.25,) * 3,
                     layers=["feat"], name="wavy")


# The wavy toy's random copy folds pixel values onto many preimages: Adam from noise lands in a poor one,
# which is what these tests of the decision rule need; L-BFGS's line search finds one as good as the
# trained model's (its random copy then inverts closer), so the rule is tested with optimiser "adam"
# (at its own default learning rate, InversionConverges.ADAM_LR).
def test_a_layer_measurably_closer_than_through_random_weights_passes():
    with Subject(wavy_spec(), device="cpu") as subject:
        result = InversionConverges(steps=150, samples=8, optimiser="adam").execute(subject, probe_set(8))
    assert result.status is Status.PASSED, result.summary()
    row = result.rows[0]
    assert row["verdict"] == PASSED_LAYER and row["passed"] is True and row["normalised_error"] < 0.1
    assert row["random_over_trained"] >= 1.25 and row["p_value"] <= 0.01
    assert result.decision["n"] == 8 and result.decision["needed"] == 7 and result.decision["better"] == "lower"
    assert result.details["steps_used"]["feat"] <= 150 and result.details["steps_used_random"]["feat"] <= 150


def test_fewer_samples_than_the_test_needs_is_inconclusive_and_says_how_many():
    """6 samples cannot reach alpha = 0.01 (0.5^6 > 0.01), even on the toy that passes with 8."""
    from auditkit.checks.synthesis import TextureSynthesisConverges

    with Subject(wavy_spec(), device="cpu") as subject:
        result = InversionConverges(steps=150, samples=6, optimiser="adam").execute(subject, probe_set(8))
        texture = TextureSynthesisConverges(steps=50, samples=6).execute(subject, probe_set(8))
    for res in (result, texture):
        assert res.status is Status.INCONCLUSIVE, res.summary()
        assert "only 6 sample(s)" in res.message and "needs at least 7" in res.message
        assert res.rows[0]["verdict"] == UNDECIDED and res.rows[0]["passed"] is None
    assert result.rows[0]["random_over_trained"] >= 1.25  # the effect is there; the test cannot reach alpha


def test_normalised_error_closed_form():
    f = torch.tensor([[0.0], [3.0], [4.0]])
    assert spread_to_others(f).tolist() == [3.5, 2.0, 2.5]  # mean distance to the two others
    assert torch.isnan(spread_to_others(f[:1])).all()  # no other image: no unit
    e = normalised(torch.tensor([0.7, 1.0, 0.0]), torch.tensor([3.5, 0.0, 2.5], dtype=torch.float64))
    assert e[0].item() == pytest.approx(0.2) and math.isnan(e[1].item()) and e[2].item() == 0.0
    # the probe's layer sees the pixels: e_i = ||x*_i - x0_i|| / mean_{j != i} ||x0_j - x0_i||
    images = smooth_images(4)
    with Subject(probe_spec(), device="cpu") as subject:
        res = invert(subject, images, "feat", steps=30)
    x0 = images.flatten(1).double()
    distance = (res.reconstructions.flatten(1).double() - x0).norm(dim=1)
    spread = torch.cdist(x0, x0).sum(1) / 3
    assert torch.allclose(res.spread, spread, rtol=1e-6)
    assert torch.allclose(res.normalised_error, distance / spread, rtol=1e-4)
    assert torch.allclose(res.final_error.double(), distance / x0.norm(dim=1), rtol=1e-4)  # the relative error
    assert (res.normalised_error > res.final_error.double()).all()  # ramps of similar colours: spread < norm


def test_texture_normalised_error_closed_form_and_identity_probe_is_evidence():
    from auditkit.checks.synthesis import TextureSynthesisConverges
    from auditkit.methods.synthesis import gram_matrix, synthesise_texture

    images = smooth_images(4)
    with Subject(probe_spec(), device="cpu") as subject:
        res = synthesise_texture(subject, images, ["feat"], steps=30)
        result = TextureSynthesisConverges(steps=150, samples=8).execute(subject, probe_set(8))
    g0, g1 = gram_matrix(images).flatten(1).double(), gram_matrix(res.images).flatten(1).double()
    distance = (g1 - g0).norm(dim=1)
    assert torch.allclose(res.normalised_error["feat"], distance / (torch.cdist(g0, g0).sum(1) / 3), rtol=1e-4)
    assert torch.allclose(res.final_error["feat"].double(), distance / g0.norm(dim=1), rtol=1e-4)
    # before: PASSED; the layer has no weights, so random weights match its Gram matrices identically
    assert result.status is Status.INFO, result.summary()
    assert result.rows[0]["verdict"] == CANNOT_TELL and result.rows[0]["random_over_trained"] == 1.0


def test_layer_verdicts_and_how_they_make_the_status():
    check = InversionConverges()
    e = torch.linspace(0.1, 0.2, 8)
    groups = ["a", "b"] * 4
    passed = check.compare("l1", e, 2 * e, groups, [])
    same = check.compare("l2", e, e.clone(), groups, [])
    worse = check.compare("l3", 2 * e, e, groups, [])
    few = check.compare("l4", e[:6], 2 * e[:6], groups[:6], [])
    failed = check.compare("l5", e, 2 * e, groups, ["loss diverged (NaN/inf) at step 3"])
    alone = check.compare("l6", e, None, groups, [])
    assert (passed["verdict"], passed["passed"]) == (PASSED_LAYER, True) and passed["random_over_trained"] == 2.0
    assert (same["verdict"], same["passed"]) == (CANNOT_TELL, None) and "not measurably closer" in same["reason"]
    assert worse["verdict"] == CANNOT_TELL and "random weights converge measurably closer" in worse["reason"]
    assert (few["verdict"], few["passed"]) == (UNDECIDED, None) and "needs at least 7" in few["reason"]
    assert (failed["verdict"], failed["passed"]) == (FAILED_LAYER, False)  # convergence first, whatever the ratio
    assert (alone["verdict"], alone["decision"]) == (NOT_COMPARED, None)

    def status(*verdicts):
        rows, decisions = [], {}
        for v in verdicts:
            v = dict(v)
            layer = f"l{len(rows)}"
            if v["decision"] is not None:
                decisions[layer] = v.pop("decision")
            else:
                v.pop("decision")
            rows.append({"layer": layer, **v})
        return check.layers_result(rows, decisions, "layers converge", {}).status

    assert status(passed, same, worse) is Status.PASSED  # a layer told apart passes; the others are evidence
    assert status(same, worse) is Status.INFO  # nothing told apart: evidence, never a pass
    assert status(alone) is Status.INFO
    assert status(passed, few) is Status.INCONCLUSIVE
    assert status(passed, few, failed) is Status.FAILED  # a layer that did not converge fails the check


def test_layers_are_inverted_together_each_group_at_its_own_layer():
    """One batch of (layers x images): the identity layer's group recovers the pixels, while the head's group
    (2 numbers per image) only matches its own two features, so it stays far from the pixels."""
    images = smooth_images()
    with Subject(probe_spec(), device="cpu") as subject:
        res = invert_layers(subject, images, ["feat", "head"], steps=150, lr=0.1, parametrisation="sigmoid")
    assert list(res) == ["feat", "head"]
    feat, head = res["feat"], res["head"]
    assert feat.reconstructions.shape == head.reconstructions.shape == images.shape
    assert feat.curves["total"].shape == head.curves["total"].shape == (150, 2)
    assert (feat.final_error < 0.1).all() and (head.final_error < 0.1).all()
    rmse = lambda r: ((r.reconstructions - images) ** 2).flatten(1).mean(1).sqrt()
    assert (rmse(feat) < 0.05).all() and (rmse(head) > 0.1).all()
    with pytest.raises(AuditModelError, match="no layer 'nope'"):
        invert_layers(subject, images, ["feat", "nope"], steps=2)


def test_check_errors_name_the_parameter():
    with pytest.raises(CheckConfigError, match="final_lr_ratio"):
        InversionConverges(final_lr_ratio=0.0)
    with pytest.raises(CheckConfigError, match="parametrisation"):
        InversionConverges(parametrisation="pixels")
    with Subject(probe_spec(), device="cpu") as subject:
        result = InversionConverges(layers=("nope",), steps=10).execute(subject, probe_set())
    assert result.status is Status.ERROR and "'nope'" in result.message and "feat" in result.message


def test_texture_on_a_zero_layer_fails_naming_the_cause():
    from auditkit.checks.synthesis import TextureSynthesisConverges

    with Subject(probe_spec("zero"), device="cpu") as subject:
        result = TextureSynthesisConverges(steps=20, samples=2).execute(subject, probe_set())
    assert result.status is Status.FAILED, result.error
    assert result.rows[0]["reason"] == "layer output is all zeros (zero Gram matrix) for 2 of 2 samples"


def test_total_variation_of_a_one_pixel_wide_image_is_zero_not_nan():
    from auditkit.methods.inversion import total_variation

    for shape in ((2, 3, 1, 5), (2, 3, 5, 1)):
        assert torch.equal(total_variation(torch.rand(shape), 2.0), torch.zeros(2))


def test_one_image_is_inconclusive_before_anything_is_optimised():
    """samples = 1: no other image to normalise by; it used to FAIL with a NaN error."""
    from auditkit.checks.synthesis import TextureSynthesisConverges

    with Subject(wavy_spec(), device="cpu") as subject:
        for check in (InversionConverges(steps=20, samples=1), TextureSynthesisConverges(steps=20, samples=1)):
            result = check.execute(subject, probe_set(8))
            assert result.status is Status.INCONCLUSIVE, result.summary()
            assert "only 1 image(s) chosen" in result.message and not result.evidence


def test_each_layers_rows_run_forward_only_to_that_layer():
    """Inverting a shallow and a deep layer together: the shallow layer's rows never reach the deep layer
    (issue 9, point 3), and chunks that hold the end of one layer's rows and the start of the next give the
    same result as one chunk."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))

    torch.manual_seed(0)
    module = Two()
    reached = []
    module.b.register_forward_pre_hook(lambda _m, args: reached.append(args[0].shape[0]))
    spec = ModelSpec(module=module, class_names=["x", "y"], input_size=(8, 8), layers=["a", "b"], name="two")
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with Subject(spec, device="cpu", batch_size=64) as subject:
        subject.backward_cost()  # its probe's two forwards of one image are not the inversion's
        reached.clear()
        both = invert_layers(subject, images, ["a", "b"], steps=5)
    # per step 3 rows reach b (its own), plus the 3 target and 3 final images: never the 6 of both layers
    assert max(reached) == 3 and sum(reached) == 3 * (5 + 2)
    with Subject(spec, device="cpu", batch_size=2) as subject:  # chunks rows 0-1, 2-3 (a and b), 4-5
        chunked = invert_layers(subject, images, ["a", "b"], steps=5)
    for layer in ("a", "b"):
        assert torch.allclose(both[layer].reconstructions, chunked[layer].reconstructions, atol=1e-6)
        assert torch.allclose(both[layer].final_error, chunked[layer].final_error, atol=1e-6, equal_nan=True)


def test_lbfgs_inverts_each_layer_as_a_problem_of_its_own():
    """L-BFGS's line search is shared by every row it optimises, so invert_layers runs one optimisation per
    layer: each layer's reconstruction is exactly the one its layer gets alone, whatever the other layers."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(),
                           nn.Linear(4 * 8 * 8, 2))
    spec = ModelSpec(module=module.eval(), class_names=["a", "b"], input_size=(8, 8), layers=["1", "2"], name="two")
    images = smooth_images(3)
    with Subject(spec, device="cpu") as subject:
        both = invert_layers(subject, images, ["1", "2"], steps=15, optimiser="lbfgs", lr=1.0)
        alone = {layer: invert(subject, images, layer, steps=15, optimiser="lbfgs", lr=1.0) for layer in ("1", "2")}
    for layer in ("1", "2"):
        assert torch.equal(both[layer].reconstructions, alone[layer].reconstructions)
        assert torch.equal(both[layer].curves["total"], alone[layer].curves["total"])
        assert both[layer].steps == alone[layer].steps and both[layer].params["evaluations"] > 15


def test_a_layer_is_judged_at_alpha_over_the_layers_compared():
    """One passing layer passes the check, so each of L layers is judged at alpha / L (Bonferroni). Errors
    1.5x lower than random weights' on every sample: 8 samples give p = 2^-8 = 0.0039, a pass alone but
    not among 3 layers (0.0033; INCONCLUSIVE, it needs 9); 9 samples give 2^-9 = 0.0020, a pass among 3."""
    check = InversionConverges()
    assert check.layer_alpha(3) == pytest.approx(0.01 / 3) and check.layer_alpha(1) == 0.01
    for n, tests, verdict in ((8, 1, PASSED_LAYER), (8, 3, UNDECIDED), (9, 3, PASSED_LAYER)):
        random = torch.linspace(0.2, 0.4, n)
        row = check.compare("l", random / 1.5, random, ["g"] * n, [], tests=tests)
        assert row["verdict"] == verdict, (n, tests, row["reason"])
        assert row["p_value"] == pytest.approx(0.5 ** n)
    assert InversionConverges.samples == 10  # 9 reach alpha / 3, one to spare
