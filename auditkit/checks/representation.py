"""Representation checks: `invariance-grows-with-depth` and `dead-units`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image, ImageDraw
from scipy.stats import spearmanr
from torch import nn

from auditkit import evidence as ev
from auditkit.checks.base import (
    Check,
    CheckConfigError,
    CheckResult,
    Status,
    require_alpha,
    require_at_least,
    require_unit,
    spread_indices,
)
from auditkit.checks.decision import ALPHA, Decision, decide, needed_samples
from auditkit.methods import embedding as em
from auditkit.methods import features as fe
from auditkit.methods.numerics import constant_rows, require_finite
from auditkit.subject import AuditModelError

DEFAULT_MAGNITUDES: dict[str, tuple[float, ...]] = {
    "translate": (2.0, 4.0, 8.0),  # pixels, horizontal
    "scale": (0.8, 0.9, 1.25),  # zoom factors about the centre
    "rotate": (10.0, 20.0, 40.0),  # degrees
}
_LISTED = 20  # dead channel indices listed per row
_UNIT = {"translate": "px", "scale": "x", "rotate": "deg"}


def _finite(features, layers, ids, what):
    """NonFiniteError naming the layer and the samples unless every layer's features are finite."""
    for name in layers:
        require_finite(features[name], f"layer output{what}", method="invariance", layer=name, sample_ids=ids)


def _penultimate_label(head: str) -> str:
    """How the penultimate features (the input of the final nn.Linear `head`) are named in rows and charts."""
    return f"penultimate (input of {head})"


def _representations(subject, images, layers, head, label):
    """(features, logits): the named layers' outputs (features_and_logits) and, when `head` names the final
    nn.Linear, its input under `label` (embedding.penultimate_features, a second forward pass)."""
    feats, logits = fe.features_and_logits(subject, images, layers)
    if head:
        feats[label] = em.penultimate_features(subject, images, head)
    return feats, logits


def _measure(subject, images, labels, layers, transform, mags, base, spread, ids, head="", label=""):
    """For each magnitude m: the per-sample invariance of each depth point (per[m][point], N float64; the
    points are the named `layers`, then the penultimate features `label` when `head` is given), its mean
    (table[m][point]), mean p(true class) of the transformed images (prob[m], from the same forward
    passes), rho = Spearman(depth, invariance) (NaN when all points tie up to rounding: ranks of rounding
    noise are no trend) and gain = last-point (the judged top) minus first-layer invariance."""
    fn = fe.TRANSFORMS[transform]
    points = [*layers, label] if head else list(layers)
    per, table, prob = {}, {}, {}
    for m in mags:  # transformed images serve this measurement alone: one sweep, nothing kept
        moved, logits, inputs = fe.transient_features(subject, fn(images, m), layers, input_of=head)
        if head:
            moved[label] = inputs
        _finite(moved, points, ids, f" under {transform} {m:g}{_UNIT[transform]}")
        per[m] = {name: fe.invariance_per_sample(base[name], moved[name], spread[name]) for name in points}
        table[m] = {name: float(per[m][name].mean()) for name in points}
        prob[m] = _true_class_probability(logits, labels)
        del moved
    depth = list(range(1, len(points) + 1))
    rhos, gains = [], []
    for m in mags:
        values = [table[m][name] for name in points]
        tied = bool(constant_rows(torch.tensor([values], dtype=torch.float64))[0])
        rho = float("nan") if tied else spearmanr(depth, values).statistic
        rhos.append(float(rho))
        gains.append(values[-1] - values[0])
    return per, table, prob, rhos, gains


def _true_class_probability(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """mean_i softmax(logits_i)[label_i]."""
    return float(torch.softmax(logits.double(), dim=1).gather(1, labels.view(-1, 1)).mean())


def _representative(mags) -> float:
    """The middle of the sorted magnitudes (the lower middle for an even count)."""
    ordered = sorted(mags)
    return ordered[(len(ordered) - 1) // 2]


def _untie(values: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
    """`values` with each entry that equals its control up to rounding (numerics.constant_rows of the pair)
    replaced by the control: a difference of rounding noise is a tie, which carries no direction."""
    pairs = torch.stack([values, controls], dim=1)
    tied = constant_rows(pairs) & torch.isfinite(pairs).all(dim=1)
    return torch.where(tied, controls, values)


_NOUN = {"translate": "translation", "scale": "scaling", "rotate": "rotation"}
METRIC = "mean invariance gain, top (penultimate features, else last layer) - bottom layer"


@dataclass
class InvarianceGrowsWithDepth(Check):
    """Features should get more invariant to a nuisance transform from the bottom layer to the top.

    The two representations compared: the bottom is the first named layer's output; the top is the
    model's penultimate features, the input of its final nn.Linear (embedding.penultimate_layer /
    penultimate_features, as the embedding checks find it), as Zeiler & Fergus (figure 5) compare layer 1
    with the fully connected layer 7. The last named layer is often a spatial map before global pooling,
    which moves with a translation about as much as the first layer. A model without an nn.Linear (or
    whose final nn.Linear's input cannot be captured once per image) is judged on its last named layer,
    as before, and the message says so.

    Per sample i and depth point l (the named layers, then the penultimate features; Euclidean d on
    flattened outputs, the spread over all ordered pairs of different images as the denominator):

        inv_l(i) = 1 - d(f_l(x_i), f_l(T x_i)) / mean_{j != k} d(f_l(x_j), f_l(x_k))

    Decision (checks.decision, effect "difference"; the control is the bottom layer measured on the same
    images): with v_i = mean over the magnitudes of inv_top(i) and c_i = the same of inv_bottom(i), passes
    when mean_i(v_i - c_i) >= min_gain and a one-sided Wilcoxon signed-rank test of v_i - c_i > 0 gives
    p <= alpha; INCONCLUSIVE below the samples the test needs (7 at alpha 0.01). Differences of
    rounding noise are ties. A bottom or top representation that is the same for every image cannot
    be measured and FAILS.

    The curve over all depth points (the penultimate features last) and Spearman(depth, invariance) per
    magnitude are evidence, shown and not judged: a local swap of two middle layers does not decide
    anything. `compare` names other transforms that are measured the same way at their default
    magnitudes (DEFAULT_MAGNITUDES) and shown (rows, details, an extra chart) but never judged.
    """

    kind = "invariance-grows-with-depth"
    title = "Invariance grows with depth"
    description = (
        "Compares two representations: the top is the model's penultimate features (the input of its final "
        "nn.Linear), or its last named layer when it has no nn.Linear; the bottom is its first named layer. "
        "Per sample: inv_l(i) = 1 - d(f_l(x_i), f_l(T x_i)) / mean_{j != k} d(f_l(x_j), f_l(x_k)), d = Euclidean "
        "distance of the flattened output, averaged over the magnitudes. Passes when "
        "mean_i(inv_top(i) - inv_bottom(i)) >= min_gain and a one-sided Wilcoxon signed-rank test of "
        "inv_top - inv_bottom > 0 gives p <= alpha (the bottom layer is the control); INCONCLUSIVE when too "
        "few samples can be judged. The per-layer curve (the penultimate features as its last point), its "
        "Spearman trend and the transforms listed in compare are shown, not judged."
    )

    transform: Literal["translate", "scale", "rotate"] = "translate"
    magnitudes: tuple[float, ...] = ()
    min_gain: float = 0.1
    alpha: float = ALPHA
    samples: int = 32
    compare: tuple[str, ...] = ()
    seed: int = 0

    def validate(self) -> None:
        if isinstance(self.compare, str):  # compare="rotate" means ("rotate",)
            self.compare = (self.compare,)
        self.compare = tuple(self.compare)
        for other in self.compare:
            if other not in DEFAULT_MAGNITUDES:
                raise CheckConfigError(f"check {self.name!r}: compare names unknown transform {other!r}; "
                                       f"expected some of {', '.join(DEFAULT_MAGNITUDES)}")
            if other == self.transform:
                raise CheckConfigError(f"check {self.name!r}: compare must not repeat the judged transform "
                                       f"{other!r}")
        if len(set(self.compare)) != len(self.compare):
            raise CheckConfigError(f"check {self.name!r}: compare lists a transform twice: {list(self.compare)}")
        if not math.isfinite(self.min_gain):
            raise CheckConfigError(f"check {self.name!r}: min_gain must be finite, got {self.min_gain}")
        require_alpha(self)
        require_at_least(self, samples=2)
        self._validate_magnitudes()

    def _validate_magnitudes(self) -> None:
        """Every magnitude must move the image: an identity (shift 0, zoom 1, a turn by a multiple of 360
        degrees) makes every layer's invariance 1 and measures nothing. Negative shifts and angles
        are the other direction and fine."""
        expected = {
            "translate": "whole, nonzero pixel shifts (negative ones move the image left)",
            "scale": "zoom factors > 0 and != 1 (1 is the identity; < 1 shrinks, > 1 enlarges)",
            "rotate": "angles in degrees that are not a multiple of 360 (those are the identity; negative "
                      "angles turn the other way)",
        }[self.transform]
        seen = set()
        for m in self.magnitudes:
            if not math.isfinite(m):
                raise CheckConfigError(f"check {self.name!r}: magnitudes: each must be a finite number, got {m!r}")
            moves = {"translate": m == round(m) and m != 0, "scale": m > 0 and m != 1,
                     "rotate": m % 360 != 0}[self.transform]
            if not moves:
                raise CheckConfigError(f"check {self.name!r}: magnitudes: {self.transform} needs {expected}, "
                                       f"got {m:g} in {list(self.magnitudes)}")
            if m in seen:
                raise CheckConfigError(f"check {self.name!r}: magnitudes: {m:g} is listed twice in "
                                       f"{list(self.magnitudes)}")
            seen.add(m)

    @property
    def used_magnitudes(self) -> tuple[float, ...]:
        return tuple(self.magnitudes) or DEFAULT_MAGNITUDES[self.transform]

    def _decide(self, top, bottom, values, controls, groups, why: str = "") -> Decision:
        return decide(values, controls, effect="difference", min_effect=self.min_gain, alpha=self.alpha,
                      seed=self.seed, groups=groups, value_label=f"invariance of {top} (top)",
                      control_label=f"invariance of {bottom} (bottom)", inconclusive=why)

    @staticmethod
    def _head(subject, images, layers):
        """(head, label, base, logits, why): the final nn.Linear `head` and the label of its input, the
        unmoved features of the named layers (and of the penultimate features under `label`) with their
        logits; head = label = "" and `why` says so when the model has no nn.Linear that runs, or its input
        cannot be captured once per image (AuditModelError of embedding.penultimate_*): the last named
        layer is then the top, as before."""
        try:
            head = em.penultimate_layer(subject, images)
            label = _penultimate_label(head)
            base, logits = _representations(subject, images, layers, head, label)
            return head, label, base, logits, ""
        except AuditModelError as exc:
            why = str(exc).split("; pass layer=")[0]
        base, logits = fe.features_and_logits(subject, images, layers)
        return "", "", base, logits, why

    def run(self, subject, audit_set) -> CheckResult:
        layers = list(subject.layers)
        if len(layers) < 2:
            return self.error_result(f"model {subject.name!r} has {len(layers)} layer(s); this check needs at least 2")
        bottom = layers[0]
        title = f"Invariance to {_NOUN[self.transform]} grows with depth"
        chosen = spread_indices(len(audit_set), self.samples)
        if len(chosen) < 2:
            why = (f"audit set {audit_set.name!r} has {len(audit_set)} sample(s); the spread between images needs "
                   f"at least 2 and the test at alpha = {self.alpha:g} needs {needed_samples(self.alpha)}")
            top = layers[-1]
            if chosen:
                try:
                    top = _penultimate_label(em.penultimate_layer(subject, audit_set.subset(chosen).images()))
                except AuditModelError:
                    pass
            result = self.decided(self._decide(top, bottom, [], [], [], why), metric=METRIC)
            result.title = title
            return result
        subset = audit_set.subset(chosen)
        images, labels = subset.images(), subset.labels()
        mags = self.used_magnitudes
        unit = _UNIT[self.transform]

        ids = [sample.id for sample in subset]
        names = list(subset.class_names)
        classes = [names[int(c)] if int(c) < len(names) else str(int(c)) for c in labels]
        head, label, base, base_logits, no_head = self._head(subject, images, layers)
        points = [*layers, label] if head else list(layers)  # depth points; the last one is the judged top
        top = points[-1]
        if head:
            compared = (f"the penultimate features (the input of the final nn.Linear {head!r}, depth "
                        f"{len(points)}) against the first named layer {bottom!r}")
        else:
            compared = (f"the last named layer {top!r} against the first named layer {bottom!r}, as before: "
                        f"{no_head}")
        _finite(base, points, ids, "")
        spread = {name: fe.mean_pairwise_distance(base[name]) for name in points}  # shared denominators
        per, table, prob, rhos, gains = _measure(subject, images, labels, layers, self.transform, mags, base,
                                                 spread, ids, head, label)
        prob[1.0 if self.transform == "scale" else 0.0] = _true_class_probability(base_logits, labels)
        depth = list(range(1, len(points) + 1))
        finite_rhos = [r for r in rhos if math.isfinite(r)]
        mean_rho = float(sum(rhos) / len(rhos))
        mean_gain = float(sum(gains) / len(gains))
        inv_top = torch.stack([per[m][top] for m in mags]).mean(dim=0)
        inv_bottom = torch.stack([per[m][bottom] for m in mags]).mean(dim=0)

        # other transforms: measured and shown, never judged
        shown: dict[str, dict] = {}
        for other in self.compare:
            o_mags = DEFAULT_MAGNITUDES[other]
            _, o_table, _, o_rhos, o_gains = _measure(subject, images, labels, layers, other, o_mags, base, spread,
                                                      ids, head, label)
            shown[other] = {"magnitudes": list(o_mags), "invariance": {f"{m:g}": o_table[m] for m in o_mags},
                            "rho_per_magnitude": o_rhos, "gain_per_magnitude": o_gains,
                            "mean_rho": float(sum(o_rhos) / len(o_rhos)),
                            "mean_gain": float(sum(o_gains) / len(o_gains)), "judged": False, "table": o_table}

        constant = [name for name in points if fe.rows_all_equal(base[name])]  # up to rounding
        unmeasurable = [name for name in (bottom, top) if name in constant]
        decision = self._decide(top, bottom, _untie(inv_top, inv_bottom).tolist(), inv_bottom.tolist(), classes)
        notes = []
        if constant:
            named = [name for name in constant if name in layers]
            what = ([f"layer(s) {', '.join(named)}"] if named else []) + (
                [f"the penultimate features (input of {head})"] if head and label in constant else [])
            notes.append(f"{' and '.join(what)} give the same output for every image, so their invariance cannot "
                         f"be measured")
        if unmeasurable:  # the model's fault: the compared representation carries no information about the image
            decision = dataclasses.replace(decision, status=Status.FAILED, reason=notes[0] + (
                f"; the check compares {compared}"))
            notes = []

        rows = [{"transform": self.transform, "judged": "yes", "layer": name, "depth": d, "magnitude": m,
                 "invariance": table[m][name]} for m in mags for d, name in zip(depth, points)]
        rows += [{"transform": other, "judged": "no (shown only)", "layer": name, "depth": d, "magnitude": m,
                  "invariance": info["table"][m][name]}
                 for other, info in shown.items() for m in info["magnitudes"] for d, name in zip(depth, points)]
        per_mag = ", ".join(f"{m:g}{unit}: rho {r:.2f}, gain {g:+.2f}" for m, r, g in zip(mags, rhos, gains))
        notes.append(f"{self.transform} by {', '.join(f'{m:g}{unit}' for m in mags)}, {len(chosen)} samples; judged "
                     f"per sample: {compared}")
        notes.append(f"shown, not judged: Spearman(depth, invariance) {mean_rho:.2f} on average; {per_mag}")
        if shown:
            notes.append("other transforms, not judged: " + ", ".join(
                f"{other} mean Spearman {info['mean_rho']:.2f}, mean gain {info['mean_gain']:+.3f}"
                for other, info in shown.items()))
        per_sample = [{"sample": i, "class": c, "inv_bottom": float(b), "inv_top": float(t),
                       "gain": float(t - b)} for i, c, b, t in zip(ids, classes, inv_bottom.tolist(), inv_top.tolist())]
        result = self.decided(
            decision, metric=METRIC, rows=rows,
            columns=["transform", "judged", "layer", "depth", "magnitude", "invariance"], message="; ".join(notes),
            details={"transform": self.transform, "magnitudes": list(mags), "layers": layers, "points": points,
                     "bottom": bottom, "top": top, "top_kind": "penultimate" if head else "last named layer",
                     "head": head, "no_head": no_head, "rho_per_magnitude": rhos, "mean_rho": mean_rho,
                     "rho_judged": False, "rho_finite": len(finite_rhos), "gain_per_magnitude": gains,
                     "mean_gain": mean_gain, "min_gain": self.min_gain, "samples": len(chosen),
                     "per_sample": per_sample, "invariance": {f"{m:g}": table[m] for m in mags},
                     "p_true_class": {f"{m:g}": p for m, p in sorted(prob.items())},
                     "compare": {other: {k: v for k, v in info.items() if k != "table"}
                                 for other, info in shown.items()}},
        )
        result.title = title
        series = {f"{self.transform} {m:g}{unit}": (depth, [table[m][name] for name in points]) for m in mags}
        x_label = "depth (" + ", ".join(f"{d}={n}" for d, n in zip(depth, points)) + ")"
        svg = ev.line_chart_svg(series, title=f"Invariance to {self.transform} vs depth", x_label=x_label,
                                y_label="invariance")
        result.evidence = [ev.svg_evidence(
            f"Invariance to {self.transform} by layer", svg,
            "1 - mean distance to the transformed image / mean distance between images, per layer "
            "(1 = unchanged, 0 = as far as another image); one line per magnitude. Judged, per sample: "
            f"{top} (top{', the last point' if head else ''}) against {bottom} (bottom); the points between "
            "are shown.")]
        result.evidence += self._figure5(bottom, top, table, prob, unit)
        if shown:
            result.evidence.append(self._comparison(points, depth, x_label, table, shown))
        return result

    def _comparison(self, layers, depth, x_label, table, shown):
        """Invariance against depth, one line per transform at its representative (middle) magnitude."""
        lines = {}
        for name, mags, tab, judged in [(self.transform, self.used_magnitudes, table, True)] + [
                (other, tuple(info["magnitudes"]), info["table"], False) for other, info in shown.items()]:
            m = _representative(mags)
            label = f"{name} {m:g}{_UNIT[name]} ({'judged' if judged else 'not judged'})"
            lines[label] = (depth, [tab[m][layer] for layer in layers])
        svg = ev.line_chart_svg(lines, title="Invariance vs depth per transform", x_label=x_label,
                                y_label="invariance")
        return ev.svg_evidence(
            "Invariance vs depth per transform", svg,
            f"Each transform at its middle magnitude. Only {self.transform} is judged; "
            f"{', '.join(shown)} {'is' if len(shown) == 1 else 'are'} measured and shown, with no threshold.")

    def _figure5(self, bottom, top, table, prob, unit):
        """As Zeiler & Fergus figure 5: feature change of the two judged representations (bottom and top),
        and p(true class), against the transformation's magnitude (the identity included)."""
        identity = 1.0 if self.transform == "scale" else 0.0
        sweep = sorted(set(self.used_magnitudes) | {identity})
        change = {name: [0.0 if m == identity else 1.0 - table[m][name] for m in sweep]
                  for name in (bottom, top)}
        probability = [prob[m] for m in sweep]  # from the forward passes of the invariance sweep
        x_label = f"{self.transform} magnitude ({unit or 'factor'})"
        change_svg = ev.line_chart_svg({name: (sweep, values) for name, values in change.items()},
                                       title=f"Feature change under {self.transform}", x_label=x_label,
                                       y_label="mean d(f(x), f(Tx)) / mean d(f(x), f(x'))")
        prob_svg = ev.line_chart_svg({"p(true class)": (sweep, probability)},
                                     title=f"Class probability under {self.transform}", x_label=x_label,
                                     y_label="mean p(true class)")
        return [
            ev.svg_evidence(f"Feature change under {self.transform}: bottom vs judged top", change_svg,
                            "Distance between the features of an image and of its transformed copy, relative to "
                            "the distance between different images (Zeiler & Fergus figure 5)."),
            ev.svg_evidence(f"True-class probability under {self.transform}", prob_svg,
                            "Mean softmax probability of the true class as the transformation grows."),
        ]


@dataclass
class DeadUnits(Check):
    """A channel is dead when its output is constant, up to rounding, over the whole audit set (every image
    and position: methods.features.dead_units, numerics.constant_rows of its values). After a ReLU that is
    "never positive" (all zeros); after swish / SiLU / GELU a channel negative everywhere still varies and
    carries information, so it is not dead, while a constant channel is dead after any activation.

    Value = the share of dead channels over all the subject's named layers together (dead / channels,
    summed over the layers): the share of the network's feature capacity that is wasted. Passes when it
    is <= max_dead and no layer is entirely dead (a layer with every channel constant passes nothing on,
    whatever the share). The share per layer is evidence: a pretrained EfficientNet-Lite0 has 4 of its
    32 stem channels dead (12.5 %), a few units in one layer, which is no flaw of the model.

    A census over few images cannot call a channel dead: a channel that responds to something in a quarter
    of the images is missed by every one of 4 images with probability 0.75^4 = 32 %, by 16 with 1 %. With
    fewer than `min_images` (16) audit images the check is INCONCLUSIVE and says how many it needs; the
    census of those images is still shown.

    Evidence: the share per layer; the activation maps of every layer for audit sample `sample`
    (at most max_maps channels per layer, dead ones outlined); the first RGB convolution's filters.
    """

    kind = "dead-units"
    title = "Few dead units"
    description = (
        "A channel is dead when its output is constant (max - min <= rtol * max |x|, rtol 1e-5 in float32) over "
        "every audit image and position: after a ReLU, all zeros; after swish / GELU, a negative but varying "
        "channel is alive. Value = dead channels / all channels of the named layers together; passes when "
        "<= max_dead and no layer has every channel dead. "
        "Fewer than min_images (default 16) audit images: INCONCLUSIVE (a channel may simply not have been "
        "triggered)."
    )

    max_dead: float = 0.1
    sample: int = 0
    max_maps: int = 64
    min_images: int = 16

    def validate(self) -> None:
        require_unit(self, "max_dead")
        if self.sample < 0:
            raise CheckConfigError(f"check {self.name!r}: sample must be an index >= 0 into the audit set, "
                                   f"got {self.sample}")
        require_at_least(self, max_maps=1, min_images=1)

    def run(self, subject, audit_set) -> CheckResult:
        layers = list(subject.layers)
        if not layers:
            return self.error_result(f"model {subject.name!r} has no layers to inspect")
        if len(audit_set) == 0:
            return self.error_result(f"audit set {audit_set.name!r} is empty")
        if self.sample >= len(audit_set):
            return self.error_result(f"check {self.name!r}: sample {self.sample} is out of range; audit set "
                                     f"{audit_set.name!r} has {len(audit_set)} samples (valid 0..{len(audit_set) - 1})")
        dead = fe.dead_units(subject, audit_set.images(), layers,
                             sample_ids=[sample.id or str(i) for i, sample in enumerate(audit_set)])
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
        total_dead, total = sum(r["dead"] for r in rows), sum(r["channels"] for r in rows)
        share = total_dead / total if total else 0.0
        all_dead = [r["layer"] for r in rows if r["channels"] and r["dead"] == r["channels"]]
        details = {"dead_per_layer": {r["layer"]: r["dead"] for r in rows},
                   "dead_channels": {name: torch.nonzero(dead[name]).flatten().tolist() for name in layers},
                   "images": len(audit_set), "min_images": self.min_images, "dead_share": share,
                   "largest_layer_share": worst["share"], "layers_all_dead": all_dead}
        census = (f"{total_dead} of {total} channels dead over {len(layers)} layers ({share:.1%}); worst layer "
                  f"{worst['layer']}: {worst['dead']} of {worst['channels']} ({worst['share']:.1%})")
        columns = ["layer", "channels", "dead", "share", "dead_channels"]
        metric = "dead share over all layers"
        if len(audit_set) < self.min_images:
            result = CheckResult(
                check=self.name, kind=self.kind, status=Status.INCONCLUSIVE, metric=metric,
                value=None, threshold=float(self.max_dead), direction="<=", rows=rows, columns=columns,
                message=(f"only {len(audit_set)} audit images; the census needs at least min_images = "
                         f"{self.min_images} before it calls a channel dead (below that a channel may simply not "
                         f"have been triggered): {self.min_images - len(audit_set)} more needed. On these "
                         f"{len(audit_set)} images (not judged): {census}"),
                details=details)
        else:
            result = self.result(metric=metric, value=share, threshold=self.max_dead, direction="<=", rows=rows,
                                 columns=columns, message=f"{len(audit_set)} images; {census}", details=details)
            if all_dead:
                result.status = Status.FAILED
                result.message += (f"; every channel of layer(s) {', '.join(all_dead)} is dead: nothing passes "
                                   f"through, whatever the share")
        svg = ev.bar_chart_svg([r["layer"] for r in rows] + ["all layers"], [r["share"] for r in rows] + [share],
                               title="Share of dead channels per layer", threshold=self.max_dead,
                               direction="<=", y_label="dead share")
        result.evidence = [ev.svg_evidence(
            "Dead channels per layer", svg,
            f"Share of channels whose output is constant (up to rounding) over every image and position of the "
            f"{len(audit_set)} audit images, per layer and over all layers (the judged value; max_dead is drawn "
            f"as the line)" + ("" if len(audit_set) >= self.min_images else
                               f" (fewer than min_images = {self.min_images}: not judged)") + ".")]
        result.evidence += self._activation_maps(subject, audit_set, layers, dead, details)
        result.evidence += self._first_filters(subject, details)
        return result

    def _activation_maps(self, subject, audit_set, layers, dead, details):
        """One PNG per layer: the sample beside its channel maps (CS231n's conv5 13 x 13 maps)."""
        item = audit_set[self.sample]
        image = item.image.unsqueeze(0)
        maps = fe.layer_features(subject, image, layers, flatten=False)
        label = audit_set.class_names[item.label] if item.label < len(audit_set.class_names) else item.label
        out, skipped = [], {}
        for name in layers:
            value = maps[name][0]
            if value.ndim != 3:
                skipped[name] = f"output per image has shape {tuple(value.shape)}, not C x H x W"
                continue
            channels = value.shape[0]
            shown = min(channels, self.max_maps)
            grid = activation_grid(value[:shown], dead[name][:shown])
            picture = ev.panel_grid([[ev.upscale(item.image, _zoom(item.image.shape[-2:], 96)), grid]],
                                    titles=[[f"sample {self.sample}", f"{name}: {shown} of {channels} channels"]],
                                    scale=1)
            h, w = value.shape[-2:]
            capped = (f"the first {shown} of {channels} channels are shown" if shown < channels
                      else f"all {channels} channels")
            out.append(ev.png_evidence(
                f"Activation maps of {name} for sample {self.sample}", picture,
                f"Sample {self.sample} ({item.id!r}, label {label}): each tile is one channel's {h} x {w} output "
                f"map ({capped}, numbered, row by row), coloured on one scale for the whole layer (inferno, "
                f"min {float(value.min()):.3g} to max {float(value.max()):.3g}). Channels dead on the whole "
                f"audit set are outlined in red."))
        details["activation_maps"] = {"sample": self.sample, "id": item.id, "skipped": skipped}
        return out

    def _first_filters(self, subject, details):
        """The first nn.Conv2d with 3 input channels (module order): its filters as RGB tiles."""
        found = next(((n, m) for n, m in subject.module.named_modules()
                      if isinstance(m, nn.Conv2d) and m.weight.shape[1] == 3), None)
        if found is None:
            details["filters"] = "no nn.Conv2d with 3 input channels in the model; filter tiles skipped"
            return []
        name, conv = found
        weight = conv.weight.detach().float().cpu()
        shown = min(weight.shape[0], self.max_maps)
        picture, zoom = filter_tiles(weight[:shown])
        details["filters"] = {"layer": name, "shape": list(weight.shape), "shown": shown}
        kh, kw = weight.shape[-2:]
        return [ev.png_evidence(
            f"First-layer filters ({name}, RGB)", picture,
            f"{shown} of {weight.shape[0]} filters of {name} ({kh} x {kw} x 3), each scaled on its own to "
            f"[0, 1] (its minimum over the 3 colour channels -> 0, its maximum -> 1), enlarged {zoom}x "
            f"(nearest neighbour).")]


def _zoom(size, target: int) -> int:
    """Integer nearest-neighbour zoom that brings the larger side of `size` near `target` pixels (>= 1)."""
    return max(1, round(target / max(int(size[0]), int(size[1]), 1)))


def _tile_rows(tiles: list, titles: list[str]) -> tuple[list[list], list[list[str]]]:
    """Tiles and titles laid out row by row, ceil(sqrt(n)) per row."""
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    return ([tiles[i : i + cols] for i in range(0, len(tiles), cols)],
            [titles[i : i + cols] for i in range(0, len(titles), cols)])


def _rgb_tiles(batch: torch.Tensor, zoom: int) -> list[Image.Image]:
    """N x 3 x H x W values in [0, 1] as N RGB pictures enlarged `zoom` times (nearest), converted at once."""
    return [ev.upscale(pic, zoom) for pic in ev.to_pil_batch(batch)]


def activation_grid(maps: torch.Tensor, dead: torch.Tensor | None = None, *, tile: int = 48) -> Image.Image:
    """C x H x W maps as a grid of inferno tiles on one shared scale (min..max of all maps), channel
    numbers above, tiles of `dead` channels outlined in red; each tile enlarged to about `tile` px."""
    maps = maps.detach().float().cpu()
    c, h, w = maps.shape
    zoom = _zoom((h, w), tile)
    lo, hi = float(maps.min()), float(maps.max())
    coloured = ev.colormap(maps.reshape(c * h, w), vmin=lo, vmax=hi).reshape(3, c, h, w).transpose(0, 1)
    tiles = []
    for k, pic in enumerate(_rgb_tiles(coloured, zoom)):
        if dead is not None and bool(dead[k]):
            ImageDraw.Draw(pic).rectangle([0, 0, pic.width - 1, pic.height - 1], outline=(220, 0, 0), width=2)
        tiles.append(pic)
    rows, titles = _tile_rows(tiles, [str(k) for k in range(c)])
    return ev.panel_grid(rows, titles=titles, scale=1)


def normalise_filters(weight: torch.Tensor) -> torch.Tensor:
    """Each filter (dimension 0) mapped to [0, 1] by its own min and max over all its other dimensions:
    (w - min) / (max - min); a filter constant up to rounding (numerics.constant_rows) becomes 0.5."""
    weight = weight.detach().float().cpu()
    dims = tuple(range(1, weight.ndim))
    lo = weight.amin(dim=dims, keepdim=True)
    span = weight.amax(dim=dims, keepdim=True) - lo
    varies = ~constant_rows(weight).view(-1, *([1] * (weight.ndim - 1)))
    return torch.where(varies, (weight - lo) / span.clamp_min(1e-12), torch.full_like(weight, 0.5))


def filter_tiles(weight: torch.Tensor, *, tile: int = 28) -> tuple[Image.Image, int]:
    """O x 3 x kh x kw filters as numbered RGB tiles (normalise_filters), enlarged (nearest) by an integer
    zoom to about `tile` px; returns (picture, zoom)."""
    scaled = normalise_filters(weight)
    zoom = _zoom(weight.shape[-2:], tile)
    rows, titles = _tile_rows(_rgb_tiles(scaled, zoom), [str(k) for k in range(weight.shape[0])])
    return ev.panel_grid(rows, titles=titles, scale=1), zoom
