"""The run journal and the one routine that turns it into the published report.

The process that writes the report (the controller under xdist) appends one
JSON event a line to `.journal.jsonl` in the staging folder as the run goes:

    {"event": "meta", "planned": [{"nodeid", "model", "check", "kind"}, ...], "started", "command", "config",
     "config_not_read"}
    {"event": "deselected", "nodeids": [...]}          # -k / -m left these out
    {"event": "begin", "nodeid"}                       # a check started
    {"event": "result", "nodeid", "result", "model_info"}
    {"event": "lost", "nodeid", "message"}             # the item ended without a result (worker crash)
    {"event": "test", "nodeid", "outcome", "duration", "evidence", "longrepr"}   # plain test evidence

`finalise()` reads it back, orders the results as planned (a serial run's
order, whatever order xdist finished them in), states how complete the run
was, writes index.html and audit.json and publishes the folder. The end of a
normal run calls it; so does the watchdog when the process died first.
This module imports no torch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

from auditkit.reportdir import JOURNAL_NAME, publish

#: pytest's exit codes, by name, for the report.
EXIT_NAMES = {0: "OK", 1: "TESTS_FAILED", 2: "INTERRUPTED", 3: "INTERNAL_ERROR", 4: "USAGE_ERROR", 5: "NO_TESTS_COLLECTED"}


class Journal:
    """Append-only event log in the staging folder; each line is flushed at once, so it survives a crash."""

    def __init__(self, staging: Path) -> None:
        self.path = Path(staging) / JOURNAL_NAME
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        if self._handle.closed:
            return
        from auditkit.checks.base import jsonable

        line = json.dumps({"event": event, **jsonable(fields)}, ensure_ascii=False, allow_nan=False)
        self._handle.write(line + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_journal(staging: Path) -> Iterator[dict[str, Any]]:
    """The journal's events in order; a line cut short by a crash ends the reading."""
    path = Path(staging) / JOURNAL_NAME
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return


def finalise(staging: Path, target: Path, exit_status: int | None, *, died: str = "") -> Path:
    """Write the report of the journal in `staging` and publish it as `target`; returns index.html's path.

    `exit_status` is pytest's (None when the process died: then `died` says
    how, and the check that was running gets an ERROR result). A run that
    produced no result at all (Ctrl-C before the first one, -k matching no
    check) is published too, as an incomplete report of 0 checks: an earlier
    run's report must never stand for this one.
    """
    from auditkit.checks.base import CheckResult, Evidence, Status
    from auditkit.report import write_report
    from auditkit.runner import report_meta

    meta_event: dict[str, Any] = {}
    planned: list[dict[str, Any]] = []
    results: dict[str, CheckResult] = {}
    infos: dict[str, dict[str, Any]] = {}
    tests: list[CheckResult] = []
    deselected: set[str] = set()
    running: str | None = None
    for event in read_journal(staging):
        kind = event.get("event")
        if kind == "meta":
            meta_event, planned = event, list(event.get("planned", []))
        elif kind == "deselected":
            deselected.update(event.get("nodeids", []))
        elif kind == "begin":
            running = event["nodeid"]
        elif kind == "result":
            results[event["nodeid"]] = CheckResult.from_dict(event["result"])
            info = event.get("model_info") or {}
            if info.get("name"):
                infos[info["name"]] = info
            running = None
        elif kind == "lost":
            results[event["nodeid"]] = _error_for(planned, event["nodeid"], event.get("message", ""))
            running = None
        elif kind == "test":
            tests.append(CheckResult(
                check=event["nodeid"], kind="test", title=event["nodeid"], duration_s=event.get("duration", 0.0),
                status=Status.PASSED if event.get("outcome") == "passed" else Status.FAILED,
                message=(event.get("longrepr") or "")[-2000:],
                evidence=[Evidence.from_dict(e) for e in event.get("evidence", [])],
            ))
    order = {item["nodeid"]: i for i, item in enumerate(planned)}
    ran = sum(1 for nodeid in results if nodeid in order)  # finished: the one the process died in is not
    died_in = running if died and running is not None and running not in results else None
    if died_in is not None:
        results[died_in] = _error_for(planned, died_in, f"the pytest process died while this check ran: {died}")
    ordered = sorted(results.items(), key=lambda kv: order.get(kv[0], len(order)))
    checks = [r for _, r in ordered]
    run = run_state(len(planned), ran, len(deselected & set(order)), exit_status, died=died,
                    running=died_in if died else running)
    models = {m: infos.get(m, {"name": m}) for m in meta_event.get("models", [])} or infos
    meta = report_meta(models, meta_event.get("started", time.time()), meta_event.get("command", ""))
    if meta_event.get("config"):
        meta["config"] = meta_event["config"]
    if meta_event.get("config_not_read"):  # other files with a [tool.auditkit] table (see auditkit.config)
        meta["config_not_read"] = meta_event["config_not_read"]
    meta["strict"] = bool(meta_event.get("strict", False))
    meta["run"] = run
    html, _ = write_report(checks + tests, meta, staging)
    publish(staging, target)
    return Path(target) / html.name


def _error_for(planned: list[dict[str, Any]], nodeid: str, message: str):
    from auditkit.checks.base import CheckResult, Status

    item = next((p for p in planned if p["nodeid"] == nodeid), {"check": nodeid, "kind": "", "model": ""})
    return CheckResult(check=item["check"], kind=item["kind"], model=item["model"], status=Status.ERROR,
                       message=message, error=message)


def run_state(planned: int, ran: int, deselected: int, exit_status: int | None, *, died: str = "",
              running: str | None = None) -> dict[str, Any]:
    """How complete the run was: {"exit_status", "exit_name", "planned", "ran", "deselected", "complete",
    "reason"}, and "died_in" (the check that was running, or None) when the process died.

    `ran` counts the checks that finished with a result; `running` is the
    check that was running when the run was interrupted or died. complete <=>
    every planned check ran and the run was neither interrupted nor killed;
    `reason` says in words why not.
    """
    reasons = []
    if died:
        reasons.append(f"the pytest process ended before the audit finished ({died})"
                       + (f" while {running} ran" if running else ""))
    elif exit_status == 2:
        reasons.append("the run was interrupted" + (f" while {running} ran" if running else ""))
    elif exit_status not in (None, 0, 1, 5):
        reasons.append(f"pytest ended with {EXIT_NAMES.get(exit_status, exit_status)}")
    if deselected:
        reasons.append(f"{deselected} check(s) were deselected (-k / -m)")
    missing = planned - ran - deselected
    if missing > 0 and not died and exit_status != 2:
        reasons.append(f"{missing} check(s) did not run (stopped early, e.g. -x / --maxfail)")
    state = {
        "exit_status": exit_status, "exit_name": EXIT_NAMES.get(exit_status, "DIED" if died else str(exit_status)),
        "planned": planned, "ran": ran, "deselected": deselected,
        "complete": not reasons and ran >= planned, "reason": "; ".join(reasons),
    }
    if died:
        state["died_in"] = running  # the check that was running when the process died (None: between checks)
    return state
