"""Checks `class-visualisation` (Simonyan et al. 2013) and `texture-synthesis-converges` (Gatys et al. 2015)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, require_at_least, require_unit
from auditkit.checks.inversion import ConvergenceCheck, layers_and_sources
from auditkit.methods import synthesis as syn


@dataclass
class ClassVisualisation(Check):
    """For every class c (or those named in `classes`), optimise one image from noise to maximise the class
    score S_c (Simonyan et al. 2013) with an L2 pull to grey, jitter and a Fourier parametrisation weighted
    1/f^decay (Lucid's, with decay 2 to favour large structures). Each image must reach p(c | x*) >= min_prob
    within `steps`: a class no image can reach is a defect worth seeing. The value is the share of classes
    reached; all must be. A model of one class is an ERROR: its softmax is 1 for any image.
    """

    kind = "class-visualisation"
    title = "Every class can be visualised"
    description = (
        "x*_c = argmax_x S_c(x) - lambda_l2 * mean (x - 0.5)^2, x = sigmoid(Fourier image, 1/f^decay) from "
        "noise, jitter each step, Adam with a cosine schedule. Passes when p(c | x*_c) >= min_prob for every class c."
    )

    classes: tuple[str, ...] = ()
    steps: int = 50
    lr: float = 0.05
    lambda_l2: float = syn.LAMBDA_L2
    jitter: int = 2
    parametrisation: Literal["fourier", "sigmoid"] = "fourier"
    decay: float = 2.0
    min_prob: float = 0.9
    seed: int = 0

    def validate(self) -> None:
        require_at_least(self, steps=1, lr=1e-12, lambda_l2=0, jitter=0, decay=0)
        require_unit(self, "min_prob")
        if self.parametrisation not in ("fourier", "sigmoid"):
            raise CheckConfigError(f"check {self.name!r}: parametrisation must be 'fourier' or 'sigmoid', "
                                   f"got {self.parametrisation!r}")

    def run(self, subject, audit_set) -> CheckResult:
        names = list(subject.spec.class_names)
        if len(names) < 2:  # the model, not the audit set, decides: the check cannot run (ERROR), never PASS
            return self.error_result(
                f"class visualisation needs at least 2 classes, model {subject.name!r} has {len(names)}: "
                f"a softmax over one logit is 1 for every image, so reaching p >= min_prob says nothing")
        unknown = [c for c in self.classes if c not in names]
        if unknown:
            raise CheckConfigError(f"check {self.name!r}: unknown class(es) {', '.join(map(repr, unknown))}; "
                                   f"model {subject.name!r} has classes {', '.join(names)}")
        classes = [names.index(c) for c in self.classes] if self.classes else list(range(len(names)))
        vis = syn.visualise_classes(subject, classes, steps=self.steps, lr=self.lr, lambda_l2=self.lambda_l2,
                                    jitter=self.jitter, parametrisation=self.parametrisation, decay=self.decay,
                                    seed=self.seed)
        rows = []
        for k, c in enumerate(classes):
            prob = float(vis.probability[k])
            diverged = bool(vis.diverged[k])
            reason = (f"score diverged (NaN/inf) at step {vis.diverged_step}" if diverged else
                      "" if prob >= self.min_prob else f"p = {prob:.3g} < min_prob {self.min_prob:.3g}")
            rows.append({"class": names[c], "probability": prob, "final_score": float(vis.curves["score"][-1, k]),
                         "passed": not reason, "reason": reason})
        reached = sum(r["passed"] for r in rows)
        failed = [r for r in rows if not r["passed"]]
        message = (f"{reached} of {len(rows)} classes reach p >= {self.min_prob:g}"
                   + (": " + "; ".join(f"{r['class']}: {r['reason']}" for r in failed) if failed else ""))
        result = self.result(metric="classes reached", value=reached / len(rows), threshold=1.0, direction=">=",
                             rows=rows, columns=list(rows[0]), message=message, details=dict(vis.params))
        result.evidence = self._evidence(vis, rows)
        return result

    def _evidence(self, vis: syn.ClassVisualisation, rows: list[dict]) -> list:
        scale = max(1, math.ceil(96 / vis.images.shape[-1]))  # panels at least 96 px wide
        per_row = 6
        cells = [ev.upscale(img, scale) for img in vis.images]
        titles = [f"{r['class']}: p {r['probability']:.2f}" for r in rows]
        grid = ev.panel_grid([cells[i:i + per_row] for i in range(0, len(cells), per_row)],
                             titles=[titles[i:i + per_row] for i in range(0, len(titles), per_row)], scale=1)
        steps = list(range(vis.curves["score"].shape[0]))
        svg = ev.line_chart_svg({r["class"]: (steps, vis.curves["score"][:, k].tolist()) for k, r in enumerate(rows)},
                                title="Class score during the optimisation", x_label="step", y_label="score (logit)")
        return [ev.png_evidence("Class visualisations", grid,
                                f"One image per class, optimised from noise; titles: the class and the model's "
                                f"probability of it (needs >= {self.min_prob:g})."),
                ev.svg_evidence("Class score curves", svg, "The optimised class score per step, one line per class.")]


@dataclass
class TextureSynthesisConverges(ConvergenceCheck):
    """Synthesise, from noise, an image whose Gram matrices at `layers` (default: every named layer) match
    those of each of `samples` source images (Gatys et al. 2015). The rule is inversion-converges': each
    layer's mean relative Gram error ||G(x*) - G(x0)||_F / ||G(x0)||_F <= max_error, and the total loss fell
    by >= min_drop and by < plateau over the last tenth of the steps; a NaN/inf or rising loss fails.
    """

    kind = "texture-synthesis-converges"
    title = "Texture synthesis converges"
    description = (
        "x* = argmin mean_l ||G_l(x) - G_l(x0)||_F^2 / ||G_l(x0)||_F^2 + lambda_tv * TV_2(x), G = F F^T / M, "
        "x = sigmoid(Fourier image weighted 1/f) from noise, Adam with a cosine schedule to lr * final_lr_ratio. "
        "A layer passes when mean "
        "||G_l(x*) - G_l(x0)||_F / ||G_l(x0)||_F <= max_error and the total loss fell by >= min_drop and by < "
        "plateau over the last tenth of the steps."
    )

    # Fourier at 300 steps: the demo's syntheses keep the source's colours and blobs (sigmoid pixels at 100
    # steps match the Gram matrices too, errors 0.09-0.21, but come out grey and high-frequency)
    steps: int = 300

    def run(self, subject, audit_set) -> CheckResult:
        layers, indices, images = layers_and_sources(self, subject, audit_set)
        res = syn.synthesise_texture(subject, images, layers, steps=self.steps, lr=self.lr,
                                     final_lr_ratio=self.final_lr_ratio, parametrisation=self.parametrisation,
                                     seed=self.seed)
        total = res.curves["total"].mean(1)
        rows = []
        for layer in layers:
            error = float(res.final_error[layer].mean())
            zero = torch.isnan(res.final_error[layer]) & ~res.diverged.to(res.final_error[layer].device)
            diverged = f"loss diverged (NaN/inf) at step {res.diverged_step}" if bool(res.diverged.any()) else ""
            dead = (f"layer output is all zeros (zero Gram matrix) for {int(zero.sum())} of {zero.numel()} samples"
                    if bool(zero.any()) else "")
            drop, fall, reasons = self.layer_verdict(total, error, [diverged, dead], what="Gram error")
            rows.append({"layer": layer, "gram_error": error, "max_gram_error": float(res.final_error[layer].max()),
                         "drop": drop, "last_tenth_fall": fall, "passed": not reasons, "reason": "; ".join(reasons)})
        result = self.layers_result(rows, "layers' Gram matrices matched", {"samples": indices, **res.params})
        result.evidence = self._evidence(images, res)
        return result

    def _evidence(self, images: torch.Tensor, res: syn.TextureResult) -> list:
        scale = max(1, math.ceil(96 / images.shape[-1]))  # panels at least 96 px wide
        mean_error = torch.stack([res.final_error[l] for l in res.layers]).mean(0)
        grid = ev.panel_grid([[ev.upscale(images[i], scale), ev.upscale(res.images[i], scale)]
                              for i in range(images.shape[0])],
                             titles=[["source", f"err {float(mean_error[i]):.2f}"]
                                     for i in range(images.shape[0])],
                             row_labels=[f"sample {i}" for i in range(images.shape[0])], scale=1)
        steps = list(range(res.curves["total"].shape[0]))
        series = {"total": (steps, res.curves["total"].mean(1).tolist())}
        series.update({l: (steps, res.curves[f"gram:{l}"].mean(1).tolist()) for l in res.layers})
        svg = ev.line_chart_svg(series, log_y=True, title="Texture synthesis loss (mean over samples)",
                                x_label="step", y_label="loss")
        return [ev.png_evidence("Texture synthesis", grid,
                                "Each source image and the texture synthesised to match its Gram matrices at "
                                + ", ".join(res.layers) + " (title: mean relative Gram error over the layers)."),
                ev.svg_evidence("Texture loss curves", svg,
                                "Total loss and each layer's normalised Gram error per step (log scale).")]
