import copy
import math

import pytest
import torch
from torch import nn

from auditkit import AuditSet, ModelSpec, Sample
from auditkit.checks.base import CheckConfigError, Status
from auditkit.checks.deletion import DeletionInsertion
from auditkit.methods import deletion as dl
from auditkit.methods import occlusion as occ
from auditkit.subject import Subject


class WeightedSum(nn.Module):
    """Two classes: logit_0 = sum(w * x[:, 0]) + bias, logit_1 = 0, so p_0 = sigmoid(logit_0)."""

    def __init__(self, weights: torch.Tensor, bias: float = 0.0):
        super().__init__()
        self.register_buffer("w", weights.clone())
        self.bias = bias

    def forward(self, x):
        a = (self.w * x[:, 0]).sum(dim=(1, 2)) + self.bias
        return torch.stack([a, torch.zeros_like(a)], 1)


def weighted_subject(weights, batch_size=7, bias=0.0):
    h, w = weights.shape
    spec = ModelSpec(module=WeightedSum(weights, bias), class_names=["on", "off"], input_size=(h, w), name="weighted")
    return Subject(spec, device="cpu", batch_size=batch_size).open()


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def test_curves_closed_form_on_a_2x2_weighted_sum():
    weights = torch.tensor([[0.4, 0.3], [0.2, 0.1]])
    subject = weighted_subject(weights)
    images = torch.ones(1, 3, 2, 2)
    target = torch.tensor([0])
    # zero baselines: deletion removes 0.4, 0.3, 0.2, 0.1 in turn; insertion reveals them in that order
    out = dl.deletion_insertion_curves(subject, images, target, weights[None], steps=4,
                                       deletion_baseline="zero", insertion_baseline="zero")
    assert out["counts"].tolist() == [0, 1, 2, 3, 4]
    expected_del = [sigmoid(v) for v in (1.0, 0.6, 0.3, 0.1, 0.0)]
    expected_ins = [sigmoid(v) for v in (0.0, 0.4, 0.7, 0.9, 1.0)]
    assert torch.allclose(out["deletion"][0], torch.tensor(expected_del), atol=1e-5)
    assert torch.allclose(out["insertion"][0], torch.tensor(expected_ins), atol=1e-5)
    # the default grey deletion baseline puts 0.5 where a pixel was removed
    grey = dl.deletion_insertion_curves(subject, images, target, weights[None], steps=4)
    expected_grey = [sigmoid(v) for v in (1.0, 0.8, 0.65, 0.55, 0.5)]
    assert torch.allclose(grey["deletion"][0], torch.tensor(expected_grey), atol=1e-5)
    # the probability of class 1 is the complement
    other = dl.deletion_insertion_curves(subject, images, torch.tensor([1]), weights[None], steps=4,
                                         deletion_baseline="zero")
    assert torch.allclose(other["deletion"][0], 1 - torch.tensor(expected_del), atol=1e-5)


def reference_curves(weights, image, steps, del_base, ins_base):
    """Partial sums by hand: pixels in descending weight order, removed / revealed one step at a time."""
    h, w = weights.shape
    order = sorted(range(h * w), key=lambda i: -float(weights.flatten()[i]))
    x = image[0].flatten()
    d = del_base[0].flatten()
    b = ins_base[0].flatten()
    wf = weights.flatten()
    dele, ins = [], []
    for k in range(steps + 1):
        c = int(math.floor(k / steps * h * w + 0.5))
        top = set(order[:c])
        dele.append(sigmoid(sum(float(wf[i]) * float(d[i] if i in top else x[i]) for i in range(h * w))))
        ins.append(sigmoid(sum(float(wf[i]) * float(x[i] if i in top else b[i]) for i in range(h * w))))
    return torch.tensor(dele), torch.tensor(ins)


def test_curves_match_hand_partial_sums_with_grey_and_blur():
    torch.manual_seed(3)
    weights = torch.randn(6, 5)  # distinct values: no ties
    subject = weighted_subject(weights)
    images = torch.rand(3, 3, 6, 5)
    maps = weights.expand(3, 6, 5)
    out = dl.deletion_insertion_curves(subject, images, torch.zeros(3, dtype=torch.long), maps, steps=7)
    grey, blur = occ.baseline_images(images, "grey"), occ.baseline_images(images, "blur")
    for i in range(3):
        ref_del, ref_ins = reference_curves(weights, images[i], 7, grey[i], blur[i])
        assert torch.allclose(out["deletion"][i], ref_del, atol=1e-5)
        assert torch.allclose(out["insertion"][i], ref_ins, atol=1e-5)
    intact = subject.class_probability(images, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(out["deletion"][:, 0], intact, atol=1e-6)
    assert torch.allclose(out["insertion"][:, -1], intact, atol=1e-6)


def test_auc_trapezoid():
    assert dl.auc(torch.full((2, 9), 0.3)).tolist() == pytest.approx([0.3, 0.3])
    ramp = torch.linspace(1, 0, 33)
    assert float(dl.auc(ramp)[0]) == pytest.approx(0.5)
    assert float(dl.auc(torch.tensor([[0.0, 1.0, 1.0]]))[0]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        dl.auc(torch.ones(1, 1))


def test_step_counts_round_and_cover_the_image():
    assert dl.step_counts(4, 10).tolist() == [0, 3, 5, 8, 10]  # 2.5 and 7.5 round up
    assert dl.step_counts(3, 64)[-1] == 64
    with pytest.raises(ValueError):
        dl.step_counts(0, 10)


def test_ranks_descend_and_break_ties_by_one_fixed_permutation():
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.3]]])
    assert dl.pixel_ranks(maps).flatten().tolist() == [3, 0, 1, 2]
    flat = torch.zeros(2, 4, 4)
    a = dl.pixel_ranks(flat, torch.Generator().manual_seed(5))
    b = dl.pixel_ranks(flat, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a[0], a[1])
    assert sorted(a[0].flatten().tolist()) == list(range(16))
    nan = torch.tensor([[[float("nan"), 1.0], [2.0, 0.0]]])
    assert dl.pixel_ranks(nan).flatten().tolist() == [3, 1, 0, 2]


def test_a_map_constant_up_to_rounding_ranks_as_all_ties():
    # before: the rounding noise (here a left-to-right ramp of relative size 1e-7) decided the pixel order
    flat = torch.ones(2, 4, 4)
    noisy = flat + 1e-7 * torch.arange(16.0).view(1, 4, 4)
    assert torch.equal(dl.pixel_ranks(noisy), dl.pixel_ranks(flat))
    real = flat + 1e-2 * torch.arange(16.0).view(1, 4, 4)  # a real spread keeps its own order
    assert dl.pixel_ranks(real)[0].flatten().tolist() == list(range(15, -1, -1))


def test_random_order_maps_are_seeded():
    assert torch.equal(dl.random_order_maps(2, 3, 4, seed=1), dl.random_order_maps(2, 3, 4, seed=1))
    assert not torch.equal(dl.random_order_maps(2, 3, 4, seed=1), dl.random_order_maps(2, 3, 4, seed=2))


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_curves_do_not_depend_on_the_batch_size(batch_size):
    torch.manual_seed(0)
    weights = torch.randn(8, 8)
    images = torch.rand(4, 3, 8, 8)
    maps = torch.rand(4, 8, 8)
    targets = torch.tensor([0, 1, 0, 1])
    ref = dl.deletion_insertion_curves(weighted_subject(weights, 300), images, targets, maps, steps=6)
    out = dl.deletion_insertion_curves(weighted_subject(weights, batch_size), images, targets, maps, steps=6)
    assert torch.allclose(out["deletion"], ref["deletion"], atol=1e-6)
    assert torch.allclose(out["insertion"], ref["insertion"], atol=1e-6)
    assert out["deletion"].shape == (4, 7)


def test_bad_shapes_are_value_errors():
    subject = weighted_subject(torch.ones(4, 4))
    with pytest.raises(ValueError, match="maps must be"):
        dl.deletion_insertion_curves(subject, torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), torch.rand(2, 3, 3))


def test_check_parameters_are_validated():
    with pytest.raises(CheckConfigError):
        DeletionInsertion(steps=0)
    with pytest.raises(CheckConfigError):
        DeletionInsertion(random_orders=0)
    with pytest.raises(CheckConfigError):
        DeletionInsertion(samples=-1)
    with pytest.raises(CheckConfigError):
        DeletionInsertion(method="gradient", layer="conv")
    with pytest.raises(CheckConfigError):
        DeletionInsertion.from_params({"method": "magic"})
    assert DeletionInsertion.from_params({"min_win_rate": 1}).min_win_rate == 1.0
    with pytest.raises(CheckConfigError, match="0.5 is a coin flip"):
        DeletionInsertion(min_win_rate=0.4)


def _checker(size):
    return ((torch.arange(size)[:, None] + torch.arange(size)[None]) % 2 == 0).float()


def _toy_set(n=4, size=32):
    """Channel 0 is a checkerboard (1 where the toy's weights are large, 0 where they are small)."""
    torch.manual_seed(7)
    samples = []
    for i in range(n):
        image = torch.rand(3, size, size)
        image[0] = _checker(size)
        samples.append(Sample(image, 0, (), f"t{i}"))
    return AuditSet(samples, ["on", "off"], name="toy")


def test_check_on_the_weighted_sum_with_the_gradient_map():
    # the gradient of the weighted sum is w itself: the map's order is the model's own order
    # large weights on the checkerboard's ones, small on its zeros; intact logit ~ +3, grey or blurred ~ -3
    weights = 0.033 * torch.linspace(0.5, 1.0, 1024).view(32, 32) * (0.05 + 0.95 * _checker(32))
    subject = weighted_subject(weights, bias=-9.6)
    result = DeletionInsertion(method="gradient", steps=8, random_orders=3).execute(subject, _toy_set(8))
    assert result.status is Status.PASSED, result.summary()
    d = result.details
    assert d["deletion_margin"] == pytest.approx(d["deletion_auc_random"] - d["deletion_auc"], abs=1e-6)
    wins_del = sum(r["deletion_auc"] < r["deletion_auc_random"] for r in result.rows) / 8
    wins_ins = sum(r["insertion_auc"] > r["insertion_auc_random"] for r in result.rows) / 8
    margins = [((r["insertion_auc"] - r["deletion_auc"]) - (r["insertion_auc_random"] - r["deletion_auc_random"]))
               / r["p"] for r in result.rows]
    assert result.value == pytest.approx(sum(margins) / 8, rel=1e-5) and wins_del == wins_ins == 1.0
    assert all(m > 0 for m in margins)
    assert result.decision["p_value"] == pytest.approx(0.5 ** 8)  # 8 of 8 positive margins: exact signed rank
    assert result.details["deletion"]["effect"] == 1.0  # each curve's own test is shown beside it
    assert [r["sample"] for r in result.rows] == [f"t{i}" for i in range(8)]
    assert set(result.columns) == {"sample", "label", "p", "deletion_auc", "deletion_auc_random", "insertion_auc",
                                   "insertion_auc_random"}
    assert len(result.evidence) == 2 and all(e.media_type == "image/svg+xml" for e in result.evidence)
    # the same numbers on two samples cannot decide: even 2 of 2 wins give p = 0.25
    few = DeletionInsertion(method="gradient", steps=8, samples=2).execute(subject, _toy_set(8))
    assert few.status is Status.INCONCLUSIVE and len(few.rows) == 2 and "needs at least 7" in few.message


@pytest.fixture(scope="module")
def demo_results():
    from auditkit.demo import demo_model, demo_shortcut_model, shapes_dataset

    data = shapes_dataset()
    out = {}
    for factory in (demo_model, demo_shortcut_model):
        spec = factory()
        before = copy.deepcopy(spec.module.state_dict())
        flags = ({n: m.training for n, m in spec.module.named_modules()},
                 {n: p.requires_grad for n, p in spec.module.named_parameters()})
        with Subject(spec, device="cpu") as subject:
            result = DeletionInsertion().execute(  # the default suite's parameters
                subject, data.for_model(spec.class_names, spec.input_size))
        after = spec.module.state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in before) and flags == (
            {n: m.training for n, m in spec.module.named_modules()},
            {n: p.requires_grad for n, p in spec.module.named_parameters()})
        out[spec.name] = (result, unchanged)
        print(spec.name, result.summary())
    return out


def test_demo_passes_deletion_insertion(demo_results):
    result, unchanged = demo_results["demo"]
    assert result.status is Status.PASSED, result.summary()
    assert result.details["deletion_auc"] < result.details["deletion_auc_random"]
    assert result.details["insertion_auc"] > result.details["insertion_auc_random"]
    assert unchanged


def test_demo_shortcut_runs_and_leaves_the_model_unchanged(demo_results):
    result, unchanged = demo_results["demo-shortcut"]
    assert result.status is not Status.ERROR, result.summary()
    assert unchanged


def test_one_curve_alone_does_not_decide():
    """The map loses deletion on 3 of 8 samples but wins the combined score everywhere (shown with the sign
    test the combined rule replaced; the check's own rule also weighs by magnitude)."""
    import numpy as np

    from auditkit.checks.decision import decide

    del_map = np.array([0.2, 0.2, 0.2, 0.2, 0.2, 0.5, 0.5, 0.5])
    del_rand = np.full(8, 0.4)
    ins_map, ins_rand = np.full(8, 0.9), np.full(8, 0.4)
    deletion = decide(del_map, del_rand, effect="win_rate", min_effect=0.6, better="lower")
    combined = decide(ins_map - del_map, ins_rand - del_rand, effect="win_rate", min_effect=0.6)
    assert deletion.effect == pytest.approx(5 / 8) and deletion.p_value > 0.01
    assert combined.effect == 1.0 and combined.p_value == pytest.approx(0.5 ** 8)


def test_min_margin_must_be_a_non_negative_number():
    from auditkit.checks.base import CheckConfigError

    with pytest.raises(CheckConfigError, match="min_margin must be a number >= 0"):
        DeletionInsertion(min_margin=-0.1)
