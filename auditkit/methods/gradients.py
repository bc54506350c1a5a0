"""Gradient attributions of the target logit w.r.t. the input pixels.

Every function takes ``(subject, images, targets)``: images are N x C x H x W
pixels in [0, 1], targets N class indices (int64). The Subject normalises
inside its forward, so every gradient flows through (x - mean) / std: the
attributions are in *pixel* space. f_t(x) below is the target's logit (not
the softmax), as Captum's Saliency uses it.

The forward always runs under torch.enable_grad() on a detached clone of the
images (requires_grad=True), through the Subject's chunked forward + backward
(Subject.gradients), on the Subject's device; the model is never changed (the Subject already turned
requires_grad off on its parameters, so only the input gets a gradient).
Attributions come back on the CPU, and always finite: each method checks its result with
numerics.require_finite, so a NaN or inf (a model whose gradient is not finite for some image, even
when its logits are) raises NonFiniteError naming the method and the samples; pass
``sample_ids=`` (one id per image) to have them named by id instead of index.

- gradient:             d f_t / d x                          (Simonyan et al. 2014)
- input_x_gradient:     x * d f_t / d x                      (Shrikumar et al. 2016)
- smoothgrad:           mean_s d f_t / d x (x + eps_s),  eps_s ~ N(0, (noise * range)^2)   (Smilkov et al. 2017)
- integrated_gradients: (x - b) * sum_k w_k d f_t / d x (b + a_k (x - b))   (Sundararajan et al. 2017)
- guided_backprop:      ReLU backward  g_in = [x > 0] * relu(g_out)   (Springenberg et al. 2015)
- deconvnet:            ReLU backward  g_in = relu(g_out)             (Zeiler & Fergus 2014)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Literal, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from auditkit.methods.numerics import require_finite

Reduce = Literal["sum", "abs_sum", "max_abs"]
IGMethod = Literal["riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre"]
IG_METHODS: tuple[str, ...] = ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre")

__all__ = [
    "to_map",
    "gradient",
    "input_x_gradient",
    "smoothgrad",
    "integrated_gradients",
    "ig_weights",
    "guided_backprop",
    "deconvnet",
    "relu_backward_override",
]


# -- helpers ---------------------------------------------------------------
_Method = TypeVar("_Method", bound=Callable[..., torch.Tensor])


def finite_attribution(method: str) -> Callable[[_Method], _Method]:
    """Decorate an attribution method so that its result goes through require_finite.

    The wrapped function takes an extra keyword ``sample_ids`` (one id per image, or None for
    indices), used only to name the samples at fault in the NonFiniteError.
    """
    def wrap(fn: _Method) -> _Method:
        @functools.wraps(fn)
        def guarded(subject, images, targets, *args, sample_ids: Sequence[object] | None = None, **kwargs):
            out = fn(subject, images, targets, *args, **kwargs)
            return require_finite(out, "attribution map", method=method, sample_ids=sample_ids)
        return guarded  # type: ignore[return-value]
    return wrap


def _check(subject, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targets as an int64 CPU vector of length N; shape errors name what was expected."""
    if images.ndim != 4:
        raise ValueError(f"images have shape {tuple(images.shape)}, expected N x C x H x W pixels")
    targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1).cpu()
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {images.shape[0]} images: expected one target per image")
    return targets


def _chunked_grad(subject, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d f_t / d x for all images through Subject.gradients, on the CPU."""
    targets = _check(subject, images, targets)
    out = torch.empty(images.shape, dtype=torch.float32)
    for rows, grad, _ in subject.gradients(images.shape[0], lambda rows: images[rows], subject.target_logits(targets)):
        out[rows] = grad.float().cpu()
    return out


def to_map(attr: torch.Tensor, reduce: Reduce = "sum") -> torch.Tensor:
    """Collapse channels: N x C x H x W -> N x H x W.

    sum: sum_c a_c; abs_sum: sum_c |a_c|; max_abs: max_c |a_c|.
    """
    if attr.ndim != 4:
        raise ValueError(f"attributions have shape {tuple(attr.shape)}, expected N x C x H x W")
    if reduce == "sum":
        return attr.sum(dim=1)
    if reduce == "abs_sum":
        return attr.abs().sum(dim=1)
    if reduce == "max_abs":
        return attr.abs().amax(dim=1)
    raise ValueError(f"unknown reduce {reduce!r}; expected sum, abs_sum or max_abs")


# -- plain gradients --------------------------------------------------------
@finite_attribution("gradient")
def gradient(subject, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Saliency (Simonyan et al.): d f_t(x) / d x, N x C x H x W on the CPU (signed; no abs)."""
    return _chunked_grad(subject, images, targets)


@finite_attribution("input_x_gradient")
def input_x_gradient(subject, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Input x gradient: x * d f_t(x) / d x, N x C x H x W on the CPU."""
    return images.detach().float().cpu() * _chunked_grad(subject, images, targets)


@finite_attribution("smoothgrad")
def smoothgrad(
    subject,
    images: torch.Tensor,
    targets: torch.Tensor,
    samples: int = 16,
    noise: float = 0.15,
    seed: int = 0,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al.): (1 / S) sum_s d f_t / d x evaluated at x + eps_s.

    eps_s ~ N(0, sigma^2) with sigma = noise * (x_max - x_min) for the pixel
    range [0, 1], i.e. sigma = noise. Noisy images are not clipped. The
    noise is drawn on the CPU from a torch.Generator seeded with `seed`,
    image by image in order (S x C x H x W each), so the result does not
    depend on the batch size or the device. All S noisy copies of an image go
    through one forward (Subject.gradients with cost S).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    targets = _check(subject, images, targets)
    sigma = float(noise) * (1.0 - 0.0)  # fraction of the pixel range [0, 1]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    state_at: dict[int, torch.Tensor] = {}  # the generator's state where a chunk starts, so a retry redraws it
    x = images.detach().float().cpu()

    def noisy(rows: slice) -> torch.Tensor:
        if rows.start in state_at:
            gen.set_state(state_at[rows.start])
        else:
            state_at[rows.start] = gen.get_state()
        eps = torch.stack([torch.randn((samples, *x.shape[1:]), generator=gen) for _ in range(rows.start, rows.stop)])
        return (x[rows].unsqueeze(1) + sigma * eps).flatten(0, 1)  # (k * S) x C x H x W, image-major

    scores = subject.target_logits(targets.repeat_interleave(samples))

    def per_sample(x_rows: torch.Tensor, rows: slice) -> torch.Tensor:
        return scores(x_rows, slice(rows.start * samples, rows.stop * samples))

    out = torch.empty(x.shape)
    for rows, grad, _ in subject.gradients(x.shape[0], noisy, per_sample, cost=samples):
        out[rows] = grad.float().cpu().view(-1, samples, *x.shape[1:]).mean(dim=1)
    return out


# -- integrated gradients ---------------------------------------------------
def ig_weights(steps: int, method: IGMethod = "riemann_trapezoid") -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) of the path integral int_0^1 g(a) da ~ sum_k w_k g(a_k).

    riemann_trapezoid: a_k = k / (n - 1), w = 1 / (n - 1) with both ends halved
        (sum w = 1; Captum uses 1 / n here, so its weights sum to (n - 1) / n).
    riemann_left / right / middle: w = 1 / n at a_k = k / n, (k + 1) / n, (k + 1/2) / n.
    gausslegendre: Gauss-Legendre nodes and weights on [-1, 1] mapped to [0, 1]
        (a = (1 + x) / 2, w = w_GL / 2), as Captum's default.
    """
    n = int(steps)
    if method == "gausslegendre":
        if n < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        nodes, w = np.polynomial.legendre.leggauss(n)
        return torch.tensor(0.5 * (1 + nodes), dtype=torch.float64), torch.tensor(0.5 * w, dtype=torch.float64)
    if method not in IG_METHODS:
        raise ValueError(f"unknown integration method {method!r}; expected one of {', '.join(IG_METHODS)}")
    if n < 2:
        raise ValueError(f"steps must be >= 2 for {method}, got {steps}")
    k = torch.arange(n, dtype=torch.float64)
    if method == "riemann_trapezoid":
        w = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (n - 1)
        return k / (n - 1), w
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    shift = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return (k + shift) / n, w


def _baseline_like(subject, images: torch.Tensor, baseline: float | torch.Tensor | None) -> torch.Tensor:
    """The baseline broadcast to N x C x H x W (float32, CPU): the normalisation mean (None), a constant, or a tensor."""
    x = images.detach().float().cpu()
    if baseline is None:
        mean = torch.tensor([float(m) for m in subject.spec.mean]).view(1, -1, 1, 1)
        return mean.expand_as(x).clone()
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, float(baseline))
    b = torch.as_tensor(baseline).detach().float().cpu()
    try:
        return b.expand_as(x).clone()
    except RuntimeError as exc:
        raise ValueError(f"baseline of shape {tuple(b.shape)} does not broadcast to images {tuple(x.shape)}") from exc


@finite_attribution("integrated_gradients")
def integrated_gradients(
    subject,
    images: torch.Tensor,
    targets: torch.Tensor,
    baseline: float | torch.Tensor | None = None,
    steps: int = 64,
    method: IGMethod = "riemann_trapezoid",
) -> torch.Tensor:
    """Integrated gradients: (x - b) * sum_k w_k d f_t / d x at b + a_k (x - b); N x C x H x W on the CPU.

    The default baseline (None) is the model's normalisation mean: the image whose normalised input
    is all zeros, which is what Captum's default baseline means when it is given normalised
    tensors. Pass 0.0 for a black image.

    Completeness: sum(attr) ~ f_t(x) - f_t(b). The N * steps interpolated
    images are built lazily, image-major, and sent through Subject.gradients
    (a chunk may mix images and steps).
    Near a constant baseline, ties in max-pooling make single pixels depend on
    float rounding (and so on the batch composition); the sums do not.
    """
    targets = _check(subject, images, targets)
    x = images.detach().float().cpu()
    b = _baseline_like(subject, images, baseline)
    alphas, weights = ig_weights(steps, method)
    n, s = x.shape[0], alphas.shape[0]
    alphas, weights = alphas.float(), weights.float()
    total = torch.zeros_like(x)  # sum_k w_k grad_k per image

    def row_owner(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.arange(rows.start, rows.stop)
        return r // s, r % s  # image, step

    def path(rows: slice) -> torch.Tensor:
        img, step = row_owner(rows)
        return b[img] + alphas[step].view(-1, 1, 1, 1) * (x[img] - b[img])

    scores = subject.target_logits(targets)

    def path_score(x_rows: torch.Tensor, rows: slice) -> torch.Tensor:
        img, _ = row_owner(rows)
        return scores(x_rows, img)

    for rows, grad, _ in subject.gradients(n * s, path, path_score):
        img, step = row_owner(rows)
        total.index_add_(0, img, weights[step].view(-1, 1, 1, 1) * grad.float().cpu())
    return (x - b) * total


# -- modified ReLU backward -------------------------------------------------
class _GuidedReLU(torch.autograd.Function):
    """relu(x) forward; backward g_in = [x > 0] * relu(g_out)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return (out > 0).to(grad_out.dtype) * grad_out.clamp(min=0)


class _DeconvReLU(torch.autograd.Function):
    """relu(x) forward; backward g_in = relu(g_out) (ignores the sign of x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad_out.clamp(min=0)


_RULES = {"guided": _GuidedReLU, "deconvnet": _DeconvReLU}
_MISSING = object()


@contextlib.contextmanager
def relu_backward_override(module: nn.Module, rule: Literal["guided", "deconvnet"]) -> Iterator[int]:
    """Inside the block every nn.ReLU in `module` computes relu(x) through a custom autograd Function.

    Done by setting `forward` on each ReLU instance (no hooks, so in-place
    ReLUs work: the replacement returns a new tensor instead of writing into
    x). On exit - even after an exception - each instance's own `forward`
    attribute is deleted again (or the one it had put back), so the model
    is exactly as before. Yields the number of ReLUs patched. Functional
    relu calls (torch.relu, F.relu) are not affected.
    """
    fn = _RULES[rule]
    saved: list[tuple[nn.Module, object]] = []
    try:
        for sub in module.modules():
            if isinstance(sub, nn.ReLU):
                saved.append((sub, sub.__dict__.get("forward", _MISSING)))
                sub.forward = fn.apply  # instance attribute shadows ReLU.forward
        yield len(saved)
    finally:
        for sub, old in reversed(saved):
            if old is _MISSING:
                sub.__dict__.pop("forward", None)
            else:
                sub.forward = old


@finite_attribution("guided_backprop")
def guided_backprop(subject, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Guided backprop: d f_t / d x with every ReLU's backward g_in = [x > 0] * relu(g_out); N x C x H x W."""
    with relu_backward_override(subject.module, "guided"):
        return _chunked_grad(subject, images, targets)


@finite_attribution("deconvnet")
def deconvnet(subject, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Deconvnet: d f_t / d x with every ReLU's backward g_in = relu(g_out); N x C x H x W."""
    with relu_backward_override(subject.module, "deconvnet"):
        return _chunked_grad(subject, images, targets)
