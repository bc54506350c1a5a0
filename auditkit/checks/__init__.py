"""Declarative checks; `build_checks` turns configuration tables into Check objects."""
from __future__ import annotations

from typing import Any, Iterable

from auditkit.checks.base import Check, CheckConfigError, CheckResult, Evidence, Status
from auditkit.registry import CHECKS, DEFAULT_SUITE, UnknownNameError

__all__ = ["Check", "CheckConfigError", "CheckResult", "Evidence", "Status", "build_checks", "check_class"]


def check_class(kind: str) -> type[Check]:
    """The Check subclass registered as `kind`; an unknown kind lists the valid ones."""
    try:
        cls = CHECKS.resolve(kind)
    except UnknownNameError as exc:
        raise CheckConfigError(f"unknown check kind {kind!r}; valid kinds: {', '.join(CHECKS.names())}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Check)):
        raise CheckConfigError(f"check kind {kind!r} resolves to {cls!r}, which is not an auditkit.Check subclass")
    if not cls.kind:
        cls.kind = kind
    return cls


def build_checks(tables: Iterable[dict[str, Any]] | None = None) -> list[Check]:
    """One Check per table {kind, [name], params...}; no tables gives the default suite.

    Check names must be unique: they are the pytest item ids.
    """
    tables = list(tables) if tables else [dict(t) for t in DEFAULT_SUITE]
    checks: list[Check] = []
    for table in tables:
        params = dict(table)
        kind = params.pop("kind")
        cls = check_class(kind)
        check = cls.from_params(params)
        checks.append(check)
    seen: set[str] = set()
    for check in checks:
        if check.name in seen:
            raise CheckConfigError(
                f"two checks are named {check.name!r}; give one of them name = \"...\" to tell them apart"
            )
        seen.add(check.name)
    return checks
