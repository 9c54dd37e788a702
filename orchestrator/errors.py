"""The orchestrator's exception tree: one base class, one subclass per subsystem.

The CLI catches ``OrchestratorError`` and prints ``error: <message>`` (plus ``hint`` when set)
and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
