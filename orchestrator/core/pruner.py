"""Pruning in the controller: after each evaluation of a worker whose experiment has
``prune:``, apply the pure rule of ``orchestrator.core.pruning`` and stop the worker as
``pruned`` when it says so. Its slot then goes to the next queued worker (the stop frees it
like any other: once every process of the run is gone).

Part of ``Controller`` (a mixin: the methods share its state). The race rules live here:
controls are never pruned, and nothing is pruned while no other worker of the experiment is
running or queued (the slot would go to no one).
"""

from __future__ import annotations

from typing import Any

from orchestrator.core.parts import ControllerParts
from orchestrator.core.pruning import prune_verdict
from orchestrator.core.runs import LiveRun
from orchestrator.core.state import ExperimentStatus, RunState


class PruningMixin(ControllerParts):
    """``_maybe_prune`` of ``Controller``."""

    def _maybe_prune(self, live: LiveRun, record: dict[str, Any]) -> None:
        """Update the run's hopeless streak after ``record`` (already in its history) and stop
        it as ``pruned`` when the rule says so and another worker could use its slot."""
        exp = live.experiment
        config = exp.prune
        if config is None or live.stopping is not None:
            return
        if self.state.experiments[exp.name].status != ExperimentStatus.running:
            return
        if live.worker.control:
            return  # a negative control runs to its end: it is there to be measured
        metrics = {c.threshold.metric for c in live.criteria if c.threshold is not None}
        if not any(_number(record.get(m)) for m in metrics):
            return  # not an evaluation of any criterion metric
        unit, budget = live.experiment.unit, live.budget
        x = record.get(unit)
        if not isinstance(x, int) or (live.prune_at is not None and x <= live.prune_at):
            return  # a second row of an evaluation already counted (records of a step merge)
        live.prune_at = x
        verdict = prune_verdict(
            config, live.criteria, live.history.records, streak=live.prune_streak, unit=unit,
            check_every=exp.check_every, budget=budget, now=self.clock(),
        )
        live.prune_streak = verdict.streak
        if not verdict.prune or live.handle is None:
            return
        others = [
            r for r in self.runs.values()
            if r.experiment is exp and r is not live and r.stopping is None
            and self._selected(r)
            and (r.record.state.active or r.record.state == RunState.pending)
        ]
        if not others:
            return  # its slot would go to no one: let it run to its budget
        reason = verdict.reason()
        self.event(f"{live.record.key}: PRUNED at {unit} {x}: {reason.removeprefix('pruned: ')}")
        self._stop([live], RunState.pruned, reason=reason)
        self._dirty = True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
