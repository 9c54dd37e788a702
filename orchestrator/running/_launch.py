"""Tiny launch wrapper: runs a worker command and records how it ended.

    python -m orchestrator.running._launch STATUS_FILE -- ARGV...

A process that is not the controller's child gives the controller no exit code, so after a
controller restart an exit is only known from this file (shared/DESIGN.md, "Mechanisms").
The wrapper forwards SIGTERM/SIGINT/SIGHUP to the worker, waits for it, and writes
``{"returncode": int, "signal": int | null, "end_time_s": float}`` atomically. Stdlib only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _write_status(path: Path, returncode: int, error: str | None = None) -> None:
    status = {
        "returncode": returncode,
        "signal": -returncode if returncode < 0 else None,
        "end_time_s": round(time.time(), 3),
        "error": error,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(status, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m orchestrator.running._launch STATUS_FILE -- ARGV...",
              file=sys.stderr)
        return 2
    status_path, command = Path(argv[0]), argv[2:]
    try:
        child = subprocess.Popen(command)
    except OSError as e:
        print(f"error: cannot start {command[0]!r}: {e.strerror or e}", file=sys.stderr)
        _write_status(status_path, 127, f"cannot start {command[0]!r}: {e.strerror or e}")
        return 127

    def forward(signum: int, _frame: object) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    returncode = child.wait()
    # The worker is gone: a stop signal from now on (the controller signals the whole process
    # group) must not kill this wrapper before, or while, it records the exit (Python resets
    # its handlers to SIG_DFL during shutdown).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _write_status(status_path, returncode)
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
