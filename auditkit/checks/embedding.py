"""Embedding checks: `feature-neighbours` and `class-separation`.

Both embed every audit image by the model's penultimate features (the input
of its final nn.Linear) or by the flattened output of `layer`, and measure
distances between unit-L2 rows (methods.embedding.unit_rows: Euclidean
distance of unit rows is monotone in cosine similarity, so an image's
brightness or a feature vector's scale does not decide its neighbours).

Both decide against a control measured in the same run (checks.decision): feature-neighbours per query
against the same query's pixel-space neighbours, class-separation against its own labels permuted over
the same map. An audit set that cannot decide is INCONCLUSIVE with the reason: one class ("needs at least
2 classes": every neighbour would share the label), no more than k images, or no class with two images.
Features that are the same for every image
are the model's fault: FAILED with the reason (there is nothing to embed, and scikit-learn's t-SNE
segfaults on identical points). Both are found before any k-NN, PCA or t-SNE runs. Non-finite features
are an ERROR naming the layer and the samples.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from auditkit import evidence as ev
from auditkit.checks.base import (
    Check,
    CheckConfigError,
    CheckResult,
    Status,
    require_alpha,
    require_at_least,
    require_unit,
)
from auditkit.checks.decision import ALPHA, Decision, decide
from auditkit.methods import embedding as em
from auditkit.methods.features import rows_all_equal
from auditkit.methods.numerics import require_finite

_PANEL = 64  # longest side of an image in the neighbour grid before panel_grid's x2 upscale
_RIGHT = (60, 160, 60)  # frame of a neighbour with the query's label
_WRONG = (220, 30, 30)  # frame of a neighbour with another label
_QUERY = (120, 120, 120)  # frame of the query


def _embedding(subject, audit_set, images: torch.Tensor, layer: str) -> tuple[str, torch.Tensor, str]:
    """(what was embedded, N x D unit-L2 rows, why they cannot be judged or ""): `layer`'s output or the
    input of the final nn.Linear (for a model without one, the deepest named layer's output averaged over
    its grid). Non-finite features raise NonFiniteError naming the layer and samples;
    features that are the same for every image (or differ in length only, so their unit rows are the
    same) give the reason."""
    if layer:
        where, named, raw = layer, f"the features of layer {layer!r}", em.features(subject, images, layer)
    else:
        try:
            linear = em.penultimate_layer(subject, images)
        except em.NoFinalLinear:  # squeezenet: a conv head; the deepest named layer, pooled over its grid
            if not subject.layers:
                raise
            layer = subject.layers[-1]
            where, named = f"{layer}, pooled", f"the pooled features of layer {layer!r} (no final nn.Linear)"
            raw = em.pooled_features(subject, images, layer)
        else:
            where, named = f"input of {linear}", "the penultimate features"
            raw = em.penultimate_features(subject, images, linear)
    require_finite(raw, "features", method="layer features" if layer else "penultimate features", layer=where,
                   sample_ids=[sample.id for sample in audit_set])
    rows = em.unit_rows(raw)
    n, size = raw.shape[0], raw.flatten(1).shape[1]
    why = ""
    if rows_all_equal(raw):
        why = (f"{named} are the same for every image: all {n} images give one vector of {size} values "
               f"({where}, up to rounding), so the model does not tell its images apart and there is nothing "
               f"to embed")
    elif rows_all_equal(rows):
        why = (f"{named} are the same for every image up to their length: all {n} images give one direction "
               f"of {size} values ({where}, up to rounding), and neighbours are taken between unit-length "
               f"rows, so there is nothing to embed")
    return where, rows, why


def _validate_k(check: Check) -> None:
    if check.k < 1:
        raise CheckConfigError(f"check {check.name!r}: k must be >= 1, got {check.k}")


def _require_neighbours(check: Check, audit_set, labels: torch.Tensor, *, least: int = 0) -> str:
    """Why the audit set cannot decide ("" when it can): one class (every neighbour shares the label),
    no more than k images, fewer than `least`, or no class with two images (no image has a neighbour of its
    own class in any space)."""
    n = labels.shape[0]
    present = labels.unique()
    if present.numel() < 2:
        names = list(audit_set.class_names)
        only = int(present[0]) if present.numel() else None
        label = names[only] if only is not None and only < len(names) else only
        return (f"needs at least 2 classes, the audit set has {present.numel()}: all {n} images of audit set "
                f"{audit_set.name!r} are {label!r}, so every neighbour shares the label whatever the features")
    if check.k > n - 1 or n < least:
        return (f"k = {check.k} nearest neighbours need at least {max(check.k + 1, least)} audit images, audit set "
                f"{audit_set.name!r} has {n}")
    if int(labels.bincount().max()) < 2:
        return (f"every class of audit set {audit_set.name!r} has one image ({n} images, {present.numel()} "
                f"classes), so no image has a neighbour of its own class in any space")
    return ""


def _unjudged(check: Check, decision: Decision, metric: str, status: Status, why: str, **details) -> CheckResult:
    """A result with no measured value: `decision` with `status` and the reason `why` (INCONCLUSIVE when the
    audit set cannot decide, FAILED when the model gives nothing to embed)."""
    result = check.decided(dataclasses.replace(decision, status=status, reason=why), metric=metric, details=details)
    result.value = None
    return result


def _chance_agreement(labels: torch.Tensor) -> float:
    """Expected leave-one-out agreement of random neighbours: mean_i (n_{y_i} - 1) / (N - 1)."""
    counts = torch.bincount(labels)
    n = labels.shape[0]
    return float(((counts[labels] - 1).double() / max(1, n - 1)).mean())


def _queries_by_class(labels: torch.Tensor, count: int) -> list[int]:
    """`count` image indices that cycle through the classes: the first image of each class (in class order),
    then the second of each, and so on; all images when count >= N."""
    order = sorted(range(labels.shape[0]), key=lambda i: (int((labels[:i] == labels[i]).sum()), int(labels[i]), i))
    return order[: max(0, count)]


def _framed(image: torch.Tensor, color: tuple[int, int, int]) -> torch.Tensor:
    """A 3 x H' x W' copy of the image (shrunk to _PANEL px at most) inside a solid frame of `color`."""
    img = image.detach().float().cpu()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    h, w = img.shape[-2:]
    if max(h, w) > _PANEL:
        f = _PANEL / max(h, w)
        img = F.interpolate(img[None], size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                            antialias=True, align_corners=False)[0]
        h, w = img.shape[-2:]
    b = max(2, round(max(h, w) / 24))
    out = torch.tensor(color, dtype=torch.float32).div(255).view(3, 1, 1).repeat(1, h + 2 * b, w + 2 * b)
    out[:, b : b + h, b : b + w] = img.clamp(0, 1)
    return out


@dataclass
class FeatureNeighbours(Check):
    """The k nearest neighbours of an image should share its label more often in feature space than in
    pixel space.

    Per query i (leave-one-out, Euclidean distance of unit-L2 rows of Z):
        agreement_Z(i) = (1 / k) #{j in kNN_Z(i) : y_j = y_i},  Z = features (penultimate, or `layer`) or pixels
    Decision (checks.decision, effect "difference"; the control is the same query in pixel space):
    passes when mean_i(agreement_features(i) - agreement_pixels(i)) >= min_gain and a one-sided Wilcoxon
    signed-rank test of the differences > 0 gives p <= alpha; INCONCLUSIVE below the queries the test
    needs (7 at alpha 0.01) or on an audit set of one class. A query alone in its class is not judged
    (no neighbour can share its label in either space).

    min_gain = 0.1 (the same for every model): one neighbour in ten more carries the query's label, half
    a neighbour of the default k = 5; agreement is a share in [0, 1], so the minimum does not depend on the
    scale of the features or the pixels.
    """

    kind = "feature-neighbours"
    title = "Feature-space neighbours share the label"
    description = (
        "agreement_Z(i) = share of the k nearest other images of image i (Euclidean distance of unit-L2 rows "
        "of Z) that carry its label; Z = flattened pixels or the model's features (the input of its final "
        "linear layer, or the output of `layer`). Passes when mean_i(agreement_features(i) - "
        "agreement_pixels(i)) >= min_gain and a one-sided Wilcoxon signed-rank test of the per-image "
        "differences > 0 gives p <= alpha (pixel space is the control). INCONCLUSIVE with fewer images "
        "than the test needs (a query alone in its class is not judged) or one class."
    )

    k: int = 5
    min_gain: float = 0.1
    alpha: float = ALPHA
    layer: str = ""
    queries: int = 4
    seed: int = 0

    def validate(self) -> None:
        _validate_k(self)
        if not (math.isfinite(self.min_gain) and -1.0 <= self.min_gain <= 1.0):
            raise CheckConfigError(f"check {self.name!r}: min_gain must be in [-1, 1], got {self.min_gain}")
        require_alpha(self)
        require_at_least(self, queries=0)

    def _decide(self, feat_share, pix_share, groups, why: str = "") -> Decision:
        return decide(feat_share, pix_share, effect="difference", min_effect=self.min_gain, alpha=self.alpha,
                      seed=self.seed, groups=groups, value_label="feature-space agreement",
                      control_label="pixel-space agreement", inconclusive=why)

    def run(self, subject, audit_set) -> CheckResult:
        images, labels = audit_set.images(), audit_set.labels()
        n, names = len(audit_set), list(audit_set.class_names)
        metric = "mean k-NN label agreement gain: features - pixels"
        why = _require_neighbours(self, audit_set, labels)
        if why:
            return _unjudged(self, self._decide([], [], []), metric, Status.INCONCLUSIVE, why, k=self.k)
        where, feats, why = _embedding(subject, audit_set, images, self.layer)
        if why:
            return _unjudged(self, self._decide([], [], []), metric, Status.FAILED, why, features=where, k=self.k)
        pixels = em.unit_rows(images)
        pix_share = em.neighbour_agreement(pixels, labels, self.k)
        feat_share = em.neighbour_agreement(feats, labels, self.k)
        pix, feat = float(pix_share.mean()), float(feat_share.mean())
        gain = feat - pix
        chance = _chance_agreement(labels)
        class_of = [names[int(c)] if int(c) < len(names) else str(int(c)) for c in labels]
        # a query alone in its class has no same-label neighbour in either space: 0 vs 0 says nothing
        alone = labels.bincount()[labels] < 2
        judged = torch.where(alone, torch.full_like(feat_share, math.nan), feat_share)
        decision = self._decide(judged.tolist(), pix_share.tolist(), class_of)
        notes = []
        if alone.any():
            notes.append(f"{int(alone.sum())} image(s) alone in their class not judged (no neighbour can share "
                         f"their label)")

        rows = []
        for c, cname in enumerate(names):
            mask = labels == c
            if mask.any():
                p, f = float(pix_share[mask].mean()), float(feat_share[mask].mean())
                rows.append({"class": cname, "samples": int(mask.sum()), "pixel_agreement": p,
                             "feature_agreement": f, "gain": f - p})
        result = self.decided(
            decision, metric=metric, rows=rows,
            columns=["class", "samples", "pixel_agreement", "feature_agreement", "gain"],
            message="; ".join(notes + [
                f"{n} images, k = {self.k}, features = {where}; label agreement of the nearest neighbours "
                f"{feat:.3f} in feature space vs {pix:.3f} in pixel space (gain {gain:+.3f}; random neighbours "
                f"would give {chance:.3f})"]),
            details={"pixel_agreement": pix, "feature_agreement": feat, "chance_agreement": chance,
                     "features": where, "k": self.k},
        )
        chosen = _queries_by_class(labels, self.queries)
        if chosen:
            result.evidence = [self._grid(images, labels, names, pixels, feats, chosen)]
        return result

    def _grid(self, images, labels, names, pixels, feats, chosen) -> ev.Evidence:
        """One row per query: query | its k pixel-space neighbours | its k feature-space neighbours."""
        pix_nn, feat_nn = em.knn_indices(pixels, self.k), em.knn_indices(feats, self.k)

        def name(i: int) -> str:
            return names[int(labels[i])]

        rows, titles = [], []
        for q in chosen:
            row, title = [_framed(images[q], _QUERY)], [f"query: {name(q)}"]
            for space, nn_idx in (("pixels", pix_nn), ("features", feat_nn)):
                row.append(None)  # a narrow gap between the groups
                title.append("")
                for rank, j in enumerate(nn_idx[q].tolist(), start=1):
                    same = bool(labels[j] == labels[q])
                    row.append(_framed(images[j], _RIGHT if same else _WRONG))
                    title.append(f"{space[0]}{rank}: {name(j)}" + ("" if same else " (x)"))
            rows.append(row)
            titles.append(title)
        grid = ev.panel_grid(rows, titles=titles, row_labels=[f"#{q}" for q in chosen], scale=2)
        return ev.png_evidence(
            "Nearest neighbours in pixel space vs feature space", grid,
            f"Each row: a query image, its {self.k} nearest images in pixel space (p1..p{self.k}), then in the "
            f"model's feature space (f1..f{self.k}), nearest first. Green frame: same label as the query; red "
            f"frame and (x): another label.")


def _arrangements(counts, cap: int) -> int:
    """n! / prod_c n_c!, the number of distinct ways to lay these labels on n images (exact integers: the
    product over classes of C(n_1 + ... + n_c, n_c)), or the first partial product above `cap`."""
    total, placed = 1, 0
    for count in counts:
        placed += int(count)
        total *= math.comb(placed, int(count))
        if total > cap:
            return total
    return total


def _needed_images(classes: int, alpha: float) -> int:
    """The fewest images, spread as evenly as possible over `classes` classes, whose distinct label
    arrangements reach 1 / alpha (the smallest p-value of a permutation test is 1 / arrangements)."""
    target = math.ceil(1.0 / alpha - 1e-9)
    n = max(2, classes)
    while _arrangements([n // classes + (c < n % classes) for c in range(classes)], target) < target:
        n += 1
    return n


class _PermutedAccuracy:
    """The permutation test's statistic: leave-one-out k-NN accuracy of labels y (N, or B x N for a batch of
    permutations) on the fixed neighbours `idx` (N x k); the batches also add up each class's accuracy, for
    its chance level."""

    def __init__(self, idx: torch.Tensor, classes: int):
        self.idx, self.classes = idx, classes
        self.class_sums = torch.zeros(classes, dtype=torch.float64)
        self.permutations = 0

    def __call__(self, y, axis: int = -1) -> np.ndarray:
        labels = torch.as_tensor(np.array(y, dtype=np.int64))
        correct = em.knn_vote(labels[..., self.idx], self.classes) == labels
        if labels.ndim == 2:  # a batch of permutations (scipy passes the observed labels alone, as N)
            hits = F.one_hot(labels, self.classes).double()  # B x N x C
            self.class_sums += ((hits * correct[..., None]).sum(1) / hits.sum(1).clamp_min(1)).sum(0)
            self.permutations += labels.shape[0]
        return correct.double().mean(dim=-1).numpy()


def _kappa(accuracy, chance: float):
    """(accuracy - chance) / (1 - chance): 0 at chance, 1 when every image is right; NaN when chance is 1."""
    return (accuracy - chance) / (1.0 - chance) if chance < 1.0 else math.nan


@dataclass
class ClassSeparation(Check):
    """Classes should form separate clusters in a 2-D t-SNE map of the model's features, beyond chance.

    The features (penultimate, or `layer`; unit-L2 rows) are mapped to 2-D by t-SNE (scikit-learn,
    perplexity min(perplexity, (N - 1) / 3), random_state = seed). accuracy = the leave-one-out k-NN
    majority-vote accuracy of the labels in that map; the control is the same statistic on the same map
    with the labels permuted (scipy.stats.permutation_test, `permutations` seeded resamples, one-sided
    "greater"; exact over all orderings when they are fewer); chance = its mean over the permutations.

        kappa = (accuracy - chance) / (1 - chance)       (scale-free: 0 at chance, 1 when all are right)

    Passes when p <= alpha and kappa >= min_kappa; FAILED otherwise. Interval: the two-sided 1 - 2 alpha
    Clopper-Pearson interval of the accuracy (correct images of N), mapped to kappa with chance fixed.
    INCONCLUSIVE when the labels have fewer distinct arrangements N! / prod_c N_c! than 1 / alpha (the
    smallest p-value is one over them), on one class, or on fewer than max(k + 1, 4) images. min_kappa = 0.25 for every model: a quarter of
    the way from chance to perfect ("fair" agreement on Landis and Koch's scale of kappa starts at 0.21).
    Evidence: PCA and t-SNE scatter plots coloured by class.
    """

    kind = "class-separation"
    title = "Classes separate in a t-SNE map of the features"
    description = (
        "t-SNE (scikit-learn, perplexity min(perplexity, (N - 1) / 3), fixed seed) of the model's features "
        "(unit-L2 rows of the input of its final linear layer, or of `layer`'s output) to 2-D; accuracy = "
        "leave-one-out k-NN majority-vote accuracy of the class labels in that map, chance = the same with "
        "the labels permuted over the map (mean of the permutations). Passes when kappa = (accuracy - "
        "chance) / (1 - chance) >= min_kappa and a one-sided permutation test (scipy.stats.permutation_test) "
        "gives p <= alpha. INCONCLUSIVE when the labels have fewer distinct arrangements than 1 / alpha, or "
        "one class."
    )

    k: int = 5
    min_kappa: float = 0.25
    alpha: float = ALPHA
    perplexity: float = 30.0
    layer: str = ""
    permutations: int = 999
    seed: int = 0

    def validate(self) -> None:
        _validate_k(self)
        require_unit(self, "min_kappa")
        require_alpha(self)
        if not (math.isfinite(self.perplexity) and self.perplexity > 0):
            raise CheckConfigError(f"check {self.name!r}: perplexity must be > 0, got {self.perplexity}")
        floor = math.ceil(1.0 / self.alpha - 1e-9) - 1
        if self.permutations < floor:
            raise CheckConfigError(
                f"check {self.name!r}: permutations = {self.permutations} cannot reach alpha = {self.alpha:g} "
                f"(the smallest p-value of R permutations is 1 / (R + 1)); use at least {floor}")

    def _rule(self) -> str:
        return (f"passes when kappa = (accuracy - chance) / (1 - chance) >= {self.min_kappa:g}, with accuracy the "
                f"leave-one-out {self.k}-NN accuracy in the t-SNE map and chance its mean over {self.permutations} "
                f"permutations of the labels on the same map, and a one-sided permutation test "
                f"(scipy.stats.permutation_test) gives p <= {self.alpha:g}; interval: Clopper-Pearson of the "
                f"accuracy, mapped to kappa")

    _LABELS = {"value": "k-NN accuracy in the t-SNE map", "control": "with the labels permuted (chance)"}

    def _unjudged(self, status: Status, why: str, n: int, classes: int, metric: str, **details) -> CheckResult:
        decision = Decision(status=status, rule=self._rule(), effect_kind="difference", n=n, effect=math.nan,
                            ci=(math.nan, math.nan), p_value=math.nan, alpha=self.alpha, min_effect=self.min_kappa,
                            value=math.nan, control=math.nan, reason=why,
                            needed=_needed_images(max(2, classes), self.alpha), labels=dict(self._LABELS))
        return _unjudged(self, decision, metric, status, why, **details)

    def _decide(self, tsne, labels, names):
        """The permutation test of the k-NN accuracy in the map (class docstring) as a Decision, and the
        per-class (accuracy, chance) for the table."""
        n, classes = labels.shape[0], max(len(names), int(labels.max()) + 1)
        present = labels.bincount(minlength=classes)
        # the test runs on the classes present, numbered 0..P-1 (the vote, and so the result, is the same;
        # a 1000-class model's 5-class audit set would otherwise vote over 1000 one-hot columns)
        present_ids = labels.unique(sorted=True)
        compact = torch.searchsorted(present_ids, labels)
        idx = em.knn_indices(tsne, self.k)
        statistic = _PermutedAccuracy(idx, len(present_ids))
        batch = max(1, min(self.permutations, 2 ** 22 // max(1, n * self.k * len(present_ids))))
        res = stats.permutation_test((compact.numpy(),), statistic, permutation_type="pairings", vectorized=True,
                                     n_resamples=self.permutations, batch=batch, alternative="greater",
                                     rng=np.random.default_rng(self.seed))
        accuracy, p = float(res.statistic), float(res.pvalue)
        chance = float(np.mean(res.null_distribution))
        correct_per_image = em.knn_vote(compact[idx], len(present_ids)) == compact  # the observed statistic, per image
        correct = int(correct_per_image.sum())
        ci = stats.binomtest(correct, n).proportion_ci(confidence_level=1 - 2 * self.alpha, method="exact")
        kappa = _kappa(accuracy, chance)
        chance_of = dict(zip(present_ids.tolist(), (statistic.class_sums / max(1, statistic.permutations)).tolist()))
        by_class = []
        for c, cname in enumerate(names):
            mask = labels == c
            if mask.any():
                acc_c = float(correct_per_image[mask].double().mean())
                by_class.append({"class": cname, "n": int(mask.sum()), "value": acc_c, "control": chance_of[c],
                                 "effect": _kappa(acc_c, chance_of[c]), "model_wins": int(correct_per_image[mask].sum())})
        arrangements = _arrangements(present.tolist(), math.ceil(1.0 / self.alpha))
        reasons = []
        if arrangements * self.alpha < 1.0:
            status = Status.INCONCLUSIVE
            counts = " + ".join(str(int(c)) for c in present if c > 0)
            reasons.append(f"the labels of these {n} images ({counts} per class) have only {arrangements} distinct "
                           f"arrangements, so the smallest p-value of a permutation test is 1 / {arrangements} = "
                           f"{1 / arrangements:.3g} > alpha {self.alpha:g}")
        else:
            if not kappa >= self.min_kappa:
                reasons.append(f"kappa {kappa:.3g} below the minimum {self.min_kappa:.3g}")
            if not p <= self.alpha:
                reasons.append(f"not better than chance, p = {p:.2g} > alpha {self.alpha:g}")
            status = Status.FAILED if reasons else Status.PASSED
        decision = Decision(status=status, rule=self._rule(), effect_kind="difference", n=n, effect=kappa,
                            ci=(_kappa(float(ci.low), chance), _kappa(float(ci.high), chance)), p_value=p,
                            alpha=self.alpha, min_effect=self.min_kappa, value=accuracy, control=chance,
                            reason="; ".join(reasons), needed=_needed_images(int((present > 0).sum()), self.alpha),
                            by_class=by_class, labels=dict(self._LABELS))
        return decision, correct_per_image, chance_of

    def run(self, subject, audit_set) -> CheckResult:
        images, labels = audit_set.images(), audit_set.labels()
        n, names = len(audit_set), list(audit_set.class_names)
        classes = int(labels.unique().numel())
        metric = "kappa of the k-NN accuracy in the t-SNE map over chance"
        why = _require_neighbours(self, audit_set, labels, least=4)  # t-SNE needs 4 points
        if why:
            return self._unjudged(Status.INCONCLUSIVE, why, n, classes, metric, k=self.k)
        perplexity = em.effective_perplexity(self.perplexity, n)
        where, feats, why = _embedding(subject, audit_set, images, self.layer)
        if why:
            return self._unjudged(Status.FAILED, why, n, classes, metric, features=where, k=self.k)
        tsne = em.tsne_2d(feats, perplexity, self.seed)
        pca, ratio = em.pca_2d(feats)
        decision, correct, class_chance = self._decide(tsne, labels, names)
        accuracy = decision.value
        feat_correct = em.knn_predict(feats, labels, self.k) == labels
        feature_accuracy = float(feat_correct.double().mean())
        pca_accuracy = em.knn_accuracy(pca, labels, self.k)

        rows = []
        for c, cname in enumerate(names):
            mask = labels == c
            if mask.any():
                rows.append({"class": cname, "samples": int(mask.sum()),
                             "tsne_knn_accuracy": float(correct[mask].double().mean()),
                             "chance_permuted": class_chance[c],
                             "feature_knn_accuracy": float(feat_correct[mask].double().mean())})
        result = self.decided(
            decision, metric=metric, rows=rows,
            columns=["class", "samples", "tsne_knn_accuracy", "chance_permuted", "feature_knn_accuracy"],
            message=(f"{n} images, k = {self.k}, features = {where}, perplexity {perplexity:.3g}; k-NN accuracy "
                     f"{accuracy:.3f} in the t-SNE map against {decision.control:.3f} with the labels permuted "
                     f"({self.permutations} permutations); {pca_accuracy:.3f} in the PCA map, "
                     f"{feature_accuracy:.3f} in the full feature space (shown, not judged)"),
            details={"features": where, "perplexity": perplexity, "seed": self.seed, "k": self.k,
                     "tsne_knn_accuracy": accuracy, "chance_accuracy": decision.control,
                     "feature_knn_accuracy": feature_accuracy, "pca_knn_accuracy": pca_accuracy,
                     "pca_explained_variance": [float(r) for r in ratio]},
        )
        groups = labels.tolist()
        pca_svg = ev.scatter_svg(pca.tolist(), groups, names, title=f"PCA of the features ({where})",
                                 x_label=f"PC1 ({float(ratio[0]):.0%} of variance)",
                                 y_label=f"PC2 ({float(ratio[1]):.0%} of variance)")
        tsne_svg = ev.scatter_svg(tsne.tolist(), groups, names, title=f"t-SNE of the features ({where})",
                                  x_label="t-SNE 1", y_label="t-SNE 2")
        result.evidence = [
            ev.svg_evidence("PCA map of the features", pca_svg,
                            "Unit-L2 feature vectors projected on their first two principal axes, coloured by class."),
            ev.svg_evidence("t-SNE map of the features", tsne_svg,
                            f"t-SNE (perplexity {perplexity:.3g}, seed {self.seed}) of the unit-L2 feature vectors, "
                            f"coloured by class; k-NN accuracy in this map {accuracy:.3f}."),
        ]
        return result
