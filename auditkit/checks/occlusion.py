"""Check `occlusion-drop` (Zeiler & Fergus 2014, section 4.2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, Status, require_at_least, require_unit
from auditkit.methods import occlusion as occ


#: The colour scale of every occlusion map: the drop p - p_occluded lies in [-1, 1].
MAP_SCALE = (-1.0, 1.0)


@dataclass
class OcclusionDrop(Check):
    """Occluding the object must cut the true-class probability; occluding elsewhere must not.

    Per sample, with p = p(true class | image):
        drop_object  = (p - p(object boxes replaced by the baseline)) / p
        drop_control = mean over up to `control_boxes` same-size boxes, each
                       covering at most `control_overlap` of its area with
                       the object's boxes, of (p - p(control occluded)) / p
    A sample passes when drop_object >= min_drop and drop_object > drop_control.
    The check passes when the share of passing samples is >= min_pass_rate.

    A sample is judged when it has an object box covering at least one pixel
    (a box under a pixel after resizing is skipped, and named) and a control
    placement. With fewer than `min_samples` judged samples the check FAILS,
    whatever their pass rate. The default, 5, is the fewest samples for which
    even all passing can be told from a coin flip (0.5^5 = 3% < 5%).
    """

    kind = "occlusion-drop"
    title = "Occluding the object drops the class score"
    description = (
        "Per sample: drop = (p - p_occluded) / p for the true class. Passes when the object's drop "
        "is >= min_drop and larger than the mean drop from same-size boxes placed away from the object "
        "(each covering at most control_overlap of it), "
        "for at least min_pass_rate of the samples. Fails when fewer than min_samples samples can be judged "
        "(judged: an object box covering a pixel and room for a control box)."
    )

    min_drop: float = 0.5
    min_pass_rate: float = 0.8
    baseline: Literal["grey", "mean", "blur", "zero"] = "grey"
    control_boxes: int = 4
    control_overlap: float = 0.25
    patch: int = 0
    stride: int = 0
    evidence_samples: int = 8
    min_samples: int = 5

    def validate(self) -> None:
        if not 0.0 < self.min_drop <= 1.0:
            raise CheckConfigError(f"check {self.name!r}: min_drop must be in (0, 1], got {self.min_drop}")
        require_unit(self, "min_pass_rate")
        if not 0.0 <= self.control_overlap < 1.0:
            raise CheckConfigError(f"check {self.name!r}: control_overlap must be in [0, 1), got {self.control_overlap}")
        require_at_least(self, control_boxes=1, min_samples=1)
        if self.patch < 0 or self.stride < 0 or self.evidence_samples < 0:
            raise CheckConfigError(f"check {self.name!r}: patch, stride and evidence_samples must be >= 0")

    def window(self, height: int, width: int) -> tuple[int, int]:
        """Sensitivity-map window: patch defaults to a fifth of the shorter side, stride to a third of the patch."""
        patch = self.patch or max(2, min(height, width) // 5)
        return patch, self.stride or max(1, patch // 3)

    def run(self, subject, audit_set) -> CheckResult:
        usable, boxed = audit_set.with_boxes()
        if boxed is None:
            return self.error_result(f"audit set {audit_set.name!r} has no sample with an object box")
        # a box valid in its file may cover no pixel once resized (1 px of 640 is 0.1 px of 64):
        # nothing to occlude, no size for a control, so the sample is skipped and named
        object_masks = boxed.box_masks()
        h, w = object_masks.shape[-2:]
        covers = object_masks.flatten(1).any(1).tolist()
        skipped = [self._no_pixel(audit_set, i, h, w) for i, ok in zip(usable, covers) if not ok]
        keep = [j for j, ok in enumerate(covers) if ok]
        usable, boxed, object_masks = [usable[j] for j in keep], boxed.subset(keep), object_masks[keep]
        notes = []
        without_box = len(audit_set) - len(covers)
        if without_box:
            notes.append(f"{without_box} sample(s) without a box skipped")
        if skipped:
            notes.append(f"{len(skipped)} sample(s) skipped as their object box covers no pixel at {w} x {h} "
                         f"(under a pixel after resizing): {_listed([s['sample'] for s in skipped])}")
        if not usable:
            return self._too_few(0, len(audit_set), notes, rows=[], details={"skipped": skipped})

        images, labels = boxed.images(), boxed.labels()
        n = len(images)
        base = occ.baseline_images(images, self.baseline)

        probs = subject.probabilities(images)
        p = probs.gather(1, labels[:, None]).squeeze(1)
        p_object = subject.class_probability(occ.occlude(images, object_masks, base), labels)

        # control boxes: same size as the object's box, placed where no object pixel is
        owners, control_masks, placements = [], [], []
        for j, i in enumerate(usable):
            union = occ.box_union(audit_set[i].boxes)
            boxes = occ.control_boxes(object_masks[j], union, self.control_boxes, self.control_overlap)
            placements.append(boxes)
            owners += [j] * len(boxes)
            if boxes:
                control_masks.append(occ.box_masks(boxes, h, w))
        owners_t = torch.tensor(owners, dtype=torch.long)
        drop_control = torch.full((n,), float("nan"))
        if owners:
            masks = torch.cat(control_masks)
            p_control = subject.class_probability(occ.occlude(images[owners_t], masks, base[owners_t]), labels[owners_t])
            rel = (p[owners_t] - p_control) / p[owners_t].clamp_min(1e-12)
            sums = torch.zeros(n).index_add_(0, owners_t, rel)
            counts = torch.zeros(n).index_add_(0, owners_t, torch.ones(len(owners)))
            drop_control = torch.where(counts > 0, sums / counts.clamp_min(1), drop_control)

        drop_object = (p - p_object) / p.clamp_min(1e-12)
        has_control = ~torch.isnan(drop_control)
        passed = (drop_object >= self.min_drop) & has_control & (drop_object > drop_control)
        judged = int(has_control.sum())

        predicted = probs.argmax(1)
        names = subject.spec.class_names
        rows = []
        for j, i in enumerate(usable):
            rows.append({
                "sample": audit_set[i].id or str(i), "label": names[int(labels[j])], "predicted": names[int(predicted[j])],
                "p": float(p[j]), "p_object_occluded": float(p_object[j]), "drop_object": float(drop_object[j]),
                "drop_control": float(drop_control[j]) if has_control[j] else None,
                "controls": len(placements[j]), "passed": bool(passed[j]) if has_control[j] else None,
            })
        if n - judged:
            notes.append(f"{n - judged} sample(s) with no room for a control box not judged")
        details = {
            "mean_drop_object": float(drop_object.mean()),
            "mean_drop_control": float(drop_control[has_control].mean()) if judged else float("nan"),
            "accuracy": float((predicted == labels).float().mean()),
            "samples_skipped": len(audit_set) - n, "skipped": skipped,
        }
        if judged < self.min_samples:
            result = self._too_few(judged, len(audit_set), notes, rows=rows, details=details)
        else:
            message = (
                f"{int(passed.sum())} of {judged} samples pass; mean drop when the object is occluded "
                f"{details['mean_drop_object']:.2f}, when a control box is {details['mean_drop_control']:.2f}"
            )
            result = self.result(
                metric="pass rate", value=float(passed[has_control].float().mean()), threshold=self.min_pass_rate,
                rows=rows, columns=list(rows[0]), message="; ".join([message] + notes),
                details={**details, "samples_judged": judged, "min_samples": self.min_samples},
            )
        result.evidence = self._evidence(subject, audit_set, usable, images, labels, object_masks, base, placements, passed)
        return result

    def _too_few(self, judged: int, total: int, notes: list[str], *, rows: list[dict], details: dict) -> CheckResult:
        """FAILED: fewer than min_samples samples could be judged, whatever their pass rate."""
        message = f"only {judged} of {total} samples could be judged (needs at least {self.min_samples})"
        result = self.result(
            metric="samples judged", value=judged, threshold=self.min_samples, rows=rows,
            columns=list(rows[0]) if rows else [], message="; ".join([message] + notes),
            details={**details, "samples_judged": judged, "min_samples": self.min_samples},
        )
        result.status = Status.FAILED  # judged < min_samples, so the judgement above already says so
        return result

    @staticmethod
    def _no_pixel(audit_set, i: int, h: int, w: int) -> dict:
        sample = audit_set[i]
        union = occ.box_union(sample.boxes)
        return {
            "sample": sample.id or str(i),
            "reason": (f"object box ({union.x0:.4g}, {union.y0:.4g}, {union.x1:.4g}, {union.y1:.4g}), "
                       f"{union.width:.2g} x {union.height:.2g} px, covers no pixel at {w} x {h}: "
                       "under a pixel after resizing, there is nothing to occlude"),
        }

    def _evidence(self, subject, audit_set, usable, images, labels, object_masks, base, placements, passed):
        """Image with box, occluded image, occlusion map overlay and control boxes for a few samples, failures first."""
        if self.evidence_samples == 0:
            return []
        def rank(j: int) -> int:  # judged failures, then unjudged samples, then passes
            return 2 if passed[j] else (1 if not placements[j] else 0)

        order = sorted(range(len(usable)), key=lambda j: (rank(j), j))[: self.evidence_samples]
        idx = torch.tensor(order)
        patch, stride = self.window(*images.shape[-2:])
        maps = occ.occlusion_map(subject, images[idx], labels[idx], patch=patch, stride=stride, baseline=self.baseline)
        occluded = occ.occlude(images[idx], object_masks[idx], base[idx])
        rows, titles, labels_txt = [], [], []
        names = subject.spec.class_names
        scale = max(1, 192 // images.shape[-1])  # draw boxes after enlarging, so lines stay thin

        def boxes_on(img, boxes, color=(0, 255, 0)):
            return ev.draw_boxes(ev.upscale(img, scale), [b.scaled(scale, scale) for b in boxes], color=color, width=2)

        for k, j in enumerate(order):
            sample = audit_set[usable[j]]
            picture = boxes_on(images[j], placements[j], (255, 160, 0))
            picture = ev.draw_boxes(picture, [b.scaled(scale, scale) for b in sample.boxes], color=(0, 255, 0), width=2)
            x, y = ev.argmax_xy(maps[k])
            heat = ev.overlay(images[j], maps[k], signed=True, vmin=MAP_SCALE[0], vmax=MAP_SCALE[1])
            heat = ev.mark_point(boxes_on(heat, sample.boxes), ((x + 0.5) * scale, (y + 0.5) * scale))
            rows.append([picture, ev.upscale(occluded[k], scale), heat])
            titles.append(["image, box, controls", "object occluded", "occlusion map"])
            verdict = {0: "FAIL", 1: "not judged", 2: "pass"}[rank(j)]
            labels_txt.append(f"{sample.id} ({names[int(labels[j])]}) {verdict}")
        # one scale for every map, so a near-zero map looks near zero: its legend beside the first row
        rows[0].append(ev.colorbar(*MAP_SCALE, height=images.shape[-2] * scale, label="drop in p"))
        titles[0].append("scale")
        grid = ev.panel_grid(rows, titles=titles, row_labels=labels_txt, scale=1)
        caption = (
            f"Green: object box; orange: control boxes. Occlusion map: drop in p(true class) when a "
            f"{patch} x {patch} window (stride {stride}) is replaced by the {self.baseline} baseline, "
            f"on one fixed scale for every image, {MAP_SCALE[0]:+g} to {MAP_SCALE[1]:+g} (colour bar): red = covering "
            "it lowers p, blue = raises it, grey = no change; the ring marks the largest drop. Failing samples first."
        )
        return [ev.png_evidence("Occlusion evidence", grid, caption)]


def _listed(ids: list[str], limit: int = 5) -> str:
    """Up to `limit` sample ids, then how many more."""
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
