"""Images synthesised from noise by the shared optimiser loop (methods.optimise): class visualisation and
Gram-matrix texture synthesis.

Class visualisation (Simonyan, Vedaldi & Zisserman 2013, with Lucid-style regularisers): for each class c,
x*_c = argmax_x S_c(x) - lambda_l2 * mean (x - 0.5)^2, S_c the class score (logit), with x in a Fourier
parametrisation weighted 1/f^decay and random jitter; one image per class, all classes in one optimisation
whose forward + backward the Subject splits into chunks (Subject.gradients). With decay = 2 (steeper than Lucid's 1) the optimisation favours large
smooth structures: on the demo the circle class draws blobs and the cross class crosses, where decay = 1
draws high-frequency noise that is just as convincing to the model.

Texture synthesis (Gatys, Ecker & Bethge 2015): the Gram matrix of a layer output F (C x M, M = H * W
positions) is G = F F^T / M. The synthesis x* minimises
    mean over layers l of ||G_l(x) - G_l(x0)||_F^2 / ||G_l(x0)||_F^2  +  lambda_tv * TV_2(x),
one synthesis per source image, all in one batch, one forward per step stopping at the deepest layer.
The final (relative) error of layer l is ||G_l(x*) - G_l(x0)||_F / ||G_l(x0)||_F (NaN when G_l(x0) = 0);
the normalised error of source i is
    e_i = ||G_l(x*_i) - G_l(x0_i)||_F / mean_{j != i} ||G_l(x0_j) - G_l(x0_i)||_F,
the distance to its own Gram matrices in units of the distance between different sources' (NaN with
fewer than 2 sources or a zero spread), as for feature inversion (methods.inversion).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from auditkit.methods.inversion import normalised, spread_to_others, total_variation
from auditkit.methods.numerics import require_finite
from auditkit.methods.optimise import forward_to, layer_outputs, optimise

#: Default weight of the L2 pull towards grey in class visualisation (the score is O(10)).
LAMBDA_L2 = 1.0
#: Default TV weight of texture synthesis (the Gram term starts near 1).
TEXTURE_LAMBDA_TV = 0.05


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """N x C x (spatial...) -> N x C x C: G = F F^T / M, F the C x M matrix of each image (M positions)."""
    if features.ndim < 3:
        raise ValueError(f"gram_matrix needs N x C x positions (or N x C x H x W), got shape {tuple(features.shape)}")
    f = features.flatten(2).float()
    return f @ f.transpose(1, 2) / f.shape[-1]


@dataclass
class ClassVisualisation:
    """One optimised image per class, and the model's probability of that class for it (CPU tensors)."""

    images: torch.Tensor  # K x C x H x W pixels in [0, 1]
    classes: list[int]
    probability: torch.Tensor  # K: p(class_k | image_k), softmax of the final, unjittered image
    curves: dict[str, torch.Tensor]  # "score", "l2", "total" -> steps_done x K
    diverged: torch.Tensor
    diverged_step: int | None
    steps: int
    params: dict[str, float] = field(default_factory=dict)


def visualise_classes(subject, classes: Sequence[int] | None = None, *, steps: int = 100, lr: float = 0.05,
                      lambda_l2: float = LAMBDA_L2, jitter: int = 2, parametrisation: str = "fourier",
                      decay: float = 2.0, seed: int = 0) -> ClassVisualisation:
    """x*_c = argmax S_c(x) - lambda_l2 * mean (x - 0.5)^2 for each class c (default: every class); see the
    module doc. The probability is that of the final image, without jitter.

    All classes are optimised together (one optimise() run, seeded with `seed`); each step's forward and
    backward go through Subject.gradients in chunks, so 1000 classes never make one forward of 1000, and
    the images do not depend on the chunks. The pixels themselves (and Adam's two moments) are held for
    every class at once: 3 x classes x C x H x W floats on the device."""
    k_all = subject.spec.num_classes
    classes = list(range(k_all)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < k_all]
    if bad or not classes:
        raise ValueError(f"classes must be a non-empty list of indices in [0, {k_all}) for model "
                         f"{subject.name!r}, got {classes}")
    h, w = subject.spec.input_size
    target = torch.tensor(classes, device=subject.device).view(-1, 1)

    def objective(x: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        score = subject.forward(x).gather(1, target[rows]).squeeze(1).float()
        l2 = (x - 0.5).pow(2).flatten(1).mean(1)
        return {"score": score, "l2": l2, "total": -score + lambda_l2 * l2}

    run = optimise(objective, (len(classes), len(subject.spec.mean), h, w), steps=steps, lr=lr, jitter=jitter,
                   parametrisation=parametrisation, decay=decay, seed=seed, device=subject.device, subject=subject,
                   method="class visualisation",
                   row_names=[f"class {subject.spec.class_names[c]}" for c in classes])
    probability = subject.probabilities(run.images).gather(1, target.cpu()).squeeze(1)
    return ClassVisualisation(images=run.images, classes=classes, probability=probability, curves=run.curves,
                              diverged=run.diverged, diverged_step=run.diverged_step, steps=run.steps,
                              params={"steps": steps, "lr": lr, "lambda_l2": lambda_l2, "jitter": jitter,
                                      "parametrisation": parametrisation, "decay": decay, "seed": seed})


@dataclass
class TextureResult:
    """Syntheses (N x C x H x W pixels in [0, 1], CPU), one per source image, and how they converged."""

    images: torch.Tensor
    curves: dict[str, torch.Tensor]  # "gram" (mean over layers), "gram:<layer>", "tv", "total" -> steps_done x N
    final_error: dict[str, torch.Tensor]  # layer -> N: ||G(x*) - G(x0)||_F / ||G(x0)||_F
    normalised_error: dict[str, torch.Tensor]  # layer -> N: ||G(x*_i) - G(x0_i)||_F / mean_{j != i} ||G(x0_j) - G(x0_i)||_F
    diverged: torch.Tensor
    diverged_step: int | None
    steps: int
    settled_step: int | None = None  # the step at which every synthesis's loss had settled (optimise's plateau)
    budget: int = 0  # the steps allowed
    layers: list[str] = field(default_factory=list)
    params: dict[str, float] = field(default_factory=dict)


def synthesise_texture(subject, images: torch.Tensor, layers: Sequence[str], *, steps: int = 100, lr: float = 0.1,
                       lambda_tv: float = TEXTURE_LAMBDA_TV, parametrisation: str = "sigmoid",
                       final_lr_ratio: float = 0.01, seed: int = 0, plateau: float = 0.0,
                       window: int = 10, optimiser: str = "adam",
                       sample_ids: Sequence[object] | None = None) -> TextureResult:
    """Match the Gram matrices of `layers` of each source image (N x C x H x W pixels); see the module doc.
    `plateau` > 0 stops early once every synthesis's loss settled over `window` steps (methods.optimise).
    A source image whose layer output or Gram matrix is not finite raises NonFiniteError naming the layer
    and the samples (by `sample_ids` when given): there is no texture to match."""
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ValueError("synthesise_texture needs at least one layer")
    for layer in layers:
        subject.layer(layer)
    x0 = images.to(subject.device, torch.float32)
    acts = layer_outputs(subject, x0, layers)
    for layer in layers:
        require_finite(acts[layer], "layer output of the source images", method="texture", layer=layer,
                       sample_ids=sample_ids)
    targets = {layer: gram_matrix(acts[layer]) for layer in layers}
    for layer, gram in targets.items():
        require_finite(gram, "Gram matrix of the source images (overflow)", method="texture", layer=layer,
                       sample_ids=sample_ids)
    norm2 = {layer: g.pow(2).flatten(1).sum(1) for layer, g in targets.items()}
    denom = {layer: torch.where(v > 0, v, torch.ones_like(v)) for layer, v in norm2.items()}

    def gram_errors(x: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        feats = forward_to(subject, x, layers)
        return {layer: (gram_matrix(feats[layer]) - targets[layer][rows]).pow(2).flatten(1).sum(1) / denom[layer][rows]
                for layer in layers}

    def objective(x: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        errors = gram_errors(x, rows)
        gram = torch.stack(list(errors.values())).mean(0)
        tv = total_variation(x, 2.0)
        return {"gram": gram, **{f"gram:{k}": v for k, v in errors.items()}, "tv": tv, "total": gram + lambda_tv * tv}

    run = optimise(objective, tuple(x0.shape), steps=steps, lr=lr, final_lr_ratio=final_lr_ratio,
                   parametrisation=parametrisation, seed=seed, plateau=plateau, window=window, optimiser=optimiser,
                   device=subject.device, subject=subject, method="texture", layer=", ".join(layers),
                   row_names=sample_ids)
    feats = layer_outputs(subject, run.images.to(subject.device), layers)
    distance = {layer: (gram_matrix(feats[layer]) - targets[layer]).flatten(1).norm(dim=1) for layer in layers}
    final_error, normalised_error = {}, {}
    for layer in layers:
        ok = (norm2[layer] > 0) & ~run.diverged.to(norm2[layer].device)
        err = distance[layer] / norm2[layer].sqrt()
        final_error[layer] = torch.where(ok, err, torch.full_like(err, math.nan)).float().cpu()
        norm_err = normalised(distance[layer], spread_to_others(targets[layer]))
        normalised_error[layer] = torch.where(ok.to(norm_err.device), norm_err,
                                              torch.full_like(norm_err, math.nan)).cpu()
    return TextureResult(images=run.images, curves=run.curves, final_error=final_error,
                         normalised_error=normalised_error, diverged=run.diverged, diverged_step=run.diverged_step,
                         steps=run.steps, settled_step=run.settled_step, budget=steps, layers=layers,
                         params={"steps": steps, "lr": lr, "final_lr_ratio": final_lr_ratio, "lambda_tv": lambda_tv,
                                 "parametrisation": parametrisation, "seed": seed, "plateau": plateau,
                                 "window": window, "optimiser": optimiser, "evaluations": run.evaluations})
