"""The watchdog: writes an "incomplete" report when the pytest process dies before writing its own.

    python -m auditkit.watchdog STAGING TARGET PID

The controller starts it at the beginning of a run with a pipe on its
standard input and writes "done" there once the report is published. If the
pipe closes without "done" (a segfault inside a native library, kill -9, an
out-of-memory kill), the watchdog finalises the journal in STAGING into
TARGET, with the check that was running reported as ERROR. It runs in its
own session, so a Ctrl-C meant for pytest does not reach it.
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
    if b"done" in message or not staging.is_dir():
        return 0
    from auditkit.journal import finalise

    try:
        finalise(staging, target, None, died=f"process {pid} exited without finishing: crashed or killed")
    except Exception as exc:  # noqa: BLE001 - nobody is left to tell but stderr
        print(f"auditkit watchdog: could not write the incomplete report to {target}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a subprocess
    raise SystemExit(main(sys.argv[1:]))
