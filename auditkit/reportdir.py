"""The report folder as a whole: built in a private staging folder, moved into place at the end.

A run never writes into the published folder. It writes evidence, index.html
and audit.json into a staging folder beside the target
(`.audit-report.tmp-<pid>-<random>`), then `publish()` swaps the two by
renames, so the published folder always holds one run's files and no other's.
A journal in the staging folder records each result as it arrives; if the
process dies before publishing, the watchdog (auditkit.watchdog) writes an
"incomplete" report from it, and if it dies while publishing, the watchdog
moves the finished report in. Whatever a dead process and a dead watchdog
leave behind, the next run puts right before it starts (recover_abandoned).
Folders are 0755 and files 0644 whatever the umask. This module imports no
torch.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
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
    """A fresh private folder beside `target` (same file system, so publish() can rename it).

    First the leftovers of runs whose process is gone are dealt with (recover_abandoned)."""
    check_target(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        recover_abandoned(target)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
        (staging / EVIDENCE_DIR).mkdir()
        _readable_folders(staging)
    except OSError as exc:
        raise ReportFolderError(f"report folder {target}: cannot create a folder in {parent}: {exc}") from exc
    return staging


def _readable_folders(folder: Path) -> None:
    """The report folder and its evidence/ readable by all (0755), whatever the umask."""
    for path in (folder, folder / EVIDENCE_DIR):
        if path.is_dir():
            os.chmod(path, 0o755)


def is_ready(staging: Path) -> bool:
    """Whether `staging` holds a finished report waiting to be moved in: index.html and audit.json
    written and the journal removed (publish() removes it only once both are complete)."""
    return (not (staging / JOURNAL_NAME).exists() and (staging / "index.html").is_file()
            and (staging / "audit.json").is_file())


def leftovers(target: Path, pid: int | None = None) -> list[tuple[str, int, Path]]:
    """("tmp" | "old", pid, path) of `target`'s staging and set-aside folders (of `pid` only, if given)."""
    found = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*-*"):
        match = _STAGING_RE.match(path.name)
        if match and match["name"] == target.name and path.is_dir() and (pid is None or int(match["pid"]) == pid):
            found.append((match[2], int(match["pid"]), path))
    return found


def remove_set_aside(target: Path, pid: int) -> None:
    """Delete the folders publish() of process `pid` set the previous report aside in."""
    for kind, _, path in leftovers(target, pid):
        if kind == "old":
            shutil.rmtree(path, ignore_errors=True)


def recover_abandoned(target: Path) -> None:
    """Deal with what processes that no longer exist left beside `target` (their watchdog died too,
    or had not finished yet):

    - a staging folder holding a finished report (is_ready: killed while publishing) is moved
      into place, when it is newer than the published report;
    - a staging folder holding a journal (killed during the run, watchdog gone) gets the
      incomplete report its watchdog would have written (auditkit.journal.finalise), when newer;
    - anything else is deleted, the previous reports publish() had set aside included: they are
      older than what was being published.

    Each folder is first claimed by renaming it to a name of this process, so that two runs
    starting at once never both handle one."""
    claimed = []
    for kind, pid, path in leftovers(target):
        if not _alive(pid):
            claim = claim_folder(path, target, kind)
            if claim is not None:
                claimed.append((kind, pid, claim))
    for kind, pid, path in sorted(claimed, key=lambda c: _mtime(c[2])):
        try:
            if kind == "tmp" and _mtime(path) > _mtime(target):
                if is_ready(path):
                    publish(path, target)
                elif (path / JOURNAL_NAME).is_file():
                    from auditkit.journal import finalise

                    finalise(path, target, None,
                             died=f"process {pid} and its watchdog exited without finishing: crashed or killed")
        except Exception:  # noqa: BLE001 - a leftover that cannot be recovered is only deleted
            pass
        shutil.rmtree(path, ignore_errors=True)


def claim_folder(path: Path, target: Path, kind: str = "tmp") -> Path | None:
    """Rename `path` (a staging or set-aside folder of `target`) to a name of this process, so that
    no other run takes it for abandoned; None when it is gone (another process claimed it first)."""
    claim = path.with_name(f".{target.name}.{kind}-{os.getpid()}-claim{uuid.uuid4().hex[:10]}")
    try:
        os.rename(path, claim)
    except OSError:
        return None
    return claim


def _mtime(folder: Path) -> float:
    """When the report (or journal) in `folder` was last written; 0 when there is none."""
    times = [(folder / name).stat().st_mtime for name in ("audit.json", JOURNAL_NAME) if (folder / name).is_file()]
    return max(times, default=0.0)


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

    `staging` must hold the finished report (index.html, audit.json, evidence/).
    Safe to be killed at any moment: the journal is removed first, which
    marks the staging folder as finished (is_ready); whoever finds it so
    after this process died (its watchdog, else the next run: see
    recover_abandoned) moves it in and deletes the folder the previous report
    was set aside in. Dot-files the user keeps in the target (such as
    .gitignore) are carried over. Two runs publishing into one target at once
    each publish a whole folder; the later one wins.
    """
    _readable_folders(staging)
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
