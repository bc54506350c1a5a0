import pytest
import torch
from torch import nn

from auditkit import AuditSet, ModelSpec, Sample
from auditkit.checks.base import CheckConfigError, Status
from auditkit.checks.inversion import CONSTANT_REASON, ZERO_NORM_REASON, InversionConverges
from auditkit.methods.inversion import invert, invert_layers
from auditkit.subject import AuditModelError, Subject


class Probe(nn.Module):
    """`feat` is the layer under test: identity, times zero, sqrt(pixel - 0.3) (NaN below 0.3), or flat
    (0.7 + 1e-7 * pixel: constant up to rounding)."""

    def __init__(self, mode: str = "identity"):
        super().__init__()
        self.mode = mode
        self.feat = nn.Identity()
        self.head = nn.Linear(3, 2)

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
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    imgs = [torch.stack([0.35 + 0.5 * xs, 0.35 + 0.5 * ys, 0.6 + 0.0 * xs + 0.1 * i]) for i in range(n)]
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


def test_nan_layer_is_reported_as_diverged():
    with Subject(probe_spec("nan"), device="cpu") as subject:
        res = invert(subject, smooth_images(), "feat", steps=20)
        result = InversionConverges(steps=20, samples=2).execute(subject, probe_set())
    assert res.diverged.any() and res.diverged_step is not None and res.steps == res.diverged_step + 1
    assert torch.isnan(res.final_error[res.diverged]).all()
    assert result.status is Status.FAILED, result.error
    assert "diverged" in result.rows[0]["reason"]


def test_identity_check_passes_and_writes_evidence():
    with Subject(probe_spec(), device="cpu") as subject:
        result = InversionConverges(steps=150, samples=2).execute(subject, probe_set())
    assert result.status is Status.PASSED, result.message
    row = result.rows[0]
    assert row["pixel_rmse"] < 0.05 and {"random_final_error", "random_pixel_rmse"} <= set(row)
    assert [e.title for e in result.evidence] == ["Feature inversion", "Inversion loss curves",
                                                  "Pixel distance to the original"]
    assert result.evidence[1].media_type == "image/svg+xml" and b"<svg" in result.evidence[1].data


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
