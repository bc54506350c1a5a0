"""The checks framework: a Check is a dataclass of thresholds; run() returns a CheckResult.

A result is separate from its condition (as deepchecks does it): the check
measures `value` for `metric`, and the status is value `direction` threshold.
A check that cannot run reports ERROR, never PASSED.
"""
from __future__ import annotations

import dataclasses
import enum
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from auditkit.errors import NotApplicable
from auditkit.progress import Tracker
from auditkit.reportdir import EVIDENCE_DIR, atomic_write, evidence_stem

if typing.TYPE_CHECKING:  # pragma: no cover
    from auditkit.data import AuditSet
    from auditkit.subject import Subject


class Status(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    INCONCLUSIVE = "inconclusive"  # the audit set cannot support a decision; passes with a warning unless strict
    INFO = "info"  # evidence only: measured and shown, judged against no threshold; never fails a run


class CheckConfigError(ValueError):
    """A check was declared with an unknown kind, an unknown parameter or a bad value."""


@dataclass
class Evidence:
    """One picture for the report: PNG bytes or SVG text, saved under the report folder.

    `path` is relative to the report folder once `save()` ran (None with
    `missing` set when it could not be written); `data` is dropped from the
    JSON form.
    """

    title: str
    media_type: str  # "image/png" or "image/svg+xml"
    data: bytes | None = None
    caption: str = ""
    path: str | None = None

    missing: str = ""  # why the file could not be written, when it could not

    @property
    def suffix(self) -> str:
        return ".svg" if self.media_type == "image/svg+xml" else ".png"

    def save(self, report_dir: Path, stem: str) -> bool:
        """Write report_dir/evidence/<stem><suffix> atomically (0644) and record its relative path.

        A failure to write (a bad folder, a name the file system refuses, a
        full disk, a NUL byte in the path, no memory for the copy) is not
        raised: `path` stays None, `missing` says why, and no temporary file
        is left. Returns whether the file was written.
        """
        if self.data is None:
            return self.path is not None
        target = Path(report_dir) / EVIDENCE_DIR / f"{stem}{self.suffix}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, self.data)
        except (OSError, ValueError, MemoryError) as exc:  # ValueError: a NUL in the path; MemoryError: no room
            reason = (exc.strerror if isinstance(exc, OSError) else "") or str(exc) or type(exc).__name__
            self.path, self.missing = None, f"could not be saved to {target}: {reason}"
            return False
        self.path, self.missing = f"{EVIDENCE_DIR}/{target.name}", ""
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "media_type": self.media_type, "caption": self.caption, "path": self.path,
                "missing": self.missing}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Evidence":
        return cls(title=d["title"], media_type=d["media_type"], caption=d.get("caption", ""), path=d.get("path"),
                   missing=d.get("missing", ""))


@dataclass
class CheckResult:
    """What a check measured and whether that meets its condition.

    status is PASSED when `value direction threshold` holds (direction is
    ">=" or "<="), FAILED when it does not, ERROR when the check could not run.
    rows holds one dict per sample (or per layer); columns orders them.
    """

    check: str
    kind: str
    status: Status
    metric: str = ""
    value: float | None = None
    threshold: float | None = None
    direction: str = ">="
    message: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    error: str | None = None
    decision: dict[str, Any] | None = None  # checks.decision.Decision.to_dict() of a judged check
    model: str = ""
    dataset: str = ""
    title: str = ""
    description: str = ""

    @property
    def passed(self) -> bool:
        return self.status is Status.PASSED

    def save_evidence(self, report_dir: Path) -> None:
        """Write each evidence file under report_dir/evidence/, named uniquely from model, check and index
        (reportdir.evidence_stem); a file that cannot be written is marked missing, the result is kept."""
        for i, item in enumerate(self.evidence):
            item.save(report_dir, evidence_stem(self.model, self.check, index=i))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["status"] = self.status.value
        d["evidence"] = [e.to_dict() for e in self.evidence]
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckResult":
        kwargs = dict(d)
        kwargs["status"] = Status(d["status"])
        kwargs["evidence"] = [Evidence.from_dict(e) for e in d.get("evidence", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def summary(self) -> str:
        """One line: status, metric, value against threshold, message."""
        if self.status is Status.ERROR:
            return f"{self.check}: ERROR: {self.message}"
        line = f"{self.check}: {self.status.value.upper()}"
        if self.decision and self.status is Status.INCONCLUSIVE:
            return f"{line}: n = {self.decision.get('n')} judged; {self.message}"
        if self.decision:
            d = self.decision
            unit = "x" if d.get("effect_kind") == "ratio" else ""
            line += (f": {self.metric} = {_g(d.get('effect'))}{unit} (needs >= {_g(d.get('min_effect'))}{unit}), "
                     f"p = {_g(d.get('p_value'), 2)} (alpha {_g(d.get('alpha'))}), n = {d.get('n')}; "
                     f"{d.get('labels', {}).get('value', 'model')} {_g(d.get('value'))} vs "
                     f"{d.get('labels', {}).get('control', 'control')} {_g(d.get('control'))}")
            return line + (f"; {self.message}" if self.message else "")
        if self.value is not None:
            line += f": {self.metric} = {self.value:.4g}"
            if self.threshold is not None:
                line += f" (needs {self.direction} {self.threshold:.4g})"
        if self.message:
            line += f"; {self.message}"
        return line


def _g(value: Any, digits: int = 3) -> str:
    """A number to `digits` significant digits; None (NaN in JSON) as NaN."""
    return "NaN" if value is None else f"{float(value):.{digits}g}"


def jsonable(obj: Any) -> Any:
    """Plain JSON types only (numbers from numpy / torch turned into floats; NaN kept as None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return None if obj != obj or obj in (float("inf"), float("-inf")) else obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return jsonable(obj.item())
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    return str(obj)


def judge(value: float, threshold: float, direction: str) -> Status:
    """PASSED when value >= threshold (direction ">=") or value <= threshold ("<="); NaN fails."""
    if direction not in (">=", "<="):
        raise ValueError(f"direction must be '>=' or '<=', got {direction!r}")
    if value != value:
        return Status.FAILED
    ok = value >= threshold if direction == ">=" else value <= threshold
    return Status.PASSED if ok else Status.FAILED


@dataclass
class Check:
    """Base of all checks. Subclasses are dataclasses whose fields are the parameters.

    Class attributes: `kind` (the name used in configuration), `title` and
    `description` (the formula, shown in the report). `run()` measures and
    returns a CheckResult; `execute()` wraps it with timing and turns any
    exception into an ERROR result.
    """

    kind: ClassVar[str] = ""
    title: ClassVar[str] = ""
    description: ClassVar[str] = ""

    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.kind
        self.validate()

    def validate(self) -> None:
        """Raise CheckConfigError for parameter values out of range; subclasses extend."""

    # -- configuration -------------------------------------------------
    @classmethod
    def parameter_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Check":
        """Build from a config table; unknown parameters and wrong types are CheckConfigError."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise CheckConfigError(
                f"check {cls.kind!r}: unknown parameter(s) {', '.join(unknown)}; "
                f"valid parameters: {', '.join(fields)}"
            )
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(cls.kind, k, v, hints.get(k)) for k, v in params.items()}
        return cls(**values)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # -- running ---------------------------------------------------------
    def run(self, subject: "Subject", audit_set: "AuditSet") -> CheckResult:
        raise NotImplementedError

    def execute(self, subject: "Subject", audit_set: "AuditSet") -> CheckResult:
        """run() with timing; an exception becomes an ERROR result carrying the traceback.

        When the Subject has a progress sink (subject.progress), the check's progress is tracked
        (auditkit.progress.Tracker) and shown through it.

        Afterwards, even when run() raised, the Subject is put back in its audit
        state (Subject.restore): a check that trained the model or left a hook
        cannot change what the next check sees; what had to be put back is
        listed in details["restored"].
        """
        start = time.perf_counter()
        restored: list[str] = []
        sink = getattr(subject, "progress", None)
        tracker = Tracker(self.name, sink) if sink is not None else None
        if tracker is not None:
            subject.tracker = tracker
        try:
            result = self.run(subject, audit_set)
        except NotApplicable as exc:  # e.g. hooks on a TorchScript model: said, not an error, never a verdict
            result = CheckResult(check=self.name, kind=self.kind, status=Status.INFO,
                                 message=f"does not apply: {exc}", details={"not_applicable": str(exc)})
        except Exception as exc:  # noqa: BLE001 - a crashed check is reported, not raised
            result = self.error_result(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        finally:
            if tracker is not None:
                subject.tracker = None
                tracker.finish()
            restore = getattr(subject, "restore", None)
            if callable(restore) and getattr(subject, "is_open", False):
                restored = restore()
        if restored:
            result.details["restored"] = restored
            result.message = (result.message + "; " if result.message else "") + (
                "auditkit put the model back after this check: " + ", ".join(restored))
        result.duration_s = time.perf_counter() - start
        result.params = jsonable(self.params())
        result.title = result.title or self.title
        result.description = result.description or self.description
        result.model = result.model or subject_name(subject)
        result.dataset = result.dataset or getattr(audit_set, "name", "")
        return result

    def result(self, *, metric: str, value: float, threshold: float, direction: str = ">=", **kwargs: Any) -> CheckResult:
        """A CheckResult judged by value `direction` threshold."""
        return CheckResult(
            check=self.name, kind=self.kind, status=judge(float(value), float(threshold), direction),
            metric=metric, value=float(value), threshold=float(threshold), direction=direction, **kwargs,
        )

    def decided(self, decision: Any, *, metric: str, message: str = "", **kwargs: Any) -> CheckResult:
        """A CheckResult whose status is the Decision's (checks.decision): value = the effect, threshold =
        its minimum, and the decision (n, CI, p-value, control, per class) recorded for the report."""
        reason = decision.reason if decision.status is not Status.PASSED else ""
        return CheckResult(
            check=self.name, kind=self.kind, status=decision.status, metric=metric, value=float(decision.effect),
            threshold=float(decision.min_effect), direction=">=", decision=jsonable(decision.to_dict()),
            message="; ".join(part for part in (reason, message) if part), **kwargs,
        )

    def info_result(self, *, message: str = "", metric: str = "", value: float | None = None, **kwargs: Any) -> CheckResult:
        """An evidence-only result (Status.INFO): what was measured and shown, with no threshold to judge."""
        return CheckResult(check=self.name, kind=self.kind, status=Status.INFO, metric=metric,
                           value=None if value is None else float(value), threshold=None, message=message, **kwargs)

    def error_result(self, message: str, error: str | None = None) -> CheckResult:
        return CheckResult(check=self.name, kind=self.kind, status=Status.ERROR, message=message, error=error or message)

    def one_class_error(self, subject, judged: str) -> CheckResult | None:
        """ERROR (the check cannot run, never PASS or FAILED) when the model has fewer than 2 classes: a
        softmax over one logit is 1 for every image, so `judged` (what the check measures) says nothing."""
        count = subject.spec.num_classes
        if count >= 2:
            return None
        return self.error_result(f"{self.kind} needs a model of at least 2 classes, model {subject.name!r} has "
                                 f"{count}: a softmax over one logit is 1 for every image, so {judged} says nothing")


def require_unit(check: Check, *names: str) -> None:
    """CheckConfigError unless each named parameter lies in [0, 1]."""
    for field_name in names:
        value = getattr(check, field_name)
        if not 0.0 <= value <= 1.0:
            raise CheckConfigError(f"check {check.name!r}: {field_name} must be in [0, 1], got {value}")


def require_alpha(check: Check) -> None:
    """CheckConfigError unless check.alpha is a significance level in (0, 0.5)."""
    if not 0.0 < check.alpha < 0.5:
        raise CheckConfigError(f"check {check.name!r}: alpha must be a significance level in (0, 0.5), got "
                               f"{check.alpha}")


def require_at_least(check: Check, **minimums: float) -> None:
    """CheckConfigError unless each named parameter is >= its minimum."""
    for field_name, minimum in minimums.items():
        value = getattr(check, field_name)
        if not value >= minimum:
            raise CheckConfigError(f"check {check.name!r}: {field_name} must be >= {minimum:g}, got {value}")


def spread_indices(total: int, samples: int) -> list[int]:
    """All of range(total) when samples <= 0 or >= total, else `samples` indices spread evenly over it
    (keeps the class mix of a set sorted by class)."""
    if samples <= 0 or samples >= total:
        return list(range(total))
    step = (total - 1) / max(1, samples - 1)
    return sorted({int(round(i * step)) for i in range(samples)})


def listed(ids: Sequence[str], limit: int = 5) -> str:
    """Up to `limit` sample ids, comma-separated, then how many more."""
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def subject_name(subject: Any) -> str:
    spec = getattr(subject, "spec", None)
    return getattr(spec, "name", "") or ""


def _coerce(kind: str, key: str, value: Any, hint: Any) -> Any:
    """Check a config value against the field's annotation; ints are accepted for floats."""
    if hint is None:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "types.UnionType":
        for option in args:
            if option is type(None) and value is None:
                return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(kind, key, value, option)
            except CheckConfigError:
                continue
        raise CheckConfigError(f"check {kind!r}: parameter {key!r} = {value!r} should be {hint}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise CheckConfigError(f"check {kind!r}: parameter {key!r} = {value!r} should be {hint.__name__}")
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        inner = args[0] if args else None
        items = [_coerce(kind, key, v, inner) for v in value] if inner not in (None, Ellipsis) else list(value)
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        if value in args:
            return value
        raise CheckConfigError(
            f"check {kind!r}: parameter {key!r} = {value!r}; expected one of {', '.join(map(repr, args))}"
        )
    if hint is float or hint in (int, str, bool) or origin in (tuple, list):
        raise CheckConfigError(f"check {kind!r}: parameter {key!r} = {value!r} should be {hint}")
    return value
