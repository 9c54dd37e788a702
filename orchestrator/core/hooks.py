"""The plan's own commands around a race: an experiment's ``setup`` (run once in the repo
before its workers start, to completion) and its ``on_success`` hook (started once the race is
decided, followed while the controller goes on). Both log to a file in the experiment's results
directory and get the controller's environment without ORCH_* variables.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.environment import base_env
from orchestrator.errors import LaunchError


def run_setup(name: str, argv: list[str], *, cwd: Path, log: Path) -> None:
    """Run an experiment's setup command to completion, appending its output to ``log``.

    Raises:
        LaunchError: it cannot start, or exits non-zero (with its last output line and the log).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        try:
            rc = subprocess.run(
                argv, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=base_env(),
            ).returncode
        except OSError as e:
            raise LaunchError(f"{name}: setup cannot start: {e}") from None
    if rc != 0:
        tail = tail_lines(log, 5)
        raise LaunchError(
            f"{name}: setup command exited with {rc}: {tail.splitlines()[-1] if tail else ''}",
            hint=f"see {log}",
        )


@dataclass
class _Waiting:
    """A hook that starts once ``after`` (the winner's pin) is done."""

    after: Future[Any]
    argv: list[str]
    cwd: Path
    log: Path


class HookRunner:
    """The on_success hooks still running (or waiting to start), by experiment name."""

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[bytes] | _Waiting] = {}

    def start(
        self, name: str, argv: list[str], *, cwd: Path, log: Path,
        after: Future[Any] | None = None,
    ) -> None:
        """Start experiment ``name``'s hook, its output appended to ``log``; with ``after``,
        once that future is done (``finished`` starts it; a start failure then lands in the
        log and reads as exit 127).

        Raises:
            OSError: the command cannot start (without ``after``).
        """
        if after is not None and not after.done():
            self.running[name] = _Waiting(after, argv, cwd, log)
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            self.running[name] = subprocess.Popen(
                argv, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=base_env(),
            )

    def finished(self) -> list[tuple[str, int]]:
        """(experiment name, exit code) of the hooks that ended since the last call; starts
        the waiting hooks whose pin is done."""
        out = []
        for name, proc in list(self.running.items()):
            if isinstance(proc, _Waiting):
                if not proc.after.done():
                    continue
                try:
                    self.start(name, proc.argv, cwd=proc.cwd, log=proc.log)
                except OSError as e:
                    with open(proc.log, "a") as fh:
                        fh.write(f"on_success hook cannot start: {e}\n")
                    del self.running[name]
                    out.append((name, 127))
                continue
            rc = proc.poll()
            if rc is not None:
                del self.running[name]
                out.append((name, rc))
        return out


def tail_lines(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file (read from its last 8 KiB; "" if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def last_line(text: str | None) -> str | None:
    """The last non-blank line of a log tail that is not an attempt header (``====``), at most
    300 characters; None if there is none."""
    if not text:
        return None
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("====")]
    return lines[-1].strip()[:300] if lines else None
