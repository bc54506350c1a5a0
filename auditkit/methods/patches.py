"""Maximally activating patches (Zeiler & Fergus 2014; CS231n "visualizing what ConvNets learn").

For a channel c of a layer, the units with the largest activations over the
audit set, the input patch each one sees (its receptive field) and the
DeconvNet projection of that single activation back to the pixels.

- ``receptive_field``: the receptive field of a layer, MEASURED on the model
  (not read off a table of kernels): the bounding box of the support of
  d unit / d input on a *structural copy* of the model (see
  ``structural_copy``), for two neighbouring units at the centre of the map.
  Gives size (h, w), stride (jump between neighbouring units) and start
  (top-left of unit (0, 0), negative where padding reaches outside), so that

      box(i, j) = (x0, y0, x1, y1) = (start_x + j * stride_x, start_y + i * stride_y, x0 + w, y0 + h)

  clipped to the image. On a plain stack it equals the closed form
  RF = 1 + sum_i (k_i - 1) * prod_{j<i} s_j (k_i the effective, dilated kernel
  d_i (k_i - 1) + 1), stride = prod_i s_i, start = -sum_i p_i * prod_{j<i} s_j.
- ``top_activations``: per channel the `top` largest activations over
  (image, y, x), from one forward pass of the audit set (in chunks).
- ``deconv_projections``: d unit / d pixels with every nn.ReLU's backward
  replaced by g_in = relu(g_out) (DeconvNet rule; max-pool backward routes to
  the arg-max, i.e. Zeiler & Fergus' "switches"), batched over the units.
- ``crop_units``: the receptive-field box of each unit cut out of N images.

The user's module is never changed: the receptive field is measured on a deep
copy, and everything else uses the Subject's hook helpers.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from auditkit.layers import NAME_LAYERS_HINT, patch_size, view_of
from auditkit.methods.gradients import relu_backward_override
from auditkit.methods.numerics import require_finite
from auditkit.methods.optimise import forward_to
from auditkit.subject import AuditModelError, copy_without_hooks

log = logging.getLogger("auditkit")

__all__ = [
    "ReceptiveField",
    "TopUnits",
    "crop_units",
    "deconv_projections",
    "display_projection",
    "module_receptive_field",
    "receptive_field",
    "structural_copy",
    "top_activations",
]

MAX_CANVAS = 2048  # pixels: the largest probe input tried when measuring a receptive field
#: The probe input grows to at most this many times the image side: a field beyond it shows the whole image
#: in every patch, so each unit's own grid cell is shown instead (as for attention).
CANVAS_PER_IMAGE = 8

# Element-wise activations: replaced by Identity in the structural copy (some, like ReLU6, Hardswish or
# Hardtanh, have zero slope on part of the positive axis, which would hide part of the receptive field).
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Dropout, nn.Dropout2d,
)
# Normalisations: replaced by Identity (a centring norm makes activations negative; its scale can be 0).
_NORMS = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
    nn.LocalResponseNorm,
)


# -- receptive field --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceptiveField:
    """Where the units of a layer look in the input: all pairs are (y, x), in input pixels.

    box(i, j) = (start_x + j * stride_x, start_y + i * stride_y, ... + width, ... + height),
    x1 / y1 exclusive; `size` is the unclipped extent (it can exceed the image).
    """

    layer: str
    size: tuple[int, int]  # (height, width)
    stride: tuple[int, int]  # (y, x) jump between neighbouring units
    start: tuple[int, int]  # (y, x) of unit (0, 0)'s top-left corner; negative where padding reaches out
    canvas: tuple[int, int]  # (height, width) of the probe input it was measured on
    token_cell: bool = False  # True: attention makes the field global; the box is the unit's own grid cell

    def unclipped_boxes(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """N x 4 int64 (x0, y0, x1, y1) of units (i, j), not clipped (may reach outside the image)."""
        i = torch.as_tensor(i, dtype=torch.int64).reshape(-1)
        j = torch.as_tensor(j, dtype=torch.int64).reshape(-1)
        y0 = self.start[0] + i * self.stride[0]
        x0 = self.start[1] + j * self.stride[1]
        return torch.stack([x0, y0, x0 + self.size[1], y0 + self.size[0]], dim=1)

    def boxes(self, i: torch.Tensor, j: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """N x 4 int64 (x0, y0, x1, y1) of units (i, j), clipped to an image of image_size = (H, W)."""
        h, w = image_size
        b = self.unclipped_boxes(i, j)
        return torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)

    def box(self, i: int, j: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of unit (i, j) clipped to image_size = (H, W)."""
        x0, y0, x1, y1 = self.boxes(torch.tensor([i]), torch.tensor([j]), image_size)[0].tolist()
        return x0, y0, x1, y1


class _WindowMaxPool(torch.autograd.Function):
    """max_pool2d forward; backward sends the gradient to EVERY element of each window (sum-pool backward),
    so the gradient's support is the pool's full window instead of its arg-max."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:  # type: ignore[override]
        ctx.pool, ctx.in_shape = pool, x.shape
        return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pool = ctx.pool
        pair = nn.modules.utils._pair
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (pair(pool.kernel_size), pair(pool.stride or pool.kernel_size),
                                                  pair(pool.padding), pair(pool.dilation))
        n, c, oh, ow = grad.shape
        # window of output o starts at o * s in padded coordinates: the transposed sum-pool (fold adds the
        # overlapping windows), then unpad
        cols = grad.reshape(n, c, 1, oh * ow).expand(n, c, kh * kw, oh * ow).reshape(n, c * kh * kw, oh * ow)
        size = ((oh - 1) * sh + dh * (kh - 1) + 1, (ow - 1) * sw + dw * (kw - 1) + 1)
        full = F.fold(cols, size, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
        h, w = ctx.in_shape[-2:]
        full = full[..., ph : ph + h, pw : pw + w]
        full = F.pad(full, (0, w - full.shape[-1], 0, h - full.shape[-2]))
        return full, None


class _WindowMaxPoolModule(nn.Module):
    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WindowMaxPool.apply(x, self.pool)


def _replacement(sub: nn.Module) -> nn.Module | None:
    if isinstance(sub, (*_ACTIVATIONS, *_NORMS)):
        return nn.Identity()
    if isinstance(sub, nn.MaxPool2d) and not sub.return_indices:
        return _WindowMaxPoolModule(sub)
    if isinstance(sub, nn.AdaptiveMaxPool2d) and not sub.return_indices:
        return nn.AdaptiveAvgPool2d(sub.output_size)
    return None


def structural_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` in which d unit / d input is non-zero exactly on the unit's receptive field.

    Why a copy and not the real model: on the real model the gradient's support is only a SUBSET of the
    receptive field - a ReLU that is off on an input zeroes every path through it, a max-pool sends the
    gradient to one arg-max per window, a zero weight (or cancelling signs) hides a tap. A union over a few
    random inputs shrinks that error but cannot remove it. In the copy:

    - every weight (ndim >= 2) is 1 / weight.shape[1] (> 0; 1 / fan-in per kernel tap, so values stay
      moderate), every other parameter is 1 (biases > 0, layer scales != 0);
    - nn activations (and dropout) and normalisation layers become Identity;
    - nn.MaxPool2d keeps its forward but its backward covers the whole window; AdaptiveMaxPool2d becomes
      AdaptiveAvgPool2d.

    With a positive input every activation is then positive (so functional F.relu calls pass everything
    too) and d unit / d x_p is a sum over paths of products of positive weights: no cancellation, non-zero
    iff some path joins pixel p to the unit. Runs in float64 so long products do not underflow. Not
    neutralised: functional max-pooling (F.max_pool2d in a forward), gating by data-dependent masks.
    """
    clone = copy_without_hooks(module).eval()
    for name, sub in list(clone.named_modules(remove_duplicate=False)):
        new = _replacement(sub) if name else None
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent_name) if parent_name else clone, child, new)
    with torch.no_grad():
        for p in clone.parameters():
            p.requires_grad_(False)
            p.fill_(1.0 / p.shape[1] if p.ndim >= 2 and p.shape[1] > 0 else 1.0)
    return clone.double()


class _Reached(Exception):
    """Raised by a forward hook to stop the forward pass at a layer, carrying its output."""

    def __init__(self, output: object):
        super().__init__("layer reached")
        self.output = output


def _stop_hook(_m: nn.Module, _inp: tuple, out: object) -> None:
    raise _Reached(out)


def _map_output(out: object, layer: str, size: tuple[int, int] | None = None,
                patch: int | None = None) -> torch.Tensor:
    """The layer's output as N x C x H x W; with the input `size`, tokens or channels-last are read as their
    grid first (layers.view_of; the Subject's hooks give outputs already read so)."""
    grid = out if size is None else view_of(out, size, patch).grid(out)
    if not isinstance(grid, torch.Tensor) or grid.ndim != 4:
        shape = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(out).__name__
        raise ValueError(f"layer {layer!r} gives {shape}; patches need a N x C x H x W feature map (or tokens "
                         f"of a grid); {NAME_LAYERS_HINT}")
    return grid


def _run_to(module: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The first output of `layer` when `module` runs on x, as a grid; the rest of the forward is skipped."""
    handle = module.get_submodule(layer).register_forward_hook(_stop_hook)
    try:
        module(x)
    except _Reached as reached:
        return _map_output(reached.output, layer, tuple(x.shape[-2:]), patch_size(module))
    finally:
        handle.remove()
    raise ValueError(f"layer {layer!r} was not called in the forward pass")


def _support_boxes(probe: nn.Module, layer: str, in_channels: int, size: tuple[int, int], device: torch.device):
    """Bounding boxes (2 x 4: y0, x0, y1, x1) of the input-gradient support of units (ci, cj) and
    (ci - 1, cj - 1) at the centre of the layer's map, and the map size; boxes None if the map is < 2 x 2."""
    x = torch.ones(2, in_channels, *size, dtype=torch.float64, device=device, requires_grad=True)
    with torch.enable_grad():
        out = _run_to(probe, layer, x)
        mh, mw = out.shape[-2:]
        if mh < 2 or mw < 2:
            return None, (mh, mw), None
        ci, cj = mh // 2, mw // 2
        objective = out[0, :, ci, cj].sum() + out[1, :, ci - 1, cj - 1].sum()
        (grad,) = torch.autograd.grad(objective, x)
    support = grad.ne(0).any(dim=1)  # 2 x H x W
    rows, cols = support.any(dim=2), support.any(dim=1)
    if not bool(rows.any(dim=1).all()):
        raise ValueError(f"layer {layer!r}: its units do not depend on the input pixels")
    ar_h = torch.arange(size[0], device=device)
    ar_w = torch.arange(size[1], device=device)
    y0 = torch.where(rows, ar_h, size[0]).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, size[1]).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    return torch.stack([y0, x0, y1, x1], 1).cpu(), (mh, mw), (ci, cj)


def module_receptive_field(
    module: nn.Module,
    layer: str,
    in_channels: int,
    image_size: tuple[int, int],
    *,
    device: torch.device | str = "cpu",
    max_canvas: int = MAX_CANVAS,
) -> ReceptiveField:
    """The receptive field of `layer` of `module`, measured on structural_copy(module).

    Probe input: ones, 2 x in_channels x canvas, canvas = image_size first, doubled while either unit's
    support touches the canvas border (then it may be clipped) or the map is smaller than 2 x 2, up to
    max_canvas pixels; only the part of the forward up to `layer` runs, so heads that need a fixed input
    size do not matter. size = support box of unit (ci, cj); stride = its offset from unit (ci-1, cj-1);
    start = box(ci, cj) - (ci, cj) * stride. A map that does not grow with the input (a global layer) or a
    field larger than max_canvas raises ValueError naming the layer.

    In a model that holds a self-attention (saliency.holds_attention), a unit whose support reaches the
    border at image_size is global (attention mixes every token with every other), and such models often
    refuse other input sizes (a position embedding of fixed size). Its field is then the unit's own cell of
    the layer's grid: stride = size = image_size // map size, start 0, token_cell True. So is the field of
    any model whose support still reaches the border at max_canvas, or at CANVAS_PER_IMAGE times the image
    (a squeeze-excitation's global pooling, as in MobileNetV3 and EfficientNet, makes every unit depend on
    every pixel; a field that many times the image would show the whole image as each patch anyway).
    """
    from auditkit.methods.saliency import holds_attention

    if layer not in dict(module.named_modules()):
        raise ValueError(f"no layer {layer!r} in the module")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        device = torch.device("cpu")  # float64 is needed
    probe = structural_copy(module).to(device)
    h, w = int(image_size[0]), int(image_size[1])
    previous_map = None
    attention = holds_attention(module)
    while True:
        boxes, map_size, centre = _support_boxes(probe, layer, in_channels, (h, w), device)
        if boxes is not None:
            y0, x0, y1, x1 = boxes.T.tolist()
            if min(y0) > 0 and min(x0) > 0 and max(y1) < h and max(x1) < w:
                (ci, cj), stride = centre, (y0[0] - y0[1], x0[0] - x0[1])
                return ReceptiveField(layer=layer, size=(y1[0] - y0[0], x1[0] - x0[0]), stride=stride,
                                      start=(y0[0] - ci * stride[0], x0[0] - cj * stride[1]), canvas=(h, w))
        if previous_map is None:
            cell = (max(1, h // map_size[0]), max(1, w // map_size[1]))
            own_cell = ReceptiveField(layer=layer, size=cell, stride=cell, start=(0, 0), canvas=(h, w),
                                      token_cell=True)
            if attention:
                return own_cell
        if previous_map is not None and map_size == previous_map:
            raise ValueError(f"layer {layer!r}: its map stays {map_size[0]} x {map_size[1]} as the input grows; "
                             "a global layer has no local receptive field")
        if 2 * max(h, w) > min(max_canvas, CANVAS_PER_IMAGE * max(image_size)):
            # the field is global (a squeeze-excitation's global pooling gates every unit by the whole image)
            # or beyond what max_canvas measures: the unit's own cell, as for attention
            log.info("auditkit: layer %r: the receptive field still reaches the border of a %d x %d probe; "
                     "showing each unit's own cell of the grid", layer, h, w)
            return own_cell
        previous_map, h, w = map_size, 2 * h, 2 * w


def receptive_field(subject, layer: str, image_size: tuple[int, int] | None = None,
                    *, max_canvas: int = MAX_CANVAS) -> ReceptiveField:
    """module_receptive_field for a Subject's layer; image_size defaults to spec.input_size (H, W)."""
    subject.layer(layer)  # unknown names list the valid ones
    size = tuple(image_size) if image_size is not None else tuple(subject.spec.input_size)
    return module_receptive_field(subject.module, layer, len(subject.spec.mean), size,
                                  device=subject.device, max_canvas=max_canvas)


# -- top activations --------------------------------------------------------------------------------


@dataclass
class TopUnits:
    """The `top` largest activations of every channel of one layer over the images: C x k tensors
    sorted by value, descending (k = min(top, candidates)); image indexes the images given, (y, x) the map."""

    layer: str
    values: torch.Tensor  # C x k float32
    image: torch.Tensor  # C x k int64
    y: torch.Tensor  # C x k int64
    x: torch.Tensor  # C x k int64
    map_size: tuple[int, int]
    distinct_images: bool

    @property
    def channels(self) -> int:
        return int(self.values.shape[0])

    def peaks(self) -> torch.Tensor:
        """Per channel its largest activation over all images and positions (C floats)."""
        return self.values[:, 0]


def _candidates(out: torch.Tensor, first: int, top: int, distinct: bool):
    """Per channel (C x m): the chunk's candidate values, image indices and flat positions."""
    n, c = out.shape[:2]
    flat = out.detach().float().flatten(2)  # n x C x HW
    if distinct:  # each image's best position (first maximum on ties)
        values, pos = flat.max(dim=2)
        image = torch.arange(first, first + n, device=out.device).view(n, 1).expand(n, c)
        return values.T, image.T, pos.T
    per_channel = flat.transpose(0, 1).reshape(c, -1)
    k = min(top, per_channel.shape[1])
    values, idx = per_channel.sort(dim=1, descending=True, stable=True)  # topk's tie order is unspecified
    values, idx = values[:, :k], idx[:, :k]
    hw = flat.shape[2]
    return values, first + idx // hw, idx % hw


class _RunningTop:
    """The running top-k candidates per layer, updated by forward hooks chunk after chunk."""

    def __init__(self, top: int, distinct: bool, sample_ids: Sequence[object] | None = None):
        self.top, self.distinct, self.sample_ids = top, distinct, sample_ids
        self.first, self.seen = 0, set()  # index of the chunk's first image; layers seen in this chunk
        self.pending: dict[str, tuple[torch.Tensor, ...]] = {}  # this chunk's candidates, merged by commit()
        self.state: dict[str, tuple[torch.Tensor, ...]] = {}  # layer -> (values, image, flat position), C x k
        self.shapes: dict[str, tuple[int, int]] = {}

    def hook(self, name: str):
        def reduce(_m: nn.Module, _inp: tuple, out: object) -> None:
            if name in self.seen:  # a module called twice: keep its first output, as _run_to does
                return
            self.seen.add(name)
            out = _map_output(out, name)
            ids = (self.sample_ids[self.first:] if self.sample_ids is not None
                   else range(self.first, self.first + out.shape[0]))
            require_finite(out.detach(), "layer output", method="top_activations", layer=name, sample_ids=ids)
            self.shapes[name] = (int(out.shape[2]), int(out.shape[3]))
            self.pending[name] = _candidates(out, self.first, self.top, self.distinct)

        return reduce

    def begin(self, first: int) -> None:
        """A chunk whose first image is `first` starts (again, after an out-of-memory): forget its candidates."""
        self.first, self.seen, self.pending = first, set(), {}

    def commit(self) -> None:
        """Merge the chunk's candidates into the running top-k (only once its forward succeeded)."""
        for name, new in self.pending.items():
            old = self.state.get(name)
            merged = new if old is None else tuple(torch.cat([a, b.to(a.device)], 1) for a, b in zip(old, new))
            order = merged[0].sort(dim=1, descending=True, stable=True).indices[:, : self.top]
            self.state[name] = tuple(t.gather(1, order) for t in merged)
        self.pending = {}


def top_activations(
    subject,
    images: torch.Tensor,
    layers: Sequence[str],
    top: int = 9,
    *,
    distinct_images: bool = True,
    sample_ids: Sequence[object] | None = None,
) -> dict[str, TopUnits]:
    """Per layer, per channel, the `top` largest activations over (image, y, x).

    distinct_images=True (the default) keeps at most one unit per image - the image's maximum for that
    channel - so the `top` patches come from `top` different images (neighbouring units of one image would
    otherwise fill the list with near-copies of one patch); False ranks every (image, y, x). Ties keep the
    earlier image (and, within an image, the first position). Images go through Subject.chunks under
    torch.no_grad(); each layer's output is reduced inside its forward hook (so a
    later in-place op cannot alter it) and only C x top candidates are kept between chunks. A layer output
    holding NaN or inf raises NonFiniteError naming the layer and the images (by `sample_ids`, one per image,
    when given; else by index).
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"top_activations needs a non-empty N x C x H x W batch, got shape {tuple(images.shape)}")
    layers = list(dict.fromkeys(layers))
    for name in layers:
        subject.layer(name)
    running = _RunningTop(top, distinct_images, sample_ids)

    def forward_chunk(rows: slice) -> None:
        running.begin(rows.start)
        subject.forward(images[rows])
        missing = [name for name in layers if name not in running.seen]
        if missing:
            raise AuditModelError(f"model {subject.name!r}: layer(s) {', '.join(map(repr, missing))} "
                                  f"were not called in the forward pass; {NAME_LAYERS_HINT}")

    with torch.no_grad(), contextlib.ExitStack() as stack:
        for name in layers:
            stack.enter_context(subject.forward_hook(name, running.hook(name)))
        for _ in subject.chunks(images.shape[0], forward_chunk):
            running.commit()
    state, shapes = running.state, running.shapes
    result = {}
    for name in layers:
        values, image, pos = (t.cpu() for t in state[name])
        w = shapes[name][1]
        result[name] = TopUnits(layer=name, values=values.float(), image=image.long(), y=pos // w, x=pos % w,
                                map_size=shapes[name], distinct_images=distinct_images)
    return result


# -- DeconvNet projections --------------------------------------------------------------------------


def deconv_projections(subject, images: torch.Tensor, layer: str, units: torch.Tensor,
                       sample_ids: Sequence[object] | None = None) -> torch.Tensor:
    """DeconvNet projection of single units to the pixels: U x C x H x W on the CPU.

    units: U x 4 int64 rows (image index into `images`, channel, y, x). Row u is
    d a_u / d pixels of image u's copy, where a_u is the layer's (first) output at (channel, y, x) and every
    nn.ReLU's backward is g_in = relu(g_out) (Zeiler & Fergus: rectified "unpooling"; conv backward =
    transposed filters; max-pool backward = their switches). Pixels outside the unit's receptive field are
    exactly 0. The forward stops at the layer; rows go through Subject.gradients. A projection that is
    not finite raises NonFiniteError naming the layer and the units (their image by `sample_ids` when given).
    """
    subject.layer(layer)
    units = torch.as_tensor(units, dtype=torch.int64).reshape(-1, 4).cpu()
    outside = (units[:, 0] < 0) | (units[:, 0] >= images.shape[0])
    if bool(outside.any()):
        raise ValueError(f"unit {units[outside][0].tolist()} names image {int(units[outside][0, 0])}, but there are "
                         f"{images.shape[0]} images (indices 0..{images.shape[0] - 1})")

    def unit_images(rows: slice) -> torch.Tensor:
        return images[units[rows, 0]]

    def unit_activation(x: torch.Tensor, rows: slice) -> torch.Tensor:
        out = _map_output(forward_to(subject, x, [layer])[layer], layer)
        picked_units = units[rows]
        c, h, w = out.shape[1:]
        bad = ((picked_units[:, 1] >= c) | (picked_units[:, 2] >= h) | (picked_units[:, 3] >= w)
               | (picked_units[:, 1:] < 0).any(1))
        if bool(bad.any()):
            raise ValueError(f"unit {picked_units[bad][0].tolist()} is outside layer {layer!r}'s output "
                             f"C x H x W = {c} x {h} x {w}")
        r = torch.arange(picked_units.shape[0], device=out.device)
        channel, y, xx = (picked_units[:, k].to(out.device) for k in (1, 2, 3))
        return out[r, channel, y, xx]  # row u's gradient is d a_u / d x_u alone

    with relu_backward_override(subject.module, "deconvnet"):
        out_parts = [grad.float().cpu() for _, grad, _ in subject.gradients(units.shape[0], unit_images, unit_activation)]
    projections = torch.cat(out_parts) if out_parts else torch.empty(0, *images.shape[1:])
    names = [f"image {sample_ids[i] if sample_ids is not None else i!r} channel {c} at ({y}, {x})"
             for i, c, y, x in units.tolist()]
    return require_finite(projections, "deconvnet projection", method="deconvnet", layer=layer, sample_ids=names)


# -- crops ------------------------------------------------------------------------------------------


def crop_units(images: torch.Tensor, rf: ReceptiveField, y: torch.Tensor, x: torch.Tensor,
               fill: float = 0.0) -> torch.Tensor:
    """Row u of images (U x C x H x W) cut to the UNCLIPPED receptive-field box of unit (y_u, x_u):
    U x C x rf_h x rf_w, with `fill` where the box reaches outside the image (one gather, no loop)."""
    n, _, h, w = images.shape
    rh, rw = rf.size
    boxes = rf.unclipped_boxes(y, x)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    top, left = max(0, -int(y0.min())), max(0, -int(x0.min()))
    bottom, right = max(0, int((y0 + rh).max()) - h), max(0, int((x0 + rw).max()) - w)
    padded = F.pad(images.cpu(), (left, right, top, bottom), value=fill)
    rows = (y0 + top).view(-1, 1, 1) + torch.arange(rh).view(1, rh, 1)  # U x rh x 1
    cols = (x0 + left).view(-1, 1, 1) + torch.arange(rw).view(1, 1, rw)  # U x 1 x rw
    picked = padded.permute(0, 2, 3, 1)[torch.arange(n).view(-1, 1, 1), rows, cols]  # U x rh x rw x C
    return picked.permute(0, 3, 1, 2).contiguous()


def display_projection(projections: torch.Tensor) -> torch.Tensor:
    """0.5 + 0.5 * p / max|p| per row (U x C x H x W): 0 shows as mid-grey, each row uses the full range."""
    scale = projections.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return 0.5 + 0.5 * projections / scale
