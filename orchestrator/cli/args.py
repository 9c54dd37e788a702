"""Worker arguments shared by the commands (``[PLAN] WORKER``, ``-w WORKER``)."""

from __future__ import annotations

from orchestrator.core.config import ExperimentConfig, Plan, WorkerConfig
from orchestrator.errors import ConfigError


def find_worker(plan: Plan, name: str) -> tuple[ExperimentConfig, WorkerConfig]:
    """The worker called ``name`` (or ``experiment/name``).

    Raises:
        ConfigError: no such worker, or the name is ambiguous.
    """
    matches = [(e, w) for e, w in plan.workers() if name in (w.name, f"{e.name}/{w.name}")]
    if not matches:
        names = ", ".join(f"{e.name}/{w.name}" for e, w in plan.workers())
        raise ConfigError(f"no worker {name!r} in {plan.source}; workers: {names}")
    if len(matches) > 1:
        raise ConfigError(f"worker name {name!r} is ambiguous; use experiment/worker")
    return matches[0]


def one_worker(words: list[str], command: str) -> str:
    """The one WORKER of ``command [PLAN] WORKER`` (the plan already taken off ``words``).

    Raises:
        ConfigError: none, or more than one, was given.
    """
    if len(words) != 1:
        raise ConfigError(
            f"{command} takes one worker, got {len(words)}: {' '.join(words) or '(none)'}",
            hint=f"python -m orchestrator {command} [PLAN] WORKER",
        )
    return words[0]
