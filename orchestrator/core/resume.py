"""Resuming a plan: adopt the state an earlier controller left, re-attach its live runs,
replay the records written while no controller ran, and settle the runs that died meanwhile.

Part of ``Controller`` (a mixin: the methods share its state).
"""

from __future__ import annotations

import shutil

from orchestrator.core import races
from orchestrator.core.parts import ControllerParts
from orchestrator.core.runs import LiveRun, live_runs
from orchestrator.core.state import (
    ExperimentRecord,
    ExperimentStatus,
    PlanState,
    RunState,
    controller_identity,
)
from orchestrator.running.gpus import Slot
from orchestrator.running.launchers import read_exit_status
from orchestrator.running.processes import find_strays, stop_processes
from orchestrator.sources.metrics import write_order_keys


class ResumeMixin(ControllerParts):
    """Loading state and re-attaching runs (``Controller.run`` calls these first)."""

    def _load_state(self) -> None:
        if self.fresh:
            self._discard_results()
        if self.paths.state.exists():
            self.state = PlanState.load(self.paths.state)
            if self.state.plan != str(self.plan.source):
                self.event(f"state was made by plan {self.state.plan}; adopting it for this plan")
                self.state.plan = str(self.plan.source)
        self.state.controller = controller_identity()
        self.state.finished = False
        if self.state.race_id is None:  # a new race, or one from before races had ids
            fresh_state = not self.paths.state.exists()
            self.state.race_id = (
                races.new_race_id(self.state.started_at) if fresh_state
                else races.adopted_race_id(self.state)
            )
        self.runs = live_runs(self.plan, self.state, self.paths)
        for live in self.runs.values():
            if live.record.started_at is not None and live.record.state.active:
                live.source.begin_attempt(live.record.started_at)  # follow its current files
        for key, live in self.runs.items():
            self._replay[key] = self._read_source(live)  # history already on disk (resume)
        for exp in self.plan.experiments:
            if exp.name not in self.state.experiments:
                self.state.experiments[exp.name] = ExperimentRecord(exp.name)
            erec = self.state.experiments[exp.name]
            if erec.started_at is None:
                erec.started_at = self.clock()

    def _discard_results(self) -> None:
        """--fresh: keep the previous race (moved to races/<race-id>/), start a new one."""
        archived = races.archive_current(self.paths, self.plan)
        if archived is None:  # no state: leftovers of a race that never saved one
            for exp, worker in self.plan.workers():
                run_dir = self.paths.run(exp.name, worker.name).run_dir
                if run_dir.exists():
                    shutil.rmtree(run_dir)
            self.paths.events.unlink(missing_ok=True)
        else:
            kept = self.paths.archived_race(archived).root
            self.event(f"previous race {archived} kept in {kept}")

    def _resume_runs(self) -> None:
        """Re-attach live runs of an earlier controller, decide on the records written while
        no controller ran (in the order they were written), then requeue the runs that died."""
        dead: list[tuple[LiveRun, int]] = []
        for live in self.runs.values():
            rec = live.record
            exp_done = self.state.experiments[rec.experiment].status != ExperimentStatus.running
            if rec.state == RunState.running and rec.pid and rec.create_time and rec.run_id:
                handle = self.launcher.attach(
                    rec.key, rec.pid, rec.create_time, rec.run_id, live.paths, rec.attempt
                )
                if handle is not None:
                    live.handle = handle
                    live.slot = self._slot_by_label(rec.slot)
                    self.event(f"{rec.key}: re-attached to pid {rec.pid} (attempt {rec.attempt})")
                    continue
                code = self._exit_code_of_dead(live)
                self.event(f"{rec.key}: attempt {rec.attempt} ended while no controller ran")
                dead.append((live, code))
            elif rec.state == RunState.preparing:
                rec.transition(RunState.pending, why="controller restarted")
            elif rec.state == RunState.stopped and rec.stop_reason in ("interrupted", "user"):
                if not exp_done and self._selected(live):
                    rec.transition(RunState.pending, why="resume after interruption")
                    rec.resume = True
                    rec.stop_reason = None
        self._stop_strays()
        batch = []
        for key, records in self._replay.items():
            live = self.runs[key]
            decide = not live.record.state.terminal
            batch += [(t, i, live, r, decide) for i, (t, r) in enumerate(write_order_keys(records))]
        self._replay.clear()
        for _, _, live, record, decide in sorted(batch, key=lambda b: (b[0], b[1])):
            self._accept(live, record, decide=decide and live.stopping is None)
        for live, code in dead:
            self._release_dead(live)
            if live.record.state != RunState.running:
                continue  # its records, replayed above, made it the winner
            if self.state.experiments[live.experiment.name].status == ExperimentStatus.running:
                self._handle_exit(live, code)
            else:
                self._settle_decided(live, code)
        # A race decided by an earlier controller (which died while stopping its runs): finish
        # what it started, never leave a re-attached run of a decided experiment running.
        for live in self.runs.values():
            erec = self.state.experiments[live.experiment.name]
            if erec.status == ExperimentStatus.running or live.handle is None:
                continue
            if live.stopping is None:
                won = erec.winner == live.worker.name
                self._stop(
                    [live], RunState.succeeded if won else RunState.stopped,
                    reason="won" if won else f"lost to {erec.winner}",
                )

    def _stop_strays(self) -> None:
        """Stop processes of attempts no controller tracks: one launched just before the old
        controller died (its pid never reached the state file), or the trainer of an attempt
        whose launch wrapper died. They would otherwise run next to the attempt replacing them.
        """
        allowed = {
            str(live.paths.run_dir): (
                {live.record.run_id}
                if live.handle is not None and live.record.run_id is not None
                else set()
            )
            for live in self.runs.values()
        }
        for run_dir, procs in find_strays(allowed).items():
            if not procs:
                continue
            live = next(r for r in self.runs.values() if str(r.paths.run_dir) == run_dir)
            pids = sorted(p.pid for p in procs)
            self.event(f"{live.record.key}: stopping {len(pids)} untracked process(es) {pids} "
                       "of an earlier attempt")
            left = stop_processes(procs, grace_s=self.plan.grace_s)
            if left:
                self.event(f"{live.record.key}: processes {left} survived SIGKILL")

    def _settle_decided(self, live: LiveRun, code: int) -> None:
        """A run of an already decided race that ended while no controller ran."""
        rec = live.record
        erec = self.state.experiments[live.experiment.name]
        self._release(live, self.clock())
        rec.exit_code = code
        if erec.winner == live.worker.name:
            rec.transition(RunState.succeeded, why="ended after winning")
        else:
            rec.stop_reason = rec.stop_reason or f"lost to {erec.winner}"
            rec.transition(RunState.stopped, why="race decided")
        self.event(f"{rec.key}: {rec.state.value} (ended while no controller ran)")
        self._dirty = True

    def _release_dead(self, live: LiveRun) -> None:
        """A run that died while no controller ran has no handle; its strays were stopped by
        ``_stop_strays``."""
        live.handle = None
        live.record.pid = None
        live.record.create_time = None

    def _exit_code_of_dead(self, live: LiveRun) -> int:
        return read_exit_status(live.paths.exit_status(live.record.attempt))

    def _slot_by_label(self, label: str | None) -> Slot | None:
        return next((s for s in self.slots if s.label() == label), None)

