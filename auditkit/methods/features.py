"""Layer features and the pixel-space transforms used to probe them.

- ``layer_features``: the outputs of named layers for a batch of images,
  computed chunk by chunk (Subject.chunks) under ``torch.no_grad()``.
  Each layer's output is copied, inside its forward hook, straight into one
  preallocated N x ... float tensor on the CPU, so nothing else of the chunk
  is kept (the model may free the activation as soon as its next layer ran),
  and a value that a later in-place op (ReLU(inplace=True)) overwrites is
  recorded as the layer produced it. The hooks are always removed.
- ``translate`` / ``scale`` / ``rotate``: batched N x C x H x W transforms in
  pixel space; the border is filled by reflection and the output keeps the
  input size.
- ``invariance`` / ``invariance_per_sample``: how little a layer's features
  move under a transform, relative to how far apart different images are
  (the layer's mean, or one value per image over the same denominator).
- ``dead_units``: channels whose output is constant (up to rounding) over the images.
- ``rows_all_equal``: whether every image gave the same features, up to rounding.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from auditkit.methods.numerics import constant_rows, require_finite
from auditkit.layers import NAME_LAYERS_HINT
from auditkit.subject import AuditModelError

Transform = Callable[[torch.Tensor, float], torch.Tensor]
OnOutput = Callable[[str, int, torch.Tensor], None]


# -- features -----------------------------------------------------------------


def _sweep(subject, images: torch.Tensor, layers: Sequence[str], on_output: OnOutput,
           input_of: str = "") -> torch.Tensor:
    """Feed `images` through Subject.chunks under no_grad; on each output of a layer call
    on_output(layer, start, output) from inside its forward hook (start = index of the chunk's first image).
    A chunk retried after an out-of-memory calls on_output again for the same rows: it must overwrite
    (or fold idempotently, as a minimum does), never append.
    Returns the model's logits, N x classes float32 on the CPU (they come with the forward for free).

    A layer called twice in one forward reports each call (the latest one last). Every layer must
    give a tensor whose first dimension is the chunk's size. With `input_of`, that layer's first
    positional input, flattened to rows, is reported too, as on_output(_INPUT_KEY, start, input): one row
    per image of the chunk (a layer called twice per forward gives twice the rows: an error). The
    hooks are Subject.forward_hook's, removed when the sweep ends, even when the forward raises.
    """
    layers = list(layers)
    seen: set[str] = set()
    state = {"start": 0, "rows": 0}

    def hook_for(name: str):
        def hook(_module, _inputs, out) -> None:
            if not isinstance(out, torch.Tensor):
                return
            if out.ndim == 0 or out.shape[0] != state["rows"]:
                raise AuditModelError(
                    f"model {subject.name!r}: layer {name!r} output has shape {tuple(out.shape)}; expected the "
                    f"batch ({state['rows']} images) as its first dimension"
                )
            seen.add(name)
            on_output(name, state["start"], out.detach())
        return hook

    inputs_seen: list[torch.Tensor] = []

    def input_hook(_module, inputs, _out) -> None:
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise AuditModelError(f"model {subject.name!r}: layer {input_of!r} was called without a positional "
                                  f"tensor input; pass layer= naming the layer whose output to embed")
        seen.add(_INPUT_KEY)
        x = inputs[0].detach()
        inputs_seen.append(x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1))

    def logits_of(rows: slice) -> torch.Tensor:
        state["start"], state["rows"] = rows.start, rows.stop - rows.start
        seen.clear()
        inputs_seen.clear()
        logits = subject.forward(images[rows]).float().cpu()
        if inputs_seen:
            given = torch.cat(inputs_seen)
            if given.shape[0] != state["rows"]:
                raise AuditModelError(
                    f"model {subject.name!r}: layer {input_of!r} gave {given.shape[0]} input rows for "
                    f"{state['rows']} images (called more than once per image?); pass layer= naming the layer "
                    f"whose output to embed")
            on_output(_INPUT_KEY, rows.start, given)
        missing = [name for name in layers + ([_INPUT_KEY] if input_of else []) if name not in seen]
        missing = [input_of if name == _INPUT_KEY else name for name in missing]
        if missing:
            raise AuditModelError(
                f"model {subject.name!r}: layer(s) {', '.join(map(repr, missing))} produced no tensor output "
                f"in the forward pass; {NAME_LAYERS_HINT}"
            )
        return logits

    with contextlib.ExitStack() as stack, torch.no_grad():
        for name in dict.fromkeys(layers):
            stack.enter_context(subject.forward_hook(name, hook_for(name)))
        if input_of:
            stack.enter_context(subject.forward_hook(input_of, input_hook, raw=True))
        logits = list(subject.chunks(images.shape[0], logits_of))
    return torch.cat(logits) if logits else torch.empty(0, subject.spec.num_classes)


def layer_features(subject, images: torch.Tensor, layers: Sequence[str], *, flatten: bool = True) -> dict[str, torch.Tensor]:
    """Outputs of `layers` for all `images` (pixels in [0, 1]), layer -> N x ... float32 tensor on the CPU.

    With flatten=True each layer's output is N x D (D = product of the other
    dimensions). Images go through Subject.chunks; each output
    is copied inside its forward hook into a tensor allocated once for all N
    images, so the memory kept is the requested features and nothing more
    (peak = one chunk's forward + the returned tensors). The forward hooks
    are removed even when the forward raises.
    """
    return features_and_logits(subject, images, layers, flatten=flatten)[0]


def features_and_logits(subject, images: torch.Tensor, layers: Sequence[str], *,
                        flatten: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(layer_features(...), the logits of the same forward passes, N x classes float32 on the CPU).

    Kept by the Subject (Subject.remembered) for the same images and layers, with the logits as
    Subject.predict's; a new dict each call, holding the kept tensors (do not change them in place)."""
    layers = list(dict.fromkeys(layers))

    def sweep():
        feats, logits = _features_and_logits(subject, images, layers)
        subject.keep(("logits",), images, logits)  # the same forward's logits, as Subject.predict's
        return feats, logits

    feats, logits = subject.remembered(("features", tuple(layers)), images, sweep)
    return {name: v.flatten(1) if flatten and v.ndim > 1 else v for name, v in feats.items()}, logits


def _features_and_logits(subject, images: torch.Tensor, layers: Sequence[str], input_of: str = ""):
    n = images.shape[0]
    out: dict[str, torch.Tensor] = {}

    def store(name: str, start: int, value: torch.Tensor) -> None:
        target = out.get(name)
        if target is None:
            target = out[name] = torch.empty((n, *value.shape[1:]), dtype=torch.float32)
        elif target.shape[1:] != value.shape[1:]:
            raise AuditModelError(
                f"model {subject.name!r}: layer {name!r} output changed shape from {tuple(target.shape[1:])} "
                f"to {tuple(value.shape[1:])} per image between calls; its features cannot be stacked"
            )
        target[start : start + value.shape[0]].copy_(value)

    logits = _sweep(subject, images, layers, store, input_of=input_of)
    feats = {name: out[name] if name in out else torch.empty(0) for name in layers}
    if input_of:
        feats[_INPUT_KEY] = out[_INPUT_KEY]
    return feats, logits


def transient_features(subject, images: torch.Tensor, layers: Sequence[str], *,
                       input_of: str = "") -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """(the outputs of `layers`, N x D each; the logits; the input of layer `input_of`, N x D, or None
    when not asked for), float32 on the CPU, from one sweep and not kept by the Subject: for images made
    for one measurement (a transformed copy of the audit images) that no other check asks for, which would
    only push the audit set's own results out of the Subject's memory budget.

    The input of `input_of` is its first positional argument (embedding.penultimate_features', flattened),
    captured by a forward hook beside the sweep's; a layer called without a tensor input is an
    AuditModelError naming it."""
    layers = list(dict.fromkeys(layers))
    feats, logits = _features_and_logits(subject, images, layers, input_of=input_of)
    inputs = feats.pop(_INPUT_KEY, None) if input_of else None
    return {name: v.flatten(1) if v.ndim > 1 else v for name, v in feats.items()}, logits, inputs


_INPUT_KEY = "\0input"  # where _features_and_logits stores the captured layer input (no layer has this name)


def rows_all_equal(x: torch.Tensor) -> bool:
    """True when the rows of x (N x ...) are all the same up to rounding: every column of the N x D matrix
    is constant by numerics.constant_rows (max - min <= rtol * max |value| over the N images). Fewer than
    2 rows, or rows with no values, are trivially equal."""
    flat = x.reshape(x.shape[0], -1)
    return flat.shape[0] < 2 or bool(constant_rows(flat.T).all())


# -- transforms ---------------------------------------------------------------


def _shift_axis(images: torch.Tensor, d: int, axis: int) -> torch.Tensor:
    """Move the content by d pixels along the last (axis=-1) or second-to-last (axis=-2) dimension."""
    if d == 0:
        return images
    size = images.shape[axis]
    if abs(d) >= size:
        raise ValueError(f"translate: a shift of {d} px needs |shift| < {size} (the image size along that axis)")
    if axis == -1:
        pad = (d, 0, 0, 0) if d > 0 else (0, -d, 0, 0)
    else:
        pad = (0, 0, d, 0) if d > 0 else (0, 0, 0, -d)
    padded = F.pad(images, pad, mode="reflect")
    if d > 0:
        return padded[..., :size] if axis == -1 else padded[..., :size, :]
    return padded[..., -d:] if axis == -1 else padded[..., -d:, :]


def translate(images: torch.Tensor, dx: float, dy: float = 0) -> torch.Tensor:
    """Shift N x C x H x W images by dx pixels right and dy pixels down (rounded to whole pixels).

    out[..., y, x] = in[..., y - dy, x - dx]; the uncovered border is filled by
    reflection about the edge pixel (F.pad mode "reflect": in[-k] = in[k]),
    so |dx| < W and |dy| < H are required. A shift of 0 returns a copy.
    """
    dx_i, dy_i = int(round(dx)), int(round(dy))
    out = _shift_axis(_shift_axis(images, dx_i, -1), dy_i, -2)
    return out.clone() if out is images else out


def _affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sample images at theta @ (u, v, 1) (normalised output coords), bilinear, reflection padding.

    align_corners=False: -1 and 1 are the outer edges of the border pixels, so
    the centre is the image centre and a 90 degree turn of a square image maps
    pixel centres onto pixel centres.
    """
    n = images.shape[0]
    theta = theta.to(images.device, torch.float32).unsqueeze(0).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def scale(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom N x C x H x W images by `factor` about the centre (> 1 enlarges), same output size.

    Bilinear sampling; the border that a factor < 1 uncovers is filled by
    reflection. factor 1 returns a copy.
    """
    if not factor > 0:
        raise ValueError(f"scale: factor must be > 0, got {factor}")
    if factor == 1:
        return images.clone()
    inv = 1.0 / float(factor)
    theta = torch.tensor([[inv, 0.0, 0.0], [0.0, inv, 0.0]], dtype=torch.float64)
    return _affine(images, theta)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate N x C x H x W images by `degrees` counter-clockwise as displayed (rows downwards), about the centre.

    Positive angles turn the same way as torch.rot90(x, 1, dims=(-2, -1)).
    Bilinear sampling with align_corners=False; corners that leave the image
    are filled by reflection. 0 degrees returns a copy.
    """
    if degrees == 0:
        return images.clone()
    h, w = images.shape[-2:]
    rad = math.radians(float(degrees))
    c, s = math.cos(rad), math.sin(rad)
    # output pixel (x, y) (centred, y down) samples input (c x - s y, s x + c y); in normalised coords
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=torch.float64)
    return _affine(images, theta)


TRANSFORMS: dict[str, Transform] = {
    "translate": lambda images, m: translate(images, m, 0),
    "scale": scale,
    "rotate": rotate,
}


def _resolve(transform: str | Transform) -> Transform:
    if callable(transform):
        return transform
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; expected one of {', '.join(TRANSFORMS)} or a callable")
    return TRANSFORMS[transform]


# -- invariance ---------------------------------------------------------------


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """mean_{i != j} ||f_i - f_j|| (Euclidean, float64) over the rows of N x ... features, N >= 2:
    the denominator of the invariance, computed once per layer and reused for every transform."""
    f = features.double().flatten(1)
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"invariance needs at least 2 images, got {n}")
    pair = torch.cdist(f, f)
    return float(pair[~torch.eye(n, dtype=torch.bool)].mean())


def invariance_per_sample(base: torch.Tensor, moved: torch.Tensor, spread: float | None = None) -> torch.Tensor:
    """N float64: inv(i) = 1 - d(base_i, moved_i) / mean_{j != k} d(base_j, base_k), d Euclidean on N x D features.

    The denominator is the layer's spread over all ordered pairs of different images (mean_pairwise_distance,
    passed as `spread` to reuse it), the same for every sample, so mean_i inv(i) is invariance_from_features.
    A layer whose output is the same for every image up to rounding (rows_all_equal) cannot be measured:
    every entry is NaN, never a perfect 1 nor a ratio of rounding noise.
    """
    n = base.shape[0]
    if n < 2:
        raise ValueError(f"invariance needs at least 2 images, got {n}")
    if moved.shape[0] != n:
        raise ValueError(f"invariance: {moved.shape[0]} transformed rows for {n} images")
    den = mean_pairwise_distance(base) if spread is None else spread
    if not den > 0 or rows_all_equal(base):
        return torch.full((n,), math.nan, dtype=torch.float64)
    num = (base.flatten(1).double() - moved.flatten(1).double()).norm(dim=1)
    return 1.0 - num / den


def invariance_from_features(base: torch.Tensor, moved: torch.Tensor, spread: float | None = None) -> float:
    """1 - mean_i d(base_i, moved_i) / mean_{i != j} d(base_i, base_j), d Euclidean on N x D features:
    the mean of invariance_per_sample (NaN for a layer that is the same for every image up to rounding).

    `spread` may hold mean_pairwise_distance(base), computed once for many `moved`.
    """
    return float(invariance_per_sample(base, moved, spread).mean())


def invariance(
    subject,
    images: torch.Tensor,
    layers: Sequence[str],
    transform: str | Transform,
    magnitude: float,
    *,
    base: dict[str, torch.Tensor] | None = None,
    spread: dict[str, float] | None = None,
) -> dict[str, float]:
    """Invariance of each layer's features to `transform` at `magnitude`, layer -> float.

        invariance_l(T) = 1 - mean_i d(f_l(x_i), f_l(T x_i)) / mean_{i != j} d(f_l(x_i), f_l(x_j))

    with f_l the flattened output of layer l, d the Euclidean distance and the
    denominator the mean over all ordered pairs of different images (the
    diagonal of the pairwise distance matrix is excluded). 1 means the
    transform does not move the features at all; 0 means it moves them as far
    as a different image would; it can be negative.

    `transform` is "translate" (magnitude = horizontal shift in pixels),
    "scale" (magnitude = zoom factor), "rotate" (magnitude = degrees) or a
    callable (images, magnitude) -> images. `base` may hold the features of
    the untransformed images (layer_features(..., flatten=True)) and `spread`
    their mean_pairwise_distance per layer, to reuse them across calls.
    """
    fn = _resolve(transform)
    if base is None:
        base = layer_features(subject, images, layers)
    moved = layer_features(subject, fn(images, magnitude), layers)
    spread = spread or {}
    return {name: invariance_from_features(base[name], moved[name], spread.get(name)) for name in layers}


# -- dead units ---------------------------------------------------------------


def dead_units(subject, images: torch.Tensor, layers: Sequence[str],
               sample_ids: Sequence[object] | None = None) -> dict[str, torch.Tensor]:
    """layer -> C bool tensor: channel c is dead when its output is constant, up to rounding, over every
    image, position and call of the layer: numerics.constant_rows (the project's one "constant up to
    rounding" rule) of the channel's values, max - min <= rtol * max(|max|, |min|).

    A dead channel tells no image and no position from another, whatever the activation. After a ReLU the
    rule is "never positive" (all zeros; a channel constant at a positive value is dead too). After swish /
    SiLU / GELU, or before any activation, a channel negative everywhere that still varies carries
    information and is not dead: "max <= 0" would call it dead.

    The channel is dimension 1 of the layer's output (N x C x ... ; for an N x C output each column is a
    channel). Each hook folds its output into a running per-channel minimum and maximum, kept in the
    layer's dtype (so the rounding tolerance is that dtype's), so no features are stored. An output
    holding NaN or inf raises NonFiniteError naming the layer and the images (by `sample_ids` when given).
    """
    if images.shape[0] == 0:
        raise ValueError("dead_units needs at least one image, got an empty batch")
    low: dict[str, torch.Tensor] = {}
    high: dict[str, torch.Tensor] = {}

    def fold(name: str, start: int, value: torch.Tensor) -> None:
        if value.ndim < 2:
            raise AuditModelError(
                f"model {subject.name!r}: layer {name!r} output has shape {tuple(value.shape)}; "
                "dead_units needs N x C (x ...)"
            )
        per_channel = value.transpose(0, 1).flatten(1)
        lo, hi = per_channel.amin(dim=1).cpu(), per_channel.amax(dim=1).cpu()
        if value.is_floating_point() and not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            ids = list(sample_ids) if sample_ids is not None else list(range(images.shape[0]))
            require_finite(value, "layer output", method="dead_units", layer=name,
                           sample_ids=ids[start:start + value.shape[0]])
        low[name] = lo if name not in low else torch.minimum(low[name], lo)
        high[name] = hi if name not in high else torch.maximum(high[name], hi)

    _sweep(subject, images, layers, fold)
    return {name: constant_rows(torch.stack([low[name], high[name]], dim=1)) for name in layers}
