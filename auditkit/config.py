"""The audit configuration: `[tool.auditkit]` in pyproject.toml, or a file named by --audit-config.

    [tool.auditkit]
    dataset = "shapes-val"          # audit set for every model (else the ModelSpec's)
    device = "auto"                 # auto | cpu | cuda | cuda:N
    report_dir = "audit-report"
    batch_size = 64
    memory = "2GB"                  # results kept for reuse (0: none; default 5 % of physical memory)
    strict = false                  # true: an INCONCLUSIVE check fails the run (as --audit-strict)
    [[tool.auditkit.checks]]
    kind = "occlusion-drop"         # any registered check kind
    name = "occlusion-blur"         # optional: the item id (defaults to kind)
    baseline = "blur"               # the check's parameters

A file given with --audit-config may hold the same keys at its top level or
under [tool.auditkit]. Without it, the configuration is the [tool.auditkit]
table of the nearest pyproject.toml that has one, searched upward from the
directory pytest was invoked in (never from pytest's rootdir, which moves
with the paths on the command line). This module imports no torch.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEYS = ("dataset", "device", "report_dir", "batch_size", "memory", "strict", "checks")
DEFAULT_REPORT_DIR = "audit-report"


#: Default budget: this fraction of the machine's physical memory (results are kept in host memory).
DEFAULT_MEMORY_FRACTION = 0.05
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def physical_memory() -> int:
    """Bytes of physical memory on this machine (0 where the platform does not tell)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def parse_memory(text: str | int | float | None, *, where: str = "--audit-memory") -> int:
    """Bytes from a budget text: "2GB", "512MiB", "1000000" (bytes), "0" (nothing kept), or a fraction
    of physical memory in (0, 1) such as "0.05". None gives the default (DEFAULT_MEMORY_FRACTION).
    ValueError naming `where` and what was expected otherwise."""
    if text is None:
        return int(DEFAULT_MEMORY_FRACTION * physical_memory())
    raw = str(text).strip().lower().replace(" ", "")
    number, unit = raw, ""
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if raw.endswith(suffix) and raw[: -len(suffix)]:
            number, unit = raw[: -len(suffix)], suffix
            break
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf") or isinstance(text, bool):
        raise ValueError(f"{where} must be a size such as 2GB or 512MB, 0, or a fraction of memory in (0, 1) "
                         f"such as 0.05, got {text!r}")
    if unit:
        return int(value * _UNITS[unit])
    if 0 < value < 1:
        return int(value * physical_memory())
    return int(value)


class AuditConfigError(ValueError):
    """The configuration file or table is malformed; the message names the file and the key."""


@dataclass
class AuditConfig:
    dataset: str | None = None
    device: str | None = None
    report_dir: str | None = None
    batch_size: int | None = None
    memory: int | None = None  # bytes for results kept for reuse (parse_memory); None: the default
    strict: bool = False
    checks: list[dict[str, Any]] = field(default_factory=list)
    source: str = "(defaults: no pyproject.toml with [tool.auditkit] found)"
    folder: Path | None = None  # the configuration file's folder: relative report_dir is taken from here

    def report_path(self, option: str | None, invocation_dir: str | Path) -> Path:
        """The report folder: --audit-report (relative to the invocation directory), else
        report_dir (relative to the configuration file), else audit-report beside the file
        (or in the invocation directory when there is no file)."""
        if option:
            return (Path(invocation_dir) / option).resolve()
        base = self.folder if self.folder is not None else Path(invocation_dir)
        return (base / (self.report_dir or DEFAULT_REPORT_DIR)).resolve()


def load_config(path: str | Path | None = None, invocation_dir: str | Path = ".") -> AuditConfig:
    """Read `path` (relative to invocation_dir), else the nearest pyproject.toml with a
    [tool.auditkit] table in invocation_dir or above it; neither gives the defaults."""
    start = Path(invocation_dir).resolve()
    if path is not None:
        file = start / path
        if not file.is_file():
            raise AuditConfigError(f"audit config {file}: file not found")
        data = _read_toml(file)
        table = data.get("tool", {}).get("auditkit", data)
    else:
        for folder in (start, *start.parents):
            file = folder / "pyproject.toml"
            if file.is_file():
                table = _read_toml(file).get("tool", {}).get("auditkit")
                if table is not None:
                    break
        else:
            return AuditConfig()
    config = parse_table(table, str(file))
    config.folder = file.parent
    return config


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise AuditConfigError(f"audit config {file}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise AuditConfigError(f"audit config {file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise AuditConfigError(f"audit config {file}: cannot be read: {exc}") from exc


def parse_table(table: dict[str, Any], source: str) -> AuditConfig:
    """Validate the [tool.auditkit] table: known keys, right types, checks as a list of tables with a kind."""
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise AuditConfigError(f"audit config {source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(KEYS)}")
    for key in ("dataset", "device", "report_dir"):
        if key in table and not isinstance(table[key], str):
            raise AuditConfigError(f"audit config {source}: {key} must be a string, got {table[key]!r}")
    batch = table.get("batch_size")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise AuditConfigError(f"audit config {source}: batch_size must be a positive integer, got {batch!r}")
    memory = table.get("memory")
    if memory is not None:
        try:
            memory = parse_memory(memory, where=f"audit config {source}: memory")
        except ValueError as exc:
            raise AuditConfigError(str(exc)) from exc
    strict = table.get("strict", False)
    if not isinstance(strict, bool):
        raise AuditConfigError(f"audit config {source}: strict must be true or false, got {strict!r}")
    checks = table.get("checks", [])
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        raise AuditConfigError(f"audit config {source}: checks must be an array of tables ([[tool.auditkit.checks]])")
    for i, check in enumerate(checks):
        if not isinstance(check.get("kind"), str):
            raise AuditConfigError(f"audit config {source}: checks[{i}] has no kind = \"...\"")
    return AuditConfig(
        dataset=table.get("dataset"), device=table.get("device"), report_dir=table.get("report_dir"),
        batch_size=batch, memory=memory, strict=strict, checks=[dict(c) for c in checks], source=source,
    )
