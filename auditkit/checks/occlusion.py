"""Check `occlusion-drop` (Zeiler & Fergus 2014, section 4.2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, listed, require_alpha, require_at_least
from auditkit.checks.decision import ALPHA, decide
from auditkit.methods import occlusion as occ


#: The colour scale of every occlusion map: the drop p - p_occluded lies in [-1, 1].
MAP_SCALE = (-1.0, 1.0)
METRIC = "mean drop_object - drop_control"


def relative_drop(p: torch.Tensor, p_occluded: torch.Tensor) -> torch.Tensor:
    """(p - p_occluded) / p, clipped to [-1, 1]: occlusion that more than doubles a small p counts as -1,
    so a misclassified sample (p near 0, ratio unbounded below) cannot outweigh the others in the mean."""
    return ((p - p_occluded) / p.clamp_min(1e-12)).clamp(-1.0, 1.0)


@dataclass
class OcclusionDrop(Check):
    """Occluding the object must cut the true-class probability more than occluding elsewhere does.

    Per sample, with p = p(true class | image):
        drop_object  = (p - p(object boxes replaced by the baseline)) / p
        drop_control = mean over up to `control_boxes` same-size boxes, each
                       covering at most `control_overlap` of its area with
                       the object's boxes, of (p - p(control occluded)) / p
    each drop clipped to [-1, 1] (relative_drop).
    Decision (checks.decision, effect "difference"): passes when
    mean(drop_object - drop_control) >= min_margin and a one-sided Wilcoxon
    signed-rank test of drop_object - drop_control > 0 gives p <= alpha.

    A sample is judged when it has an object box covering at least one pixel
    (a box under a pixel after resizing is skipped, and named) and a control
    placement. With fewer judged samples than the test needs to reach alpha
    (7 at alpha = 0.01) the check is INCONCLUSIVE and says how many it needs.
    """

    kind = "occlusion-drop"
    title = "Occluding the object drops the class score"
    description = (
        "Per sample: drop = (p - p_occluded) / p for the true class, for the object's boxes and for same-size "
        "control boxes placed away from the object (each covering at most control_overlap of it). Passes when "
        "mean(drop_object - drop_control) >= min_margin and a one-sided Wilcoxon signed-rank test of "
        "drop_object - drop_control > 0 gives p <= alpha. INCONCLUSIVE when fewer samples can be judged than "
        "the test needs (judged: an object box covering a pixel and room for a control box)."
    )

    min_margin: float = 0.1
    alpha: float = ALPHA
    baseline: Literal["grey", "mean", "blur", "zero"] = "grey"
    control_boxes: int = 4
    control_overlap: float = 0.25
    patch: int = 0
    stride: int = 0
    evidence_samples: int = 4  # each map costs about 100 forwards (10 x 10 windows): 1.6 plain inferences of 64 images
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.min_margin <= 1.0:
            raise CheckConfigError(f"check {self.name!r}: min_margin must be in [0, 1], got {self.min_margin}")
        require_alpha(self)
        if not 0.0 <= self.control_overlap < 1.0:
            raise CheckConfigError(f"check {self.name!r}: control_overlap must be in [0, 1), got {self.control_overlap}")
        require_at_least(self, control_boxes=1)
        if self.patch < 0 or self.stride < 0 or self.evidence_samples < 0:
            raise CheckConfigError(f"check {self.name!r}: patch, stride and evidence_samples must be >= 0")

    def window(self, height: int, width: int) -> tuple[int, int]:
        """Sensitivity-map window: patch defaults to a fifth of the shorter side, stride to half the patch
        (9 x 9 windows; the map is evidence, the verdict uses the boxes)."""
        patch = self.patch or max(2, min(height, width) // 5)
        return patch, self.stride or max(1, patch // 2)

    def _decide(self, drop_object, drop_control, groups, why: str = ""):
        return decide(drop_object, drop_control, effect="difference", min_effect=self.min_margin, alpha=self.alpha,
                      seed=self.seed, groups=groups, value_label="drop_object", control_label="drop_control",
                      inconclusive=why)

    def run(self, subject, audit_set) -> CheckResult:
        one_class = self.one_class_error(subject, "the drop of p(class) under occlusion")
        if one_class is not None:
            return one_class
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
        usable, object_masks = [usable[j] for j in keep], object_masks[keep]
        boxed = boxed.subset(keep) if keep else None
        notes = []
        without_box = len(audit_set) - len(covers)
        if without_box:
            notes.append(f"{without_box} sample(s) without a box skipped")
        if skipped:
            notes.append(f"{len(skipped)} sample(s) skipped as their object box covers no pixel at {w} x {h} "
                         f"(under a pixel after resizing): {listed([s['sample'] for s in skipped])}")
        if not usable:
            decision = self._decide([], [], [])
            return self.decided(decision, metric=METRIC, message="; ".join(notes),
                                details={"skipped": skipped, "samples_judged": 0})

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
            rel = relative_drop(p[owners_t], p_control)
            sums = torch.zeros(n).index_add_(0, owners_t, rel)
            counts = torch.zeros(n).index_add_(0, owners_t, torch.ones(len(owners)))
            drop_control = torch.where(counts > 0, sums / counts.clamp_min(1), drop_control)

        drop_object = relative_drop(p, p_object)
        has_control = ~torch.isnan(drop_control)
        margin = drop_object - drop_control
        judged = int(has_control.sum())

        predicted = probs.argmax(1)
        names = subject.spec.class_names
        class_of = [names[int(label)] for label in labels]
        rows = []
        for j, i in enumerate(usable):
            rows.append({
                "sample": audit_set[i].id or str(i), "label": class_of[j], "predicted": names[int(predicted[j])],
                "p": float(p[j]), "p_object_occluded": float(p_object[j]), "drop_object": float(drop_object[j]),
                "drop_control": float(drop_control[j]) if has_control[j] else None,
                "margin": float(margin[j]) if has_control[j] else None, "controls": len(placements[j]),
            })
        if n - judged:
            notes.append(f"{n - judged} sample(s) with no room for a control box not judged")
        details = {
            "mean_drop_object": float(drop_object.mean()),
            "mean_drop_control": float(drop_control[has_control].mean()) if judged else float("nan"),
            "accuracy": float((predicted == labels).float().mean()),
            "samples_skipped": len(audit_set) - n, "skipped": skipped, "samples_judged": judged,
        }
        decision = self._decide(drop_object.tolist(), drop_control.tolist(), class_of)
        result = self.decided(decision, metric=METRIC, rows=rows, columns=list(rows[0]), message="; ".join(notes),
                              details=details)
        result.evidence = self._evidence(subject, audit_set, usable, images, labels, object_masks, base, placements,
                                         margin)

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

    def _evidence(self, subject, audit_set, usable, images, labels, object_masks, base, placements, margin):
        """Image with box, occluded image, occlusion map overlay and control boxes for a few samples, the
        smallest margin (drop_object - drop_control) first, then samples without a control."""
        if self.evidence_samples == 0:
            return []
        def rank(j: int) -> tuple[int, float]:
            m = float(margin[j])
            return (1, 0.0) if m != m else (0, m)

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
            m = float(margin[j])
            verdict = "no control" if m != m else f"margin {m:+.2f}"
            labels_txt.append(f"{sample.id} ({names[int(labels[j])]}) {verdict}")
        # one scale for every map, so a near-zero map looks near zero: its legend beside the first row
        rows[0].append(ev.colorbar(*MAP_SCALE, height=images.shape[-2] * scale, label="drop in p"))
        titles[0].append("scale")
        grid = ev.panel_grid(rows, titles=titles, row_labels=labels_txt, scale=1)
        caption = (
            f"Green: object box; orange: control boxes. Occlusion map: drop in p(true class) when a "
            f"{patch} x {patch} window (stride {stride}) is replaced by the {self.baseline} baseline, "
            f"on one fixed scale for every image, {MAP_SCALE[0]:+g} to {MAP_SCALE[1]:+g} (colour bar): red = covering "
            "it lowers p, blue = raises it, grey = no change; the ring marks the largest drop. Smallest margin "
            "(object drop minus control drop) first."
        )
        return [ev.png_evidence("Occlusion evidence", grid, caption)]

