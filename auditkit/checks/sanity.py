"""Check `saliency-sanity`: the saliency map depends on the model's weights (Adebayo et al. 2018)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, require_alpha, require_at_least
from auditkit.checks.decision import ALPHA, decide
from auditkit.checks.saliency import Method, run_auto, validate_method_layer
from auditkit.methods import randomisation as rnd
from auditkit.progress import report
from auditkit.methods.numerics import CONSTANT_RTOL, NonFiniteError, constant_rows, require_finite
from auditkit.methods import saliency as sal

_MAX_COLUMNS = 8  # map columns in the evidence grid: the original and at most 7 cascade steps


@dataclass
class SaliencySanity(Check):
    """Cascading model-parameter randomisation: re-initialise the layers of a copy of the model from
    the output layer down, a block at a time and cumulatively (at most `max_steps` blocks that follow the
    module tree, methods.randomisation.cascade_blocks; 0: one parameter layer per step, as the paper), and after each step compare the saliency
    map with the trained model's by Spearman rank correlation (mean over the first `samples` audit
    samples). An explanation of the model must change once the model is random: the check passes
    when the correlation after randomising all layers is <= max_similarity. The user's module is
    never changed (the randomisation runs on a deep copy).
    """

    kind = "saliency-sanity"
    title = "Saliency depends on the model's weights"
    description = (
        "rho_k = mean over samples of Spearman(|map of the trained model|, |map after re-initialising the "
        "top k blocks of parameter layers|) (Adebayo et al. 2018, cascading randomisation; at most max_steps "
        "blocks that follow the module tree). With rho_i the sample's "
        "correlation after randomising all layers, passes when mean(max_similarity - rho_i) >= 0 and a one-sided "
        "Wilcoxon signed-rank test of max_similarity - rho_i > 0 gives p <= alpha. Samples whose map is constant "
        "up to rounding (no ranking) are left out and counted; if every trained map is, the check cannot run."
    )

    method: Method = "auto"
    layer: str = ""
    max_similarity: float = 0.5
    alpha: float = ALPHA
    samples: int = 16
    max_steps: int = 12
    absolute: bool = True
    evidence_samples: int = 3
    seed: int = 0

    def validate(self) -> None:
        if not -1.0 <= self.max_similarity <= 1.0:
            raise CheckConfigError(f"check {self.name!r}: max_similarity must be in [-1, 1], got {self.max_similarity}")
        require_at_least(self, samples=1, evidence_samples=0, max_steps=0)
        require_alpha(self)
        validate_method_layer(self)

    def _maps(self, subject, images, labels, layer, ids, state: str = "trained") -> torch.Tensor:
        """The maps (absolute when `absolute`); NaN or inf is a NonFiniteError naming method, layer, samples."""
        try:
            maps = sal.saliency_map(subject, images, labels, self.method, layer=layer, sample_ids=ids).float()
        except NonFiniteError as exc:  # say which model: the trained one, or a randomised copy
            raise NonFiniteError(f"{exc} (the {state} model)") from exc
        require_finite(maps, f"saliency map of the {state} model", method=self.method, layer=layer or "",
                       sample_ids=ids)
        return maps.abs() if self.absolute else maps

    def run(self, subject, audit_set) -> CheckResult:
        if self.method == "auto":
            return run_auto(self, subject, audit_set)
        n = min(self.samples, len(audit_set))
        if n == 0:
            return self.error_result(f"audit set {audit_set.name!r} is empty")
        first = audit_set.subset(range(n))
        images, labels = first.images(), first.labels()
        # Grad-CAM's layer is resolved once, by name, so every copy uses the same one.
        layer = None
        if self.method == "grad_cam":
            layer = self.layer or subject.map_layer()
            if layer is None:
                return self.error_result(f"model {subject.name!r} has no layers; give the check a layer for grad_cam")

        ids = [sample.id for sample in first]
        original = self._maps(subject, images, labels, layer, ids)
        usable = ~constant_rows(original)
        if not bool(usable.any()):  # no ranking at all: the check cannot run (ERROR), it must never pass
            return self.error_result(
                f"{self.method}: the trained model's maps are constant (up to rounding: max - min <= "
                f"{CONSTANT_RTOL:g} x max) for all {n} samples{f' at layer {layer!r}' if layer else ''}; "
                f"there is no ranking to compare with the randomised model's"
            )
        dropped = int((~usable).sum())

        rows, step_maps, rho = [], [], torch.empty(0)
        steps = len(rnd.cascade_blocks(subject.module, self.max_steps))
        for name, copy in rnd.cascade(subject.module, seed=self.seed, max_steps=self.max_steps):
            report(subject, "steps", len(rows) + 1, steps)
            with subject.derived(copy) as randomised:
                maps = self._maps(randomised, images, labels, layer, ids, f"randomised (down to {name or '<root>'})")
            rho = rnd.spearman_rows(original, maps)[usable]
            defined = rho[~torch.isnan(rho)]
            mean = float(defined.mean()) if defined.numel() else math.nan
            std = float(defined.std(unbiased=False)) if defined.numel() else math.nan
            rows.append({"step": len(rows) + 1, "randomised_down_to": name or "<root>", "spearman": mean,
                         "std": std, "constant_maps": int(rho.numel() - defined.numel())})
            step_maps.append(maps)
        if not rows:
            return self.error_result(f"model {subject.name!r} has no parameters to randomise")

        last = rows[-1]
        notes = []
        if dropped:
            notes.append(f"{dropped} of {n} samples left out: the trained model's map is constant (up to rounding)")
        constant_steps = [r for r in rows if r["constant_maps"]]
        if constant_steps:
            notes.append(f"the randomised map is constant (Spearman undefined, left out) for some samples at "
                         f"{len(constant_steps)} of {len(rows)} steps, {last['constant_maps']} at the last")
        if math.isnan(last["spearman"]):
            notes.append("after randomising all layers every map is constant, so no correlation is defined")
        message = (f"{self.method}: Spearman with the trained model's map falls from {rows[0]['spearman']:.2f} "
                   f"(top layer {rows[0]['randomised_down_to']} random) to {last['spearman']:.2f} "
                   f"(all {len(rnd.parameter_layers(subject.module))} parameter layers random, in {len(rows)} steps), over {int(usable.sum())} samples")
        if notes:
            message += "; " + "; ".join(notes)
        names = subject.spec.class_names
        groups = [names[int(labels[j])] for j in range(n) if bool(usable[j])]
        # a constant randomised map shares no ranking with the trained one: rho 0 for the decision
        decision = decide([self.max_similarity] * len(rho), torch.nan_to_num(rho, nan=0.0).tolist(), effect="difference", min_effect=0.0,
                          alpha=self.alpha, seed=self.seed, groups=groups, value_label="max_similarity",
                          control_label="Spearman(trained, randomised)")
        result = self.decided(
            decision, metric="max_similarity - Spearman after randomising all layers", rows=rows,
            columns=list(rows[0]), message=message,
            details={"method": self.method, "layer": layer, "absolute": self.absolute, "samples": n,
                     "samples_used": int(usable.sum()), "curve": [r["spearman"] for r in rows],
                     "spearman_per_sample": dict(zip([i for i, u in zip(ids, usable.tolist()) if u], rho.tolist()))},
        )
        result.evidence = self._evidence(audit_set, images, original, step_maps, rows)
        return result

    def _evidence(self, audit_set, images, original, step_maps, rows):
        if self.evidence_samples == 0:
            return []
        steps = list(range(len(step_maps)))
        if len(steps) > _MAX_COLUMNS - 1:  # keep the first and last step, evenly spaced in between
            k = _MAX_COLUMNS - 1
            steps = sorted({round(i * (len(steps) - 1) / (k - 1)) for i in range(k)})
        scale = max(1, 128 // images.shape[-1])
        grid_rows, titles, labels = [], [], []
        for j in range(min(self.evidence_samples, images.shape[0])):
            panels = [ev.upscale(ev.overlay(images[j], original[j]), scale)]
            panels += [ev.upscale(ev.overlay(images[j], step_maps[s][j]), scale) for s in steps]
            grid_rows.append(panels)
            titles.append(["trained"] + [f"to {rows[s]['randomised_down_to']}" for s in steps])
            labels.append(str(audit_set[j].id or j))
        grid = ev.panel_grid(grid_rows, titles=titles, row_labels=labels, scale=1)
        caption = (f"{self.method} map of the trained model, then after re-initialising the layers from the "
                   f"output down to the named one (cumulative). A sane method's map changes.")
        xs = [float(r["step"]) for r in rows]
        chart = ev.line_chart_svg(
            {"spearman": (xs, [r["spearman"] for r in rows]),
             "max_similarity": (xs, [self.max_similarity] * len(xs))},
            title=f"Cascading randomisation ({self.method})", x_label="layers randomised (top down)",
            y_label="Spearman rho",
        )
        chart_caption = "Mean Spearman correlation with the trained model's map, per cascade step: " + ", ".join(
            f"{r['step']}={r['randomised_down_to']}" for r in rows)
        return [ev.png_evidence(f"Saliency under randomisation ({self.method})", grid, caption),
                ev.svg_evidence(f"Randomisation curve ({self.method})", chart, chart_caption)]
