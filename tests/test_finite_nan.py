"""NaN never passes (issue 13, point 6): a non-finite attribution map, layer feature or optimiser step is an
ERROR that names the method, the layer and the sample, never a PASS nor a FAILED built on NaN.

The models here have finite logits but NaN gradients (the torch.where / sqrt trap: the branch not taken
still back-propagates 0 * NaN), or NaN features, for chosen images only.
"""
import math

import pytest
import torch
from torch import nn

from auditkit import AuditSet, Box, ModelSpec, Sample
from auditkit.checks.base import Status
from auditkit.checks.deletion import DeletionInsertion
from auditkit.checks.inversion import InversionConverges
from auditkit.checks.patches import MaxActivatingPatches
from auditkit.checks.saliency import SaliencyInBox
from auditkit.checks.synthesis import TextureSynthesisConverges
from auditkit.methods import patches as pt
from auditkit.methods import saliency as sal
from auditkit.methods.numerics import NonFiniteError
from auditkit.methods.optimise import optimise
from auditkit.subject import AuditModelError, Subject


def trap(v: torch.Tensor) -> torch.Tensor:
    """0 where v > 0.5, else sqrt(0.5 - v): finite values, NaN gradient wherever v > 0.5."""
    return torch.where(v > 0.5, torch.zeros_like(v), torch.sqrt(0.5 - v))


class TrapNet(nn.Module):
    """Finite logits; d logit / d input and d logit / d feat are NaN for images whose channel-1 corner is > 0.5."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.feat.bias.zero_()
        self.relu = nn.ReLU()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        a = self.feat(x)
        corner = trap(a[:, 1, :2, :2]).sum(dim=(1, 2))
        return self.head(self.relu(a).mean(dim=(2, 3))) + corner[:, None]


def trap_set(n: int = 4, bad: int = 2, size: int = 16) -> AuditSet:
    """Images with a box in the middle; only sample `bad` (id 't<bad>') has its channel-1 corner at 1."""
    gen = torch.Generator().manual_seed(3)
    samples = []
    for i in range(n):
        image = 0.4 * torch.rand(3, size, size, generator=gen)
        image[1, :2, :2] = 1.0 if i == bad else 0.0
        samples.append(Sample(image, i % 2, (Box(4, 4, 12, 12),), f"t{i}"))
    return AuditSet(samples, ["a", "b"], name="trap")


def trap_subject() -> Subject:
    torch.manual_seed(0)
    spec = ModelSpec(module=TrapNet(), class_names=["a", "b"], input_size=(16, 16), layers=["feat"], name="trap")
    return Subject(spec, device="cpu", batch_size=3)


@pytest.mark.parametrize("method", sal.METHODS)
def test_every_attribution_method_raises_naming_method_layer_and_sample(method):
    data = trap_set()
    options = {"noise": 0.05} if method == "smoothgrad" else {}  # noise never lifts a clean corner above 0.5
    with trap_subject() as subject:
        logits = subject.predict(data.images())
        assert torch.isfinite(logits).all()  # the model's outputs are fine: only its gradients are not
        with pytest.raises(NonFiniteError) as info:
            sal.saliency_map(subject, data.images(), data.labels(), method, sample_ids=[x.id for x in data],
                             **options)
    message = str(info.value)
    assert f"method {method!r}" in message and "'t2'" in message and "1 of 4" in message, message
    if method == "grad_cam":
        assert "layer 'feat'" in message, message
    # without ids the sample is named by its index
    with trap_subject() as subject, pytest.raises(NonFiniteError, match=r"1 of 4 sample\(s\): 2$"):
        sal.saliency_map(subject, data.images(), data.labels(), method, **options)


def test_finite_maps_are_unchanged_by_the_guard():
    data = trap_set(bad=-1)
    with trap_subject() as subject:
        maps = sal.saliency_map(subject, data.images(), data.labels(), "gradient", sample_ids=[x.id for x in data])
    assert torch.isfinite(maps).all() and maps.shape == (4, 16, 16)


def test_deletion_insertion_on_partly_nan_gradient_maps_is_an_error():
    # before: PASSED, the NaN pixels were simply ranked last
    with trap_subject() as subject:
        result = DeletionInsertion(method="gradient", steps=4).execute(subject, trap_set())
    assert result.status is Status.ERROR, result.summary()
    assert "NonFiniteError" in result.message and "'gradient'" in result.message and "'t2'" in result.message


def test_deletion_curves_refuse_nan_maps_given_directly():
    data = trap_set()
    maps = torch.rand(4, 16, 16)
    maps[1, 3, 3] = math.nan
    with trap_subject() as subject, pytest.raises(NonFiniteError, match=r"saliency map.*1 of 4 sample\(s\): 1"):
        from auditkit.methods.deletion import deletion_insertion_curves

        deletion_insertion_curves(subject, data.images(), data.labels(), maps, steps=2)


@pytest.mark.parametrize("method", ["gradient", "grad_cam"])
def test_saliency_in_box_on_nan_maps_is_an_error_not_a_nan_failure(method):
    # before: FAILED with "mean energy nan"
    with trap_subject() as subject:
        result = SaliencyInBox(method=method).execute(subject, trap_set())
    assert result.status is Status.ERROR, result.summary()
    assert f"'{method}'" in result.message and "'t2'" in result.message and "nan" not in result.message.split(":")[0]


class LaterNaN(nn.Module):
    """Finite logits on the first call, NaN on every later one."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        self.calls += 1
        out = self.lin(x.mean(dim=(2, 3)))
        return out * math.nan if self.calls > 1 else out


def test_a_model_that_turns_nan_after_its_first_call_is_caught_on_gradient_outputs():
    # before: the output check ran on the first call only when the output required grad
    from auditkit.methods.gradients import gradient

    spec = ModelSpec(module=LaterNaN(), class_names=["a", "b"], input_size=(8, 8), name="later")
    x, t = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with Subject(spec, device="cpu") as subject:
        subject.backward_cost()  # the memory probe's forwards come first; the model counts its calls after
        spec.module.calls = 0
        assert torch.isfinite(gradient(subject, x, t)).all()
        with pytest.raises(AuditModelError, match=r"model 'later': output holds NaN or infinite values for 2 of 2"):
            gradient(subject, x, t)


def test_optimiser_stops_at_a_nan_gradient_even_on_the_last_step():
    # before: a finite loss with a NaN gradient at the last step returned NaN images, none marked diverged
    calls = []

    def objective(x, rows):
        total = (x - 0.3).pow(2).flatten(1).mean(1)
        if len(calls) == 4:  # the last of 5 steps: image 1's gradient is NaN, its loss is finite
            total = total + torch.stack([torch.zeros(()), trap(x[1].mean() + 1.0), torch.zeros(())])
        calls.append(1)
        return {"total": total}

    run = optimise(objective, (3, 3, 4, 4), steps=5)
    assert run.diverged.tolist() == [False, True, False] and run.diverged_step == 4 and run.steps == 5
    assert torch.isfinite(run.images).all()


class NaNFeature(nn.Module):
    """Layer `feat` outputs sqrt(pixel - 0.2): NaN wherever a pixel is below 0.2; the head hides it."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        f = self.feat(torch.sqrt(x - 0.2))
        return self.head(torch.nan_to_num(f).mean(dim=(2, 3)))


def nan_feature_set() -> AuditSet:
    samples = []
    for i in range(3):
        image = torch.full((3, 8, 8), 0.6) + 0.01 * i
        if i == 1:
            image[:, 0, 0] = 0.0
        samples.append(Sample(image, i % 2, (), f"f{i}"))
    return AuditSet(samples, ["a", "b"], name="nanfeat")


def nan_feature_subject() -> Subject:
    torch.manual_seed(0)
    spec = ModelSpec(module=NaNFeature(), class_names=["a", "b"], input_size=(8, 8), layers=["feat"], name="nanf")
    return Subject(spec, device="cpu")


def test_inversion_of_nan_features_is_an_error_naming_layer_and_sample():
    # before: FAILED "loss diverged (NaN/inf) at step 0", without the sample
    with nan_feature_subject() as subject:
        result = InversionConverges(steps=10, samples=0, random_baseline=False).execute(subject, nan_feature_set())
    assert result.status is Status.ERROR, result.summary()
    assert "'inversion'" in result.message and "layer 'feat'" in result.message and "'f1'" in result.message


def test_max_activating_patches_on_nan_features_is_an_error():
    # before: INFO, with NaN peaks ranked as the channel's best units
    with nan_feature_subject() as subject:
        result = MaxActivatingPatches(layers=("feat",), top=2).execute(subject, nan_feature_set())
    assert result.status is Status.ERROR, result.summary()
    assert "layer 'feat'" in result.message and "'f1'" in result.message


class TrapLayer(nn.Module):
    def forward(self, x):
        return x + trap(x)


def test_deconv_projection_with_a_nan_gradient_is_an_error():
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():  # channel 0 of the conv is 0.9 everywhere: the trap's gradient is NaN there
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([0.9, 0.0, 0.0]))
    module = nn.Sequential(conv, TrapLayer(), nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    spec = ModelSpec(module=module, class_names=["a", "b"], input_size=(8, 8), layers=["1"], name="trapdeconv")
    images = torch.rand(2, 3, 8, 8)
    with Subject(spec, device="cpu") as subject:
        assert torch.isfinite(pt.forward_to(subject, images, ["1"])["1"]).all()
        with pytest.raises(NonFiniteError, match=r"deconvnet projection.*layer '1'.*2 of 2"):
            pt.deconv_projections(subject, images, "1", torch.tensor([[0, 0, 0, 0], [1, 0, 3, 3]]))


def test_texture_of_nan_features_is_an_error_naming_layer_and_sample():
    # before: FAILED "loss diverged (NaN/inf) at step 0", without the sample
    with nan_feature_subject() as subject:
        result = TextureSynthesisConverges(steps=10, samples=0, random_baseline=False).execute(
            subject, nan_feature_set())
    assert result.status is Status.ERROR, result.summary()
    assert "'texture'" in result.message and "layer 'feat'" in result.message and "'f1'" in result.message


def test_dead_units_on_nan_features_names_the_sample_by_id():
    # before: "... for 1 of 3 sample(s): 1", an index the user never wrote
    from auditkit.checks.representation import DeadUnits

    with nan_feature_subject() as subject:
        result = DeadUnits().execute(subject, nan_feature_set())
    assert result.status is Status.ERROR, result.summary()
    assert "layer 'feat'" in result.message and "'f1'" in result.message


class NaNWhenRandom(nn.Module):
    """Finite maps that vary over pixels while `feat` holds its trained identity weight; a randomised copy
    (any other weight) has NaN pixel gradients (the trap at 1) with finite logits."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        a = self.feat(x)
        out = self.head(torch.relu(a - 0.2).mean(dim=(2, 3)))
        if not bool((self.feat.weight.diagonal() == 1).all()):
            out = out + trap(a.sum(dim=(1, 2, 3)) * 0 + 1.0)[:, None]
        return out


def test_saliency_sanity_nan_in_a_randomised_copy_names_the_copy_and_the_sample():
    # before: PASSED (the NaN maps were dropped as constant); then an ERROR naming index 0, not the copy
    from auditkit.checks.sanity import SaliencySanity

    torch.manual_seed(0)
    spec = ModelSpec(module=NaNWhenRandom(), class_names=["a", "b"], input_size=(16, 16), layers=["feat"],
                     name="nanrandom")
    with Subject(spec, device="cpu") as subject:
        result = SaliencySanity(method="gradient", samples=4).execute(subject, trap_set(4, bad=-1))
    assert result.status is Status.ERROR, result.summary()
    assert "randomised" in result.message and "'t0'" in result.message
