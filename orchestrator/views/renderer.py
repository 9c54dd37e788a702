"""Figures drawn in a detached, lower-priority process (``python -m
orchestrator.views.race_report``), so matplotlib never holds the controller's GIL, its decision
path or its exit: the race report at each decision, and the dashboard's progress plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from orchestrator.core.config import Plan

# Added to the renderer's nice value: on a box whose cores are busy with training, the
# controller and the workers come first; a figure can wait a second.
RENDER_NICENESS = 10


def spawn_renderer(plan: Plan, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m orchestrator.views.race_report ARGS`` for ``plan`` in its own session
    (a Ctrl-C in the controller's terminal does not reach it), its output appended to ``log``.

    Raises:
        OSError: the log cannot be opened or the process cannot start.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.views.race_report", *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=plan.plan_dir,
            env={**os.environ, "MPLBACKEND": "Agg"},
        )


def lower_priority() -> None:
    """Lower this process's CPU priority by ``RENDER_NICENESS`` (the renderer calls it first)."""
    try:
        os.nice(RENDER_NICENESS)
    except OSError:
        pass
