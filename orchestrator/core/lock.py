"""One controller per plan: an exclusive flock on results/controller.lock (the CLI's stop,
rerun and clean take it too before they touch a plan's runs with no controller running)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from orchestrator.errors import StateError


class ControllerLock:
    """An exclusive flock on results/controller.lock: one controller per plan at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Raises StateError if another controller holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StateError(
                f"another controller ({holder}) is running this plan",
                hint="watch it with `python -m orchestrator status`, or stop it first",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
