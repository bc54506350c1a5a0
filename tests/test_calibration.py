"""The calibration matrix's fast subset (benchmarks/calibration, issue 14.4): three tiny models with known
behaviour through the checks meant to tell them apart, against the verdicts written in expected.py.

- good-plain-64 (shipped weights) reads the shapes: it must pass occlusion-drop and saliency-in-box;
- flaw-watermark-plain-64 (shipped weights) reads only a corner watermark: accurate on its audit set, at
  chance without the watermark, and occlusion-drop and both saliency-in-box variants must FAIL it;
- flaw-random-plain-64 (seeded random weights): occlusion-drop and feature-neighbours must FAIL it.

The full matrix (14 models, every check) is `python benchmarks/calibration/run.py`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.calibration import run as R
from benchmarks.calibration import train as T
from benchmarks.calibration.expected import BY_NAME, CHECKS, ENTRIES
from benchmarks.calibration.tasks import CLASSES, TaskSpec, audit_set, box_area_shares, generate

#: check -> the entries of the fast subset it runs on (the checks meant to catch each flaw, and the good
#: model's localisation checks).
FAST_CELLS = {
    "good-plain-64": ("occlusion-drop", "saliency-in-box"),
    "flaw-watermark-plain-64": ("occlusion-drop", "saliency-in-box"),
    "flaw-random-plain-64": ("occlusion-drop", "feature-neighbours"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fast_cells(tmp_path_factory):
    report = tmp_path_factory.mktemp("calibration")
    cells, infos = {}, {}
    for name, checks in FAST_CELLS.items():
        got, info = R.run_entries([BY_NAME[name]], checks, log=lambda s: None, report_root=report)
        cells.update({(c.model, c.check): c for c in got})
        infos.update(info)
    return cells, infos


def test_matrix_is_complete_and_written_down():
    assert len(ENTRIES) >= 12
    families = {e.arch for e in ENTRIES if e.name.startswith("good-")}
    assert {"plain", "resnet", "mobile", "vit"} <= families
    assert any(e.arch == "efficientnet-lite0" for e in ENTRIES)
    sizes = {e.size for e in ENTRIES}
    assert min(sizes) == 64 and max(sizes) == 224
    flaws = {e.train_task.shortcut for e in ENTRIES if e.train_task is not None} - {"none"}
    assert flaws == {"watermark", "background", "texture"}
    assert any(e.random for e in ENTRIES) and any(e.kill for e in ENTRIES)
    for e in ENTRIES:
        assert set(e.expect) | set(e.skip) >= set(CHECKS), e.name
        assert all(x.why for x in e.expect.values()), e.name
        if e.name.startswith("flaw-"):  # every planted flaw names the checks meant to catch it
            assert any(x.role == "target" and x.status == "failed" for x in e.expect.values()), e.name
        else:
            assert all(x.role == "good" for x in e.expect.values()), e.name


def test_tasks_boxes_are_exact_and_objects_span_the_requested_sizes():
    spec = TaskSpec(96, (0.03, 0.15))
    images, labels, boxes = generate(spec, 40, seed=5)
    again, _, _ = generate(spec, 40, seed=5)
    assert torch.equal(images, again)  # deterministic
    shares = box_area_shares(audit_set(spec, 40, seed=5))
    assert 0.03 * 0.8 <= min(shares) and max(shares) <= 0.15 * 1.2
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    # the box is tight around one solid-coloured object: the colour shared by most pixels in the box (up to
    # the +-0.05 pixel noise) covers a good part of it and touches all four edges of the box
    for i in range(8):
        x0, y0, x1, y1 = (int(v) for v in boxes[i].as_tuple())
        patch = images[i, :, y0:y1, x0:x1].permute(1, 2, 0).numpy()
        flat = patch.reshape(-1, 3)
        candidates = flat[:: max(1, len(flat) // 64)]
        close = np.abs(flat[None] - candidates[:, None]).max(axis=2) <= 0.1
        colour = candidates[close.sum(1).argmax()]
        mask = (np.abs(patch - colour).max(axis=2) <= 0.1)
        assert mask.mean() > 0.25, i
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), i


def test_watermark_model_is_a_real_shortcut(fast_cells):
    _, infos = fast_cells
    info = infos["flaw-watermark-plain-64"]
    assert info["accuracy_audit_distribution"] >= 0.9  # accurate where the watermark agrees with the shape...
    assert info["accuracy_without_shortcut"] <= 0.45  # ...and near chance (0.25) without it
    assert infos["good-plain-64"]["accuracy_audit_distribution"] >= 0.8
    assert "shipped" in infos["good-plain-64"]["source"]


@pytest.mark.parametrize("model,check", [(m, c) for m, checks in FAST_CELLS.items() for c in checks])
def test_fast_cell_meets_its_expectation(fast_cells, model, check):
    cells, _ = fast_cells
    cell = cells[(model, check)]
    assert cell.expect.role in ("good", "target")
    assert cell.expect.accepts(cell.got), f"expected {cell.expect.label()} ({cell.expect.why}); {cell.summary}"
    assert cell.verdict == "ok"


def test_fast_verdicts_by_margin(fast_cells):
    """Not by a tuned edge: the good model's occlusion margin is far above the minimum, the flawed ones'
    upper bound below it."""
    cells, _ = fast_cells
    good = cells[("good-plain-64", "occlusion-drop")].result["decision"]
    assert good["ci"][0] > good["min_effect"]
    for flawed in ("flaw-watermark-plain-64", "flaw-random-plain-64"):
        d = cells[(flawed, "occlusion-drop")].result["decision"]
        assert d["effect"] < d["min_effect"], flawed
    saliency = cells[("flaw-watermark-plain-64", "saliency-in-box")].result["decision"]
    assert saliency["effect"] < saliency["min_effect"]


def test_registries_are_left_as_found(fast_cells):
    from auditkit.registry import DATASETS, MODELS

    assert not set(FAST_CELLS) & set(MODELS.factories)
    assert not set(FAST_CELLS) & set(DATASETS.factories)


def test_confusion_table_marks_problems():
    from benchmarks.calibration.expected import Expect

    cells = [R.Cell("m", "occlusion-drop", Expect("passed", "good", "x"), "failed"),
             R.Cell("m", "dead-units", Expect("failed", "target", "x"), "failed"),
             R.Cell("m", "class-separation", Expect("passed", "side", "x"), "failed")]
    assert [c.verdict for c in cells] == ["problem", "ok", "note"]
    table = R.confusion_table(cells)
    assert "FAIL XX" in table and "FAIL ok" in table and "FAIL ~" in table
    assert "m / occlusion-drop" in R.mismatches(cells)
    assert R.Cell("m", "x", Expect("passed", "good", "x"), "inconclusive").verdict == "problem"
    assert T.recipe_key(BY_NAME["good-plain-64"]) != T.recipe_key(BY_NAME["flaw-dead-plain-64"])
