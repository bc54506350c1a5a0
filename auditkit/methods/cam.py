"""Grad-CAM (Selvaraju et al. 2017): class activation maps from a layer's gradients.

For the activation A (N x K x h x w) of a layer and the target logit f_t:

    w_k = (1 / (h w)) sum_ij d f_t / d A_kij
    map = relu(sum_k w_k A_k)                     (h x w)

then bilinearly upsampled to the input size (align_corners=False). A is
captured by a forward hook that keeps the graph (``subject.forward_hook(...,
raw=True)``) and d f_t / d A comes from torch.autograd.grad: no backward
hooks on modules, the model is never changed. A token or channels-last
output is read as its grid (Subject.layer_view), A and its gradient alike. The maps are checked by numerics.require_finite: a
NaN or inf raises NonFiniteError naming the method, the layer and the samples.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from auditkit.layers import NAME_LAYERS_HINT, first_tensor
from auditkit.methods.gradients import _check
from auditkit.methods.numerics import require_finite

__all__ = ["grad_cam"]


def _cam_chunk(subject, pixels: torch.Tensor, targets: torch.Tensor, layer: str) -> torch.Tensor:
    """relu(sum_k w_k A_k) at the layer's resolution, N x h x w on the Subject's device; A is the layer's
    output as Subject.layer_view reads it (tokens as their grid), its gradient read the same way.

    A token layer whose patch tokens get no gradient at all (the last block of a class-token ViT: the head
    reads the class token only) is read at its input instead, the tokens its attention mixes into the
    class token (where pytorch-grad-cam's ViT example hooks, the last block's first norm)."""
    x = pixels.detach().to(subject.device, torch.float32).clone().requires_grad_(True)
    t = targets.to(subject.device).view(-1, 1)
    raw: dict[str, torch.Tensor | None] = {}

    def keep(_m, inputs, out) -> None:
        raw["out"] = first_tensor(out)
        raw["in"] = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    with torch.enable_grad(), subject.forward_hook(layer, keep, raw=True):
        logits = subject.forward(x)
        out = raw.get("out")
        if out is None:
            raise ValueError(f"layer {layer!r} of model {subject.name!r} did not output a tensor in the forward; "
                             f"{NAME_LAYERS_HINT}")
        view = subject.layer_view(layer, out)
        if view.grid(out).ndim != 4:
            raise ValueError(f"layer {layer!r} outputs shape {tuple(out.shape)}, Grad-CAM needs N x K x h x w "
                             f"(or tokens of a grid); {NAME_LAYERS_HINT}")
        score = logits.gather(1, t).sum()
        tokens_in = raw.get("in")
        use_input = view.kind == "tokens" and tokens_in is not None and tokens_in.shape == out.shape
        grads = torch.autograd.grad(score, [out, tokens_in] if use_input else [out], allow_unused=True)
    grad = grads[0] if grads[0] is not None else torch.zeros_like(out)
    if use_input and grads[1] is not None and not bool(view.grid(grad).ne(0).any()):
        out, grad = tokens_in, grads[1]
    a, g = view.grid(out.detach()), view.grid(grad)
    weights = g.mean(dim=(2, 3), keepdim=True)  # w_k: spatial mean of d f_t / d A_k
    return F.relu((weights * a).sum(dim=1))


def grad_cam(
    subject,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None = None,
    upsample: bool = True,
    sample_ids: Sequence[object] | None = None,
) -> torch.Tensor:
    """Grad-CAM maps, N x H x W on the CPU (N x h x w at the layer's resolution when upsample=False).

    layer: a name from named_modules(); default Subject.map_layer() (the deepest named layer with a map
    larger than 1 x 1).
    In the Subject's forward + backward chunks (Subject.chunks at Subject.backward_cost(): the gradient is
    the layer's, not the pixels', so Subject.gradients does not serve). A non-finite map raises
    NonFiniteError naming the layer and the samples (by `sample_ids` when given, else by index).
    """
    targets = _check(subject, images, targets)
    if layer is None:
        if not subject.layers:
            raise ValueError(f"model {subject.name!r} has no layers; pass layer= to grad_cam")
        layer = subject.map_layer()
    subject.layer(layer)  # unknown names raise, listing the valid ones

    def maps_of(rows: slice) -> torch.Tensor:
        cam = _cam_chunk(subject, images[rows], targets[rows], layer)
        if upsample:
            cam = F.interpolate(cam.unsqueeze(1), size=tuple(images.shape[-2:]), mode="bilinear",
                                align_corners=False).squeeze(1)
        return cam.float().cpu()

    out = list(subject.chunks(images.shape[0], maps_of, cost=subject.backward_cost()))
    maps = torch.cat(out) if out else torch.empty(0, *images.shape[-2:])
    return require_finite(maps, "attribution map", method="grad_cam", layer=layer, sample_ids=sample_ids)
