"""Tests for auditkit.report: files written atomically, JSON round trip, ordering, escaping, no remote refs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import pytest
from PIL import Image

from auditkit.checks.base import CheckResult, Evidence, Status
from auditkit.evidence import line_chart_svg, png_evidence, svg_evidence
from auditkit.report import SCHEMA, read_report_json, sort_results, verdict, write_report
from auditkit import reportdir
from auditkit.reportdir import evidence_stem

HOSTILE = "<script>alert(1)</script>"


def _results(report_dir: Path) -> list[CheckResult]:
    passed = CheckResult(
        check="pointing", kind="pointing", status=Status.PASSED, metric="hit rate", value=0.93, threshold=0.75,
        model="demo", dataset="shapes", title="Pointing game", duration_s=0.5,
        rows=[{"sample": "a", "hit": True, "passed": True}],
    )
    failed = CheckResult(
        check="occlusion-drop", kind="occlusion", status=Status.FAILED, metric="pass rate", value=0.62, threshold=0.8,
        message="15 of 40 kept their label", model="demo", dataset="shapes", title="Occlusion",
        rows=[{"sample": "x", "drop": 0.123456, "passed": False}, {"sample": "y", "drop": 0.9, "passed": True}],
        columns=["sample", "drop", "passed"], params={"patch": 8},
        evidence=[
            png_evidence("grid", Image.new("RGB", (8, 8), (200, 30, 30)), "a caption"),
            svg_evidence("curve", line_chart_svg({"s": ([0, 1], [1.0, 0.5])})),
        ],
    )
    error = CheckResult(
        check="sanity", kind="sanity", status=Status.ERROR, message="RuntimeError: boom",
        error="Traceback (most recent call last):\nRuntimeError: boom", model="demo",
        evidence=[Evidence(title="never saved", media_type="image/png", data=b"")],
    )
    results = [passed, failed, error]
    for r in (passed, failed):
        r.save_evidence(report_dir)
    return results


META = {
    "models": [{"name": "demo", "version": "1.0"}], "dataset": "shapes", "device": "cpu",
    "torch_version": "2.x", "started": "2025-01-02T03:04:05+00:00", "duration_s": 1.5,
}


def test_write_report_creates_both_files(tmp_path: Path) -> None:
    html_path, json_path = write_report(_results(tmp_path), META, tmp_path)
    assert html_path == tmp_path / "index.html" and json_path == tmp_path / "audit.json"
    html = html_path.read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and "auditkit audit" in html
    assert f'src="evidence/{evidence_stem("demo", "occlusion-drop", index=0)}.png"' in html
    assert 'loading="lazy"' in html
    assert "evidence not saved" in html  # the unsaved evidence of the error result
    assert "pass rate 0.62 &lt; 0.80 required" in html
    assert "demo :: occlusion-drop" in html
    assert "RuntimeError: boom" in html and "<pre>" in html
    assert 'class="bad"' in html  # the failed per-sample row is highlighted
    assert "0.1235" in html  # floats to 4 significant digits


def test_json_round_trip(tmp_path: Path) -> None:
    results = _results(tmp_path)
    _, json_path = write_report(results, META, tmp_path)
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    assert doc["schema"] == SCHEMA
    assert doc["meta"]["counts"] == {"passed": 1, "failed": 1, "error": 1, "inconclusive": 0, "info": 0,
                                     "total": 3}
    meta, back = read_report_json(json_path)
    assert meta["dataset"] == "shapes" and meta["models"] == META["models"]
    by_check = {r.check: r for r in back}
    for original in results:
        r = by_check[original.check]
        assert r.status is original.status
        assert r.value == original.value and r.threshold == original.threshold
        assert [e.path for e in r.evidence] == [e.path for e in original.evidence]
    assert by_check["occlusion-drop"].evidence[0].path == f"evidence/{evidence_stem('demo', 'occlusion-drop', index=0)}.png"
    assert by_check["sanity"].evidence[0].path is None
    assert read_report_json(tmp_path)[1][0].check == back[0].check  # the folder works too
    assert "counts" not in META  # the caller's meta is not modified


def test_read_report_json_rejects_other_files(tmp_path: Path) -> None:
    p = tmp_path / "audit.json"
    p.write_text(json.dumps({"schema": "something/9"}))
    with pytest.raises(ValueError, match="schema"):
        read_report_json(p)


def test_failures_sort_before_errors_before_passes(tmp_path: Path) -> None:
    results = _results(tmp_path)
    assert [r.status for r in sort_results(results)] == [Status.FAILED, Status.ERROR, Status.PASSED]
    html_path, json_path = write_report(results, META, tmp_path)
    html = html_path.read_text(encoding="utf-8")
    sections = re.findall(r'<section class="card result (\w+)"', html)
    assert sections == ["failed", "error", "passed"]
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    assert [r["status"] for r in doc["results"]] == ["failed", "error", "passed"]


def test_hostile_names_are_escaped(tmp_path: Path) -> None:
    r = CheckResult(
        check=HOSTILE, kind=HOSTILE, status=Status.FAILED, metric=HOSTILE, value=0.1, threshold=0.5,
        message=f"class {HOSTILE} failed", model=HOSTILE, dataset=HOSTILE, title=HOSTILE,
        rows=[{"label": HOSTILE, HOSTILE: 1.0, "passed": False}], params={HOSTILE: HOSTILE},
        evidence=[Evidence(title=HOSTILE, media_type="image/png", caption=HOSTILE, path="evidence/x.png")],
        details={HOSTILE: HOSTILE},
    )
    meta = {"models": [{"name": HOSTILE, "version": HOSTILE}], "dataset": HOSTILE, "device": HOSTILE,
            "command": HOSTILE, HOSTILE: HOSTILE}
    html_path, _ = write_report([r], meta, tmp_path)
    html = html_path.read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_evidence_paths_must_be_relative(tmp_path: Path) -> None:
    r = CheckResult(check="c", kind="k", status=Status.PASSED, evidence=[
        Evidence(title="js", media_type="image/png", path="javascript:alert(1)"),
        Evidence(title="abs", media_type="image/png", path="/etc/passwd"),
        Evidence(title="up", media_type="image/png", path="../x.png"),
    ])
    html = write_report([r], {}, tmp_path)[0].read_text(encoding="utf-8")
    assert "javascript:" not in html and "/etc/passwd" not in html and "../x.png" not in html
    assert html.count("evidence not saved") == 3


def test_no_remote_resources(tmp_path: Path) -> None:
    html = write_report(_results(tmp_path), META, tmp_path)[0].read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert refs, "expected some local references"
    assert not [u for u in refs if re.match(r"(?i)\s*(https?:)?//", u)]
    assert "@import" not in html and "url(" not in html
    assert "<link" not in html.lower() and "<script" not in html.lower()


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("old report")
    write_report(_results(tmp_path), META, tmp_path)
    assert (tmp_path / "index.html").read_text(encoding="utf-8") != "old report"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in {"index.html", "audit.json", "evidence"}]
    assert leftovers == []


def test_failed_render_keeps_the_old_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "index.html").write_text("old report")
    (tmp_path / "audit.json").write_text("{}")

    def boom(self: jinja2.Template, *args: object, **kwargs: object) -> str:
        raise RuntimeError("render failed")

    monkeypatch.setattr(jinja2.Template, "render", boom)
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(_results(tmp_path), META, tmp_path)
    assert (tmp_path / "index.html").read_text() == "old report"
    assert (tmp_path / "audit.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "evidence", "index.html"]


def test_failed_write_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "index.html").write_text("old report")

    def fail_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(reportdir.os, "replace", fail_replace)
    with pytest.raises(OSError):
        write_report([], {}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]
    assert (tmp_path / "index.html").read_text() == "old report"


def test_empty_report_and_minimal_meta(tmp_path: Path) -> None:
    html_path, json_path = write_report([], {}, tmp_path / "new" / "dir")
    assert "No checks ran" in html_path.read_text(encoding="utf-8")
    meta, results = read_report_json(json_path)
    assert results == [] and meta["counts"]["total"] == 0


def test_verdict_sentences() -> None:
    def res(status: Status, value: float, threshold: float, direction: str) -> CheckResult:
        return CheckResult(check="c", kind="k", status=status, metric="m", value=value, threshold=threshold, direction=direction)

    assert verdict(res(Status.FAILED, 0.62, 0.8, ">=")) == "m 0.62 < 0.80 required"
    assert verdict(res(Status.PASSED, 0.93, 0.75, ">=")) == "m 0.93 ≥ 0.75 required"
    assert verdict(res(Status.PASSED, 0.031, 0.05, "<=")) == "m 0.031 ≤ 0.050 allowed"
    assert verdict(res(Status.FAILED, 0.31, 0.2, "<=")) == "m 0.31 > 0.20 allowed"
    assert verdict(res(Status.FAILED, 0.7999, 0.8, ">=")) == "m 0.7999 < 0.8000 required"


def test_evidence_only_results_sort_last_and_show_an_evidence_badge(tmp_path: Path) -> None:
    info = CheckResult(check="patches", kind="k", status=Status.INFO, message="shown, not judged")
    failed = CheckResult(check="bad", kind="k", status=Status.FAILED, metric="m", value=0.1, threshold=0.5)
    assert [r.check for r in sort_results([info, failed])] == ["bad", "patches"]
    html_path, json_path = write_report([info, failed], {"models": ["m"]}, tmp_path)
    page = html_path.read_text(encoding="utf-8")
    assert 'class="badge info"' in page and "1</b> evidence only" in page
    meta, results = read_report_json(json_path)
    assert meta["counts"]["info"] == 1 and results[-1].status is Status.INFO


def test_incomplete_run_of_no_check_and_unread_configuration_are_shown(tmp_path: Path) -> None:
    run = {"exit_status": 2, "exit_name": "INTERRUPTED", "planned": 3, "ran": 0, "deselected": 0,
           "complete": False, "reason": "the run was interrupted while audit[m]::c ran"}
    meta = {**META, "run": run, "config": "/p/pyproject.toml", "config_not_read": "/q/pyproject.toml (pytest's configfile)"}
    html_path, json_path = write_report([], meta, tmp_path)
    page = html_path.read_text(encoding="utf-8")
    assert "Incomplete run" in page and "0 of 3 planned checks ran" in page and "INTERRUPTED" in page
    assert "Configuration not read" in page and "/q/pyproject.toml (pytest&#39;s configfile)" in page
    meta_read, results = read_report_json(json_path)
    assert meta_read["overall"] == "incomplete" and results == []
