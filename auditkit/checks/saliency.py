"""Check `saliency-in-box`: the saliency map's energy lands inside the object's boxes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, listed, require_alpha
from auditkit.checks.decision import ALPHA, decide, needed_samples
from auditkit.methods import saliency as sal

Method = Literal["auto", "gradient", "input_x_gradient", "smoothgrad", "integrated_gradients",
                 "guided_backprop", "deconvnet", "grad_cam"]


def validate_method_layer(check: Check) -> None:
    """A Grad-CAM layer may only be named for method 'grad_cam' or 'auto'."""
    if check.layer and check.method not in ("grad_cam", "auto"):
        raise CheckConfigError(f"check {check.name!r}: layer applies to methods 'grad_cam' and 'auto' only, not "
                               f"{check.method!r}")


def run_auto(check: Check, subject, audit_set) -> CheckResult:
    """Run `check` (method "auto") with the method methods.saliency.auto_method picks for this subject: the
    same check with that method (and its layer, for Grad-CAM); the message says why when it is not Grad-CAM,
    details["method_requested"] is "auto"."""
    method, why = sal.auto_method(subject, check.layer or None)
    resolved = dataclasses.replace(check, method=method, layer=check.layer if method == "grad_cam" else "")
    result = resolved.run(subject, audit_set)
    result.message = "; ".join(part for part in (result.message, why) if part)
    result.details["method_requested"] = "auto"
    return result


_METHOD_TITLES = {"gradient": "gradient", "input_x_gradient": "input x gradient", "smoothgrad": "SmoothGrad",
                  "integrated_gradients": "integrated gradients", "guided_backprop": "guided backprop",
                  "deconvnet": "DeconvNet", "grad_cam": "Grad-CAM"}


@dataclass
class SaliencyInBox(Check):
    """The saliency map puts more of its energy inside the object's boxes than a control map does.

    Per sample: energy = positive map inside the boxes / positive map overall (a map with no positive
    value has energy 0); control energy = max(energy of a centre-prior map (a Gaussian at the image
    centre), box area fraction (the energy of a uniform map)). Decision (checks.decision, effect "ratio"):
    passes when the geometric mean of energy / control energy is >= min_ratio and a one-sided Wilcoxon
    signed-rank test of log(energy / control energy) > 0 gives p <= alpha.

    A sample is judged when its boxes cover a pixel and its control energy is <= max_control_energy:
    where a box is so large or so central that the control already puts more than that share inside,
    a map that looks at the object cannot be told from one that looks at the middle. Too few judged
    samples for the test is INCONCLUSIVE, saying why. Pointing hits (the map's maximum within
    tolerance_px of a box) are shown against the prior's, with an exact McNemar (sign) test; not judged.
    """

    kind = "saliency-in-box"
    title = "Saliency lands inside the object"
    description = (
        "energy = positive map inside the boxes / positive map overall; control = max(centre-prior map's energy, "
        "box area fraction = a uniform map's energy). Passes when the geometric mean of energy / control >= "
        "min_ratio and a one-sided Wilcoxon signed-rank test of log(energy / control) > 0 gives p <= alpha, over "
        "the samples whose control energy is <= max_control_energy (larger or more central boxes cannot tell "
        "a map on the object from one on the middle). Pointing hits are shown beside the prior's."
    )

    method: Method = "auto"
    layer: str = ""
    min_ratio: float = 1.25
    max_control_energy: float = 0.5
    alpha: float = ALPHA
    tolerance_px: float = 15.0
    evidence_samples: int = 6
    seed: int = 0

    def validate(self) -> None:
        require_alpha(self)
        if not 0.0 < self.max_control_energy < 1.0:
            raise CheckConfigError(f"check {self.name!r}: max_control_energy must be in (0, 1), got "
                                   f"{self.max_control_energy}")
        if not 1.0 <= self.min_ratio <= 1.0 / self.max_control_energy:
            raise CheckConfigError(
                f"check {self.name!r}: min_ratio must be in [1, 1 / max_control_energy = "
                f"{1.0 / self.max_control_energy:.3g}] (no map can put more than all its energy in a box), "
                f"got {self.min_ratio}")
        if self.tolerance_px < 0 or self.evidence_samples < 0:
            raise CheckConfigError(f"check {self.name!r}: tolerance_px and evidence_samples must be >= 0")
        validate_method_layer(self)

    def run(self, subject, audit_set) -> CheckResult:
        if self.method == "auto":
            return run_auto(self, subject, audit_set)
        usable, boxed = audit_set.with_boxes()
        if boxed is None:
            return self.error_result(f"audit set {audit_set.name!r} has no sample with an object box")
        images, labels, inside = boxed.images(), boxed.labels(), boxed.box_masks()
        boxes = [sample.boxes for sample in boxed]
        n, _, h, w = images.shape
        names = subject.spec.class_names
        ids = [audit_set[i].id or str(i) for i in usable]
        class_of = [names[int(label)] for label in labels]

        maps = sal.saliency_map(subject, images, labels, self.method, layer=self.layer or None, sample_ids=ids)
        area = sal.area_fraction(inside)
        energy = torch.nan_to_num(sal.energy_in_box(maps, inside), nan=0.0)  # no positive value: none inside
        prior = sal.centre_prior(n, h, w)
        prior_energy = sal.energy_in_box(prior, inside)
        control = torch.maximum(prior_energy, area)
        hits = sal.pointing_hits(maps, boxes, self.tolerance_px)
        prior_hits = sal.pointing_hits(prior, boxes, self.tolerance_px)

        no_pixel = area <= 0
        too_large = ~no_pixel & (control > self.max_control_energy)
        judged = ~no_pixel & ~too_large
        notes, why = [], ""
        if bool(no_pixel.any()):
            notes.append(f"{int(no_pixel.sum())} sample(s) skipped as their box covers no pixel at {w} x {h}: "
                         f"{listed([i for i, m in zip(ids, no_pixel.tolist()) if m])}")
        if bool(too_large.any()):
            notes.append(f"{int(too_large.sum())} sample(s) not judged: their boxes are so large or central that a "
                         f"control map already puts more than {self.max_control_energy:g} of its energy inside")
        needed = needed_samples(self.alpha)
        if int(judged.sum()) < needed and bool(too_large.any()):
            why = (f"only {int(judged.sum())} of {n} samples can be judged (needs {needed}): in {int(too_large.sum())} "
                   f"the object covers so much of the image, or sits so centrally, that the centre prior or a "
                   f"uniform map already puts more than {self.max_control_energy:g} of its energy inside; no "
                   f"localisation verdict is possible. Add samples with smaller or off-centre objects")
        keep = judged.tolist()
        decision = decide([e for e, k in zip(energy.tolist(), keep) if k], [c for c, k in zip(control.tolist(), keep) if k],
                          effect="ratio", min_effect=self.min_ratio, alpha=self.alpha, seed=self.seed,
                          groups=[g for g, k in zip(class_of, keep) if k], value_label="energy",
                          control_label="control energy", inconclusive=why)
        pointing = decide(hits.float().tolist(), prior_hits.float().tolist(), effect="win_rate", min_effect=0.5,
                          alpha=self.alpha, seed=self.seed, value_label="map hits", control_label="prior hits")

        ratio = energy / control.clamp_min(1e-6)
        rows = [{
            "sample": ids[j], "label": class_of[j], "energy": float(energy[j]), "control_energy": float(control[j]),
            "ratio": float(ratio[j]), "prior_energy": float(prior_energy[j]), "area": float(area[j]),
            "lift": float(energy[j] / area[j]) if area[j] > 0 else None, "hit": bool(hits[j]),
            "prior_hit": bool(prior_hits[j]), "judged": bool(judged[j]),
        } for j in range(n)]
        mean = lambda t: float(torch.nanmean(t.float()))  # noqa: E731
        message = (f"{self.method}: pointing hits {mean(hits):.2f} vs the prior's {mean(prior_hits):.2f} (McNemar "
                   f"p = {pointing.p_value:.2g}, shown, not judged)")
        result = self.decided(
            decision, metric="geometric mean energy / control energy", rows=rows, columns=list(rows[0]),
            message="; ".join([message] + notes),
            details={
                "method": self.method, "mean_energy": mean(energy), "mean_lift": mean(energy / area.clamp_min(1e-12)),
                "pointing_accuracy": mean(hits), "prior_mean_energy": mean(prior_energy),
                "prior_pointing_accuracy": mean(prior_hits), "pointing": pointing.to_dict(),
                "samples_judged": int(judged.sum()), "samples_too_large": int(too_large.sum()),
            },
        )
        result.title = f"{self.title} ({_METHOD_TITLES.get(self.method, self.method)})"
        result.evidence = self._evidence(audit_set, usable, images, maps, boxes, ratio, judged, energy)
        return result

    def _evidence(self, audit_set, usable, images, maps, boxes, ratio, judged, energy):
        """The map over each of a few samples, judged ones with the smallest energy ratio first."""
        if self.evidence_samples == 0:
            return []
        order = sorted(range(len(usable)), key=lambda j: (not bool(judged[j]), float(ratio[j]), j))
        order = order[: self.evidence_samples]
        scale = max(1, 192 // images.shape[-1])
        rows, titles, labels = [], [], []
        for j in order:
            scaled = [b.scaled(scale, scale) for b in boxes[j]]
            x, y = ev.argmax_xy(maps[j])
            heat = ev.draw_boxes(ev.upscale(ev.overlay(images[j], maps[j]), scale), scaled, width=2)
            rows.append([ev.draw_boxes(ev.upscale(images[j], scale), scaled, width=2),
                         ev.mark_point(heat, ((x + 0.5) * scale, (y + 0.5) * scale))])
            titles.append(["image and box", f"energy {float(energy[j]):.2f}, x{float(ratio[j]):.2f} the control"])
            labels.append(f"{audit_set[usable[j]].id}" + ("" if judged[j] else " (not judged)"))
        grid = ev.panel_grid(rows, titles=titles, row_labels=labels, scale=1)
        caption = (f"{self.method} map over the image, with each sample's energy in the box and its ratio to the "
                   "control's (the centre prior's or a uniform map's, whichever is larger); green: object box; ring: "
                   "the map's maximum. Smallest ratio first.")
        return [ev.png_evidence(f"Saliency ({self.method})", grid, caption)]

