"""Embeddings: k-NN agreement / accuracy, PCA, t-SNE, and the checks feature-neighbours and class-separation."""
import copy
import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from auditkit import AuditSet, ModelSpec, Sample
from auditkit.checks import check_class
from auditkit.checks.base import CheckConfigError, Status
from auditkit.checks.decision import decide
from auditkit.checks.embedding import ClassSeparation, FeatureNeighbours, _arrangements, _needed_images
from auditkit.demo import demo_model, shapes_dataset
from auditkit.methods import embedding as em
from auditkit.methods.randomisation import random_copy
from auditkit.subject import AuditModelError, Subject, _hook_keys
from tests.toys import NaNFeatures

sklearn = pytest.importorskip("sklearn")


# -- toys ---------------------------------------------------------------------


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


class TwoHeads(nn.Module):
    """`head` is registered first but called last; `proj` (registered last) feeds it."""

    def __init__(self, fail: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(4, 2)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.boom = Boom() if fail else nn.Identity()
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        pooled = self.conv(x).mean(dim=(2, 3))
        return self.head(self.boom(torch.relu(self.proj(pooled))))


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def _toy_spec(module, name="toy"):
    return ModelSpec(module=module, class_names=["a", "b"], input_size=(8, 8), layers=["conv"], name=name)


def _images(n=8, size=8, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _state(module):
    return (copy.deepcopy(module.state_dict()), {n: m.training for n, m in module.named_modules()},
            {n: p.requires_grad for n, p in module.named_parameters()}, _hook_keys(module))


def _assert_unchanged(module, before):
    state, training, grads, hooks = before
    now = module.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(state[k], now[k]) for k in state)
    assert {n: m.training for n, m in module.named_modules()} == training
    assert {n: p.requires_grad for n, p in module.named_parameters()} == grads
    assert _hook_keys(module) == hooks


# -- k nearest neighbours: hand-made sets with known answers -------------------

# On a line: 0, 1, 3 | 10, 11, 13 with labels 0 0 1 | 1 1 0.
LINE = torch.tensor([[0.0], [1.0], [3.0], [10.0], [11.0], [13.0]])
LINE_LABELS = torch.tensor([0, 0, 1, 1, 1, 0])


def test_knn_indices_leave_one_out_nearest_first_and_ties_by_index():
    idx = em.knn_indices(LINE, 2)
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0], [4, 5], [3, 5], [4, 3]]
    # equal distances: the lower index first; a duplicate (distance 0) is a neighbour, the point itself is not
    pts = torch.tensor([[0.0], [1.0], [-1.0], [0.0]])
    assert em.knn_indices(pts, 3).tolist() == [[3, 1, 2], [0, 3, 2], [0, 3, 1], [0, 1, 2]]


def test_knn_agreement_closed_form():
    # k = 1: neighbours 1, 0, 1, 4, 3, 4 -> same label for points 0, 1, 3, 4 -> 4/6
    assert em.knn_agreement(LINE, LINE_LABELS, 1) == pytest.approx(4 / 6)
    # k = 2: shares 1/2, 1/2, 0, 1/2, 1/2, 0 -> 1/3
    shares = em.neighbour_agreement(LINE, LINE_LABELS, 2)
    assert shares.tolist() == [0.5, 0.5, 0.0, 0.5, 0.5, 0.0]
    assert em.knn_agreement(LINE, LINE_LABELS, 2) == pytest.approx(1 / 3)


def test_knn_predict_breaks_ties_by_the_nearest_neighbour():
    # k = 2: points 0, 1, 3, 4 see one vote for each label; the nearer neighbour's label wins
    assert em.knn_predict(LINE, LINE_LABELS, 2).tolist() == [0, 0, 0, 1, 1, 1]
    assert em.knn_accuracy(LINE, LINE_LABELS, 2) == pytest.approx(4 / 6)
    # a strict majority beats a nearer single vote: the nearest is label 1, two farther ones are label 0
    pts = torch.tensor([[0.0], [1.0], [2.0], [2.5]])
    assert em.knn_predict(pts, torch.tensor([0, 1, 0, 0]), 3)[0] == 0


def test_knn_against_sklearn_neighbours():
    from sklearn.neighbors import NearestNeighbors

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.8 * torch.randn(40, generator=gen, dtype=torch.float64) > 0).long()
    # kneighbors() without a query: each indexed point's neighbours, the point itself left out
    ref_idx = NearestNeighbors(n_neighbors=5).fit(x.numpy()).kneighbors(return_distance=False)
    assert em.knn_indices(x, 5).tolist() == ref_idx.tolist()
    ys = y.numpy()
    for k in (1, 3, 5):  # two classes and odd k: no vote ties, so the rule is the plain majority
        votes = ys[ref_idx[:, :k]]
        majority = (votes.sum(axis=1) * 2 > k).astype(int)
        assert em.knn_predict(x, y, k).tolist() == majority.tolist()
        assert em.knn_accuracy(x, y, k) == pytest.approx((majority == ys).mean())
        assert em.knn_agreement(x, y, k) == pytest.approx((votes == ys[:, None]).mean())


def test_knn_bad_arguments_name_what_is_expected():
    with pytest.raises(ValueError, match=r"k = 6 .*1 <= k <= N - 1 = 5"):
        em.knn_agreement(LINE, LINE_LABELS, 6)
    with pytest.raises(ValueError, match=r"labels have shape \(5,\), expected \(6,\)"):
        em.knn_agreement(LINE, LINE_LABELS[:5], 1)
    with pytest.raises(ValueError, match="N x D"):
        em.knn_indices(torch.zeros(6), 1)


def test_unit_rows_scale_invariance():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-2.0, 0.0]])
    assert torch.allclose(em.unit_rows(x), torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]), rtol=0, atol=1e-7)
    assert em.unit_rows(torch.ones(2, 3, 4, 4)).shape == (2, 48)


# -- PCA and t-SNE ----------------------------------------------------------------


def test_pca_2d_matches_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 8, generator=gen, dtype=torch.float64) * torch.tensor([5.0, 3, 1, 1, 0.5, 0.5, 0.2, 0.1],
                                                                               dtype=torch.float64) + 7.0
    coords, ratio = em.pca_2d(x)
    ref = PCA(n_components=2, svd_solver="full").fit(x.numpy())
    ref_coords = ref.transform(x.numpy())
    for axis in range(2):
        sign = np.sign(np.dot(coords[:, axis].numpy(), ref_coords[:, axis]))
        np.testing.assert_allclose(coords[:, axis].numpy(), sign * ref_coords[:, axis], atol=1e-9)
    np.testing.assert_allclose(ratio.numpy(), ref.explained_variance_ratio_, rtol=1e-9)
    assert coords.mean(0).abs().max() < 1e-9
    # the sign convention (largest-magnitude loading positive) depends on the axes only, not on row order
    perm = torch.randperm(30, generator=gen)
    assert torch.allclose(em.pca_2d(x[perm])[0], coords[perm], rtol=0, atol=1e-9)
    # degenerate: 2 points in 1-D -> one axis, the second coordinate is 0
    two, r2 = em.pca_2d(torch.tensor([[0.0], [2.0]]))
    assert two.tolist() == [[-1.0, 0.0], [1.0, 0.0]] and r2.tolist() == [1.0, 0.0]


def test_tsne_2d_wraps_sklearn_deterministically():
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    gen = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(10, 5, generator=gen), torch.randn(10, 5, generator=gen) + 6])
    a = em.tsne_2d(x, perplexity=30.0, seed=0)  # clamped to (20 - 1) / 3
    b = em.tsne_2d(x, perplexity=30.0, seed=0)
    assert a.shape == (20, 2) and a.dtype == torch.float64
    assert torch.equal(a, b)
    with threadpool_limits(limits=1):
        ref = TSNE(n_components=2, perplexity=19 / 3, init="pca", random_state=0).fit_transform(x.numpy())
    np.testing.assert_allclose(a.numpy(), ref, rtol=1e-6, atol=1e-6)
    # two well-separated blobs stay separated in the map
    assert em.knn_accuracy(a, torch.tensor([0] * 10 + [1] * 10), 3) == 1.0


def test_effective_perplexity_clamps_and_refuses_tiny_sets():
    assert em.effective_perplexity(30.0, 60) == pytest.approx(59 / 3)
    assert em.effective_perplexity(5.0, 60) == 5.0
    with pytest.raises(ValueError, match="at least 4 points"):
        em.effective_perplexity(30.0, 3)
    with pytest.raises(ValueError, match="perplexity must be > 0"):
        em.effective_perplexity(0.0, 60)


# -- features: penultimate, named layer, hooks -----------------------------------


def test_penultimate_is_the_input_of_the_linear_called_last_and_hooks_are_removed():
    module, images = TwoHeads(), _images(n=7)
    before = _state(module)
    with Subject(_toy_spec(module), device="cpu", batch_size=3) as subject:
        assert em.penultimate_layer(subject, images) == "head"
        got = em.penultimate_features(subject, images)
        assert _hook_keys(module) == before[3]
        named = em.features(subject, images, "conv")
    with torch.no_grad():
        expected = torch.relu(module.proj(module.conv(images).mean(dim=(2, 3))))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert named.shape == (7, 6 * 8 * 8)
    _assert_unchanged(module, before)


def test_hooks_removed_when_the_forward_raises():
    module = TwoHeads(fail=True)
    before = _state(module)
    with Subject(_toy_spec(module), device="cpu") as subject:
        with pytest.raises(RuntimeError, match="boom"):
            em.penultimate_features(subject, _images())
        assert _hook_keys(module) == before[3]
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    _assert_unchanged(module, before)


def test_model_without_linear_asks_for_layer():
    with Subject(_toy_spec(NoLinear(), name="nolin"), device="cpu") as subject:
        with pytest.raises(AuditModelError, match=r"'nolin' has no nn.Linear.*pass layer="):
            em.features(subject, _images())
        assert em.features(subject, _images(), "conv").shape == (8, 2 * 8 * 8)


def test_unknown_layer_is_named():
    with Subject(_toy_spec(TwoHeads()), device="cpu") as subject, \
            pytest.raises(AuditModelError, match=r"no layer 'nope'.*available layers: head, conv"):
        em.features(subject, _images(), "nope")


# -- the checks on the demo --------------------------------------------------------


@pytest.fixture(scope="module")
def shapes():
    return shapes_dataset()


@pytest.fixture(scope="module")
def trained(shapes):
    spec = demo_model()
    before = _state(spec.module)
    with Subject(spec, device="cpu") as subject:
        results = (FeatureNeighbours().execute(subject, shapes), ClassSeparation().execute(subject, shapes))
    return spec, before, results


@pytest.fixture(scope="module")
def untrained(shapes):
    spec = demo_model()
    spec = dataclasses.replace(spec, module=random_copy(spec.module, seed=0), name="demo-random")
    with Subject(spec, device="cpu") as subject:
        return FeatureNeighbours(queries=0).execute(subject, shapes), ClassSeparation().execute(subject, shapes)


def test_demo_passes_feature_neighbours(trained):
    result = trained[2][0]
    assert result.status is Status.PASSED, result.summary()
    # measured: 0.927 in feature space vs 0.340 in pixel space, gain 0.587 (CI 0.50 to 0.67, p 1e-11);
    # default min_gain 0.1, the same for every model
    assert result.value == pytest.approx(0.587, abs=0.03)
    d = result.decision
    assert (d["effect_kind"], d["n"], d["min_effect"], d["alpha"]) == ("difference", 60, 0.1, 0.01)
    assert d["ci"][0] >= 0.4 and d["p_value"] < 1e-8  # by far, not by a tuned edge
    assert (d["value"], d["control"]) == pytest.approx((result.details["feature_agreement"],
                                                        result.details["pixel_agreement"]))
    assert sorted(g["class"] for g in d["by_class"]) == sorted(r["class"] for r in result.rows)
    assert result.details["feature_agreement"] > 0.85 and result.details["pixel_agreement"] < 0.45
    assert result.details["chance_agreement"] == pytest.approx(np.mean([(c - 1) / 59 for c in [12] * 24 + [14] * 14
                                                                         + [13] * 13 + [9] * 9]))
    assert result.details["features"] == "input of head"
    assert [r["class"] for r in result.rows] == ["circle", "square", "triangle", "star", "cross"]
    assert sum(r["samples"] for r in result.rows) == 60
    weighted = sum(r["samples"] * r["gain"] for r in result.rows) / 60
    assert weighted == pytest.approx(result.value)
    (grid,) = result.evidence
    assert grid.media_type == "image/png" and grid.data.startswith(b"\x89PNG")
    img = Image.open(io.BytesIO(grid.data))
    # 4 query rows of 1 + 5 + 5 framed 64 px panels (70 px with the frame, x2)
    assert img.height > 4 * 140 and img.width > 11 * 140


def test_demo_passes_class_separation(trained):
    result = trained[2][1]
    assert result.status is Status.PASSED, result.summary()
    # measured: k-NN accuracy 0.95 in the t-SNE map (perplexity 59/3) against 0.185 with the labels permuted:
    # kappa 0.94 (CI 0.81 to 0.99), p = 1 / 1000, the smallest p of 999 permutations; default min_kappa 0.25
    d = result.decision
    assert result.details["tsne_knn_accuracy"] >= 0.85 and d["value"] == result.details["tsne_knn_accuracy"]
    assert 0.1 < d["control"] < 0.3  # five classes: chance is about 0.2
    assert result.value == d["effect"] == pytest.approx((d["value"] - d["control"]) / (1 - d["control"]))
    assert d["ci"][0] >= 0.6 and d["p_value"] == pytest.approx(1 / 1000)
    assert [g["class"] for g in d["by_class"]] == ["circle", "square", "triangle", "star", "cross"]
    assert result.details["perplexity"] == pytest.approx(59 / 3)
    assert result.details["feature_knn_accuracy"] >= 0.85
    pca_svg, tsne_svg = (e.data.decode() for e in result.evidence)
    for svg in (pca_svg, tsne_svg):
        assert svg.count("<circle") >= 60  # the 60 points, plus the legend's dots
        for name in ("circle", "square", "triangle", "star", "cross"):
            assert f">{name}<" in svg  # legend entry
    assert "PC1 (" in pca_svg and "t-SNE 1" in tsne_svg


def test_the_users_model_is_unchanged(trained):
    spec, before, _ = trained
    _assert_unchanged(spec.module, before)


def test_untrained_copy_fails_both(untrained):
    neighbours, separation = untrained
    # measured (random_copy seed 0): agreement 0.173 in features vs 0.340 in pixels -> gain -0.167
    assert neighbours.status is Status.FAILED, neighbours.summary()
    assert neighbours.value < 0.0 and neighbours.evidence == []
    # measured: 0.233 in the t-SNE map (5 classes: chance is about 0.2)
    assert separation.status is Status.FAILED, separation.summary()
    assert separation.details["tsne_knn_accuracy"] < 0.4
    assert separation.value < 0.25 and "below the minimum 0.25" in separation.message
    assert separation.decision["p_value"] > 0.01  # measured: kappa -0.002, p = 0.54 against the permuted labels


# -- the checks: configuration, errors, escaping ------------------------------------


def test_registered_and_configurable():
    assert check_class("feature-neighbours") is FeatureNeighbours
    assert check_class("class-separation") is ClassSeparation
    check = ClassSeparation.from_params({"k": 3, "min_kappa": 0.5, "perplexity": 10, "layer": "stage4"})
    assert (check.k, check.min_kappa, check.perplexity, check.layer) == (3, 0.5, 10.0, "stage4")
    assert (ClassSeparation().min_kappa, ClassSeparation().permutations, FeatureNeighbours().min_gain) == (0.25, 999, 0.1)
    for cls, params, match in [
        (FeatureNeighbours, {"k": 0}, "k must be >= 1"),
        (FeatureNeighbours, {"min_gain": 1.5}, r"min_gain must be in \[-1, 1\]"),
        (FeatureNeighbours, {"queries": -1}, "queries must be >= 0"),
        (ClassSeparation, {"min_kappa": 1.2}, r"min_kappa must be in \[0, 1\]"),
        (ClassSeparation, {"min_accuracy": 0.6}, "unknown parameter"),
        (ClassSeparation, {"permutations": 50}, r"permutations = 50 cannot reach alpha = 0.01.*at least 99"),
        (ClassSeparation, {"alpha": 0.5}, "alpha must be a significance level"),
        (FeatureNeighbours, {"alpha": 0.0}, "alpha must be a significance level"),
        (ClassSeparation, {"perplexity": 0}, "perplexity must be > 0"),
        (ClassSeparation, {"neighbours": 3}, "unknown parameter"),
    ]:
        with pytest.raises(CheckConfigError, match=match):
            cls.from_params(params)


def _toy_set(names=("a", "b")):
    images = _images(n=8)
    return AuditSet([Sample(images[i], i % 2, (), f"s{i}") for i in range(8)], list(names), name="toyset")


def test_checks_error_on_a_bad_layer_and_cannot_decide_on_too_few_images():
    module = TwoHeads()
    before = _state(module)
    with Subject(_toy_spec(module), device="cpu") as subject:
        for check in (FeatureNeighbours(layer="nope"), ClassSeparation(layer="nope")):
            result = check.execute(subject, _toy_set())
            assert result.status is Status.ERROR and "no layer 'nope'" in result.message
        for check in (FeatureNeighbours(k=8), ClassSeparation(k=8)):  # the data cannot support k: not a crash
            result = check.execute(subject, _toy_set())
            assert result.status is Status.INCONCLUSIVE, result.summary()
            assert "k = 8 nearest neighbours need at least 9 audit images, audit set 'toyset' has 8" in result.message
        tiny = AuditSet([Sample(img, i % 2, (), f"s{i}") for i, img in enumerate(_images(n=3))], ["a", "b"],
                        name="tiny")
        result = ClassSeparation(k=1).execute(subject, tiny)  # t-SNE needs 4 points
        assert result.status is Status.INCONCLUSIVE and "need at least 4 audit images" in result.message
        # one image per class (the calibration's 4 photographs): no image has a neighbour of its own class
        singles = AuditSet([Sample(img, i, (), f"s{i}") for i, img in enumerate(_images(n=4))], list("abcd"),
                           name="singles")
        for check in (FeatureNeighbours(k=1), ClassSeparation(k=1)):
            result = check.execute(subject, singles)
            assert result.status is Status.INCONCLUSIVE, result.summary()
            assert "every class of audit set 'singles' has one image" in result.message
        one_class = AuditSet([Sample(img, 0, (), f"s{i}") for i, img in enumerate(_images())], ["a", "b"], name="one")
        for check in (FeatureNeighbours(k=1), ClassSeparation(k=1)):  # agreement would be trivially 1
            result = check.execute(subject, one_class)
            assert result.status is Status.INCONCLUSIVE, result.summary()  # the data cannot decide
            assert "needs at least 2 classes, the audit set has 1" in result.message
            assert result.decision["status"] == "inconclusive" and result.value is None and result.evidence == []
    _assert_unchanged(module, before)


def test_class_names_are_escaped_in_the_evidence():
    names = ("<b>a&amp;</b>", "c\"d'<script>")
    with Subject(_toy_spec(TwoHeads()), device="cpu") as subject:
        result = ClassSeparation(k=1, layer="conv").execute(subject, _toy_set(names))
        # layer="conv": the penultimate features of TwoHeads differ in length only (one non-zero ReLU unit)
        grid = FeatureNeighbours(k=1, queries=2, layer="conv").execute(subject, _toy_set(names))
    # 4 + 4 labels have C(8, 4) = 70 arrangements: no permutation test can reach alpha 0.01, evidence is drawn
    assert result.status is Status.INCONCLUSIVE and "only 70 distinct arrangements" in result.message
    assert result.decision["needed"] == 9  # C(9, 4) = 126 >= 100
    for evidence in result.evidence:
        svg = evidence.data.decode()
        assert "<b>" not in svg and "<script>" not in svg
        assert "&lt;b&gt;a&amp;amp;&lt;/b&gt;" in svg
        assert re.search(r"c(&quot;|\")d('|&#39;|&apos;)&lt;script&gt;", svg)
    assert grid.status in (Status.PASSED, Status.FAILED) and grid.evidence[0].data.startswith(b"\x89PNG")


class SharedHead(nn.Module):
    """The final nn.Linear is called twice per image: its input rows do not match the images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        pooled = self.conv(x).mean(dim=(2, 3))
        return self.head(pooled) + self.head(pooled * 2)


def test_a_linear_called_twice_per_image_asks_for_layer():
    module = SharedHead()
    before = _state(module)
    with Subject(_toy_spec(module), device="cpu") as subject, \
            pytest.raises(AuditModelError, match=r"layer 'head' gave 16 input rows for 8 images.*pass layer="):
        em.penultimate_features(subject, _images())
    _assert_unchanged(module, before)


# -- constant, non-finite and one-class features (issue 13: no check can kill the run) ---------------


class ConstantFeatures(nn.Module):
    """The final nn.Linear sees the same vector for every image (or, with `lengths`, vectors that differ
    in length only, which are the same unit rows)."""

    def __init__(self, lengths: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.lengths = lengths

    def forward(self, x):
        pooled = self.conv(x).mean(dim=(2, 3)) * 0 + torch.tensor([1.0, -2.0, 0.5, 3.0])
        if self.lengths:
            pooled = pooled * (1 + x.mean(dim=(1, 2, 3)))[:, None]
        return self.head(pooled)


@pytest.fixture
def no_embedding(monkeypatch):
    """PCA, t-SNE and k-NN must not run on features that cannot be embedded (t-SNE segfaults on them)."""
    def refuse(*_a, **_k):
        raise AssertionError("an embedding ran on features that should have been refused")

    for name in ("tsne_2d", "pca_2d", "knn_indices"):
        monkeypatch.setattr(em, name, refuse)


@pytest.mark.parametrize("lengths", [False, True])
def test_constant_features_fail_with_the_reason_before_any_embedding(no_embedding, lengths):
    with Subject(_toy_spec(ConstantFeatures(lengths)), device="cpu") as subject:
        results = [check.execute(subject, _toy_set()) for check in (FeatureNeighbours(k=1), ClassSeparation(k=1))]
    for result in results:
        assert result.status is Status.FAILED, result.summary()
        assert "the penultimate features are the same for every image" in result.message
        assert result.value is None and result.evidence == []
        if lengths:
            assert "up to their length" in result.message


def test_non_finite_features_are_an_error_naming_the_layer_and_samples(no_embedding):
    images = _images(n=8)
    module = NaNFeatures()
    with Subject(_toy_spec(module), device="cpu") as subject:
        conv = em.features(subject, images, "conv")
        bad = [f"'s{i}'" for i in range(8) if conv.view(8, 4, 8, 8)[i, 0, 0, 0] > 0.2]
        assert 0 < len(bad) < 8
        for check in (FeatureNeighbours(k=1, layer="odd"), ClassSeparation(k=1, layer="odd")):
            result = check.execute(subject, _toy_set())
            assert result.status is Status.ERROR, result.summary()
            assert "NonFiniteError" in result.message and "layer 'odd'" in result.message
            assert f"for {len(bad)} of 8 sample(s): {', '.join(bad)}" in result.message


def _isolated(code: str):
    """Run `code` in a fresh interpreter, so that a segfault fails the test instead of killing pytest."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


_TSNE_OF_BAD_POINTS = """
import torch
from auditkit.methods import embedding as em
for points in (torch.ones(10, 4), torch.full((10, 4), float("nan"))):
    try:
        em.tsne_2d(points)
    except ValueError as exc:
        print(type(exc).__name__, exc, flush=True)
"""


def test_tsne_refuses_identical_or_non_finite_points_instead_of_crashing():
    """Before: scikit-learn's Barnes-Hut t-SNE segfaulted on identical points."""
    proc = _isolated(_TSNE_OF_BAD_POINTS)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    identical, nan = proc.stdout.splitlines()
    assert "10 identical points" in identical
    assert identical.startswith("ValueError") and "NonFiniteError" not in identical
    assert "not finite (NaN)" in nan


_ZEROED_DEMO = """
import torch
from auditkit.checks.embedding import ClassSeparation, FeatureNeighbours
from auditkit.demo import demo_model, shapes_dataset
from auditkit.subject import Subject
spec = demo_model()
with torch.no_grad():
    for p in spec.module.parameters():
        p.zero_()
with Subject(spec, device="cpu") as subject:
    for check in (ClassSeparation(), FeatureNeighbours()):
        print(check.execute(subject, shapes_dataset()).summary(), flush=True)
"""


def test_zeroed_demo_does_not_kill_the_run():
    """Before: class-separation segfaulted inside scikit-learn's t-SNE (exit 139, no report).
    In a subprocess, so that a crash fails this test instead of killing pytest."""
    proc = _isolated(_ZEROED_DEMO)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert ": FAILED" in line and "the penultimate features are the same for every image" in line


# -- decisions against a control measured in the same run (issue 14) ----------------------------------


def _two_blobs(n_per: int = 30, seed: int = 0) -> torch.Tensor:
    """Two tight clusters far apart on a plane: the first n_per points at (0, 0), the others at (10, 0)."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(2 * n_per, 2, generator=gen, dtype=torch.float64) * 0.1
    points[n_per:, 0] += 10.0
    return points


def test_class_separation_permutation_test_clustered_labels_pass_with_kappa_one():
    names = ["a", "b"]
    labels = torch.tensor([0] * 30 + [1] * 30)
    decision, correct, _ = ClassSeparation()._decide(_two_blobs(), labels, names)
    assert bool(correct.all()) and decision.value == 1.0
    assert decision.status is Status.PASSED, decision.reason
    assert decision.effect == 1.0  # (1 - chance) / (1 - chance)
    assert decision.p_value == pytest.approx(1 / 1000)  # no permutation beats all-correct: (0 + 1) / (999 + 1)
    # the interval: Clopper-Pearson of 60 of 60 at 98 %, mapped to kappa with chance fixed
    from scipy import stats
    low = stats.binomtest(60, 60).proportion_ci(confidence_level=0.98, method="exact").low
    assert decision.ci == pytest.approx(((low - decision.control) / (1 - decision.control), 1.0))
    assert 0.3 < decision.control < 0.7  # two balanced classes: a permuted label is right about half the time
    assert [(g["class"], g["n"], g["model_wins"], g["effect"]) for g in decision.by_class] == [("a", 30, 30, 1.0),
                                                                                             ("b", 30, 30, 1.0)]
    assert "permutation test" in decision.rule and decision.effect_kind == "difference"


def test_class_separation_permutation_test_random_labels_fail():
    """Labels drawn independently of the map: accuracy near chance (kappa sd about 0.05 on 400 points)."""
    labels = torch.randperm(400, generator=torch.Generator().manual_seed(3)) % 2
    decision, _, _ = ClassSeparation()._decide(_two_blobs(200), labels, ["a", "b"])
    assert decision.status is Status.FAILED, decision
    assert decision.p_value > 0.01 and decision.effect < 0.25
    assert "not better than chance" in decision.reason and "below the minimum 0.25" in decision.reason


def test_class_separation_exact_permutation_test_closed_form():
    """6 points, 3 + 3 labels: 720 <= 999 orderings, so scipy enumerates them all. With k = 1 only the observed
    labelling and its swap are all right: p = 2 of the C(6, 3) = 20 arrangements = 0.1; chance = the mean
    accuracy over the 20 arrangements."""
    import itertools

    points = torch.tensor([[0.0, 0], [1, 0], [2, 0], [10, 0], [11, 0], [12, 0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    accuracies = []
    for ones in itertools.combinations(range(6), 3):
        y = torch.zeros(6, dtype=torch.long)
        y[list(ones)] = 1
        accuracies.append(em.knn_accuracy(points, y, 1))
    assert sum(a == 1.0 for a in accuracies) == 2
    check = ClassSeparation(k=1, alpha=0.2, permutations=999)
    decision, _, _ = check._decide(points, labels, ["a", "b"])
    assert decision.p_value == pytest.approx(0.1)
    assert decision.control == pytest.approx(np.mean(accuracies))
    assert decision.status is Status.PASSED and decision.effect == 1.0
    # at alpha 0.01 the 20 arrangements cannot decide: the smallest p-value is 1 / 20
    strict, _, _ = ClassSeparation(k=1)._decide(points, labels, ["a", "b"])
    assert strict.status is Status.INCONCLUSIVE and "only 20 distinct arrangements" in strict.reason
    assert strict.p_value == pytest.approx(0.1) and strict.needed == 9


def test_label_arrangements_and_images_needed_closed_form():
    assert _arrangements([4, 4], 10 ** 6) == 70 and _arrangements([3, 2, 1], 10 ** 6) == 60  # 6! / (3! 2! 1!)
    assert _arrangements([30, 30], 100) > 100  # stops once the cap is passed
    assert _needed_images(2, 0.01) == 9  # C(8, 4) = 70 < 100 <= C(9, 4) = 126
    assert _needed_images(5, 0.01) == 5  # 5! = 120
    assert _needed_images(2, 0.05) == 6  # C(6, 3) = 20 = 1 / 0.05: the smallest p-value reaches alpha


class Tinted(nn.Module):
    """Layer `means` = the channel means of the image (which carry the class tint); layer `detail` = the image
    minus its channel means (the noise alone); the logits come from the means."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.means = _ChannelMeans()
        self.detail = _Detail()
        self.head = nn.Linear(3, classes)

    def forward(self, x):
        self.detail(x)
        return self.head(self.means(x))


class _ChannelMeans(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class _Detail(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=(2, 3), keepdim=True)


def _tinted_set(n: int = 24) -> AuditSet:
    """Noise in [0, 0.9] plus a tint of 0.1 in the red (label 0) or green (label 1) channel: the pixels'
    distances are the noise's, the channel means the tint's."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        img = torch.rand(3, 8, 8, generator=gen) * 0.9
        img[i % 2] += 0.1
        samples.append(Sample(img, i % 2, (), f"s{i}"))
    return AuditSet(samples, ["red", "green"], name="tinted")


@pytest.mark.parametrize("layer, status", [("means", Status.PASSED), ("detail", Status.FAILED)])
def test_feature_neighbours_decides_per_query_against_pixel_space(layer, status):
    data = _tinted_set()
    spec = ModelSpec(module=Tinted(), class_names=["red", "green"], input_size=(8, 8), layers=["means", "detail"],
                     name="tinted")
    with Subject(spec, device="cpu") as subject:
        result = FeatureNeighbours(layer=layer, queries=0).execute(subject, data)
        feats = em.unit_rows(em.features(subject, data.images(), layer))
    labels = data.labels()
    pix = em.neighbour_agreement(em.unit_rows(data.images()), labels, 5)
    feat = em.neighbour_agreement(feats, labels, 5)
    expected = decide(feat.tolist(), pix.tolist(), effect="difference", min_effect=0.1, alpha=0.01,
                      groups=["red" if int(y) == 0 else "green" for y in labels],
                      value_label="feature-space agreement", control_label="pixel-space agreement")
    assert result.status is status is expected.status, result.summary()
    d = result.decision
    assert d["effect"] == pytest.approx(float((feat - pix).mean())) == pytest.approx(expected.effect)
    assert d["p_value"] == pytest.approx(expected.p_value) and d["ci"] == pytest.approx(list(expected.ci))
    assert d["n"] == 24 and [g["class"] for g in d["by_class"]] == ["red", "green"]
    if layer == "means":  # the tint decides the neighbours in feature space, the noise in pixel space
        assert d["value"] > 0.85 and d["control"] < 0.7 and d["p_value"] < 0.01 and d["ci"][0] >= 0.1
    else:  # the noise alone: no better than the pixels
        assert d["effect"] < 0.1


def test_a_query_alone_in_its_class_is_not_judged():
    """Its agreement is 0 in both spaces whatever the model: a tie that would only pull towards FAILED."""
    data = _tinted_set(24)
    images = torch.stack([data[i].image for i in range(24)] + [data[0].image.flip(-1)])
    lonely = AuditSet([Sample(images[i], i % 2 if i < 24 else 2, (), f"s{i}") for i in range(25)],
                      ["red", "green", "lonely"], name="lonely")
    spec = ModelSpec(module=Tinted(classes=3), class_names=["red", "green", "lonely"], input_size=(8, 8),
                     layers=["means", "detail"], name="tinted")
    with Subject(spec, device="cpu") as subject:
        result = FeatureNeighbours(layer="means", queries=0).execute(subject, lonely)
    assert result.decision["n"] == 24 and "1 image(s) alone in their class not judged" in result.message
    assert [g["class"] for g in result.decision["by_class"]] == ["red", "green"]


def test_class_separation_votes_over_the_classes_present_only():
    """Three classes of a 1000-class model give the same test as the same three numbered 0..2 (the vote is
    over the classes present; before, every permutation one-hot-encoded 1000 columns)."""
    gen = torch.Generator().manual_seed(3)
    small = torch.tensor([0, 1, 2] * 8)
    tsne = torch.randn(24, 2, generator=gen) + 3.0 * small.view(-1, 1).float()
    check = ClassSeparation(permutations=199)
    few, few_correct, few_chance = check._decide(tsne, small, ["a", "b", "c"])
    ids = torch.tensor([3, 500, 999])
    names = [f"c{k}" for k in range(1000)]
    many, many_correct, many_chance = check._decide(tsne, ids[small], names)
    assert few.p_value == many.p_value and few.value == many.value and torch.equal(few_correct, many_correct)
    assert [many_chance[int(c)] for c in ids] == [few_chance[c] for c in range(3)]
