"""The audit report: a self-contained index.html and a machine-readable audit.json.

`write_report(results, meta, out_dir)` renders both from the check results
(whose evidence files are already saved under out_dir/evidence) and writes
each one atomically. The HTML has no external resources (inline CSS, no
scripts, no fonts or CDNs), so it opens offline; images are referenced by
their relative evidence paths. Every user-controlled string goes through
Jinja's autoescaping.
"""
from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

import jinja2

from auditkit.checks.base import CheckResult, Status, jsonable
from auditkit.reportdir import atomic_write

__all__ = ["SCHEMA", "write_report", "read_report_json", "sort_results", "count_statuses", "render_html"]

SCHEMA = "auditkit.audit/1"
HTML_NAME = "index.html"
JSON_NAME = "audit.json"
MAX_ROWS = 1000  # per-sample rows shown in the HTML per result (all of them are in audit.json)

# Failures first, then errors, then undecided, then passes, then evidence-only results; stable within a status.
_ORDER = {Status.FAILED: 0, Status.ERROR: 1, Status.INCONCLUSIVE: 2, Status.PASSED: 3, Status.INFO: 4}

# Meta keys shown in the header (in this order); other keys go to the environment list.
_HEADER_KEYS = ("models", "dataset", "layers", "device", "torch_version", "started", "duration_s")
_ENV_KEYS = ("auditkit_version", "python_version", "torch_version", "platform", "device", "command", "git_commit",
             "config", "config_not_read")
_ENV_LABELS = {
    "auditkit_version": "auditkit", "python_version": "Python", "torch_version": "PyTorch",
    "platform": "Platform", "device": "Device", "command": "Command", "git_commit": "Git commit",
    "config": "Configuration", "dataset": "Audit set", "started": "Started", "duration_s": "Duration", "models": "Models", "layers": "Layers",
    "config_not_read": "Configuration not read",
}


# -- ordering and counts ----------------------------------------------------------


def sort_results(results: Iterable[CheckResult]) -> list[CheckResult]:
    """Results ordered FAILED, ERROR, INCONCLUSIVE, PASSED, INFO, keeping the given order within each status."""
    return sorted(results, key=lambda r: _ORDER.get(Status(r.status), len(_ORDER)))


def count_statuses(results: Sequence[CheckResult]) -> dict[str, int]:
    """{"passed", "failed", "error", "inconclusive", "info", "total"} counts of the results."""
    counts = {s.value: 0 for s in Status}
    for r in results:
        counts[Status(r.status).value] += 1
    counts["total"] = len(results)
    return counts


# -- formatting (also used as Jinja filters) ---------------------------------------


def fmt_num(value: Any, digits: int = 4) -> str:
    """A number for display: floats to `digits` significant digits, ints as they are, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.{digits}g}"
    return str(value)


def fmt_cell(value: Any) -> str:
    """A table cell: numbers via fmt_num, lists/dicts as compact JSON (shortened), the rest as str."""
    if value is None or isinstance(value, (bool, int, float)):
        return fmt_num(value)
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(jsonable(value), ensure_ascii=False, separators=(", ", ": "))
    else:
        text = str(value)
    return text if len(text) <= 200 else text[:199] + "…"


def fmt_pair(value: float | None, threshold: float | None) -> tuple[str, str]:
    """Value and threshold with the same number of decimals: two significant digits of the
    smaller one at least (0.62 / 0.80, 0.031 / 0.050), more if they would otherwise look equal."""
    if value is None or threshold is None or not (math.isfinite(value) and math.isfinite(threshold)):
        return fmt_num(value), fmt_num(threshold)
    big = max(abs(value), abs(threshold))
    if big >= 1e5 or (0 < big < 1e-4):
        return f"{value:.4g}", f"{threshold:.4g}"
    nonzero = [abs(x) for x in (value, threshold) if x != 0]
    integral = float(value).is_integer() and float(threshold).is_integer()
    d = 0 if integral else max(1, 1 - math.floor(math.log10(min(nonzero)))) if nonzero else 0
    d = min(d, 6)
    while d < 8:
        a, b = f"{value:.{d}f}", f"{threshold:.{d}f}"
        if a != b or value == threshold:
            return a, b
        d += 1
    return f"{value:.8g}", f"{threshold:.8g}"


def direction_symbol(direction: str) -> str:
    return {">=": "≥", "<=": "≤"}.get(direction, direction)


def fmt_threshold(result: CheckResult) -> str:
    """The condition as text, e.g. "≥ 0.5"; an em dash when there is no threshold."""
    if result.threshold is None or Status(result.status) is Status.INFO:  # evidence only: nothing to meet
        return "—"
    return f"{direction_symbol(result.direction)} {fmt_num(result.threshold)}"


def fmt_duration(seconds: Any) -> str:
    """A duration such as "12 ms", "3.4 s" or "2 min 05 s"."""
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return str(seconds)
    if not math.isfinite(s):
        return "—"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def fmt_datetime(text: Any) -> str:
    """An ISO datetime shown as "YYYY-MM-DD HH:MM:SS (+zone)"; other text unchanged."""
    try:
        dt = datetime.fromisoformat(str(text))
    except ValueError:
        return str(text)
    out = dt.strftime("%Y-%m-%d %H:%M:%S")
    if dt.tzinfo is not None:
        out += " " + (dt.tzname() or dt.strftime("%z"))
    return out


def verdict(result: CheckResult) -> str:
    """The metric against its threshold as a sentence, e.g. "pass rate 0.62 < 0.80 required"."""
    metric = result.metric or "value"
    status = Status(result.status)
    if status is Status.ERROR and result.value is None:
        return ""
    if result.threshold is None:
        return f"{metric} {fmt_num(result.value)}"
    sym = direction_symbol(result.direction)
    if result.value is None or (isinstance(result.value, float) and math.isnan(result.value)):
        return f"{metric} has no value (needs {sym} {fmt_num(result.threshold)})"
    v, t = fmt_pair(float(result.value), float(result.threshold))
    lower_is_better = result.direction == "<="
    word = "allowed" if lower_is_better else "required"
    if status is Status.PASSED:
        op = sym
    else:
        op = ">" if lower_is_better else "<"
    return f"{metric} {v} {op} {t} {word}"


def decision_view(result: CheckResult) -> dict[str, Any] | None:
    """The decision of a judged check (checks.decision) as display strings: its verdict sentence, the facts
    (n judged, effect with its interval, p-value against alpha, model and control), the rule, the reason
    and the per-class breakdown; None for a result without a decision."""
    d = result.decision
    if not d:
        return None
    labels = d.get("labels") or {}
    kind = d.get("effect_kind", "difference")
    unit = "×" if kind == "ratio" else ""
    effect, minimum = fmt_pair(_num(d.get("effect")), _num(d.get("min_effect")))
    p, alpha = fmt_num(_num(d.get("p_value")), 2), fmt_num(_num(d.get("alpha")))
    ci = d.get("ci") or [None, None]
    status = Status(result.status)
    if status is Status.INCONCLUSIVE:
        sentence = "cannot decide: " + (d.get("reason") or "")
    else:
        ok_effect = _num(d.get("effect")) >= _num(d.get("min_effect"))
        ok_p = _num(d.get("p_value")) <= _num(d.get("alpha"))
        sentence = (f"effect {effect}{unit} {'≥' if ok_effect else '<'} {minimum}{unit} required, "
                    f"p = {p} {'≤' if ok_p else '>'} α = {alpha}")
    facts = [
        ("judged samples", f"{d.get('n')} (the test needs ≥ {d.get('needed')})"),
        ("effect", f"{effect}{unit}, interval {fmt_num(_num(ci[0]), 3)} to {fmt_num(_num(ci[1]), 3)}{unit} "
                   f"({fmt_num(100 * (1 - 2 * _num(d.get('alpha'))), 3)}%)"),
        ("p-value", f"{p} (α = {alpha}, one-sided)"),
        (labels.get("value", "model"), fmt_num(_num(d.get("value")))),
        (labels.get("control", "control"), fmt_num(_num(d.get("control")))),
    ]
    return {"sentence": sentence, "facts": facts, "rule": d.get("rule", ""), "by_class": d.get("by_class") or [],
            "value_label": labels.get("value", "model"), "control_label": labels.get("control", "control"),
            "unit": unit}


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def gauge(result: CheckResult) -> dict[str, Any] | None:
    """Positions (in %) for a 0..1 gauge of value against threshold, or None when either lies outside [0, 1]."""
    v, t = result.value, result.threshold
    if v is None or t is None:
        return None
    try:
        v, t = float(v), float(t)
    except (TypeError, ValueError):
        return None
    if not (0.0 <= v <= 1.0 and 0.0 <= t <= 1.0):
        return None
    ok_from, ok_to = (t, 1.0) if result.direction == ">=" else (0.0, t)
    return {
        "value": round(v * 100, 2),
        "threshold": round(t * 100, 2),
        "ok_left": round(ok_from * 100, 2),
        "ok_width": round((ok_to - ok_from) * 100, 2),
    }


def table_columns(result: CheckResult) -> list[str]:
    """result.columns if given, else the union of the rows' keys in order of first appearance."""
    if result.columns:
        return [str(c) for c in result.columns]
    seen: dict[str, None] = {}
    for row in result.rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def numeric_columns(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> set[str]:
    """Columns whose non-empty values are all numbers (bools excluded): right-aligned in the table."""
    out = set()
    for c in columns:
        vals = [row.get(c) for row in rows if row.get(c) is not None]
        if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out.add(c)
    return out


def evidence_href(path: str | None) -> str | None:
    """A relative URL for an evidence path, or None if it is missing or not a plain relative path."""
    if not path:
        return None
    p = str(path).replace("\\", "/")
    if p.startswith("/") or ":" in p.split("/")[0] or ".." in p.split("/"):
        return None
    return quote(p, safe="/")


def _result_view(index: int, r: CheckResult) -> dict[str, Any]:
    """Everything the template needs for one result, precomputed."""
    # Keys as strings so that columns (always str) find them.
    rows = [{str(k): v for k, v in row.items()} for row in r.rows[:MAX_ROWS]]
    failed_rows = sum(1 for row in r.rows if row.get("passed") is False)
    columns = table_columns(r)
    return {
        "r": r,
        "anchor": f"check-{index + 1}",
        "status": Status(r.status).value,
        "title": r.title or r.check,
        "cid": f"{r.model} :: {r.check}" if r.model else r.check,
        "verdict": "" if r.decision else verdict(r),
        "decision": decision_view(r),
        "gauge": None if r.decision else gauge(r),
        "threshold": fmt_threshold(r),
        "columns": columns,
        "numeric": numeric_columns(columns, rows),
        "rows": rows,
        "n_rows": len(r.rows),
        "failed_rows": failed_rows,
        "evidence": [{"e": e, "href": evidence_href(e.path), "svg": e.media_type == "image/svg+xml"} for e in r.evidence],
    }


# -- rendering --------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("auditkit", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=fmt_num, cell=fmt_cell, duration=fmt_duration, datetime=fmt_datetime)
    return env


def overall_status(counts: dict[str, int], run: dict[str, Any] | None = None, strict: bool = False) -> str:
    """The run's verdict: "incomplete" when not every planned check ran (run["complete"] false),
    else "failed" if any check failed (or, when strict, could not decide), "error" if any could not
    run, "passed", or "empty". Without strict an INCONCLUSIVE check passes (with a warning)."""
    if run is not None and not run.get("complete", True):
        return "incomplete"
    if counts["failed"] or (strict and counts.get("inconclusive", 0)):
        return "failed"
    if counts["error"]:
        return "error"
    return "passed" if counts["total"] else "empty"


def _meta_with_counts(meta: dict[str, Any], results: Sequence[CheckResult]) -> dict[str, Any]:
    out = dict(jsonable(dict(meta or {})))
    out["counts"] = count_statuses(results)
    out["overall"] = overall_status(out["counts"], out.get("run"), bool(out.get("strict")))
    return out


def render_html(results: Sequence[CheckResult], meta: dict[str, Any]) -> str:
    """The report page as a string (results are sorted here: failures, errors, passes)."""
    ordered = sort_results(results)
    full_meta = _meta_with_counts(meta, ordered)
    models = full_meta.get("models") or []
    if isinstance(models, dict):
        models = [models]
    models = [
        {"name": str(m.get("name") or ""), "version": str(m.get("version") or "")}
        if isinstance(m, dict) else {"name": str(m), "version": ""}
        for m in (models if isinstance(models, list) else [models])
    ]
    header_keys = set(_HEADER_KEYS) | set(_ENV_KEYS) | {"counts", "overall", "run"}
    env_keys = [k for k in _ENV_KEYS if full_meta.get(k) not in (None, "")]
    env_keys += [k for k, v in full_meta.items() if k not in header_keys and v not in (None, "")]
    env_items = [(_ENV_LABELS.get(k, k.replace("_", " ")), full_meta[k]) for k in env_keys]
    counts = full_meta["counts"]
    template = _environment().get_template("report.html")
    return template.render(
        meta=full_meta,
        models=models,
        counts=counts,
        overall=full_meta["overall"],
        run=full_meta.get("run") or {},
        env_items=env_items,
        results=[_result_view(i, r) for i, r in enumerate(ordered)],
    )


def render_json(results: Sequence[CheckResult], meta: dict[str, Any]) -> str:
    """audit.json content: {"schema", "meta" (with counts), "results"} with results sorted like the HTML."""
    ordered = sort_results(results)
    doc = {"schema": SCHEMA, "meta": _meta_with_counts(meta, ordered), "results": [r.to_dict() for r in ordered]}
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_report(results: list[CheckResult], meta: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write out_dir/index.html and out_dir/audit.json; returns (html_path, json_path).

    Both documents are rendered in memory first, so a rendering error leaves
    any existing files untouched; each file is then replaced atomically.
    Evidence files must already be saved under out_dir (Evidence.path is
    relative to out_dir). `meta` is not modified; counts are computed from
    the results and added to the written meta as meta["counts"].
    """
    out = Path(out_dir)
    json_text = render_json(results, meta)
    html_text = render_html(results, meta)
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / HTML_NAME, out / JSON_NAME
    atomic_write(json_path, json_text.encode("utf-8"))
    atomic_write(html_path, html_text.encode("utf-8"))
    return html_path, json_path


def read_report_json(path: str | Path) -> tuple[dict[str, Any], list[CheckResult]]:
    """(meta, results) from an audit.json written by write_report (or its folder).

    Raises ValueError when the file is not an auditkit audit of schema version 1.
    """
    p = Path(path)
    if p.is_dir():
        p = p / JSON_NAME
    doc = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{p}: not an auditkit audit (schema {found!r}, expected {SCHEMA!r})")
    return dict(doc.get("meta") or {}), [CheckResult.from_dict(d) for d in doc.get("results", [])]
