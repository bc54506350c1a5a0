"""Embedding checks: `feature-neighbours` and `class-separation`.

Both embed every audit image by the model's penultimate features (the input
of its final nn.Linear) or by the flattened output of `layer`, and measure
distances between unit-L2 rows (methods.embedding.unit_rows: Euclidean
distance of unit rows is monotone in cosine similarity, so an image's
brightness or a feature vector's scale does not decide its neighbours).

Neither can pass on an audit set of one class (every neighbour would share the label) or on features
that are the same for every image (there is nothing to embed, and scikit-learn's t-SNE segfaults on
identical points): both are FAILED with the reason, found before any k-NN, PCA or t-SNE runs.
Non-finite features are an ERROR naming the layer and the samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, Status, require_at_least, require_unit
from auditkit.methods import embedding as em
from auditkit.methods.features import rows_all_equal
from auditkit.methods.numerics import require_finite

_PANEL = 64  # longest side of an image in the neighbour grid before panel_grid's x2 upscale
_RIGHT = (60, 160, 60)  # frame of a neighbour with the query's label
_WRONG = (220, 30, 30)  # frame of a neighbour with another label
_QUERY = (120, 120, 120)  # frame of the query


def _embedding(subject, audit_set, images: torch.Tensor, layer: str) -> tuple[str, torch.Tensor, str]:
    """(what was embedded, N x D unit-L2 rows, why they cannot be judged or ""): `layer`'s output or the
    input of the final nn.Linear. Non-finite features raise NonFiniteError naming the layer and samples;
    features that are the same for every image (or differ in length only, so their unit rows are the
    same) give the reason."""
    if layer:
        where, named, raw = layer, f"the features of layer {layer!r}", em.features(subject, images, layer)
    else:
        linear = em.penultimate_layer(subject, images)
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


def _require_neighbours(check: Check, audit_set, labels: torch.Tensor) -> str:
    """Raise unless the set has more than k images; return why it cannot be judged ("" when it can):
    an audit set of one class makes every neighbour share the label."""
    n = labels.shape[0]
    if check.k > n - 1:
        raise ValueError(f"check {check.name!r}: k = {check.k} needs at least k + 1 = {check.k + 1} audit images, "
                         f"audit set {audit_set.name!r} has {n}")
    present = labels.unique()
    if present.numel() < 2:
        names = list(audit_set.class_names)
        only = int(present[0]) if present.numel() else None
        label = names[only] if only is not None and only < len(names) else only
        return (f"needs at least 2 classes, the audit set has 1: all {n} images of audit set {audit_set.name!r} "
                f"are {label!r}, so every neighbour shares the label whatever the features")
    return ""


def _cannot_pass(check: Check, metric: str, threshold: float, why: str, **details) -> CheckResult:
    """FAILED with the reason and no value: what the check needs is not there, so it cannot pass."""
    return CheckResult(check=check.name, kind=check.kind, status=Status.FAILED, metric=metric, value=None,
                       threshold=float(threshold), message=why, details=details)


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

    agreement(Z) = (1 / N) sum_i (1 / k) #{j in kNN_Z(i) : y_j = y_i}, leave-one-out, Euclidean distance
    of unit-L2 rows of Z. Z = pixels (flattened) or features (penultimate, or `layer`). The check passes
    when agreement(features) - agreement(pixels) >= min_gain.
    """

    kind = "feature-neighbours"
    title = "Feature-space neighbours share the label"
    description = (
        "agreement(Z) = mean over images of the share of its k nearest other images (Euclidean distance of "
        "unit-L2 rows of Z) that carry its label. Z = flattened pixels or the model's features (the input "
        "of its final linear layer, or the output of `layer`). Passes when agreement(features) - "
        "agreement(pixels) >= min_gain."
    )

    k: int = 5
    min_gain: float = 0.25
    layer: str = ""
    queries: int = 4

    def validate(self) -> None:
        _validate_k(self)
        if not (math.isfinite(self.min_gain) and -1.0 <= self.min_gain <= 1.0):
            raise CheckConfigError(f"check {self.name!r}: min_gain must be in [-1, 1], got {self.min_gain}")
        require_at_least(self, queries=0)

    def run(self, subject, audit_set) -> CheckResult:
        images, labels = audit_set.images(), audit_set.labels()
        n, names = len(audit_set), list(audit_set.class_names)
        metric = "k-NN label agreement: features - pixels"
        why = _require_neighbours(self, audit_set, labels)
        if why:
            return _cannot_pass(self, metric, self.min_gain, why, k=self.k)
        where, feats, why = _embedding(subject, audit_set, images, self.layer)
        if why:
            return _cannot_pass(self, metric, self.min_gain, why, features=where, k=self.k)
        pixels = em.unit_rows(images)
        pix_share = em.neighbour_agreement(pixels, labels, self.k)
        feat_share = em.neighbour_agreement(feats, labels, self.k)
        pix, feat = float(pix_share.mean()), float(feat_share.mean())
        gain = feat - pix
        chance = _chance_agreement(labels)

        rows = []
        for c, cname in enumerate(names):
            mask = labels == c
            if mask.any():
                p, f = float(pix_share[mask].mean()), float(feat_share[mask].mean())
                rows.append({"class": cname, "samples": int(mask.sum()), "pixel_agreement": p,
                             "feature_agreement": f, "gain": f - p})
        result = self.result(
            metric=metric, value=gain, threshold=self.min_gain, rows=rows,
            columns=["class", "samples", "pixel_agreement", "feature_agreement", "gain"],
            message=(f"{n} images, k = {self.k}, features = {where}; label agreement of the nearest neighbours "
                     f"{feat:.3f} in feature space vs {pix:.3f} in pixel space (gain {gain:+.3f}; random "
                     f"neighbours would give {chance:.3f})"),
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


@dataclass
class ClassSeparation(Check):
    """Classes should form separate clusters in a 2-D t-SNE map of the model's features.

    The features (penultimate, or `layer`; unit-L2 rows) are mapped to 2-D by t-SNE
    (scikit-learn, perplexity min(perplexity, (N - 1) / 3), random_state = seed); value = the
    leave-one-out k-NN majority-vote accuracy in that map. Passes when it is >= min_accuracy.
    Evidence: PCA and t-SNE scatter plots coloured by class.
    """

    kind = "class-separation"
    title = "Classes separate in a t-SNE map of the features"
    description = (
        "t-SNE (scikit-learn, perplexity min(perplexity, (N - 1) / 3), fixed seed) of the model's features "
        "(unit-L2 rows of the input of its final linear layer, or of `layer`'s output) to 2-D; value = "
        "leave-one-out k-NN majority-vote accuracy of the class labels in that map. Passes when >= min_accuracy."
    )

    k: int = 5
    min_accuracy: float = 0.6
    perplexity: float = 30.0
    layer: str = ""
    seed: int = 0

    def validate(self) -> None:
        _validate_k(self)
        require_unit(self, "min_accuracy")
        if not (math.isfinite(self.perplexity) and self.perplexity > 0):
            raise CheckConfigError(f"check {self.name!r}: perplexity must be > 0, got {self.perplexity}")

    def run(self, subject, audit_set) -> CheckResult:
        images, labels = audit_set.images(), audit_set.labels()
        n, names = len(audit_set), list(audit_set.class_names)
        metric = "k-NN accuracy in the t-SNE map"
        why = _require_neighbours(self, audit_set, labels)
        if why:
            return _cannot_pass(self, metric, self.min_accuracy, why, k=self.k)
        perplexity = em.effective_perplexity(self.perplexity, n)
        where, feats, why = _embedding(subject, audit_set, images, self.layer)
        if why:
            return _cannot_pass(self, metric, self.min_accuracy, why, features=where, k=self.k)
        tsne = em.tsne_2d(feats, perplexity, self.seed)
        pca, ratio = em.pca_2d(feats)
        correct = em.knn_predict(tsne, labels, self.k) == labels
        accuracy = float(correct.double().mean())
        feat_correct = em.knn_predict(feats, labels, self.k) == labels
        feature_accuracy = float(feat_correct.double().mean())
        pca_accuracy = em.knn_accuracy(pca, labels, self.k)

        rows = []
        for c, cname in enumerate(names):
            mask = labels == c
            if mask.any():
                rows.append({"class": cname, "samples": int(mask.sum()),
                             "tsne_knn_accuracy": float(correct[mask].double().mean()),
                             "feature_knn_accuracy": float(feat_correct[mask].double().mean())})
        result = self.result(
            metric=metric, value=accuracy, threshold=self.min_accuracy, rows=rows,
            columns=["class", "samples", "tsne_knn_accuracy", "feature_knn_accuracy"],
            message=(f"{n} images, k = {self.k}, features = {where}, perplexity {perplexity:.3g}; k-NN accuracy "
                     f"{accuracy:.3f} in the t-SNE map, {pca_accuracy:.3f} in the PCA map, {feature_accuracy:.3f} "
                     f"in the full feature space"),
            details={"features": where, "perplexity": perplexity, "seed": self.seed, "k": self.k,
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
