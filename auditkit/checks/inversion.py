"""Check `inversion-converges`: each layer's features can be inverted back to an image (Mahendran & Vedaldi 2015)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult
from auditkit.methods import inversion as inv
from auditkit.methods.randomisation import random_copy

ZERO_NORM_REASON = "layer output is constant (zero norm)"


@dataclass
class InversionConverges(Check):
    """Per layer, invert the features of the first `samples` images from noise (`steps` Adam steps,
    alpha-norm and TV regularisers). A layer passes when the mean final relative feature error
    ||f(x*) - f(x0)|| / ||f(x0)|| <= max_error, the mean total loss fell by at least min_drop from
    its first to its last value, and over the last tenth of the steps it fell by less than
    `plateau` (it has settled). A diverged (NaN/inf) loss or a constant (zero) layer output fails.
    The check passes when every layer passes. The same inversion through a randomly initialised
    copy of the model is reported beside it.
    """

    kind = "inversion-converges"
    title = "Feature inversion converges"
    description = (
        "x* = argmin ||f(x) - f(x0)||^2 / ||f(x0)||^2 + lambda_alpha * mean|x - 0.5|^6 + lambda_tv * TV_2(x), "
        "x = sigmoid(z), from noise. A layer passes when mean ||f(x*) - f(x0)|| / ||f(x0)|| <= max_error, "
        "the total loss fell by >= min_drop (relative) and by < plateau over the last tenth of the steps; "
        "the check passes when all layers pass. A randomly initialised copy of the model is inverted beside it."
    )

    layers: tuple[str, ...] = ()
    steps: int = 200
    samples: int = 4
    max_error: float = 0.5
    min_drop: float = 0.5
    plateau: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 10:
            raise CheckConfigError(f"check {self.name!r}: steps must be >= 10, got {self.steps}")
        if self.samples < 1:
            raise CheckConfigError(f"check {self.name!r}: samples must be >= 1, got {self.samples}")
        if self.max_error < 0:
            raise CheckConfigError(f"check {self.name!r}: max_error must be >= 0, got {self.max_error}")
        for field_name in ("min_drop", "plateau"):
            value = getattr(self, field_name)
            if not 0.0 <= value <= 1.0:
                raise CheckConfigError(f"check {self.name!r}: {field_name} must be in [0, 1], got {value}")

    def run(self, subject, audit_set) -> CheckResult:
        from auditkit.subject import Subject

        layers = tuple(self.layers) or tuple(subject.layers)
        for layer in layers:
            subject.layer(layer)  # unknown layers fail here, listing the valid ones
        n = min(self.samples, len(audit_set))
        images = audit_set.subset(range(n)).images()

        random_subject = Subject(dataclasses.replace(subject.spec, module=random_copy(subject.module, self.seed)),
                                 device=subject.device)
        rows, results, randoms = [], {}, {}
        try:
            with random_subject:
                for layer in layers:
                    res = inv.invert(subject, images, layer, steps=self.steps, seed=self.seed)
                    rnd = inv.invert(random_subject, images, layer, steps=self.steps, seed=self.seed)
                    results[layer], randoms[layer] = res, rnd
                    rows.append(self._row(layer, res, rnd, images))
        finally:
            random_subject.close()

        failed = [r for r in rows if not r["passed"]]
        share = (len(rows) - len(failed)) / len(rows)
        message = (f"{len(rows) - len(failed)} of {len(rows)} layers converge"
                   + (": " + "; ".join(f"{r['layer']}: {r['reason']}" for r in failed) if failed else ""))
        result = self.result(metric="layers converged", value=share, threshold=1.0, direction=">=",
                             rows=rows, columns=list(rows[0]), message=message,
                             details={"samples": n, "steps": self.steps, "lambda_alpha": inv.LAMBDA_ALPHA,
                                      "lambda_tv": inv.LAMBDA_TV})
        result.evidence = self._evidence(images, layers, results, randoms)
        return result

    def _row(self, layer: str, res: inv.InversionResult, rnd: inv.InversionResult, images: torch.Tensor) -> dict:
        total = res.curves["total"].mean(1) if res.steps else torch.full((1,), math.nan)
        first, last = float(total[0]), float(total[-1])
        k = max(1, res.steps // 10)
        before = float(total[max(0, len(total) - 1 - k)])
        drop = (first - last) / first if first > 0 else math.nan
        fall = (before - last) / before if before > 0 else math.nan
        error = float(res.final_error.mean())
        reasons = []
        if bool(res.zero_norm.any()):
            reasons.append(ZERO_NORM_REASON)
        elif bool(res.diverged.any()):
            reasons.append(f"loss diverged (NaN/inf) at step {res.diverged_step}")
        else:
            if not error <= self.max_error:
                reasons.append(f"final error {error:.3g} > max_error {self.max_error:.3g}")
            if not drop >= self.min_drop:
                reasons.append(f"loss fell by {drop:.3g} < min_drop {self.min_drop:.3g}")
            if not fall < self.plateau:
                reasons.append(f"still falling: {fall:.3g} over the last tenth >= plateau {self.plateau:.3g}")
        return {
            "layer": layer, "final_error": error, "drop": drop, "last_tenth_fall": fall,
            "pixel_rmse": _rmse(res.reconstructions, images), "random_final_error": float(rnd.final_error.mean()),
            "random_pixel_rmse": _rmse(rnd.reconstructions, images), "passed": not reasons,
            "reason": "; ".join(reasons),
        }

    def _evidence(self, images, layers, results, randoms):
        scale = max(1, 96 // images.shape[-1])
        grid_rows, titles, labels = [], [], []
        for i in range(images.shape[0]):
            cells = [ev.upscale(images[i], scale)] + [ev.upscale(results[l].reconstructions[i], scale) for l in layers]
            grid_rows.append(cells)
            titles.append(["original"] + [f"{l} (err {float(results[l].final_error[i]):.2f})" for l in layers])
            labels.append(f"sample {i}")
            grid_rows.append([None] + [ev.upscale(randoms[l].reconstructions[i], scale) for l in layers])
            titles.append([""] + [f"{l} random (err {float(randoms[l].final_error[i]):.2f})" for l in layers])
            labels.append(f"sample {i}, random model")
        grid = ev.panel_grid(grid_rows, titles=titles, row_labels=labels, scale=1)
        series = {}
        for l in layers:
            curve = results[l].curves["total"].mean(1)
            series[l] = (list(range(len(curve))), curve.tolist())
        svg = ev.line_chart_svg(series, log_y=True, title="Total inversion loss (mean over samples)",
                                x_label="step", y_label="loss")
        return [
            ev.png_evidence("Feature inversion", grid,
                            "Each sample, then its reconstruction from each layer of the trained model; "
                            "the row below inverts the same layers of a randomly initialised copy."),
            ev.svg_evidence("Inversion loss curves", svg, "Total loss per step, one line per layer (log scale)."),
        ]


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b.to(a.device, a.dtype)) ** 2).flatten(1).mean(1).sqrt().mean())
