"""Embeddings of the audit images: penultimate features, nearest neighbours, PCA and t-SNE maps.

- ``penultimate_layer`` / ``penultimate_features``: the input of the model's
  final ``nn.Linear`` (the one called last in a forward pass), N x D on the CPU.
- ``features``: a named layer's flattened output, or the penultimate features
  when no layer is named.
- ``unit_rows``: rows scaled to unit L2 norm. Euclidean distances between unit
  rows are monotone in cosine similarity, ||a - b||^2 = 2 - 2 cos(a, b), so
  neighbours do not depend on an image's overall brightness or feature scale.
  The checks apply it to pixels and features alike before any distance.
- ``knn_indices`` / ``neighbour_agreement`` / ``knn_agreement`` /
  ``knn_vote`` / ``knn_predict`` / ``knn_accuracy``: leave-one-out k nearest neighbours by
  Euclidean distance of the rows given (a point is never its own neighbour;
  equal distances are ordered by the lower index).
- ``pca_2d``: the projection of the centred rows on their first two principal axes.
- ``tsne_2d``: scikit-learn's t-SNE, deterministic (fixed random_state, one thread).

k-NN and t-SNE refuse non-finite rows (numerics.require_finite), and t-SNE refuses rows that are all
the same (features.rows_all_equal): scikit-learn's Barnes-Hut t-SNE segfaults on identical points.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from auditkit.methods.features import layer_features, rows_all_equal, transient_features
from auditkit.methods.numerics import require_finite
from auditkit.subject import AuditModelError

__all__ = [
    "effective_perplexity",
    "features",
    "knn_accuracy",
    "knn_agreement",
    "knn_indices",
    "knn_predict",
    "knn_vote",
    "neighbour_agreement",
    "pca_2d",
    "penultimate_features",
    "penultimate_layer",
    "tsne_2d",
    "unit_rows",
]

_QUERY_CHUNK = 1024  # queries per block of the pairwise distance matrix


# -- features -----------------------------------------------------------------


class NoFinalLinear(AuditModelError):
    """The model has no nn.Linear that runs in its forward, so it has no penultimate features."""


def penultimate_layer(subject, probe: torch.Tensor) -> str:
    """Name of the model's final nn.Linear: the nn.Linear called last in a forward pass of `probe`.

    One forward of the first probe image, with a hook on every nn.Linear that
    records the call order (all hooks removed, even on error). A model without
    an nn.Linear, or whose nn.Linear is never called, is an AuditModelError that
    asks for `layer=`.
    """
    subject.require_hooks("capturing the input of its final nn.Linear")
    linears = [name for name, m in subject.module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NoFinalLinear(
            f"model {subject.name!r} has no nn.Linear, so its penultimate features (the input of the final "
            f"nn.Linear) are not defined; pass layer= naming the layer whose output to embed"
        )
    called: list[str] = []
    with contextlib.ExitStack() as stack, torch.no_grad():
        for name in linears:
            stack.enter_context(subject.forward_hook(name, lambda _m, _i, _o, name=name: called.append(name), raw=True))
        subject.forward(probe[:1])
    if not called:
        raise NoFinalLinear(
            f"model {subject.name!r}: none of its nn.Linear layers ({', '.join(linears)}) ran in the forward pass; "
            f"pass layer= naming the layer whose output to embed"
        )
    return called[-1]


def penultimate_features(subject, images: torch.Tensor, linear: str = "") -> torch.Tensor:
    """The input of the final nn.Linear (see penultimate_layer) for all images: N x D float32 on the CPU.

    `linear` may name that layer when it is already known (saves the probe forward). Kept by the Subject
    for the same images (Subject.remembered): do not change the result in place.
    Images (pixels in [0, 1]) go through Subject.chunks under no_grad; the input is captured by a forward hook of the Subject, which is
    removed even when the forward raises. Inputs with more than two dimensions
    are flattened to N x D.
    """
    if images.shape[0] == 0:
        raise ValueError("penultimate_features: no images given")
    layer = linear or penultimate_layer(subject, images)
    return subject.remembered(("penultimate", layer), images, lambda: _inputs_of_layer(subject, images, layer))


def _inputs_of_layer(subject, images: torch.Tensor, layer: str) -> torch.Tensor:
    """The flattened first positional input of `layer` for every image: features.transient_features' capture,
    which refuses a layer called without a tensor input, more than once per forward, or not at all."""
    return transient_features(subject, images, [], input_of=layer)[2]


def features(subject, images: torch.Tensor, layer: str = "") -> torch.Tensor:
    """N x D features: the flattened output of `layer`, or the penultimate features when layer is "".

    An unknown layer name is an AuditModelError that names it and lists the valid ones.
    """
    if not layer:
        return penultimate_features(subject, images)
    subject.layer(layer)  # validates the name before any forward
    return layer_features(subject, images, [layer])[layer]


def pooled_features(subject, images: torch.Tensor, layer: str) -> torch.Tensor:
    """N x C: the output of `layer` as its grid (Subject.layer_view: tokens without the class token), averaged
    over the grid's positions; an output that is no grid is flattened as it is."""
    maps = layer_features(subject, images, [layer], flatten=False)[layer]
    return maps.mean(dim=(2, 3)) if maps.ndim == 4 else maps.flatten(1)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of x (flattened to N x D) divided by their L2 norm; an all-zero row stays zero."""
    return F.normalize(x.flatten(1).float(), p=2.0, dim=1, eps=1e-12)


# -- nearest neighbours -------------------------------------------------------


def _check_knn(x: torch.Tensor, k: int, labels: torch.Tensor | None = None) -> None:
    if x.ndim != 2:
        raise ValueError(f"expected an N x D matrix of features, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if k < 1 or k > n - 1:
        raise ValueError(f"k = {k} nearest neighbours need 1 <= k <= N - 1 = {n - 1} (N = {n} points, leave-one-out)")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({n},) (one per row of the features)")
    require_finite(x, "k-NN input", method="k nearest neighbours")


def knn_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """N x k indices of each row's k nearest other rows by Euclidean distance, nearest first.

    Leave-one-out: row i is never its own neighbour (a duplicate of it, at
    distance 0, is). Equal distances are ordered by the lower index (stable
    sort). Distances are computed in blocks of queries (torch.cdist), so
    memory grows as block x N, not N x N.
    """
    _check_knn(x, k)
    x = x.float().cpu()  # the indices address CPU label tensors
    out = []
    for start in range(0, x.shape[0], _QUERY_CHUNK):
        d = torch.cdist(x[start : start + _QUERY_CHUNK], x)
        rows = torch.arange(d.shape[0])
        d[rows, rows + start] = float("inf")
        out.append(d.argsort(dim=1, stable=True)[:, :k])
    return torch.cat(out)


def neighbour_agreement(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """N float64: share of each row's k nearest other rows (knn_indices) that carry the row's label."""
    labels = torch.as_tensor(labels).long().cpu()
    _check_knn(x, k, labels)
    return (labels[knn_indices(x, k)] == labels[:, None]).double().mean(dim=1)


def knn_agreement(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """(1 / N) sum_i (1 / k) #{j in kNN(i) : y_j = y_i}, leave-one-out, Euclidean distance on the rows given."""
    return float(neighbour_agreement(x, labels, k).mean())


def knn_vote(votes: torch.Tensor, classes: int) -> torch.Tensor:
    """The majority label of each row of `votes` (... x k labels, nearest first): ... int64.

    Ties between labels with the same count go to the label whose nearest member is nearer (the earlier
    one in the row), so the vote is deterministic: score_c = count_c * (k + 1) + (k - first rank of c),
    which orders by count first and by first rank among equal counts. Leading dimensions are kept, so
    a batch of relabellings (B x N x k) is voted at once.
    """
    votes = torch.as_tensor(votes).long()
    k = votes.shape[-1]
    hit = F.one_hot(votes, classes)  # ... x k x C
    count = hit.sum(dim=-2)
    rank = torch.arange(k).view(k, 1).expand_as(hit)
    first = torch.where(hit.bool(), rank, torch.full_like(rank, k)).amin(dim=-2)  # k where absent
    return (count * (k + 1) + (k - first)).argmax(dim=-1)


def knn_predict(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """N int64: the majority label among each row's k nearest other rows (leave-one-out), by knn_vote
    (ties between labels with the same count go to the label whose nearest member is nearer)."""
    labels = torch.as_tensor(labels).long().cpu()
    _check_knn(x, k, labels)
    return knn_vote(labels[knn_indices(x, k)], int(labels.max()) + 1)


def knn_accuracy(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose leave-one-out k-NN majority vote (knn_predict) equals their own label."""
    labels = torch.as_tensor(labels).long().cpu()
    return float((knn_predict(x, labels, k) == labels).double().mean())


# -- 2-D maps -----------------------------------------------------------------


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x 2 coordinates, explained variance ratio of the 2 axes), float64 on the CPU.

    With Xc = X - mean(X) and Xc = U S V^T (SVD), the coordinates are
    Xc V[:, :2] = U[:, :2] S[:2] and the ratios S[:2]^2 / sum(S^2). The sign of
    each axis is fixed so that its largest-magnitude loading in V is positive
    (as scikit-learn's svd_flip). With fewer than 2 non-trivial axes (N < 3 or
    D < 2) the missing coordinates are 0.
    """
    x = torch.as_tensor(x).detach().cpu().double().flatten(1)
    n = x.shape[0]
    if n < 1:
        raise ValueError("pca_2d: no points given")
    xc = x - x.mean(dim=0, keepdim=True)
    _, s, vt = torch.linalg.svd(xc, full_matrices=False)
    m = min(2, s.shape[0])
    vt = vt[:m]
    sign = torch.sign(vt.gather(1, vt.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    sign[sign == 0] = 1.0
    coords = torch.zeros(n, 2, dtype=torch.float64)
    coords[:, :m] = xc @ (vt * sign[:, None]).T
    total = (s * s).sum()
    ratio = torch.zeros(2, dtype=torch.float64)
    if total > 0:
        ratio[:m] = s[:m] ** 2 / total
    return coords, ratio


def effective_perplexity(perplexity: float, n: int) -> float:
    """min(perplexity, (n - 1) / 3): t-SNE's perplexity kept below n / 3; n < 4 points is a ValueError."""
    if not perplexity > 0:
        raise ValueError(f"t-SNE perplexity must be > 0, got {perplexity}")
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points (perplexity < n / 3 and >= 1), got {n}")
    return float(min(perplexity, (n - 1) / 3.0))


def tsne_2d(x: torch.Tensor, perplexity: float = 30.0, seed: int = 0) -> torch.Tensor:
    """N x 2 t-SNE map (float64) of the rows of x: sklearn.manifold.TSNE, deterministic.

    TSNE(n_components=2, perplexity=effective_perplexity(perplexity, N),
    init="pca", random_state=seed) on float32 rows, run with one OpenMP thread
    (threadpoolctl): Barnes-Hut's result then does not depend on the thread
    count, and it does not stall on a busy machine. scikit-learn is imported
    here, lazily; its absence is an ImportError that says how to install it. Non-finite rows are a
    NonFiniteError, rows that are all the same (rows_all_equal) a ValueError, both before scikit-learn runs.
    """
    try:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "t-SNE maps need scikit-learn (sklearn.manifold.TSNE); install it with `pip install scikit-learn`"
        ) from exc
    x = torch.as_tensor(x).detach().cpu().float().flatten(1)
    require_finite(x, "t-SNE input", method="t-SNE")
    if rows_all_equal(x):
        raise ValueError(f"t-SNE of {x.shape[0]} identical points (the same up to rounding) is undefined; "
                         f"scikit-learn's t-SNE would crash on them")
    data = x.numpy()
    perp = effective_perplexity(perplexity, data.shape[0])
    with threadpool_limits(limits=1):
        emb = TSNE(n_components=2, perplexity=perp, init="pca", random_state=int(seed)).fit_transform(data)
    return torch.from_numpy(emb).double()
