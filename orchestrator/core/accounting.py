"""Slot-seconds used and saved: the one definition every report uses.

A run holds a slot from its start to its end (``RunRecord.busy_s``: GPU-seconds on a GPU slot,
wall seconds of a CPU slot otherwise). A race that ends early saves what the runs it stopped
would still have used to reach their budget. The estimate scales each stopped run's measured
seconds per unit of progress (epoch or step; start-up and evaluations included) to its budget;
a run that never started (cancelled) takes the median rate of the others. Runs that ended on
their own (exhausted, failed) saved nothing.

What was saved has one of two causes, counted apart: the **decision** (losers stopped and queued
workers cancelled when a worker won, and the winner's own remaining budget) and **pruning** (a
worker stopped early because its projection could not meet the criteria, ``RunState.pruned``).
Both use the same estimate: the run's remaining budget at its measured pace.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.core.state import RunRecord, RunState


@dataclass(frozen=True)
class RunUsage:
    """What the accounting needs of one worker.

    Attributes:
        worker: the worker's name.
        record: its run record, or None when it never got one.
        done: progress reached (epochs or steps, in the budget's unit).
        budget: its budget in the same unit (max_epochs or max_steps).
        won: the race was decided for this worker (it was stopped at its win).
    """

    worker: str
    record: RunRecord | None
    done: int
    budget: int
    won: bool = False


@dataclass(frozen=True)
class ComputeRow:
    """Slot time one worker used, and the estimate of running it to its budget."""

    worker: str
    state: str
    done: int
    budget: int
    busy_s: float  # wall seconds holding a slot (GPU-seconds on a GPU slot)
    cpu_s: float
    full_busy_s: float | None  # estimate: busy_s / done x budget
    full_cpu_s: float | None
    note: str
    cause: str = ""  # what ended it early: "decision", "pruning", or "" (ran its course)

    @property
    def saved_busy_s(self) -> float:
        return max(0.0, (self.full_busy_s or self.busy_s) - self.busy_s)

    @property
    def saved_cpu_s(self) -> float:
        return max(0.0, (self.full_cpu_s or self.cpu_s) - self.cpu_s)

    # names of the epoch-only version, kept for the job reports that use them
    @property
    def epochs_done(self) -> int:
        return self.done

    @property
    def max_epochs(self) -> int:
        return self.budget


def compute_savings(usages: Sequence[RunUsage], unit: str = "epoch") -> list[ComputeRow]:
    """Per worker: slot-seconds used, and an estimate of the slot-seconds to reach its budget.

    Args:
        usages: one entry per worker of the experiment.
        unit: ``epoch`` or ``step``, for the notes.

    Returns:
        One ``ComputeRow`` per usage, in order. ``saved_busy_s`` is 0 for runs that were not
        ended early by the race.
    """
    rates = [
        (u.record.busy_s / u.done, u.record.cpu_s / u.done)
        for u in usages if u.record is not None and u.done > 0
    ]
    median_busy = statistics.median(r[0] for r in rates) if rates else None
    median_cpu = statistics.median(r[1] for r in rates) if rates else None
    rows = []
    for u in usages:
        rec = u.record
        state = rec.state.value if rec is not None else "never started"
        busy, cpu = (rec.busy_s, rec.cpu_s) if rec is not None else (0.0, 0.0)
        done = u.done if rec is not None else 0
        won = u.won and rec is not None and rec.state == RunState.succeeded
        pruned = rec is not None and rec.state == RunState.pruned
        early = pruned or won or (
            rec is not None and rec.state in (RunState.stopped, RunState.cancelled)
        )
        full_busy = full_cpu = None
        note = "ran its course" if rec is not None and rec.state.terminal else "still stopping"
        if early and done > 0:
            full_busy = busy / done * u.budget
            full_cpu = cpu / done * u.budget
            note = f"{done} of {u.budget} {unit}s; {busy / done:,.1f} s/{unit} measured"
        elif early and median_busy is not None and median_cpu is not None:
            full_busy = busy + median_busy * max(0, u.budget - done)
            full_cpu = cpu + median_cpu * max(0, u.budget - done)
            note = f"never trained: median s/{unit} of the others"
        if won:
            note = "winner, stopped at its win; " + note
        if pruned:
            note = "pruned; " + note
        cause = ("pruning" if pruned else "decision") if early else ""
        rows.append(ComputeRow(u.worker, state, done, u.budget, busy, cpu, full_busy, full_cpu,
                               note, cause))
    return rows


def saved_by_cause(rows: Sequence[ComputeRow]) -> dict[str, float]:
    """Slot-seconds saved, split by cause: ``{"decision": s, "pruning": s}``."""
    out = {"decision": 0.0, "pruning": 0.0}
    for r in rows:
        if r.cause:
            out[r.cause] += r.saved_busy_s
    return out
