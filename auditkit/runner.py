"""One audit session: resolves models and audit sets by name, builds each once, runs checks.

Used by the pytest plugin (one AuditSession per process) and usable on its
own: `AuditSession(["demo"]).run_all()` runs the configured suite.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auditkit.checks import build_checks
from auditkit.checks.base import Check, CheckResult, jsonable
from auditkit.config import DEFAULT_REPORT_DIR, AuditConfig
from auditkit.registry import DATASETS, MODELS


@dataclass
class AuditSession:
    """Everything one process needs to run audits; Subjects are opened lazily and closed by close()."""

    models: list[str]
    config: AuditConfig = field(default_factory=AuditConfig)
    dataset: str | None = None
    device: str | None = None
    report_dir: Path = Path(DEFAULT_REPORT_DIR)
    batch_size: int | None = None
    memory: int | None = None  # bytes kept for reuse per Subject (--audit-memory); None: config, else default
    checks: list[Check] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    _subjects: dict[str, Any] = field(default_factory=dict)
    _sets: dict[str, Any] = field(default_factory=dict)
    _failures: dict[str, BaseException] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.checks:
            self.checks = build_checks(self.config.checks)
        self.report_dir = Path(self.report_dir)

    # -- building ----------------------------------------------------------
    def subject(self, model: str):
        """The open Subject of `model`, built on first use; a failure is remembered and re-raised."""
        if model in self._failures:
            raise self._failures[model]
        if model not in self._subjects:
            try:
                self._subjects[model] = self._build_subject(model)
            except BaseException as exc:
                self._failures[model] = exc
                raise
        return self._subjects[model]

    def _build_subject(self, model: str):
        from auditkit.spec import ModelSpec
        from auditkit.subject import Subject, device_for_worker

        factory = MODELS.resolve(model)
        spec = factory() if callable(factory) and not isinstance(factory, ModelSpec) else factory
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"model {model!r}: its factory returned {type(spec).__name__}, expected an auditkit.ModelSpec")
        if not spec.name:
            spec.name = model
        # CLI over file over default; under pytest-xdist each worker takes its own entry or GPU
        device = device_for_worker(self.device or self.config.device or "auto", os.environ.get("PYTEST_XDIST_WORKER"))
        batch = self.batch_size or self.config.batch_size or 64
        memory = self.memory if self.memory is not None else self.config.memory
        return Subject(spec, device=device, batch_size=batch, memory=memory).open()

    def dataset_name(self, model: str) -> str:
        name = self.dataset or self.config.dataset or self.subject(model).spec.dataset
        if not name:
            raise LookupError(
                f"model {model!r} names no audit set: pass --audit-dataset NAME, set dataset in "
                f"[tool.auditkit], or give its ModelSpec a dataset"
            )
        return name

    def audit_set(self, model: str):
        """The audit set for `model`, resized to its input size with labels matched to its classes."""
        if model not in self._sets:
            from auditkit.data import AuditSet

            subject = self.subject(model)
            name = self.dataset_name(model)
            factory = DATASETS.resolve(name)
            data = factory() if callable(factory) and not isinstance(factory, AuditSet) else factory
            if not isinstance(data, AuditSet):
                raise TypeError(f"audit set {name!r}: its factory returned {type(data).__name__}, expected an auditkit.AuditSet")
            if data.name in ("", "audit-set"):
                data.name = name
            self._sets[model] = data.for_model(subject.spec.class_names, subject.spec.input_size)
        return self._sets[model]

    # -- running -----------------------------------------------------------
    def run(self, model: str, check: Check, progress=None) -> CheckResult:
        """Run one check on one model; building failures become an ERROR result, evidence is saved.
        `progress`: a progress sink (auditkit.progress) for this check, or None."""
        start = time.perf_counter()
        try:
            subject = self.subject(model)
            data = self.audit_set(model)
        except Exception as exc:  # noqa: BLE001 - reported as the check's ERROR
            import traceback

            result = check.error_result(f"{type(exc).__name__}: {exc}", traceback.format_exc())
            result.model = model
            result.params = check.params()
            result.title = check.title
            result.duration_s = time.perf_counter() - start
            return result
        subject.progress = progress
        try:
            with no_process_exit(check.name):
                result = check.execute(subject, data)
        finally:
            subject.progress = None
        result.model = model
        result.save_evidence(self.report_dir)
        return result

    def run_all(self) -> list[CheckResult]:
        return [self.run(model, check) for model in self.models for check in self.checks]

    def model_info(self, model: str) -> dict[str, Any]:
        """Name, version, device, audit set and versions, for the report header."""
        info: dict[str, Any] = {"name": model}
        subject = self._subjects.get(model)
        if subject is not None:
            import torch

            info.update(subject.describe())
            info["spec_name"], info["name"] = info["name"], model
            info["torch_version"] = str(torch.__version__)
        if model in self._sets:
            info["dataset"] = self._sets[model].name
            info["samples"] = len(self._sets[model])
        return jsonable(info)

    def close(self) -> None:
        """Give every model back to its owner, as it was."""
        for subject in self._subjects.values():
            subject.close()
        self._subjects.clear()


class ProcessExitError(RuntimeError):
    """A check called os._exit(): it would end the run with that status (0: a green exit) and no report."""


@contextlib.contextmanager
def no_process_exit(check: str):
    """While a check runs, os._exit() called from this thread raises ProcessExitError instead, so
    the check is an ERROR and the run goes on (os._exit(0) would end pytest with status 0, which no
    report or watchdog can change for the shell that waits for it). Other threads, and children
    forked by the check (multiprocessing, DataLoader workers), still exit as they ask."""
    real = os._exit
    pid, thread = os.getpid(), threading.get_ident()

    def guarded(status: int) -> None:
        if os.getpid() != pid or threading.get_ident() != thread:
            real(status)
        raise ProcessExitError(f"check {check!r} called os._exit({status}), which would end the pytest "
                               f"process with status {status} before any report; a check must return a result")

    os._exit = guarded
    try:
        yield
    finally:
        os._exit = real


def _layers_line(info: dict[str, Any]) -> str:
    """One model's layers for the header: "name: a, b, c", how token or channels-last layers are read."""
    if info.get("torchscript"):
        return f"{info.get('name', '')}: none (TorchScript takes no hooks)"
    read = info.get("layers_read_as") or {}
    shown = [f"{layer} ({read[layer]})" if layer in read else layer for layer in info["layers"]]
    return f"{info.get('name', '')}: " + ", ".join(shown)


def report_meta(model_infos: dict[str, dict[str, Any]], started: float, command: str = "") -> dict[str, Any]:
    """The report header: models, audit sets, device, versions, date, duration."""
    from auditkit import __version__

    infos = list(model_infos.values())
    return {
        "models": [{"name": i.get("name", ""), "version": i.get("version", "")} for i in infos],
        "dataset": ", ".join(sorted({i["dataset"] for i in infos if i.get("dataset")})),
        "layers": "; ".join(_layers_line(i) for i in infos if i.get("layers") or i.get("torchscript")),
        "device": ", ".join(sorted({i["device"] for i in infos if i.get("device")})),
        "torch_version": next((i["torch_version"] for i in infos if i.get("torch_version")), ""),
        "auditkit_version": __version__,
        "python_version": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "started": datetime.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 2),
        "command": command or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
