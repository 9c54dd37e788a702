"""The plan's own commands around a race: an experiment's ``setup`` (run once in the repo
before its workers start, to completion) and its ``on_success`` hook (started once the race is
decided, followed while the controller goes on). Both log to a file in the experiment's results
directory and get the controller's environment without ORCH_* variables.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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


class HookRunner:
    """The on_success hooks still running, by experiment name."""

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], *, cwd: Path, log: Path) -> None:
        """Start experiment ``name``'s hook, its output appended to ``log``.

        Raises:
            OSError: the command cannot start.
        """
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            self.running[name] = subprocess.Popen(
                argv, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=base_env(),
            )

    def finished(self) -> list[tuple[str, int]]:
        """(experiment name, exit code) of the hooks that ended since the last call."""
        out = []
        for name, proc in list(self.running.items()):
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
