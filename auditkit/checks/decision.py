"""The decision layer: every judged check decides on per-sample values against a control measured in
the same run, with one stated rule.

For the n samples where both the model's value v_i and the control's value c_i are finite:

    d_i = v_i - c_i                      (effect "difference": the mean of d is the effect)
    d_i = log v_i - log c_i              (effect "ratio": exp(mean d), the geometric-mean ratio, is the effect)
    d_i = sign(v_i - c_i)                (effect "win_rate": the share of untied pairs with v_i > c_i)

    p      = one-sided p-value that d is centred above 0: scipy.stats.wilcoxon(d != 0, alternative="greater")
             for "difference" and "ratio", scipy.stats.binomtest(wins, untied, 0.5, "greater") for "win_rate"
    CI     = the effect's two-sided 1 - 2 alpha interval (its lower end is the one-sided 1 - alpha bound):
             a seeded BCa scipy.stats.bootstrap of the mean of d, or Clopper-Pearson for a win rate

    PASSED        p <= alpha and effect >= min_effect
    FAILED        otherwise
    INCONCLUSIVE  n < needed_samples(alpha): even n pairs all in the model's favour give p = 0.5^n > alpha,
                  so the data cannot decide (n = 7 at alpha = 0.01); or the check says why it cannot decide.

Ties (d_i = 0) carry no direction and are dropped from the test, as the Wilcoxon and sign tests do; they
still count as judged samples, so a model that changes nothing FAILS rather than stays undecided.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
from scipy import stats

from auditkit.checks.base import Status

Effect = Literal["difference", "ratio", "win_rate"]

#: The default significance level of every judged check.
ALPHA = 0.01
_BOOTSTRAP_RESAMPLES = 2000
_RATIO_FLOOR = 1e-6  # values at or below it are taken as this before the log of a ratio


def needed_samples(alpha: float) -> int:
    """The fewest untied pairs for which a one-sided signed-rank or sign test can reach `alpha`:
    the smallest p-value of n pairs is 0.5^n, so n = ceil(log2(1 / alpha))."""
    return max(1, math.ceil(math.log2(1.0 / alpha) - 1e-12))


@dataclass
class Decision:
    """The outcome of one paired comparison (see the module's docstring for the rule)."""

    status: Status
    rule: str  # the rule in words, with its numbers
    effect_kind: str
    n: int  # judged samples (both values finite)
    effect: float  # mean difference, geometric-mean ratio or win rate
    ci: tuple[float, float]
    p_value: float
    alpha: float
    min_effect: float
    value: float  # the model's summary (mean, or geometric mean for a ratio)
    control: float  # the control's summary, the same way
    reason: str = ""  # why it failed or could not decide; "" when it passed
    needed: int = 0  # samples the test needs to be able to reach alpha
    by_class: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # {"value": what v is, "control": what c is}
    better: str = "higher"  # which way the values beat the control

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["ci"] = list(self.ci)
        return d

    def summary(self) -> str:
        """One line: effect with its interval, p-value, n and the control."""
        unit = {"ratio": "x", "win_rate": " win rate", "difference": ""}[self.effect_kind]
        return (f"effect {self.effect:.3g}{unit} (CI {self.ci[0]:.3g} to {self.ci[1]:.3g}, needs >= "
                f"{self.min_effect:.3g}), p = {self.p_value:.2g} (alpha {self.alpha:g}), n = {self.n}; "
                f"{self.labels.get('value', 'model')} {self.value:.3g} vs {self.labels.get('control', 'control')} "
                f"{self.control:.3g}")


def decide(values: Sequence[float] | np.ndarray, controls: Sequence[float] | np.ndarray, *, effect: Effect,
           min_effect: float, alpha: float = ALPHA, seed: int = 0, groups: Sequence[Any] | None = None,
           value_label: str = "model", control_label: str = "control", better: Literal["higher", "lower"] = "higher",
           inconclusive: str = "") -> Decision:
    """Decide whether `values` beat their paired `controls` (module docstring), where `better` says
    which way: "lower" tests control - value (ratio: control / value) instead, and reports both as given.

    `groups` (one name per sample, e.g. the class) adds a per-group breakdown. A non-empty
    `inconclusive` gives INCONCLUSIVE with that reason whatever the numbers.
    """
    if effect not in ("difference", "ratio", "win_rate"):
        raise ValueError(f"effect must be 'difference', 'ratio' or 'win_rate', got {effect!r}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.asarray(controls, dtype=np.float64).reshape(-1)
    if v.shape != c.shape:
        raise ValueError(f"values ({v.size}) and controls ({c.size}) must pair up one to one")
    keep = np.isfinite(v) & np.isfinite(c)
    v, c = v[keep], c[keep]
    kept_groups = [g for g, k in zip(groups, keep) if k] if groups is not None else None
    n = int(v.size)
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    d = _differences(v, c, effect) if better == "higher" else _differences(c, v, effect)
    needed = needed_samples(alpha)
    value, control = _summary(v, effect), _summary(c, effect)
    eff, ci = _effect(d, effect, alpha, seed)
    p = _p_value(d, effect)
    labels = {"value": value_label, "control": control_label}
    rule = _rule(effect, alpha, min_effect, value_label, control_label, better)

    if inconclusive:
        status, reason = Status.INCONCLUSIVE, inconclusive
    elif n < needed:
        status = Status.INCONCLUSIVE
        reason = (f"only {n} sample(s) could be judged; a one-sided test at alpha = {alpha:g} needs at least "
                  f"{needed} (the smallest p-value of n samples is 0.5^n)")
    elif not (p <= alpha and eff >= min_effect):
        status = Status.FAILED
        reason = "; ".join(([] if eff >= min_effect else [f"effect {eff:.3g} below the minimum {min_effect:.3g}"])
                           + ([] if p <= alpha else [f"not significant, p = {p:.2g} > alpha {alpha:g}"]))
    else:
        status, reason = Status.PASSED, ""
    return Decision(status=status, rule=rule, effect_kind=effect, n=n, effect=eff, ci=ci, p_value=p, alpha=alpha,
                    min_effect=min_effect, value=value, control=control, reason=reason, needed=needed,
                    by_class=_by_group(v, c, d, effect, kept_groups), labels=labels, better=better)


def combine(decisions: Sequence[Decision], rule: str) -> Decision:
    """Intersection-union: passes only when every decision passes (its p-value is the largest p, its
    effect the weakest); INCONCLUSIVE when any is and none FAILED; FAILED when any failed."""
    if not decisions:
        raise ValueError("combine needs at least one decision")
    failed = [d for d in decisions if d.status is Status.FAILED]
    undecided = [d for d in decisions if d.status is Status.INCONCLUSIVE]
    worst = min(decisions, key=lambda d: d.effect - d.min_effect if math.isfinite(d.effect) else -math.inf)
    status = Status.FAILED if failed else Status.INCONCLUSIVE if undecided else Status.PASSED
    reason = "; ".join(f"{d.labels.get('value', '')}: {d.reason}" for d in failed or undecided)
    return Decision(status=status, rule=rule, effect_kind=worst.effect_kind, n=min(d.n for d in decisions),
                    effect=worst.effect, ci=worst.ci, p_value=max(d.p_value for d in decisions), alpha=worst.alpha,
                    min_effect=worst.min_effect, value=worst.value, control=worst.control, reason=reason,
                    needed=max(d.needed for d in decisions), by_class=worst.by_class, labels=worst.labels,
                    better=worst.better)


def _differences(v: np.ndarray, c: np.ndarray, effect: str) -> np.ndarray:
    if effect == "ratio":
        return np.log(np.maximum(v, _RATIO_FLOOR)) - np.log(np.maximum(c, _RATIO_FLOOR))
    if effect == "win_rate":
        return np.sign(v - c)
    return v - c


def _summary(x: np.ndarray, effect: str) -> float:
    if x.size == 0:
        return math.nan
    if effect == "ratio":
        return float(np.exp(np.log(np.maximum(x, _RATIO_FLOOR)).mean()))
    return float(x.mean())


def _effect(d: np.ndarray, effect: str, alpha: float, seed: int) -> tuple[float, tuple[float, float]]:
    """(effect, two-sided 1 - 2 alpha interval)."""
    if d.size == 0:
        return math.nan, (math.nan, math.nan)
    if effect == "win_rate":
        wins, untied = int((d > 0).sum()), int((d != 0).sum())
        if untied == 0:
            return 0.5, (0.0, 1.0)
        ci = stats.binomtest(wins, untied, 0.5).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
        return wins / untied, (float(ci.low), float(ci.high))
    mean = float(d.mean())
    if d.size < 2 or float(d.max() - d.min()) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        lo = hi = mean  # no spread: nothing to resample
    else:
        res = stats.bootstrap((d,), np.mean, confidence_level=1 - 2 * alpha, n_resamples=_BOOTSTRAP_RESAMPLES,
                              method="BCa", rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # BCa degenerates on a few distinct values
            res = stats.bootstrap((d,), np.mean, confidence_level=1 - 2 * alpha, n_resamples=_BOOTSTRAP_RESAMPLES,
                                  method="percentile", rng=np.random.default_rng(seed))
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if effect == "ratio":
        return math.exp(mean), (math.exp(lo), math.exp(hi))
    return mean, (lo, hi)


def _p_value(d: np.ndarray, effect: str) -> float:
    untied = d[d != 0]
    if untied.size == 0:
        return 1.0
    if effect == "win_rate":
        return float(stats.binomtest(int((untied > 0).sum()), int(untied.size), 0.5, alternative="greater").pvalue)
    return float(stats.wilcoxon(untied, alternative="greater").pvalue)


def _by_group(v, c, d, effect: str, groups) -> list[dict[str, Any]]:
    if groups is None:
        return []
    out = []
    names = list(dict.fromkeys(groups))
    g = np.asarray([names.index(x) for x in groups], dtype=np.int64)
    for k, name in enumerate(names):
        mask = g == k
        dd = d[mask]
        out.append({"class": str(name), "n": int(mask.sum()), "value": _summary(v[mask], effect),
                    "control": _summary(c[mask], effect),
                    "effect": (float((dd > 0).sum() / max(1, (dd != 0).sum())) if effect == "win_rate"
                               else math.exp(float(dd.mean())) if effect == "ratio" else float(dd.mean())),
                    "model_wins": int((dd > 0).sum())})
    return out


def _rule(effect: str, alpha: float, min_effect: float, value: str, control: str, better: str = "higher") -> str:
    """The decision rule in words, for the report."""
    a, b = (value, control) if better == "higher" else (control, value)
    if effect == "ratio":
        return (f"passes when {a} / {b} per sample has geometric mean >= {min_effect:g} and a one-sided "
                f"Wilcoxon signed-rank test of log({a} / {b}) > 0 gives p <= {alpha:g}")
    if effect == "win_rate":
        return (f"passes when {value} is {better} than {control} on >= {min_effect:.0%} of the untied samples and a "
                f"one-sided binomial (sign) test gives p <= {alpha:g}")
    return (f"passes when mean({a} - {b}) >= {min_effect:g} and a one-sided Wilcoxon signed-rank test "
            f"of {a} - {b} > 0 gives p <= {alpha:g}")
