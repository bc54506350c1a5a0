"""Check `inversion-converges`: each layer's features can be inverted back to an image (Mahendran & Vedaldi 2015)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from auditkit import evidence as ev
from auditkit.checks.base import (Check, CheckConfigError, CheckResult, Status, require_alpha, require_at_least,
                                  require_unit)
from auditkit.checks.decision import ALPHA, combine, decide, needed_samples
from auditkit.methods import inversion as inv
from auditkit.methods.optimise import OPTIMISERS, relative_fall

ZERO_NORM_REASON = "layer output is constant: all zeros (zero norm)"
CONSTANT_REASON = "layer output is constant up to rounding (numerics.constant_rows): any image matches it"


def layers_and_sources(check: Check, subject, audit_set) -> tuple[tuple[str, ...], list[int], torch.Tensor]:
    """(layers, sample indices, images) for an optimisation check: its `layers`, or at most `max_layers`
    named layers spread from the first to the last (each validated, unknown ones listing the valid names),
    and `samples` images taken class by class."""
    layers = tuple(dict.fromkeys(check.layers or spread_layers(subject.layers, check.max_layers)))
    if not layers:
        raise CheckConfigError(f"check {check.name!r}: model {subject.name!r} has no named layers; "
                               f"name them with the `layers` parameter")
    for layer in layers:
        subject.layer(layer)
    indices = class_round_robin(audit_set.labels(), check.samples)
    return layers, indices, audit_set.subset(indices).images()


def spread_layers(layers, count: int) -> tuple[str, ...]:
    """At most `count` of `layers` (all when count <= 0): the first, the last and evenly spaced between."""
    layers = tuple(layers)
    if count <= 0 or len(layers) <= count:
        return layers
    if count == 1:
        return layers[-1:]
    return tuple(layers[round(k * (len(layers) - 1) / (count - 1))] for k in range(count))


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
                        window: int = 10, what: str = "normalised error") -> tuple[float, float, list[str]]:
    """The convergence rule shared by inversion and texture synthesis, on the mean total-loss curve `total`
    (1-D, one value per step run) and the mean final `error`: (drop, fall, failure reasons).

    drop = (total[0] - total[-1]) / total[0] must be >= min_drop; fall = (total[-1-k] - total[-1]) /
    total[-1-k] over the last k = `window` steps must be > -plateau (not rising again); error <= max_error.
    A non-finite curve, or a loss that ended above where it started, is reported as diverged. A loss still
    falling (fall >= plateau: the step budget ran out before it settled) is no failure by itself: the
    error rule decides, and the check notes it (still_falling).
    """
    if total.numel() == 0:
        return math.nan, math.nan, ["no optimisation step ran"]
    if not torch.isfinite(total).all():
        return math.nan, math.nan, [f"loss diverged (NaN/inf) at step {int((~torch.isfinite(total)).nonzero()[0])}"]
    k = max(1, min(window, total.numel() - 1))
    drop = relative_fall(total, 0)
    fall = relative_fall(total, max(0, total.numel() - 1 - k))
    reasons = []
    if float(total[-1]) > float(total[0]):
        reasons.append(f"loss diverged: it rose from {float(total[0]):.3g} to {float(total[-1]):.3g}")
    elif fall < 0 and not -fall < plateau:
        reasons.append(f"loss rising again: up by {-fall:.3g} over the last {k} steps (plateau {plateau:.3g})")
    if not error <= max_error:
        reasons.append(f"{what} {error:.3g} > max_error {max_error:.3g}")
    if not drop >= min_drop:
        reasons.append(f"loss fell by {drop:.3g} < min_drop {min_drop:.3g}")
    return drop, fall, reasons


def still_falling(fall: float, plateau: float) -> bool:
    """Whether the last window's relative fall says the loss had not settled yet (fall >= plateau)."""
    return math.isfinite(fall) and fall > 0 and not fall < plateau


def pixel_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: sqrt(mean (a - b)^2) over channels and pixels."""
    return ((a - b.to(a.device, a.dtype)) ** 2).flatten(1).mean(1).sqrt()


# A layer's verdict (the `verdict` column): only "failed" fails the check.
PASSED_LAYER = "passed"
FAILED_LAYER = "failed"
CANNOT_TELL = "cannot tell trained from random weights"
UNDECIDED = "inconclusive"
NOT_COMPARED = "not compared with random weights"
RANDOM_CLOSER = "random weights converge measurably closer"


@dataclass
class ConvergenceCheck(Check):
    """Parameters, the per-layer rule and the verdict shared by the optimisation checks inversion-converges
    and texture-synthesis-converges.

    Per layer l, e_i is sample i's normalised error (its distance to its target over the mean distance
    between different audit images' targets, methods.inversion) and r_i the same optimisation's through
    a random-weights copy of the model (methods.randomisation.random_copy, same images, same seed), paired
    per sample. The optimiser runs for at most `steps` steps and stops early once every image's loss
    changed by at most `plateau` (relative) over `window` steps.

    - FAILED (the layer did not converge): the loss diverged (NaN/inf, ended above its start, or rose by
      >= plateau over the last window), fell by less than min_drop, mean_i e_i > max_error, or the layer's
      output is constant (any image matches it);
    - PASSED: converged, and decide(e, r, effect="ratio", better="lower") passes: the geometric mean of
      r_i / e_i >= min_ratio and a one-sided Wilcoxon signed-rank test of log(r_i / e_i) > 0 gives
      p <= alpha / L, L the layers compared (Bonferroni: one passing layer passes the check; checks.decision);
    - "cannot tell trained from random weights": converged, but not measurably closer than through random
      weights. Random networks invert and match textures well too (He et al. 2016), so such a layer measures
      the optimiser, not the model: it is shown as evidence and neither passes nor fails the check;
    - INCONCLUSIVE: fewer judged samples than the test needs (decision.needed_samples(alpha / L), 9 for 3
      layers at 0.01).

    The check is FAILED when a layer failed, else INCONCLUSIVE when a layer could not be decided, else
    PASSED when a layer passed, else INFO: no layer can be told from random weights, or random_baseline is
    off. INFO rather than INCONCLUSIVE, because more audit images would not change what is missing: both
    networks converge, so the check has nothing about this model to judge (INCONCLUSIVE is kept for "too
    few samples", which more samples do fix), and it shows its pictures as evidence, never as a pass.
    """

    layers: tuple[str, ...] = ()
    max_layers: int = 3  # without `layers`: this many named layers, first to last (each costs an optimisation)
    steps: int = 100
    samples: int = 10  # 9 reach alpha / 3 layers = 0.0033 (layer_alpha); one to spare
    optimiser: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float | None = None  # L-BFGS: each line search's first step; Adam: the learning rate; None: step_size()
    final_lr_ratio: float = 0.001  # Adam only: the cosine schedule's end, lr * final_lr_ratio
    parametrisation: Literal["fourier", "sigmoid"] = "fourier"
    max_error: float = 0.5
    min_drop: float = 0.5
    plateau: float = 0.01
    window: int = 10
    min_ratio: float = 1.25
    alpha: float = ALPHA
    random_baseline: bool = True
    seed: int = 0

    def validate(self) -> None:
        require_at_least(self, steps=10, samples=0, max_error=0, final_lr_ratio=1e-12, window=1, min_ratio=1.0)
        if self.lr is not None:
            require_at_least(self, lr=1e-12)
        require_unit(self, "min_drop", "plateau", "final_lr_ratio")
        require_alpha(self)
        if self.parametrisation not in ("fourier", "sigmoid"):
            raise CheckConfigError(f"check {self.name!r}: parametrisation must be 'fourier' or 'sigmoid', "
                                   f"got {self.parametrisation!r}")
        if self.optimiser not in OPTIMISERS:
            raise CheckConfigError(f"check {self.name!r}: optimiser must be one of {', '.join(OPTIMISERS)}, "
                                   f"got {self.optimiser!r}")

    #: Adam's default learning rate for this check (L-BFGS's first step is 1, the textbook value)
    ADAM_LR = 0.1

    def step_size(self) -> float:
        """lr, or the optimiser's default when lr is None: 1 for L-BFGS, ADAM_LR for Adam."""
        if self.lr is not None:
            return self.lr
        return 1.0 if self.optimiser == "lbfgs" else self.ADAM_LR

    def too_few_samples(self, indices: Sequence[int], audit_set) -> CheckResult | None:
        """INCONCLUSIVE before anything is optimised when fewer than 2 images are chosen: the normalised error
        divides by the distance to the other images, which one image does not have. (From 2 images on the
        layers run, so a real non-convergence still FAILS; below decision.needed_samples the verdict is
        INCONCLUSIVE.) None when there are enough."""
        if len(indices) >= 2:
            return None
        why = (f"only {len(indices)} image(s) chosen (samples = {self.samples}, audit set {audit_set.name!r} of "
               f"{len(audit_set)}): the normalised error needs other images to measure against, and the paired "
               f"test against random weights needs at least {needed_samples(self.alpha)}; nothing was optimised")
        decision = decide([], [], effect="ratio", min_effect=self.min_ratio, alpha=self.alpha, inconclusive=why)
        return self.decided(decision, metric="random / trained error (geometric mean)",
                            details={"samples": list(indices)})

    def layer_verdict(self, total: torch.Tensor, error: float, blockers: Sequence[str],
                      what: str = "normalised error") -> tuple[float, float, list[str]]:
        """(drop, last-window fall, reasons) for one layer: the first non-empty blocker (a run whose curve
        cannot be judged: diverged, zero output) fails it outright; otherwise convergence_reasons."""
        for reason in blockers:
            if reason:
                return math.nan, math.nan, [reason]
        return convergence_reasons(total, error, max_error=self.max_error, min_drop=self.min_drop,
                                   plateau=self.plateau, window=self.window, what=what)

    def layer_alpha(self, tests: int) -> float:
        """The level each of `tests` layers is judged at: alpha / tests (Bonferroni), since one layer that
        passes passes the check; at 3 layers and alpha 0.01 a layer needs p <= 0.0033, so 9 samples."""
        return self.alpha / max(1, tests)

    def compare(self, layer: str, trained: torch.Tensor, random: torch.Tensor | None, groups: Sequence[str],
                reasons: Sequence[str], what: str = "normalised error", tests: int = 1) -> dict:
        """The layer's verdict against random weights, as row fields: verdict, random / trained ratio, p-value,
        passed (True, False, or None for a layer that neither passes nor fails), reason, and the Decision
        (key "decision", popped by the caller); judged at layer_alpha(tests), `tests` the layers compared."""
        alpha = self.layer_alpha(tests)
        if random is None:
            decision = None
        else:
            decision = decide(trained.tolist(), random.tolist(), effect="ratio", min_effect=self.min_ratio,
                              alpha=alpha, seed=self.seed, groups=groups, better="lower",
                              value_label=f"{layer} {what} (trained)",
                              control_label=f"{layer} {what} (random weights)")
        ratio = decision.effect if decision else math.nan
        p = decision.p_value if decision else math.nan
        if reasons:
            verdict, passed, reason = FAILED_LAYER, False, "; ".join(reasons)
        elif decision is None:
            verdict, passed, reason = NOT_COMPARED, None, "converged; random_baseline is off, so not compared"
        elif decision.status is Status.PASSED:
            verdict, passed, reason = PASSED_LAYER, True, ""
        elif decision.status is Status.INCONCLUSIVE:
            verdict, passed, reason = UNDECIDED, None, decision.reason
        else:
            verdict, passed = CANNOT_TELL, None
            reverse = decide(random.tolist(), trained.tolist(), effect="ratio", min_effect=self.min_ratio,
                             alpha=alpha, seed=self.seed, better="lower")
            reason = (f"converged, but {RANDOM_CLOSER} (random / trained "
                      f"{ratio:.3g}x, p = {reverse.p_value:.2g}): evidence, not judged"
                      if reverse.status is Status.PASSED else
                      f"converged, but not measurably closer than through random weights ({decision.reason}): "
                      f"evidence, not judged")
        return {"verdict": verdict, "random_over_trained": ratio, "p_value": p, "passed": passed,
                "reason": reason, "decision": decision}

    def layers_result(self, rows: list[dict], decisions: dict, outcome: str, details: dict) -> CheckResult:
        """The check's result from its layer rows (see the class doc): FAILED > INCONCLUSIVE > PASSED > INFO."""
        failed = [r for r in rows if r["verdict"] == FAILED_LAYER]
        undecided = [r for r in rows if r["verdict"] == UNDECIDED]
        passed = [r for r in rows if r["verdict"] == PASSED_LAYER]
        evidence = [r for r in rows if r["verdict"] == CANNOT_TELL]
        alone = [r for r in rows if r["verdict"] == NOT_COMPARED]
        converged = len(rows) - len(failed)
        details = {**details, "decisions": {layer: d.to_dict() for layer, d in decisions.items()}}
        parts = [f"{converged} of {len(rows)} {outcome} ({self._what_converged()})"]
        if failed:
            parts.append("failed: " + "; ".join(f"{r['layer']}: {r['reason']}" for r in failed))
        if passed:
            parts.append(f"measurably closer than through random weights (random / trained >= "
                         f"{self.min_ratio:g}, p <= alpha / {len(rows)} layers = {self.layer_alpha(len(rows)):.2g}): "
                         + ", ".join(r["layer"] for r in passed))
        if evidence:
            parts.append(f"{CANNOT_TELL} (evidence, not judged): " + ", ".join(r["layer"] for r in evidence))
            closer = [r["layer"] for r in evidence if RANDOM_CLOSER in r["reason"]]
            if closer:
                parts.append(f"{RANDOM_CLOSER} than the trained model: " + ", ".join(closer))
        if alone:
            parts.append("random_baseline is off, so not compared with random weights (evidence, not judged): "
                         + ", ".join(r["layer"] for r in alone))
        notes = details.get("notes") or []
        message = "; ".join(parts + list(notes))
        common = dict(rows=rows, columns=list(rows[0]), details=details)
        if failed:
            return self.result(metric="layers converged", value=converged / len(rows), threshold=1.0,
                               direction=">=", message=message, **common)
        metric = "random / trained error (geometric mean)"
        if undecided:
            decision = combine([decisions[r["layer"]] for r in undecided], rule=self._rule())
            return self.decided(decision, metric=metric, message=message, **common)
        if passed:
            decision = combine([decisions[r["layer"]] for r in passed], rule=self._rule())
            return self.decided(decision, metric=metric, message=message, **common)
        if decisions:
            decision = dataclasses.replace(
                combine(list(decisions.values()), rule=self._rule()), status=Status.INFO,
                reason="no layer converges measurably closer than through random weights, so the check measured "
                       "the optimiser, not the model: evidence only")
            return self.decided(decision, metric=metric, message=message, **common)
        return self.info_result(message=message, **common)

    def _what_converged(self) -> str:
        return f"mean normalised error <= {self.max_error:g}, no divergence"

    def _rule(self) -> str:
        return (f"per layer: converged (mean normalised error <= {self.max_error:g}, no divergence), and the "
                f"normalised errors through random weights r_i over the trained model's e_i have geometric mean "
                f">= {self.min_ratio:g} with a one-sided Wilcoxon signed-rank test of log(r_i / e_i) > 0 giving "
                f"p <= {self.alpha:g}; layers that cannot be told from random weights are evidence only")

    def layers_steps_note(self, label: str, results: dict) -> str:
        """steps_note for the layers' results: one clause when every layer ended alike, else one per layer
        (with L-BFGS each layer is an optimisation of its own)."""
        ends = {layer: (res.steps, res.settled_step) for layer, res in results.items()}
        if len(set(ends.values())) == 1:
            return self.steps_note(label, *next(iter(ends.values())))
        return "; ".join(self.steps_note(f"{label}, {layer}", *end) for layer, end in ends.items())

    def steps_note(self, label: str, steps: int, settled: int | None) -> str:
        """How the optimisation ended, e.g. "trained: settled after 62 of 100 steps"."""
        if settled is not None:
            return f"{label}: settled after {steps} of {self.steps} steps"
        return f"{label}: ran the whole budget of {self.steps} steps"


@dataclass
class InversionConverges(ConvergenceCheck):
    """Per layer, invert the features of `samples` images (classes in turn) from noise (Mahendran & Vedaldi
    2015): L-BFGS (one optimisation per layer) or Adam (all layers in one batch) with alpha-norm and TV
    regularisers, for at most `steps`
    steps, stopping early once every image's loss changed by <= plateau (relative) over `window` steps. The
    same inversion runs through a random-weights copy of the model (same images, same seed). Per sample i:

        e_i = ||f(x*_i) - f(x0_i)|| / mean_{j != i} ||f(x0_j) - f(x0_i)||   (trained model)
        r_i = the same through the random-weights copy

    A layer passes when it converged (mean_i e_i <= max_error: much closer to its own image's features than
    to the other images'; no NaN/inf, no rising loss, loss fell by >= min_drop, output not constant) and
    its errors are measurably below random weights': geometric mean of r_i / e_i >= min_ratio and a
    one-sided Wilcoxon signed-rank test of log(r_i / e_i) > 0 gives p <= alpha / L (L layers). A converged layer that
    cannot be told from random weights is evidence, not a gate (random networks invert well too: He et al.
    2016; the issue that introduced this rule found the demo's random copy inverting better than the
    trained model). The check's status follows ConvergenceCheck: FAILED when a layer did not converge,
    INCONCLUSIVE with fewer than decision.needed_samples(alpha / L) judged samples (9 at 3 layers), PASSED when a
    layer passed, INFO when no layer can be told from random weights. The relative error ||f(x*) - f(x0)|| /
    ||f(x0)|| and the pixel distance of each reconstruction to its original are shown beside. `samples` = 0
    inverts the whole audit set at once (cost grows linearly with it: see benchmarks/synthesis.py).
    """

    kind = "inversion-converges"
    title = "Feature inversion converges"
    description = (
        "x* = argmin ||f(x) - f(x0)||^2 / ||f(x0)||^2 + lambda_alpha * mean|x - 0.5|^6 + lambda_tv * TV_2(x), "
        "x = sigmoid(Fourier image) from noise, L-BFGS with a strong-Wolfe line search (optimiser 'adam': Adam "
        "with a cosine schedule to lr * final_lr_ratio), at most `steps` steps, stopping once every loss "
        "changed by <= plateau over `window` steps; the same through a "
        "random-weights copy. e_i = ||f(x*_i) - f(x0_i)|| / mean_{j != i} ||f(x0_j) - f(x0_i)||, r_i the random "
        "copy's. A layer passes when mean e_i <= max_error (and no NaN, no rising loss, loss fell by >= min_drop) "
        "and geomean(r_i / e_i) >= min_ratio with a one-sided Wilcoxon test of log(r_i / e_i) > 0 at p <= alpha / L "
        "(L layers); "
        "a converged layer not measurably below random weights is evidence only. FAILED if a layer did not "
        "converge, INCONCLUSIVE below the samples the test needs (9 at 3 layers, alpha 0.01), PASSED if a layer "
        "passed, else INFO."
    )

    # L-BFGS in 50 steps a layer (about 55 evaluations each) reaches what Adam (lr 0.25, cosine) did in
    # 80: mean normalised errors 0.12-0.21 against 0.15-0.28 on the demo's trained model. Fewer steps judge
    # the speed of the start, not where it ends: at 25 the demo's stage1 passed (random / trained 1.42x),
    # its random copy not yet caught up (1.21x at 50, evidence only), so the budget is kept at 50
    steps: int = 50
    ADAM_LR = 0.25  # Adam (optimiser = "adam") needed about 80 steps at this rate for L-BFGS's errors in 50

    def _invert(self, subject, images: torch.Tensor, layers: Sequence[str],
                sample_ids: Sequence[object]) -> dict[str, inv.InversionResult]:
        return inv.invert_layers(subject, images, layers, steps=self.steps, lr=self.step_size(),
                                 optimiser=self.optimiser, final_lr_ratio=self.final_lr_ratio,
                                 parametrisation=self.parametrisation,
                                 seed=self.seed, plateau=self.plateau, window=self.window, sample_ids=sample_ids)

    def run(self, subject, audit_set) -> CheckResult:

        layers, indices, images = layers_and_sources(self, subject, audit_set)
        undecided = self.too_few_samples(indices, audit_set)
        if undecided is not None:
            return undecided
        ids = [audit_set[i].id or str(i) for i in indices]
        groups = [audit_set.class_names[int(label)] for label in audit_set.labels()[indices]]
        results = self._invert(subject, images, layers, ids)
        randoms: dict[str, inv.InversionResult] = {}
        if self.random_baseline:
            with subject.randomised(self.seed) as rnd:
                randoms = self._invert(rnd, images, layers, ids)
        rows, decisions = [], {}
        for layer in layers:
            row = self._row(layer, results[layer], randoms.get(layer), images, groups, len(layers))
            decision = row.pop("decision")
            if decision is not None:
                decisions[layer] = decision
            rows.append(row)

        first = results[layers[0]]
        notes = [self.layers_steps_note("trained", results)]
        if randoms:
            notes.append(self.layers_steps_note("random weights", randoms))
        unsettled = [r["layer"] for r in rows if r.pop("_still_falling")]
        if unsettled:
            notes.append(f"loss still falling at the end ({', '.join(unsettled)}): more steps would lower the error")
        rmse = [r["pixel_rmse"] for r in rows]
        result = self.layers_result(rows, decisions, "layers converge", {
            "samples": indices, "steps": self.steps,
            "steps_used": {layer: res.steps for layer, res in results.items()},
            "settled_step": {layer: res.settled_step for layer, res in results.items()},
            "steps_used_random": {layer: res.steps for layer, res in randoms.items()} if randoms else None,
            "settled_step_random": {layer: res.settled_step for layer, res in randoms.items()} if randoms else None,
            "optimiser": self.optimiser, "evaluations": first.params.get("evaluations"), "lr": self.step_size(),
            "final_lr_ratio": self.final_lr_ratio, "plateau": self.plateau, "window": self.window,
            "parametrisation": self.parametrisation, "lambda_alpha": inv.LAMBDA_ALPHA, "lambda_tv": inv.LAMBDA_TV,
            "pixel_rmse_grows_with_depth": all(a <= b for a, b in zip(rmse, rmse[1:])), "notes": notes})
        result.evidence = self._evidence(images, layers, results, randoms, rows)
        return result

    def _row(self, layer: str, res: inv.InversionResult, rnd: inv.InversionResult | None,
             images: torch.Tensor, groups: Sequence[str], tests: int = 1) -> dict:
        error = float(res.normalised_error.mean())
        zero = (f"{ZERO_NORM_REASON} for {int(res.zero_norm.sum())} of {res.zero_norm.numel()} samples"
                if bool(res.zero_norm.any()) else "")
        flat = res.constant & ~res.zero_norm
        constant = (f"{CONSTANT_REASON} for {int(flat.sum())} of {flat.numel()} samples"
                    if bool(flat.any()) else "")
        diverged = f"loss diverged (NaN/inf) at step {res.diverged_step}" if bool(res.diverged.any()) else ""
        total = res.curves["total"].mean(1)
        drop, fall, reasons = self.layer_verdict(total, error, [zero, constant, diverged])
        verdict = self.compare(layer, res.normalised_error, rnd.normalised_error if rnd else None, groups, reasons,
                               tests=tests)
        nan = math.nan
        return {
            "layer": layer, "verdict": verdict["verdict"], "normalised_error": error,
            "max_normalised_error": float(res.normalised_error.max()),
            "random_normalised_error": float(rnd.normalised_error.mean()) if rnd else nan,
            "random_over_trained": verdict["random_over_trained"], "p_value": verdict["p_value"],
            "relative_error": float(res.final_error.mean()),
            "random_relative_error": float(rnd.final_error.mean()) if rnd else nan,
            "pixel_rmse": float(pixel_rmse(res.reconstructions, images).mean()),
            "random_pixel_rmse": float(pixel_rmse(rnd.reconstructions, images).mean()) if rnd else nan,
            "drop": drop, "last_window_fall": fall, "passed": verdict["passed"], "reason": verdict["reason"],
            "decision": verdict["decision"], "_still_falling": not reasons and still_falling(fall, self.plateau),
        }

    def _evidence(self, images, layers, results, randoms, rows):
        scale = max(1, math.ceil(96 / images.shape[-1]))  # panels at least 96 px wide
        grid_rows, titles, labels = [], [], []
        for i in range(images.shape[0]):
            grid_rows.append([ev.upscale(images[i], scale)]
                             + [ev.upscale(results[l].reconstructions[i], scale) for l in layers])
            titles.append(["original"] + [f"{l}: e {float(results[l].normalised_error[i]):.2f}" for l in layers])
            labels.append(f"sample {i}")
            if randoms:
                grid_rows.append([None] + [ev.upscale(randoms[l].reconstructions[i], scale) for l in layers])
                titles.append([""] + [f"random: e {float(randoms[l].normalised_error[i]):.2f}" for l in layers])
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
                            "layer and normalised error e: the feature distance to the sample's own features over "
                            "the mean feature distance between different samples)"
                            + ("; the row below inverts the same layers of a randomly initialised copy." if randoms
                               else ".")),
            ev.svg_evidence("Inversion loss curves", curves_svg,
                            "Total loss per step, one line per layer (log scale)."),
            ev.svg_evidence("Pixel distance to the original", rmse_svg,
                            "Shallow layers keep more of the image, so their reconstructions should lie closer "
                            f"to the original than those of deep layers. Depth: {depth_names}."),
        ]
