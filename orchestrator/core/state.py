"""Run states, their legal transitions, and the state file the controller rewrites atomically.

``state.json`` in the results directory is the single source of truth between controller
restarts and for ``orchestrator status`` in another shell. It is written with temp file + fsync +
os.replace after every change, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Self

from orchestrator.errors import StateError
from orchestrator.reporting import atomic_write_bytes

STATE_VERSION = 1


class RunState(str, Enum):
    """Life cycle of one worker's run (all its attempts)."""

    pending = "pending"  # waiting for a slot (or for its retry backoff to pass)
    preparing = "preparing"  # worktree being created, slot reserved
    running = "running"  # a process of the current attempt is alive
    succeeded = "succeeded"  # met every criterion: the experiment's winner
    stopped = "stopped"  # terminated because another worker won, or by the user
    exhausted = "exhausted"  # used its budget (epochs, steps or time) or exited 0 unmet
    failed = "failed"  # crashed more often than max_retries allows, or could not start
    cancelled = "cancelled"  # never started because the race ended
    pruned = "pruned"  # stopped early: its projection cannot meet the criteria (``prune:``)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Holds (or is about to hold) a slot."""
        return self in (RunState.preparing, RunState.running)


TERMINAL = frozenset(
    {
        RunState.succeeded, RunState.stopped, RunState.exhausted, RunState.failed,
        RunState.cancelled, RunState.pruned,
    }
)

_ALLOWED: dict[RunState, frozenset[RunState]] = {
    # pending -> succeeded: its record, read after a controller restart, met the criteria.
    RunState.pending: frozenset(
        {RunState.preparing, RunState.cancelled, RunState.stopped, RunState.succeeded}
    ),
    RunState.preparing: frozenset(
        {RunState.running, RunState.failed, RunState.cancelled, RunState.pending, RunState.stopped}
    ),
    RunState.running: frozenset(
        {
            RunState.succeeded,
            RunState.stopped,
            RunState.exhausted,
            RunState.failed,
            RunState.pruned,
            RunState.pending,  # crashed (or stalled) and will be retried with ORCH_RESUME=1
        }
    ),
    # A stop by the user (Ctrl-C, `orchestrator stop`) can be resumed by `run` or `rerun`;
    # `rerun` may also reopen any other finished run by hand.
    RunState.stopped: frozenset({RunState.pending}),
    RunState.failed: frozenset({RunState.pending}),
    RunState.exhausted: frozenset({RunState.pending}),
    RunState.cancelled: frozenset({RunState.pending}),
    RunState.succeeded: frozenset({RunState.pending}),
    # `run` leaves a pruned run pruned; `rerun --resume` continues it by hand.
    RunState.pruned: frozenset({RunState.pending}),
}


class IllegalTransition(AssertionError):
    """A state change the life cycle does not allow: a bug in the controller."""


class _JsonRecord:
    """``to_json``/``from_json`` of a record dataclass: enum fields (``_ENUMS``) stored as their
    values; keys this version does not know (written by a newer one) are dropped on load."""

    _ENUMS: ClassVar[dict[str, type[Enum]]] = {}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        for name in self._ENUMS:
            d[name] = getattr(self, name).value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        kw = {k: v for k, v in d.items() if k in known}
        for name, enum in cls._ENUMS.items():
            kw[name] = enum(kw[name])
        return cls(**kw)


@dataclass
class RunRecord(_JsonRecord):
    """Everything the controller knows about one worker's run."""

    experiment: str
    worker: str
    branch: str
    state: RunState = RunState.pending
    attempt: int = 0
    run_id: str | None = None
    slot: str | None = None
    pid: int | None = None
    create_time: float | None = None
    started_at: float | None = None  # of the current attempt
    ended_at: float | None = None
    busy_s: float = 0.0  # wall seconds spent holding a slot, all attempts
    cpu_s: float = 0.0  # CPU seconds of the run's processes, all attempts (sampled)
    epoch: int | None = None
    max_epochs: int | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    last_record_at: float | None = None
    records: int = 0
    exit_code: int | None = None
    error: str | None = None  # one line for the dashboard
    stderr_tail: str | None = None
    stop_reason: str | None = None  # "lost to X", "user", "interrupted", "stalled"
    retry_at: float | None = None
    stalled: bool = False
    resume: bool = False  # next attempt must resume from the checkpoint
    # What the metric source could not use: {"bad_lines": 2, "bad_values": 1, ...} (counted,
    # never fatal; see orchestrator.sources.metrics.SourceStats).
    metric_problems: dict[str, int] = field(default_factory=dict)
    # After the last attempt on a GPU slot: "released in 0.4s", or "NOT released after 30s
    # (pids [...])" when NVML still showed the run's processes holding memory.
    gpu_release: str | None = None
    # Budgets and progress in the experiment's unit ("epoch" or "step"): ``epoch`` and ``step``
    # are the last reported values of each; ``budget`` is max_epochs or max_steps.
    unit: str = "epoch"
    step: int | None = None
    budget: int | None = None
    max_time_s: float | None = None
    control: bool = False  # a negative control: can never win
    # Criterion metrics never reported at two check points where the run reported others.
    unreported: list[str] = field(default_factory=list)
    # Provenance (orchestrator.core.provenance): the commit the current/last attempt ran, how
    # many commits its branch is behind base_ref, whether its worktree was dirty, and one dict
    # per attempt (branch, commit, argv, redacted plan env, host, slot, start, end, exit, ...).
    commit: str | None = None
    behind: int | None = None
    dirty: bool = False
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def progress(self) -> int | None:
        """The last reported epoch or step, in the unit of the budget."""
        return self.epoch if self.unit == "epoch" else self.step

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.worker}"

    def transition(self, new: RunState, *, why: str = "") -> None:
        """Move to ``new``.

        Raises:
            IllegalTransition: the life cycle does not allow it (a controller bug).
        """
        if new == self.state:
            return
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(
                f"run {self.key} cannot go from {self.state.value} to {new.value}"
                + (f" ({why})" if why else "")
            )
        self.state = new

    _ENUMS: ClassVar[dict[str, type[Enum]]] = {"state": RunState}


class ExperimentStatus(str, Enum):
    """Outcome of one experiment (a race)."""

    running = "running"  # undecided
    succeeded = "succeeded"  # a worker met every criterion
    failed = "failed"  # every worker ended without meeting them


@dataclass
class ExperimentRecord(_JsonRecord):
    name: str
    status: ExperimentStatus = ExperimentStatus.running
    winner: str | None = None
    winner_epoch: int | None = None
    winner_metrics: dict[str, Any] = field(default_factory=dict)
    started_at: float | None = None
    decided_at: float | None = None
    decision_latency_s: float | None = None  # winning record written -> last loser reaped
    hook: str | None = None  # on_success outcome: "ok", "exit N", "running"
    setup_done: bool = False
    unit: str = "epoch"  # of winner_epoch (which is a step when the budget is in steps)
    # Controls that met the criteria at or before the winning check point: the experiment is
    # flagged (and failed): its criteria do not separate real results from a control.
    control_flags: list[str] = field(default_factory=list)
    # Controls the decision waits for: each must be evaluated at the winning check point.
    awaiting_controls: list[str] = field(default_factory=list)
    winner_commit: str | None = None  # the SHA the winning attempt ran
    pin: dict[str, Any] | None = None  # winner.json of the pinned checkpoint (core.pinning)
    tag: str | None = None  # "race/<exp>/<race-id> (created)" or "... (exists, left alone)"

    _ENUMS: ClassVar[dict[str, type[Enum]]] = {"status": ExperimentStatus}


@dataclass
class PlanState:
    """The whole state file."""

    plan: str
    experiments: dict[str, ExperimentRecord] = field(default_factory=dict)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    controller: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished: bool = False
    sync: dict[str, Any] = field(default_factory=dict)
    race_id: str | None = None  # this race's id (orchestrator.core.races); None before a run

    def run(self, experiment: str, worker: str) -> RunRecord:
        return self.runs[f"{experiment}/{worker}"]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "plan": self.plan,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "finished": self.finished,
            "controller": self.controller,
            "sync": self.sync,
            "race_id": self.race_id,
            "experiments": {k: v.to_json() for k, v in self.experiments.items()},
            "runs": {k: v.to_json() for k, v in self.runs.items()},
        }

    def save(self, path: Path) -> None:
        """Write atomically (temp + fsync + rename)."""
        self.updated_at = time.time()
        data = json.dumps(self.to_json(), indent=1, allow_nan=False, default=str)
        atomic_write_bytes(path, (data + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> PlanState:
        """Read a state file.

        Raises:
            StateError: it is missing, unreadable, or of another version.
        """
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise StateError(
                f"no state at {path}: this plan has not been run yet",
                hint="start it with `python -m orchestrator run PLAN`",
            ) from None
        except (OSError, json.JSONDecodeError) as e:
            raise StateError(f"cannot read state file {path}: {e}") from None
        if d.get("version") != STATE_VERSION:
            raise StateError(
                f"state file {path} has version {d.get('version')}, expected {STATE_VERSION}",
                hint="start over with `python -m orchestrator run PLAN --fresh`",
            )
        return cls(
            plan=d["plan"],
            experiments={
                k: ExperimentRecord.from_json(v) for k, v in d.get("experiments", {}).items()
            },
            runs={k: RunRecord.from_json(v) for k, v in d.get("runs", {}).items()},
            controller=d.get("controller", {}),
            started_at=d.get("started_at", time.time()),
            updated_at=d.get("updated_at", time.time()),
            finished=d.get("finished", False),
            sync=d.get("sync", {}),
            race_id=d.get("race_id"),
        )


def controller_identity() -> dict[str, Any]:
    """pid, create time and host of this process, to tell a live controller from a dead one."""
    import psutil

    me = psutil.Process()
    return {"pid": me.pid, "create_time": me.create_time(), "host": socket.gethostname()}


def controller_alive(info: dict[str, Any]) -> bool:
    """Whether the controller described by ``info`` still runs (pid + create time match)."""
    import psutil

    if not info or info.get("host") not in (None, socket.gethostname()):
        return False
    try:
        proc = psutil.Process(int(info["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - float(info["create_time"])) < 0.01
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False


def append_event(path: Path, event: dict[str, Any]) -> None:
    """Append one JSON line to the event log (single write)."""
    line = (json.dumps(event, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
