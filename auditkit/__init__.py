"""auditkit: audit what a PyTorch vision model looks at, as pytest tests with an HTML report.

The public API is what this module exports. Names that need torch are loaded
on first use, so `import auditkit` (and the pytest plugin) stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from auditkit.registry import register_check, register_dataset, register_model

__version__ = "0.1.0"

__all__ = [
    "register_model", "register_dataset", "register_check",
    "ModelSpec", "AuditSet", "Sample", "Box", "Check", "CheckResult", "Status", "Subject", "decide", "Decision",
    "ProgressEvent", "tqdm_progress",
]

_LAZY = {
    "ModelSpec": "auditkit.spec",
    "AuditSet": "auditkit.data",
    "Sample": "auditkit.data",
    "Box": "auditkit.data",
    "Check": "auditkit.checks.base",
    "CheckResult": "auditkit.checks.base",
    "Status": "auditkit.checks.base",
    "Subject": "auditkit.subject",
    "decide": "auditkit.checks.decision",
    "Decision": "auditkit.checks.decision",
    "ProgressEvent": "auditkit.progress",
    "tqdm_progress": "auditkit.progress",
}

if TYPE_CHECKING:  # pragma: no cover
    from auditkit.checks.base import Check, CheckResult, Status
    from auditkit.checks.decision import Decision, decide
    from auditkit.data import AuditSet, Box, Sample
    from auditkit.progress import ProgressEvent, tqdm_progress
    from auditkit.spec import ModelSpec
    from auditkit.subject import Subject


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'auditkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
