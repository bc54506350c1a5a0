"""Representation checks: `invariance-grows-with-depth` and `dead-units`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from scipy.stats import spearmanr

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, Status, spread_indices
from auditkit.methods import features as fe

DEFAULT_MAGNITUDES: dict[str, tuple[float, ...]] = {
    "translate": (2.0, 4.0, 8.0),  # pixels, horizontal
    "scale": (0.8, 0.9, 1.25),  # zoom factors about the centre
    "rotate": (10.0, 20.0, 40.0),  # degrees
}
_LISTED = 20  # dead channel indices listed per row
_UNIT = {"translate": "px", "scale": "x", "rotate": "deg"}


@dataclass
class InvarianceGrowsWithDepth(Check):
    """Features should get more invariant to a nuisance transform from shallow to deep layers.

    invariance_l(T) = 1 - mean_i d(f_l(x_i), f_l(T x_i)) / mean_{i != j} d(f_l(x_i), f_l(x_j))
    (Euclidean d on flattened layer outputs). For each magnitude, rho = Spearman(depth, invariance)
    over the subject's layers; the check passes when the mean rho over magnitudes is >= min_rho AND
    the mean (over magnitudes) of last-layer minus first-layer invariance is >= min_gain.
    """

    kind = "invariance-grows-with-depth"
    title = "Invariance grows with depth"
    description = (
        "invariance_l(T) = 1 - mean_i d(f_l(x_i), f_l(T x_i)) / mean_{i != j} d(f_l(x_i), f_l(x_j)), d = Euclidean "
        "distance of the flattened layer output. Passes when Spearman(depth, invariance), averaged over the "
        "magnitudes, is >= min_rho and the last layer's invariance exceeds the first layer's by >= min_gain "
        "(averaged over the magnitudes)."
    )

    transform: Literal["translate", "scale", "rotate"] = "translate"
    magnitudes: tuple[float, ...] = ()
    min_rho: float = 0.8
    min_gain: float = 0.1
    samples: int = 32

    def validate(self) -> None:
        if not -1.0 <= self.min_rho <= 1.0:
            raise CheckConfigError(f"check {self.name!r}: min_rho must be in [-1, 1], got {self.min_rho}")
        if not math.isfinite(self.min_gain):
            raise CheckConfigError(f"check {self.name!r}: min_gain must be finite, got {self.min_gain}")
        if self.samples < 2:
            raise CheckConfigError(f"check {self.name!r}: samples must be >= 2, got {self.samples}")
        for m in self.magnitudes:
            if not math.isfinite(m) or (self.transform == "scale" and m <= 0):
                raise CheckConfigError(
                    f"check {self.name!r}: magnitude {m!r} is not valid for transform {self.transform!r}"
                )

    @property
    def used_magnitudes(self) -> tuple[float, ...]:
        return tuple(self.magnitudes) or DEFAULT_MAGNITUDES[self.transform]

    def run(self, subject, audit_set) -> CheckResult:
        layers = list(subject.layers)
        if len(layers) < 2:
            return self.error_result(f"model {subject.name!r} has {len(layers)} layer(s); this check needs at least 2")
        chosen = spread_indices(len(audit_set), self.samples)
        if len(chosen) < 2:
            return self.error_result(f"audit set {audit_set.name!r} has fewer than 2 samples")
        subset = audit_set.subset(chosen)
        images, labels = subset.images(), subset.labels()
        mags = self.used_magnitudes
        unit = _UNIT[self.transform]

        base = fe.layer_features(subject, images, layers)
        table: dict[float, dict[str, float]] = {
            m: fe.invariance(subject, images, layers, self.transform, m, base=base) for m in mags
        }
        depth = list(range(1, len(layers) + 1))
        rhos, gains = [], []
        for m in mags:
            values = [table[m][name] for name in layers]
            rho = spearmanr(depth, values).statistic if len(set(values)) > 1 else float("nan")
            rhos.append(float(rho))
            gains.append(values[-1] - values[0])
        mean_rho = float(sum(rhos) / len(rhos))
        mean_gain = float(sum(gains) / len(gains))

        rows = [{"layer": name, "depth": d, "magnitude": m, "invariance": table[m][name]}
                for m in mags for d, name in zip(depth, layers)]
        per_mag = ", ".join(f"{m:g}{unit}: rho {r:.2f}, gain {g:+.2f}" for m, r, g in zip(mags, rhos, gains))
        message = (f"{self.transform}, {len(chosen)} samples; mean Spearman {mean_rho:.2f}, mean gain "
                   f"{layers[-1]} - {layers[0]} = {mean_gain:+.3f} (needs >= {self.min_gain:g}); {per_mag}")
        result = self.result(
            metric="Spearman(depth, invariance)", value=mean_rho, threshold=self.min_rho, rows=rows,
            columns=["layer", "depth", "magnitude", "invariance"], message=message,
            details={"transform": self.transform, "magnitudes": list(mags), "layers": layers,
                     "rho_per_magnitude": rhos, "gain_per_magnitude": gains, "mean_gain": mean_gain,
                     "min_gain": self.min_gain, "samples": len(chosen),
                     "invariance": {f"{m:g}": table[m] for m in mags}},
        )
        if result.status is Status.PASSED and not mean_gain >= self.min_gain:
            result.status = Status.FAILED
            result.message = (f"FAILED on gain: invariance rises with depth (rho {mean_rho:.2f} >= {self.min_rho:g}) "
                              f"but the last layer gains only {mean_gain:+.3f} over the first (needs >= "
                              f"{self.min_gain:g}); " + message)
        series = {f"{self.transform} {m:g}{unit}": (depth, [table[m][name] for name in layers]) for m in mags}
        svg = ev.line_chart_svg(series, title=f"Invariance to {self.transform} vs depth",
                                x_label="depth (" + ", ".join(f"{d}={n}" for d, n in zip(depth, layers)) + ")",
                                y_label="invariance")
        result.evidence = [ev.svg_evidence(
            f"Invariance to {self.transform} by layer", svg,
            "1 - mean distance to the transformed image / mean distance between images, per layer "
            "(1 = unchanged, 0 = as far as another image); one line per magnitude.")]
        result.evidence += self._figure5(subject, images, labels, layers, table, unit)
        return result

    def _figure5(self, subject, images, labels, layers, table, unit):
        """As Zeiler & Fergus figure 5: feature change of the first and last layer, and p(true class),
        against the transformation's magnitude (the identity included)."""
        identity = 1.0 if self.transform == "scale" else 0.0
        sweep = sorted(set(self.used_magnitudes) | {identity})
        change = {name: [0.0 if m == identity else 1.0 - table[m][name] for m in sweep]
                  for name in (layers[0], layers[-1])}
        transform = fe.TRANSFORMS[self.transform]
        probability = [float(subject.class_probability(transform(images, m), labels).mean()) for m in sweep]
        x_label = f"{self.transform} magnitude ({unit or 'factor'})"
        change_svg = ev.line_chart_svg({name: (sweep, values) for name, values in change.items()},
                                       title=f"Feature change under {self.transform}", x_label=x_label,
                                       y_label="mean d(f(x), f(Tx)) / mean d(f(x), f(x'))")
        prob_svg = ev.line_chart_svg({"p(true class)": (sweep, probability)},
                                     title=f"Class probability under {self.transform}", x_label=x_label,
                                     y_label="mean p(true class)")
        return [
            ev.svg_evidence(f"Feature change under {self.transform}: first vs last layer", change_svg,
                            "Distance between the features of an image and of its transformed copy, relative to "
                            "the distance between different images (Zeiler & Fergus figure 5)."),
            ev.svg_evidence(f"True-class probability under {self.transform}", prob_svg,
                            "Mean softmax probability of the true class as the transformation grows."),
        ]


@dataclass
class DeadUnits(Check):
    """A channel is dead when its output is <= 0 for every audit image and position; the check
    passes when the largest share of dead channels over the subject's layers is <= max_dead."""

    kind = "dead-units"
    title = "Few dead units"
    description = (
        "A channel is dead when max over images and positions of its output is <= 0. "
        "Value = the largest share of dead channels over the layers; passes when <= max_dead."
    )

    max_dead: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.max_dead <= 1.0:
            raise CheckConfigError(f"check {self.name!r}: max_dead must be in [0, 1], got {self.max_dead}")

    def run(self, subject, audit_set) -> CheckResult:
        layers = list(subject.layers)
        if not layers:
            return self.error_result(f"model {subject.name!r} has no layers to inspect")
        if len(audit_set) == 0:
            return self.error_result(f"audit set {audit_set.name!r} is empty")
        dead = fe.dead_units(subject, audit_set.images(), layers)
        rows = []
        for name in layers:
            mask = dead[name]
            idx = torch.nonzero(mask).flatten().tolist()
            shown = ", ".join(map(str, idx[: _LISTED]))
            if len(idx) > _LISTED:
                shown += f", ... (+{len(idx) - _LISTED})"
            channels = int(mask.numel())
            rows.append({"layer": name, "channels": channels, "dead": len(idx),
                         "share": len(idx) / channels if channels else 0.0, "dead_channels": shown})
        worst = max(rows, key=lambda r: r["share"])
        result = self.result(
            metric="largest dead share", value=worst["share"], threshold=self.max_dead, direction="<=",
            rows=rows, columns=["layer", "channels", "dead", "share", "dead_channels"],
            message=(f"{len(audit_set)} images; worst layer {worst['layer']}: {worst['dead']} of "
                     f"{worst['channels']} channels dead ({worst['share']:.1%}); "
                     f"{sum(r['dead'] for r in rows)} dead channels over {len(layers)} layers"),
            details={"dead_per_layer": {r["layer"]: r["dead"] for r in rows}},
        )
        svg = ev.bar_chart_svg([r["layer"] for r in rows], [r["share"] for r in rows],
                               title="Share of dead channels per layer", threshold=self.max_dead,
                               direction="<=", y_label="dead share")
        result.evidence = [ev.svg_evidence("Dead channels per layer", svg,
                                           "Share of channels whose output is never positive on the audit set.")]
        return result
