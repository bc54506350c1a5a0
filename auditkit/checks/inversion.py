"""Check `inversion-converges`: each layer's features can be inverted back to an image (Mahendran & Vedaldi 2015)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, require_at_least, require_unit
from auditkit.methods import inversion as inv
from auditkit.methods.optimise import relative_fall
from auditkit.methods.randomisation import random_copy

ZERO_NORM_REASON = "layer output is constant: all zeros (zero norm)"
CONSTANT_REASON = "layer output is constant up to rounding (numerics.constant_rows): any image matches it"


def layers_and_sources(check: Check, subject, audit_set) -> tuple[tuple[str, ...], list[int], torch.Tensor]:
    """(layers, sample indices, images) for an optimisation check: its `layers` or every named layer (each
    validated, unknown ones listing the valid names), and `samples` images taken class by class."""
    layers = tuple(dict.fromkeys(check.layers or subject.layers))
    if not layers:
        raise CheckConfigError(f"check {check.name!r}: model {subject.name!r} has no named layers; "
                               f"name them with the `layers` parameter")
    for layer in layers:
        subject.layer(layer)
    indices = class_round_robin(audit_set.labels(), check.samples)
    return layers, indices, audit_set.subset(indices).images()


def class_round_robin(labels: torch.Tensor, samples: int) -> list[int]:
    """`samples` indices (all when samples <= 0), taking the classes in turn (in order of first appearance),
    the first unused image of each, so a handful of samples covers every class; sorted."""
    labels = [int(v) for v in labels]
    if samples <= 0 or samples >= len(labels):
        return list(range(len(labels)))
    queues: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        queues.setdefault(label, []).append(i)
    order = [q for q in queues.values()]
    picked: list[int] = []
    while len(picked) < samples:
        for queue in order:
            if queue and len(picked) < samples:
                picked.append(queue.pop(0))
    return sorted(picked)


def convergence_reasons(total: torch.Tensor, error: float, *, max_error: float, min_drop: float, plateau: float,
                        what: str = "final error") -> tuple[float, float, list[str]]:
    """The convergence rule shared by inversion and texture synthesis, on the mean total-loss curve `total`
    (1-D, one value per step) and the final error: (drop, last-tenth fall, failure reasons).

    drop = (total[0] - total[-1]) / total[0] must be >= min_drop; fall = (total[-1-k] - total[-1]) /
    total[-1-k], k = max(1, steps // 10), must satisfy |fall| < plateau (settled: neither still falling nor
    rising again); error <= max_error.
    A non-finite curve, or a loss that ended above where it started, is reported as diverged.
    """
    if total.numel() == 0:
        return math.nan, math.nan, ["no optimisation step ran"]
    if not torch.isfinite(total).all():
        return math.nan, math.nan, [f"loss diverged (NaN/inf) at step {int((~torch.isfinite(total)).nonzero()[0])}"]
    k = max(1, total.numel() // 10)
    drop = relative_fall(total, 0)
    fall = relative_fall(total, max(0, total.numel() - 1 - k))
    reasons = []
    if float(total[-1]) > float(total[0]):
        reasons.append(f"loss diverged: it rose from {float(total[0]):.3g} to {float(total[-1]):.3g}")
    if not error <= max_error:
        reasons.append(f"{what} {error:.3g} > max_error {max_error:.3g}")
    if not drop >= min_drop:
        reasons.append(f"loss fell by {drop:.3g} < min_drop {min_drop:.3g}")
    if not abs(fall) < plateau:
        state = "still falling" if fall > 0 else "rising again"
        reasons.append(f"not settled, {state}: changed by {abs(fall):.3g} over the last tenth >= plateau {plateau:.3g}")
    return drop, fall, reasons


def pixel_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: sqrt(mean (a - b)^2) over channels and pixels."""
    return ((a - b.to(a.device, a.dtype)) ** 2).flatten(1).mean(1).sqrt()


@dataclass
class ConvergenceCheck(Check):
    """Parameters and validation shared by the optimisation checks judged by the convergence rule
    (inversion-converges, texture-synthesis-converges); see convergence_reasons."""

    layers: tuple[str, ...] = ()
    steps: int = 100
    samples: int = 5
    lr: float = 0.1
    final_lr_ratio: float = 0.001
    parametrisation: Literal["fourier", "sigmoid"] = "fourier"
    max_error: float = 0.5
    min_drop: float = 0.5
    plateau: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        require_at_least(self, steps=10, samples=0, lr=1e-12, max_error=0, final_lr_ratio=1e-12)
        require_unit(self, "min_drop", "plateau", "final_lr_ratio")
        if self.parametrisation not in ("fourier", "sigmoid"):
            raise CheckConfigError(f"check {self.name!r}: parametrisation must be 'fourier' or 'sigmoid', "
                                   f"got {self.parametrisation!r}")

    def layer_verdict(self, total: torch.Tensor, error: float, blockers: Sequence[str],
                      what: str = "final error") -> tuple[float, float, list[str]]:
        """(drop, last-tenth fall, reasons) for one layer: the first non-empty blocker (a run whose curve
        cannot be judged: diverged, zero output) fails it outright; otherwise convergence_reasons."""
        for reason in blockers:
            if reason:
                return math.nan, math.nan, [reason]
        return convergence_reasons(total, error, max_error=self.max_error, min_drop=self.min_drop,
                                   plateau=self.plateau, what=what)

    def layers_result(self, rows: list[dict], outcome: str, details: dict) -> CheckResult:
        """Passes when every layer's row passed; the message lists each failed layer with its reasons."""
        failed = [r for r in rows if not r["passed"]]
        message = (f"{len(rows) - len(failed)} of {len(rows)} {outcome}"
                   + (": " + "; ".join(f"{r['layer']}: {r['reason']}" for r in failed) if failed else ""))
        return self.result(metric="layers converged", value=(len(rows) - len(failed)) / len(rows), threshold=1.0,
                           direction=">=", rows=rows, columns=list(rows[0]), message=message, details=details)


@dataclass
class InversionConverges(ConvergenceCheck):
    """Per layer, invert the features of `samples` images (classes in turn) from noise: `steps` Adam steps,
    alpha-norm and TV regularisers, all layers and images in one batch. A layer passes when the mean final
    relative feature error ||f(x*) - f(x0)|| / ||f(x0)|| <= max_error, the mean total loss fell by at least
    min_drop from its first to its last value, and over the last tenth of the steps it fell by less than
    `plateau`. The cosine learning-rate schedule ends at lr * final_lr_ratio (1/1000), so a converged loss
    settles by design: the plateau rule catches a step budget too short for the schedule's tail, the error
    rule catches a plateau in the wrong place. A diverged (NaN/inf or rising) loss or a layer output that
    is constant (all zeros, or constant up to rounding) fails. The check passes when every layer passes. `samples` = 0 inverts the whole audit
    set at once (cost grows linearly with it: see benchmarks/synthesis.py). The same inversion through a
    randomly initialised copy of the model is reported beside it (random networks invert well too: He et
    al. 2016), and the pixel distance of each reconstruction to its original shows how much each layer keeps.
    """

    kind = "inversion-converges"
    title = "Feature inversion converges"
    description = (
        "x* = argmin ||f(x) - f(x0)||^2 / ||f(x0)||^2 + lambda_alpha * mean|x - 0.5|^6 + lambda_tv * TV_2(x), "
        "x = sigmoid(Fourier image) from noise, Adam with a cosine schedule to lr * final_lr_ratio. A layer "
        "passes when mean ||f(x*) - f(x0)|| / ||f(x0)|| <= max_error, the total loss fell by >= min_drop "
        "(relative) and by < plateau over the last tenth of the steps; the check passes when all layers pass. "
        "A randomly initialised copy of the model is inverted beside it."
    )

    random_baseline: bool = True

    def _invert(self, subject, images: torch.Tensor, layers: Sequence[str],
                sample_ids: Sequence[object]) -> dict[str, inv.InversionResult]:
        return inv.invert_layers(subject, images, layers, steps=self.steps, lr=self.lr,
                                 final_lr_ratio=self.final_lr_ratio, parametrisation=self.parametrisation,
                                 seed=self.seed, sample_ids=sample_ids)

    def run(self, subject, audit_set) -> CheckResult:
        from auditkit.subject import Subject

        layers, indices, images = layers_and_sources(self, subject, audit_set)

        ids = [audit_set[i].id or str(i) for i in indices]
        results = self._invert(subject, images, layers, ids)
        randoms: dict[str, inv.InversionResult] = {}
        if self.random_baseline:
            random_module = random_copy(subject.module, self.seed)
            with Subject(dataclasses.replace(subject.spec, module=random_module), device=subject.device) as rnd:
                randoms = self._invert(rnd, images, layers, ids)
        rows = [self._row(layer, results[layer], randoms.get(layer), images) for layer in layers]

        rmse = [r["pixel_rmse"] for r in rows]
        result = self.layers_result(rows, "layers converge", {
            "samples": indices, "steps": self.steps, "lr": self.lr, "final_lr_ratio": self.final_lr_ratio,
            "parametrisation": self.parametrisation, "lambda_alpha": inv.LAMBDA_ALPHA, "lambda_tv": inv.LAMBDA_TV,
            "pixel_rmse_grows_with_depth": all(a <= b for a, b in zip(rmse, rmse[1:]))})
        result.evidence = self._evidence(images, layers, results, randoms, rows)
        return result

    def _row(self, layer: str, res: inv.InversionResult, rnd: inv.InversionResult | None,
             images: torch.Tensor) -> dict:
        error = float(res.final_error.mean())
        zero = (f"{ZERO_NORM_REASON} for {int(res.zero_norm.sum())} of {res.zero_norm.numel()} samples"
                if bool(res.zero_norm.any()) else "")
        flat = res.constant & ~res.zero_norm
        constant = (f"{CONSTANT_REASON} for {int(flat.sum())} of {flat.numel()} samples"
                    if bool(flat.any()) else "")
        diverged = f"loss diverged (NaN/inf) at step {res.diverged_step}" if bool(res.diverged.any()) else ""
        drop, fall, reasons = self.layer_verdict(res.curves["total"].mean(1), error, [zero, constant, diverged])
        nan = math.nan
        return {
            "layer": layer, "final_error": error, "max_final_error": float(res.final_error.max()), "drop": drop,
            "last_tenth_fall": fall, "pixel_rmse": float(pixel_rmse(res.reconstructions, images).mean()),
            "random_final_error": float(rnd.final_error.mean()) if rnd else nan,
            "random_pixel_rmse": float(pixel_rmse(rnd.reconstructions, images).mean()) if rnd else nan,
            "passed": not reasons, "reason": "; ".join(reasons),
        }

    def _evidence(self, images, layers, results, randoms, rows):
        scale = max(1, math.ceil(96 / images.shape[-1]))  # panels at least 96 px wide
        grid_rows, titles, labels = [], [], []
        for i in range(images.shape[0]):
            grid_rows.append([ev.upscale(images[i], scale)]
                             + [ev.upscale(results[l].reconstructions[i], scale) for l in layers])
            titles.append(["original"] + [f"{l}: err {float(results[l].final_error[i]):.2f}" for l in layers])
            labels.append(f"sample {i}")
            if randoms:
                grid_rows.append([None] + [ev.upscale(randoms[l].reconstructions[i], scale) for l in layers])
                titles.append([""] + [f"random: err {float(randoms[l].final_error[i]):.2f}" for l in layers])
                labels.append(f"sample {i}, random model")
        grid = ev.panel_grid(grid_rows, titles=titles, row_labels=labels, scale=1)
        series = {}
        for l in layers:
            curve = results[l].curves["total"].mean(1)
            series[l] = (list(range(len(curve))), curve.tolist())
            if randoms:
                curve = randoms[l].curves["total"].mean(1)
                series[f"{l} (random)"] = (list(range(len(curve))), curve.tolist())
        curves_svg = ev.line_chart_svg(series, log_y=True, title="Total inversion loss (mean over samples)",
                                       x_label="step", y_label="loss")
        depth = list(range(1, len(layers) + 1))
        rmse_series = {"trained": (depth, [r["pixel_rmse"] for r in rows])}
        if randoms:
            rmse_series["random weights"] = (depth, [r["random_pixel_rmse"] for r in rows])
        rmse_svg = ev.line_chart_svg(rmse_series, title="Pixel RMSE of the reconstruction, by depth",
                                     x_label="layer depth (1 = shallowest)", y_label="pixel RMSE")
        depth_names = ", ".join(f"{i} = {l}" for i, l in zip(depth, layers))
        return [
            ev.png_evidence("Feature inversion", grid,
                            "Each sample, then its reconstruction from each layer of the trained model (titles: "
                            "layer and relative feature error)"
                            + ("; the row below inverts the same layers of a randomly initialised copy." if randoms
                               else ".")),
            ev.svg_evidence("Inversion loss curves", curves_svg,
                            "Total loss per step, one line per layer (log scale)."),
            ev.svg_evidence("Pixel distance to the original", rmse_svg,
                            "Shallow layers keep more of the image, so their reconstructions should lie closer "
                            f"to the original than those of deep layers. Depth: {depth_names}."),
        ]
