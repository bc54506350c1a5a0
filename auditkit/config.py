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
table of the first of these that has one (`lookup_places`):

1. the file pytest was given with -c / --config-file, then the nearest
   pyproject.toml with the table upward from that file's folder;
2. the nearest one upward from the folder given with --rootdir;
3. the nearest one upward from the common folder of the path arguments
   (`pytest proj/tests`), as pytest finds its own configuration file;
4. the nearest one upward from the directory pytest was invoked in.

Only what the user wrote counts: never the rootdir or configuration file
pytest settled on by itself, which move when an option's value looks like a
path (pytest takes `--audit-report /existing/folder` for a test path before
it knows the option). Where another of these places holds a different
[tool.auditkit] table, the AuditConfig says so (`not_read`), and the plugin
prints it. This module imports no torch.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

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
    #: how the file was found, in words ("" for --audit-config or the invocation directory, the usual ways)
    found_by: str = ""
    #: other files holding a [tool.auditkit] table that a place searched later would have given:
    #: (file, how it would have been found); the plugin names them in the run's header
    not_read: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> list[str]:
        """Lines for the run's header: the file read and how it was found, then the files with a
        [tool.auditkit] table that were not read."""
        lines = [f"configuration {self.source}" + (f" ({self.found_by})" if self.found_by else "")]
        lines += [f"not read: {file}, which also has [tool.auditkit] ({how}); --audit-config FILE chooses one"
                  for file, how in self.not_read]
        return lines

    def report_path(self, option: str | None, invocation_dir: str | Path) -> Path:
        """The report folder: --audit-report (relative to the invocation directory), else
        report_dir (relative to the configuration file), else audit-report beside the file
        (or in the invocation directory when there is no file)."""
        if option:
            return (Path(invocation_dir) / option).resolve()
        base = self.folder if self.folder is not None else Path(invocation_dir)
        return (base / (self.report_dir or DEFAULT_REPORT_DIR)).resolve()


def load_config(path: str | Path | None = None, invocation_dir: str | Path = ".", *,
                inifile: str | Path | None = None, rootdir: str | Path | None = None,
                args: Iterable[str] = ()) -> AuditConfig:
    """Read `path` (relative to invocation_dir) when given; else the [tool.auditkit] table that
    `lookup_places` lists from pytest's -c file (`inifile`), --rootdir (`rootdir`), the path
    arguments (`args`) and invocation_dir; none gives the defaults (still naming the places that
    were searched, when -c, --rootdir or path arguments were given)."""
    start = Path(invocation_dir).resolve()
    if path is not None:
        file = start / path
        if not file.is_file():
            raise AuditConfigError(f"audit config {file}: file not found")
        data = _read_toml(file)
        table = data.get("tool", {}).get("auditkit", data)
        if not isinstance(table, dict):
            raise AuditConfigError(f"audit config {file}: [tool.auditkit] must be a table")
        config = parse_table(table, str(file))
        config.folder = file.parent
        return config
    places = lookup_places(start, inifile=inifile, rootdir=rootdir, args=args)
    found: list[tuple[Path, dict[str, Any], str]] = []
    from_invocation_dir: Path | None = None
    for how, first, folder in places:
        hit = _search(first, folder, strict=not found)
        if first is not None:
            how = f"in {how}" if hit is not None and hit[0] == first else f"upward from the folder of {how}"
        if hit is not None and how == INVOCATION_DIR:
            from_invocation_dir = hit[0]
        if hit is not None and all(hit[0] != f for f, _, _ in found):
            found.append((*hit, how))
    if not found:
        config = AuditConfig()
        if len(places) > 1:
            config.found_by = "looked " + ", ".join(
                f"in and upward from the folder of {how}" if first is not None else how for how, first, _ in places)
        return config
    file, table, how = found[0]
    config = parse_table(table, str(file))
    config.folder = file.parent
    # the usual case (what the invocation directory gives, however else it was reached) goes unsaid
    config.found_by = "" if file == from_invocation_dir else f"found {how}"
    config.not_read = [(str(f), h) for f, _, h in found[1:]]
    return config


def holds_table(file: str | Path | None) -> bool:
    """Whether `file` is a TOML file with a [tool.auditkit] table (False for anything unreadable)."""
    if file is None or Path(file).suffix != ".toml" or not Path(file).is_file():
        return False
    try:
        return isinstance(_read_toml(Path(file)).get("tool", {}).get("auditkit"), dict)
    except AuditConfigError:
        return False


INVOCATION_DIR = "upward from the invocation directory"


def lookup_places(invocation_dir: Path, *, inifile: str | Path | None = None, rootdir: str | Path | None = None,
                  args: Iterable[str] = ()) -> list[tuple[str, Path | None, Path]]:
    """Where the configuration is looked for, first first: (how, a file to try first or None,
    the folder the upward search starts from)."""
    places: list[tuple[str, Path | None, Path]] = []
    if inifile:
        ini = invocation_dir / os.path.expandvars(str(inifile))
        if ini.is_file():
            places.append((f"pytest's -c {inifile}", ini.resolve(), ini.resolve().parent))
    if rootdir:
        root = invocation_dir / os.path.expandvars(str(rootdir))
        if root.is_dir():
            places.append((f"upward from --rootdir {rootdir}", None, root.resolve()))
    folders = _arg_folders(invocation_dir, args)
    if folders:
        common = Path(os.path.commonpath([str(f) for _, f in folders]))
        shown = " ".join(dict.fromkeys(arg for arg, _ in folders))
        places.append((f"upward from the path argument(s) {shown}", None, common))
    places.append((INVOCATION_DIR, None, invocation_dir))
    return places


def _arg_folders(invocation_dir: Path, args: Iterable[str]) -> list[tuple[str, Path]]:
    """(argument, its folder) of the path arguments that exist (a file gives its folder; a node id
    `path::name` its path's), as pytest reads them."""
    folders = []
    for arg in args:
        text = str(arg).split("::")[0]
        if not text or text.startswith("-"):
            continue
        path = invocation_dir / text
        try:
            if path.is_dir():
                folders.append((text, path.resolve()))
            elif path.exists():
                folders.append((text, path.resolve().parent))
        except OSError:  # a name too long for the file system, say: not a path
            continue
    return folders


def _search(first: Path | None, folder: Path, *, strict: bool) -> tuple[Path, dict[str, Any]] | None:
    """(file, table) of `first` when it holds a [tool.auditkit] table, else of the nearest
    pyproject.toml with one in `folder` or above. `strict`: a malformed file on the way is an
    AuditConfigError (else it is passed over: the search only looks for files to mention)."""
    candidates = ([first] if first is not None else []) + [f / "pyproject.toml" for f in (folder, *folder.parents)]
    for file in candidates:
        if not file.is_file():
            continue
        if file is first and file.suffix != ".toml":
            continue  # pytest.ini, tox.ini, setup.cfg: no TOML tables there
        try:
            table = _read_toml(file).get("tool", {}).get("auditkit")
        except AuditConfigError:
            if strict:
                raise
            continue
        if table is not None:
            if not isinstance(table, dict):
                raise AuditConfigError(f"audit config {file}: [tool.auditkit] must be a table")
            return file, table
    return None


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
