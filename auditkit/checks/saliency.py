"""Check `saliency-in-box`: the saliency map's energy lands inside the object's boxes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, require_unit
from auditkit.methods import saliency as sal

Method = Literal["gradient", "input_x_gradient", "smoothgrad", "integrated_gradients",
                 "guided_backprop", "deconvnet", "grad_cam"]


def validate_method_layer(check: Check) -> None:
    """A Grad-CAM layer may only be named for method 'grad_cam'."""
    if check.layer and check.method != "grad_cam":
        raise CheckConfigError(f"check {check.name!r}: layer applies to method 'grad_cam' only, not {check.method!r}")


_METHOD_TITLES = {"gradient": "gradient", "input_x_gradient": "input x gradient", "smoothgrad": "SmoothGrad",
                  "integrated_gradients": "integrated gradients", "guided_backprop": "guided backprop",
                  "deconvnet": "DeconvNet", "grad_cam": "Grad-CAM"}


@dataclass
class SaliencyInBox(Check):
    """Per sample: energy = positive map inside the boxes / positive map overall; lift = energy /
    box area fraction; hit = the map's maximum lies within tolerance_px of a box. A sample passes
    when energy >= min_energy and lift >= min_lift; the check passes when the share of passing
    samples is >= min_pass_rate. The same numbers for a centre-prior map (a Gaussian at the
    image centre) are reported beside them, so the margin over "always look at the middle" shows.
    """

    kind = "saliency-in-box"
    title = "Saliency lands inside the object"
    description = (
        "energy = sum of the positive map inside the boxes / sum over the image; lift = energy / box "
        "area fraction (1 = uniform). A sample passes when energy >= min_energy and lift >= min_lift; "
        "the check passes when at least min_pass_rate of the samples pass. A centre-prior map is scored beside it."
    )

    method: Method = "grad_cam"
    layer: str = ""
    min_energy: float = 0.5
    min_lift: float = 1.5
    min_pass_rate: float = 0.7
    tolerance_px: float = 15.0
    evidence_samples: int = 6

    def validate(self) -> None:
        require_unit(self, "min_energy", "min_pass_rate")
        if self.min_lift < 0 or self.tolerance_px < 0 or self.evidence_samples < 0:
            raise CheckConfigError(f"check {self.name!r}: min_lift, tolerance_px and evidence_samples must be >= 0")
        validate_method_layer(self)

    def run(self, subject, audit_set) -> CheckResult:
        usable, boxed = audit_set.with_boxes()
        if boxed is None:
            return self.error_result(f"audit set {audit_set.name!r} has no sample with an object box")
        images, labels, inside = boxed.images(), boxed.labels(), boxed.box_masks()
        boxes = [sample.boxes for sample in boxed]
        n, _, h, w = images.shape

        ids = [audit_set[i].id or str(i) for i in usable]
        maps = sal.saliency_map(subject, images, labels, self.method, layer=self.layer or None, sample_ids=ids)
        prior = sal.centre_prior(n, h, w)
        ours, centre = self._score(maps, inside, boxes), self._score(prior, inside, boxes)
        passed = ours["passed"]
        rate = float(passed.float().mean())
        prior_rate = float(centre["passed"].float().mean())

        rows = [{
            "sample": ids[j],
            "energy": float(ours["energy"][j]), "lift": float(ours["lift"][j]), "hit": bool(ours["hit"][j]),
            "prior_energy": float(centre["energy"][j]), "prior_lift": float(centre["lift"][j]),
            "prior_hit": bool(centre["hit"][j]), "passed": bool(passed[j]),
        } for j, i in enumerate(usable)]
        mean = lambda t: float(torch.nanmean(t.float()))  # noqa: E731
        result = self.result(
            metric="pass rate", value=rate, threshold=self.min_pass_rate, rows=rows, columns=list(rows[0]),
            message=(f"{self.method}: {int(passed.sum())} of {n} samples pass (centre prior: {prior_rate:.2f}); "
                     f"mean energy {mean(ours['energy']):.2f} vs prior {mean(centre['energy']):.2f}, "
                     f"mean lift {mean(ours['lift']):.2f} vs {mean(centre['lift']):.2f}, "
                     f"pointing hits {mean(ours['hit']):.2f} vs {mean(centre['hit']):.2f}"),
            details={
                "method": self.method, "mean_energy": mean(ours["energy"]), "mean_lift": mean(ours["lift"]),
                "pointing_accuracy": mean(ours["hit"]), "prior_pass_rate": prior_rate,
                "prior_mean_energy": mean(centre["energy"]), "prior_mean_lift": mean(centre["lift"]),
                "prior_pointing_accuracy": mean(centre["hit"]),
            },
        )
        result.title = f"{self.title} ({_METHOD_TITLES.get(self.method, self.method)})"
        result.evidence = self._evidence(audit_set, usable, images, maps, boxes, passed, ours)
        return result

    def _score(self, maps: torch.Tensor, inside: torch.Tensor, boxes) -> dict[str, torch.Tensor]:
        energy = sal.energy_in_box(maps, inside)
        lift = energy / sal.area_fraction(inside)
        hit = sal.pointing_hits(maps, boxes, self.tolerance_px)
        passed = (energy >= self.min_energy) & (lift >= self.min_lift)  # NaN compares False
        return {"energy": energy, "lift": lift, "hit": hit, "passed": passed}

    def _evidence(self, audit_set, usable, images, maps, boxes, passed, ours):
        if self.evidence_samples == 0:
            return []
        order = sorted(range(len(usable)), key=lambda j: (bool(passed[j]), j))[: self.evidence_samples]
        scale = max(1, 192 // images.shape[-1])
        rows, titles, labels = [], [], []
        for j in order:
            scaled = [b.scaled(scale, scale) for b in boxes[j]]
            x, y = ev.argmax_xy(maps[j])
            heat = ev.draw_boxes(ev.upscale(ev.overlay(images[j], maps[j]), scale), scaled, width=2)
            rows.append([ev.draw_boxes(ev.upscale(images[j], scale), scaled, width=2),
                         ev.mark_point(heat, ((x + 0.5) * scale, (y + 0.5) * scale))])
            titles.append(["image and box",
                           f"energy {float(ours['energy'][j]):.2f}, lift {float(ours['lift'][j]):.1f}"])
            labels.append(f"{audit_set[usable[j]].id} {'pass' if passed[j] else 'FAIL'}")
        grid = ev.panel_grid(rows, titles=titles, row_labels=labels, scale=1)
        caption = (f"{self.method} map over the image, with each sample's energy in the box and lift; "
                   "green: object box; ring: the map's maximum. Failing samples first.")
        return [ev.png_evidence(f"Saliency ({self.method})", grid, caption)]
