"""Control workers (``control: true``): negative controls that run like any worker and can
never win.

A control gets a slot before queued workers, is not stopped as a loser until it has been
evaluated at the winning check point (epoch or step), and is never cancelled by a decision. If a
control meets the criteria at or before that point, the experiment is flagged ("criteria met
by control X: they do not separate real results from a control") and counts as failed.

Part of ``Controller`` (a mixin: the methods share its state).
"""

from __future__ import annotations

from typing import Any

from orchestrator.core.config import ExperimentConfig
from orchestrator.core.criteria import all_pass
from orchestrator.core.parts import ControllerParts
from orchestrator.core.runs import LiveRun
from orchestrator.core.state import ExperimentRecord, ExperimentStatus, RunState


class ControlsMixin(ControllerParts):
    """What the controller does for control workers."""

    def _control_record(self, live: LiveRun, record: dict[str, Any], at: int | None) -> None:
        """A control's merged record: note a pass of the criteria; settle an awaited control
        once it has been evaluated at the winning check point."""
        erec = self.state.experiments[live.experiment.name]
        if at is not None and live.control_passed_at is None and all_pass(live.criteria, record):
            live.control_passed_at = at
            self.event(f"{live.record.key}: control meets the criteria at "
                       f"{live.experiment.unit} {at}")
            if erec.winner is not None and erec.winner_epoch is not None and \
                    at <= erec.winner_epoch:
                self._flag(erec, live.worker.name, at)
        if live.worker.name not in erec.awaiting_controls or erec.winner_epoch is None:
            return
        progress = live.record.progress
        if progress is not None and progress >= erec.winner_epoch:
            erec.awaiting_controls.remove(live.worker.name)
            self._stop([live], RunState.stopped,
                       reason=f"control evaluated at the winning {live.experiment.unit}")
            self._conclude_controls(erec)

    def _controls_at_decision(self, winner: LiveRun, erec: ExperimentRecord) -> None:
        """At the decision: flag controls that already passed, wait for those not yet
        evaluated at the winning check point."""
        assert erec.winner_epoch is not None
        for live in self.runs.values():
            if live.experiment is not winner.experiment or not live.worker.control:
                continue
            passed = live.control_passed_at
            if passed is not None and passed <= erec.winner_epoch:
                self._flag(erec, live.worker.name, passed)
            elif (live.record.progress or -1) < erec.winner_epoch and \
                    not live.record.state.terminal:
                erec.awaiting_controls.append(live.worker.name)
                self.event(f"{live.record.key}: control keeps running until it is evaluated at "
                           f"{winner.experiment.unit} {erec.winner_epoch}")
        self._conclude_controls(erec)

    def _settle_controls(self) -> None:
        """Awaited controls that ended (crashed, exhausted) before the winning check point."""
        for erec in self.state.experiments.values():
            for name in list(erec.awaiting_controls):
                live = self.runs.get(f"{erec.name}/{name}")
                if live is None or (live.record.state.terminal and live.stopping is None):
                    erec.awaiting_controls.remove(name)
                    self.event(f"{erec.name}/{name}: control ended before the winning check "
                               "point")
                    self._conclude_controls(erec)

    def _end_controls(self, exp: ExperimentConfig, *, reason: str) -> None:
        """The race failed: stop its running controls, cancel the pending ones."""
        erec = self.state.experiments[exp.name]
        for live in self.runs.values():
            if live.experiment is not exp or not live.worker.control:
                continue
            if live.control_passed_at is not None:
                self._flag(erec, live.worker.name, live.control_passed_at)
            if live.record.state == RunState.pending:
                live.record.transition(RunState.cancelled, why=reason)
            elif live.handle is not None and live.stopping is None:
                self._stop([live], RunState.stopped, reason=reason)

    def _flag(self, erec: ExperimentRecord, control: str, at: int) -> None:
        text = (f"criteria met by control {control} at {erec.unit} {at}: they do not separate "
                "real results from a control")
        if text not in erec.control_flags:
            erec.control_flags.append(text)
            self.event(f"{erec.name}: FLAGGED: {text}")
            self._dirty = True

    def _conclude_controls(self, erec: ExperimentRecord) -> None:
        """Once no control is awaited, a flagged experiment counts as failed."""
        if erec.awaiting_controls or not erec.control_flags:
            return
        if erec.status == ExperimentStatus.succeeded:
            erec.status = ExperimentStatus.failed
            self.event(f"{erec.name}: counts as FAILED: {erec.control_flags[0]}")
            self._dirty = True
