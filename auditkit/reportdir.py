"""The report folder as a whole: built in a private staging folder, moved into place at the end.

A run never writes into the published folder. It writes evidence, index.html
and audit.json into a staging folder beside the target
(`.audit-report.tmp-<pid>-<random>`), then `publish()` swaps the two by
renames, so the published folder always holds one run's files and no other's.
A journal in the staging folder records each result as it arrives; if the
process dies before publishing, the watchdog (auditkit.watchdog) writes an
"incomplete" report from it. This module imports no torch.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

EVIDENCE_DIR = "evidence"
JOURNAL_NAME = ".journal.jsonl"  # written by auditkit.journal; never published
#: What a published report folder may hold; anything else there is the user's and is never deleted.
REPORT_ENTRIES = frozenset({"index.html", "audit.json", EVIDENCE_DIR, "summary.md"})
_STAGING_RE = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
#: Longest readable part of an evidence file name; the hash keeps the whole name unique.
_SLUG_CHARS = 40


class ReportFolderError(ValueError):
    """The report folder cannot be used (a file, foreign contents, not writable); the message names it."""


# -- file writing --------------------------------------------------------------------


def atomic_write(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `target` through a temporary file in the same folder and os.replace.

    The file is readable by all (`mode`, 0644: reports are shared); on any
    failure the temporary file is removed and the exception propagates.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:40]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def slug(text: str, limit: int = _SLUG_CHARS) -> str:
    """Letters, digits, '.', '_' and '-' of `text`, at most `limit` characters (may be empty)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit].strip("._")


def evidence_stem(*names: str, index: int) -> str:
    """A file stem unique to the raw `names` and `index`, short enough for any file system.

        slug(name_1)__...__slug(name_k)__NN-<sha1(names)[:10]>

    Names that differ only in characters the slug drops ("demo model" and
    "demo_model", or two non-Latin names) get different hashes; each slug is
    at most 40 characters, so the stem stays far below 255 bytes.
    """
    digest = hashlib.sha1("\x00".join(names).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    parts = [slug(n) or "x" for n in names]
    return "__".join(parts) + f"__{index:02d}-{digest}"


# -- the folder ------------------------------------------------------------------------


def check_target(target: Path) -> None:
    """ReportFolderError unless `target` is absent, empty, or holds only an earlier auditkit report."""
    if target.exists() and not target.is_dir():
        raise ReportFolderError(f"report folder {target} is a file: expected a folder (or nothing) there")
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in REPORT_ENTRIES and not p.name.startswith("."))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ReportFolderError(
                f"report folder {target} holds files auditkit did not write ({shown}); each run replaces "
                f"the whole folder, so choose an empty or new folder with --audit-report"
            )


def make_staging(target: Path) -> Path:
    """A fresh private folder beside `target` (same file system, so publish() can rename it)."""
    check_target(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(target)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    except OSError as exc:
        raise ReportFolderError(f"report folder {target}: cannot create a folder in {parent}: {exc}") from exc
    os.chmod(staging, 0o755)
    (staging / EVIDENCE_DIR).mkdir(mode=0o755)
    return staging


def remove_abandoned(target: Path) -> None:
    """Delete staging folders of `target` left by processes that no longer exist."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*-*"):
        match = _STAGING_RE.match(path.name)
        if match and match["name"] == target.name and path.is_dir() and not _alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(staging: Path, target: Path, attempts: int = 20) -> None:
    """Replace `target` by `staging` as a whole: rename the old folder aside, rename staging in, delete the old.

    The journal is removed first. Dot-files the user keeps in the target
    (such as .gitignore) are carried over. Two runs publishing into one
    target at once each publish a whole folder; the later one wins.
    """
    (staging / JOURNAL_NAME).unlink(missing_ok=True)
    for _ in range(attempts):
        old = None
        if target.is_dir():
            check_target(target)
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-{os.getpid()}-"))
            for kept in target.iterdir():
                if kept.name.startswith(".") and kept.is_file() and not (staging / kept.name).exists():
                    shutil.copy2(kept, staging / kept.name)
            try:
                os.replace(target, old / "report")
            except FileNotFoundError:  # another run moved it first
                pass
        try:
            os.rename(staging, target)
        except OSError:  # another run published in between: try again over its folder
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            time.sleep(0.01)
            continue
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise ReportFolderError(f"report folder {target}: could not move the new report into place")


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
