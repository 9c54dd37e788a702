"""The orchestrator's exception tree: one base class, one subclass per subsystem.

The CLI catches ``OrchestratorError`` and prints ``error: <message>`` (plus ``hint`` when set)
and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class OrchestratorError(Exception):
    """Base of every error the orchestrator reports to a user.

    Args:
        message: one sentence naming what is wrong.
        hint: optional sentence naming what to do about it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(OrchestratorError):
    """The plan (experiments.yaml) is invalid; ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.problems = problems or []


class CriteriaError(OrchestratorError):
    """A success criterion cannot be parsed or uses something outside the whitelist."""


class WorktreeError(OrchestratorError):
    """A git worktree cannot be created, reused or removed safely."""


class LaunchError(OrchestratorError):
    """A run could not be started (missing executable, bad working directory, ...)."""


class StateError(OrchestratorError):
    """The state file is unreadable, belongs to another plan, or is locked by a live controller."""


class SyncError(OrchestratorError):
    """Pushing or pulling files over SSH failed in a way the user must fix (auth, host key)."""


class WriteErrors:
    """Counts failed writes (disk full, read-only folder) and warns at most once a minute per kind.

    A race goes on when the dashboard or the state cannot be written; the user still hears of it.

    Args:
        clock: time source in seconds (tests may fake it).
        interval_s: minimum seconds between two warnings of the same kind.
    """

    def __init__(self, clock: Callable[[], float] = time.time, interval_s: float = 60.0) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self.count = 0
        self._last: dict[str, float] = {}

    def report(self, what: str, error: OSError) -> bool:
        """Count one failed write of ``what``; print a warning unless one was printed lately.

        Returns:
            True when a warning was printed.
        """
        self.count += 1
        now = self.clock()
        last = self._last.get(what)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[what] = now
        print(f"warning: cannot write {what}: {error.strerror or error}", file=sys.stderr)
        return True
