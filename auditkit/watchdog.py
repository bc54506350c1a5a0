"""The watchdog: writes an "incomplete" report when the pytest process dies before writing its own.

    python -m auditkit.watchdog STAGING TARGET PID

The controller starts it at the beginning of a run with a pipe on its
standard input and writes "done" there once the report is published. If the
pipe closes without "done" (a segfault inside a native library, kill -9, an
out-of-memory kill), the watchdog finalises the journal in STAGING into
TARGET, with the check that was running reported as ERROR; if the process
died while publishing, it moves the finished report in (see recover()). It
runs in its own session, so a Ctrl-C meant for pytest does not reach it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def start(staging: Path, target: Path) -> subprocess.Popen:
    """Start the watchdog for this process's run; keep the returned Popen until `stop()`."""
    return subprocess.Popen(
        [sys.executable, "-m", "auditkit.watchdog", str(staging), str(target), str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    """Tell the watchdog the run ended normally and wait for it to leave."""
    try:
        process.stdin.write(b"done\n")
        process.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def main(argv: list[str]) -> int:
    staging, target, pid = Path(argv[0]), Path(argv[1]), argv[2]
    message = sys.stdin.buffer.read()  # blocks until the controller closes the pipe, or dies
    if b"done" in message:
        return 0
    try:
        recover(staging, target, int(pid))
    except Exception as exc:  # noqa: BLE001 - nobody is left to tell but stderr
        print(f"auditkit watchdog: could not write the incomplete report to {target}: {exc}", file=sys.stderr)
        return 1
    return 0


def recover(staging: Path, target: Path, pid: int) -> None:
    """After process `pid` died without publishing: make `target` tell the truth about its run.

    - staging still holds the journal: the process died during the run (or while writing the
      report): write the incomplete report from the journal and publish it;
    - staging holds a finished report and no journal: the process died while publishing, between
      moving the previous report aside and moving this one in: move it in as it is;
    - staging is gone: the process had published; only the previous report it set aside is left.
    In every case the folders the process set the previous report aside in are deleted.
    The staging folder is first renamed to a name of this process, so that a run started meanwhile
    does not take it for abandoned (auditkit.reportdir.recover_abandoned).
    """
    from auditkit.reportdir import JOURNAL_NAME, claim_folder, discard, is_ready, publish, remove_set_aside

    claimed = claim_folder(staging, target) if staging.is_dir() else None
    try:
        if claimed is None:
            return
        if (claimed / JOURNAL_NAME).is_file():
            from auditkit.journal import finalise

            finalise(claimed, target, None, died=f"process {pid} exited without finishing: crashed or killed")
        elif is_ready(claimed):
            publish(claimed, target)
        else:
            discard(claimed)
    finally:
        remove_set_aside(target, pid)


if __name__ == "__main__":  # pragma: no cover - run as a subprocess
    raise SystemExit(main(sys.argv[1:]))
