"""Scheduling runs onto slots, launching them, and stopping them (whole process trees, on
worker threads, so a slow stop never delays another decision).

Part of ``Controller`` (a mixin: the methods share its state).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator.core import provenance
from orchestrator.core.config import ExperimentConfig, expand
from orchestrator.core.environment import placeholder_values, worker_env
from orchestrator.core.parts import ControllerParts
from orchestrator.core.runs import LiveRun
from orchestrator.core.state import ExperimentRecord, ExperimentStatus, RunState
from orchestrator.errors import LaunchError, WorktreeError
from orchestrator.running import worktrees
from orchestrator.running.gpus import Slot
from orchestrator.running.launchers import LaunchSpec


class SchedulingMixin(ControllerParts):
    """Slots, launches and stops of ``Controller``."""

    def _stop(
        self,
        lives: list[LiveRun],
        final: RunState,
        *,
        reason: str,
        decided_from: float | None = None,
        experiment: ExperimentRecord | None = None,
    ) -> None:
        lives = [r for r in lives if r.handle is not None and r.stopping is None]
        if not lives:
            if experiment is not None and decided_from is not None:
                experiment.decision_latency_s = max(0.0, time.time() - decided_from)
            return
        handles = [r.handle for r in lives if r.handle is not None]
        grace = self.plan.grace_s

        def work() -> Any:
            reports = self.launcher.stop(handles, grace)
            if experiment is not None and decided_from is not None:
                experiment.decision_latency_s = max(0.0, time.time() - decided_from)
            return reports

        future = self._stopper.submit(work)
        for r in lives:
            r.stopping = future
            r.stop_state = final
            r.record.stop_reason = reason
            self.event(f"{r.record.key}: stopping ({reason})")
        future.add_done_callback(lambda _f: self.wake.set())

    def _finish_stop(self, live: LiveRun) -> None:
        future, live.stopping = live.stopping, None
        assert future is not None
        try:
            reports = future.result()
        except Exception as e:  # a bug in stopping must not kill the race
            self.event(f"{live.record.key}: stop failed: {e!r}")
            reports = []
        survivors = [pid for rep in reports for pid in rep.survivors]
        if survivors:
            self.event(f"{live.record.key}: processes {survivors} survived SIGKILL")
        self._ingest_final(live)
        final = live.stop_state or RunState.stopped
        live.stop_state = None
        rec = live.record
        if live.handle is not None:
            rec.exit_code = live.handle.poll()
        self._release(live, self.clock())
        if final == RunState.pending:  # stalled and restarted: counts as a retry
            if rec.attempt <= self.plan.max_retries:
                rec.transition(RunState.pending, why=rec.stop_reason or "")
                rec.resume = True
                rec.retry_at = self.clock() + self.plan.retry_backoff_s
            else:
                rec.transition(RunState.failed, why="stalled, out of retries")
                rec.error = "stalled"
        else:
            rec.transition(final, why=rec.stop_reason or "")
        self.event(f"{rec.key}: {rec.state.value}")
        self._dirty = True

    def _ingest_final(self, live: LiveRun) -> None:
        for record in self._read_source(live):
            self._accept(live, record, decide=False)

    def _release(self, live: LiveRun, now: float) -> None:
        rec = live.record
        if live.handle is not None:
            rec.cpu_s += live.handle.cpu_seconds()
            if live.slot is not None and live.slot.gpu is not None:
                self.slot_holds.hold(live.slot, live.handle.pids(), live)
        provenance.end_attempt(live, now, live.handle.poll() if live.handle else None)
        if rec.started_at is not None:
            rec.busy_s += max(0.0, now - rec.started_at)
        rec.ended_at = now
        rec.pid = None
        rec.create_time = None
        if live.handle is not None and live.handle.poll() is None:
            self._retired.append(live.handle)  # keep polling it until it is reaped
        live.handle = None
        live.slot = None
        worktrees.unlock_worktree(self.plan.repo, self._worktree(live))

    def _check_slot_holds(self) -> None:
        for index, live, outcome in self.slot_holds.finished():
            if isinstance(outcome, BaseException):  # NVML misbehaving must not kill the race
                self.event(f"{live.record.key}: GPU memory check failed: {outcome!r}")
                continue
            held, waited = outcome
            slot = self.slots[index]
            if held:
                live.record.gpu_release = (
                    f"NOT released after {waited:.0f}s (pids {held}); slot handed over anyway"
                )
                self.event(f"{live.record.key}: GPU {slot.gpu} memory still held by pids {held} "
                           f"after {waited:.0f}s; handing {slot.label()} over anyway")
            else:
                live.record.gpu_release = f"released in {waited:.1f}s"
            self._dirty = True

    # -- scheduling and launching -----------------------------------------------------------

    def _schedule(self, now: float) -> None:
        self._check_slot_holds()
        busy = {r.slot.index for r in self.runs.values() if r.slot is not None}
        busy |= self.slot_holds.held()
        free = [s for s in self.slots if s.index not in busy]
        if not free or self.interrupted:
            return
        order = {id(w): i for i, (_, w) in enumerate(self.plan.workers())}
        waiting = sorted(
            (
                r for r in self.runs.values()
                if r.record.state == RunState.pending
                and self._selected(r)
                and self._may_start(r)
                and (r.record.retry_at or 0) <= now
            ),
            # controls first: they must be evaluated wherever the race is decided
            key=lambda r: (not r.worker.control, r.worker.priority, order[id(r.worker)]),
        )
        free_iter = iter(free)
        for live in waiting:
            if live.record.state != RunState.pending:
                continue  # cancelled: its race was decided while we were launching
            if not self._may_start(live):
                continue
            slot = next(free_iter, None)
            if slot is None:
                break
            self._start(live, slot)
            # Launching many runs takes a while: decide on records written meanwhile, so a
            # worker that passes early is not kept waiting behind the launch queue.
            self._ingest([r for r in self.runs.values() if r.handle is not None])

    def _may_start(self, live: LiveRun) -> bool:
        """Its race is undecided, or it is a control the decision waits for."""
        erec = self.state.experiments[live.experiment.name]
        return erec.status == ExperimentStatus.running or live.worker.name in erec.awaiting_controls

    def _start(self, live: LiveRun, slot: Slot) -> None:
        rec = live.record
        rec.transition(RunState.preparing, why="slot free")
        live.slot = slot
        rec.slot = slot.label()
        try:
            wt = self._worktree(live)
            worktrees.ensure_worktree(
                self.plan.repo, wt, live.worker.branch, self.plan.base_ref,
                fresh=self.fresh and rec.attempt == 0,
            )
            rec.attempt += 1
            rec.run_id = f"{rec.experiment}/{rec.worker}/{rec.attempt}/{uuid.uuid4().hex[:8]}"
            values = self._placeholders(live.experiment, live, worktree=wt)
            argv = expand(live.worker.command, values, shell=live.worker.shell)
            env = self._env(live, slot, wt, values)
            provenance.begin_attempt(self.plan, live, wt, argv, slot.label())
            spec = LaunchSpec(
                key=rec.key, argv=argv, cwd=wt, env=env, paths=live.paths, run_id=rec.run_id,
                attempt=rec.attempt, slot=slot,
                header=f"==== attempt {rec.attempt} {time.strftime('%Y-%m-%d %H:%M:%S')} "
                f"slot {slot.label()} resume={int(rec.resume)}: {' '.join(argv)}",
            )
            worktrees.lock_worktree(self.plan.repo, wt, f"orchestrator run {rec.run_id}")
            # The attempt number and run id reach the state file before anything is launched: a
            # controller killed right after the launch leaves a "preparing" run whose attempt
            # the next controller finds by its tag (``_stop_strays``) and counts.
            self._save_state()
            live.history.begin_attempt()
            live.source.begin_attempt(time.time())  # files are stamped by the real clock
            live.handle = self.launcher.start(spec)
        except (WorktreeError, LaunchError) as e:
            live.slot = None
            rec.slot = None
            rec.transition(RunState.failed, why="cannot start")
            rec.error = str(e)
            self.event(f"{rec.key}: FAILED to start: {e}")
            self._dirty = True
            return
        rec.transition(RunState.running, why="launched")
        rec.stop_reason = None  # an earlier attempt's stop is over
        rec.pid = live.handle.pid
        rec.create_time = live.handle.create_time
        rec.started_at = self.clock()
        rec.retry_at = None
        rec.stalled = False
        rec.error = None
        self.event(
            f"{rec.key}: started attempt {rec.attempt} on {slot.label()} ({live.handle.where()}"
            f"{', resuming' if rec.resume else ''})"
        )
        self._watch(live)
        self._dirty = True
        self._save_state()  # pid + create time on disk before anything else: re-attach needs them

    def _worktree(self, live: LiveRun) -> Path:
        return self.plan.worktree_path(live.worker, live.experiment)

    def _placeholders(
        self, exp: ExperimentConfig, live: LiveRun | None, worktree: Path | None = None
    ) -> dict[str, str]:
        if live is None:
            return placeholder_values(self.plan, exp)
        return placeholder_values(
            self.plan, exp, live.worker, live.paths,
            worktree or self._worktree(live), live.record.attempt,
        )

    def _env(self, live: LiveRun, slot: Slot, wt: Path, values: dict[str, str]) -> dict[str, str]:
        rec = live.record
        return worker_env(
            live.experiment, live.worker, live.paths, wt, rec.attempt,
            resume=rec.resume, cuda_visible_devices=slot.cuda_visible_devices, values=values,
        )

