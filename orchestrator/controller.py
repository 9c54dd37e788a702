"""The controller loop: schedule runs onto slots, watch their metrics, decide races, stop losers.

One thread owns all state. File events (watchdog) only wake the loop early; polling every
``poll_interval_s`` is the fallback. Stops run on worker threads so that a slow stop of one
experiment's losers never delays another experiment's decision; a slot is free again only once
every process of the stopped run is gone. State is saved atomically after every change.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import worktrees
from .config import ExperimentConfig, Plan, expand
from .criteria import all_pass
from .dashboard import Dashboard
from .environment import placeholder_values, worker_env
from .errors import LaunchError, WorktreeError
from .file_events import FileWatcher
from .gpus import Slot, SlotHolds, make_slots
from .hooks import HookRunner, last_line, run_setup, tail_lines
from .launchers import Launcher, LaunchSpec, LocalLauncher, RunHandle
from .lock import ControllerLock
from .metrics import write_order_keys
from .paths import ResultsPaths
from .processes import find_strays, reap_orphans, stop_processes
from .runs import LiveRun, live_runs
from .state import (
    ExperimentRecord,
    ExperimentStatus,
    PlanState,
    RunState,
    append_event,
    controller_identity,
)

STDERR_TAIL_LINES = 20


class Controller:
    """Runs a plan to a decision.

    Args:
        plan: the validated plan.
        only: run only these worker names (others stay as they are).
        fresh: discard earlier state and run directories, recreate worktrees.
        launcher: executor (default: local processes).
        ui: optional callback(controller) called after each tick (the CLI's live table).
        subreaper: adopt orphaned descendants and reap them (the CLI's own process only).
        clock: time source (tests may fake it).
    """

    def __init__(
        self,
        plan: Plan,
        *,
        only: list[str] | None = None,
        fresh: bool = False,
        launcher: Launcher | None = None,
        ui: Callable[[Controller], None] | None = None,
        subreaper: bool = False,
        clock: Callable[[], float] = time.time,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.plan = plan
        self.only = set(only) if only else None
        self.fresh = fresh
        self.launcher = launcher or _default_launcher(plan)
        self.ui = ui
        self.subreaper = subreaper
        self.clock = clock
        self.echo = echo or (lambda line: None)
        self.paths = ResultsPaths(plan.results_dir)
        self.slots = make_slots(
            # With Ray, Ray assigns GPUs on its nodes: the controller only caps concurrency.
            "none" if plan.executor == "ray" else plan.gpus,
            workers_per_gpu=plan.workers_per_gpu,
            max_parallel=plan.max_parallel,
            cpu_slots=sum(len(e.workers) for e in plan.experiments),
        )
        self.state = PlanState(plan=str(plan.source))
        self.runs: dict[str, LiveRun] = {}
        self.events: deque[str] = deque(maxlen=30)
        self.hooks = HookRunner()
        self.wake = threading.Event()
        self.interrupted: str | None = None  # "interrupted" once Ctrl-C/SIGTERM arrived
        self.detach = False
        self._dirty = True
        self._dashboard_failed = False
        self._replay: dict[str, list[dict[str, Any]]] = {}
        self._retired: list[RunHandle] = []  # released handles whose process is not reaped yet
        self._stopper = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stop")
        # GPU slots whose last run's memory is not yet confirmed released.
        self.slot_holds = SlotHolds(self.wake, timeout_s=30.0)
        self._lock = ControllerLock(self.paths.lock)
        self._files = FileWatcher(self.wake)
        self.dashboard = Dashboard(plan, self.paths)

    # -- setup ------------------------------------------------------------------------------

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
        self.runs = live_runs(self.plan, self.state, self.paths)
        for key, live in self.runs.items():
            self._replay[key] = self._read_source(live)  # history already on disk (resume)
        for exp in self.plan.experiments:
            if exp.name not in self.state.experiments:
                self.state.experiments[exp.name] = ExperimentRecord(exp.name)
            erec = self.state.experiments[exp.name]
            if erec.started_at is None:
                erec.started_at = self.clock()

    def _discard_results(self) -> None:
        for exp, worker in self.plan.workers():
            run_dir = self.paths.run(exp.name, worker.name).run_dir
            if run_dir.exists():
                shutil.rmtree(run_dir)
            viz = self.paths.success_viz_dir(exp.name)
            if viz.exists():
                shutil.rmtree(viz)
        self.paths.state.unlink(missing_ok=True)
        self.paths.events.unlink(missing_ok=True)

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
        from .launchers import read_exit_status

        return read_exit_status(live.paths.exit_status(live.record.attempt))

    def _slot_by_label(self, label: str | None) -> Slot | None:
        return next((s for s in self.slots if s.label() == label), None)

    def _selected(self, live: LiveRun) -> bool:
        return self.only is None or live.worker.name in self.only

    def _run_setups(self) -> None:
        for exp in self.plan.experiments:
            erec = self.state.experiments[exp.name]
            if exp.setup is None or erec.status != ExperimentStatus.running:
                continue
            if not any(self._selected(r) for r in self.runs.values() if r.experiment is exp):
                continue
            argv = expand(exp.setup, self._placeholders(exp, None))
            self.event(f"{exp.name}: setup: {' '.join(argv)}")
            self._flush(force=True)
            run_setup(
                exp.name, argv, cwd=self.plan.repo,
                log=self.paths.experiment_dir(exp.name) / "setup.log",
            )
            erec.setup_done = True

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run the plan until every experiment is decided (or Ctrl-C).

        Returns:
            0 when every experiment has a winner, 1 when one failed, 130 when interrupted.

        Raises:
            OrchestratorError: the plan cannot start (locked, bad worktree, setup failed).
        """
        self._lock.acquire()
        try:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            self._load_state()
            self._resume_runs()
            self._flush(force=True)
            self._run_setups()
            self._start_watching()
            while not self._finished():
                if self.interrupted:
                    break
                self.tick()
                self.wake.wait(self.plan.poll_interval_s)
                self.wake.clear()
            return self._shutdown()
        finally:
            self._files.stop()
            self._stopper.shutdown(wait=True)
            self.slot_holds.close()
            self.dashboard.close()
            self.launcher.close()
            self._lock.release()

    def request_interrupt(self, reason: str = "interrupted", *, detach: bool = False) -> None:
        """Ask the loop to stop; ``detach`` leaves workers running. From code on any thread
        (signal handlers set ``interrupted`` and ``detach`` themselves: see
        cli.install_signal_handlers)."""
        self.interrupted = reason
        self.detach = detach
        self.wake.set()

    def tick(self) -> None:
        """One pass: control requests, exits, metrics (in write order), decisions, stalls,
        scheduling."""
        now = self.clock()
        self._read_control()
        if self.subreaper:
            reap_orphans({})
        self._retired = [h for h in self._retired if h.poll() is None]
        exits: dict[str, int] = {}
        for live in list(self.runs.values()):
            if live.stopping is not None:
                if live.stopping.done():
                    self._finish_stop(live)
                continue
            if live.handle is None:
                continue
            live.handle.refresh()
            code = live.handle.poll()  # polled before reading: the read sees its last records
            if code is not None:
                exits[live.record.key] = code
        self._ingest([r for r in self.runs.values() if r.handle is not None])
        for key, code in exits.items():
            live = self.runs[key]
            if live.stopping is None and live.handle is not None:
                self._handle_exit(live, code)
        for live in self.runs.values():
            if live.handle is not None and live.stopping is None:
                self._check_stall(live, now)
        self._check_hooks()
        self._check_slot_holds()
        self._decide_failures()
        self._schedule(now)
        if self.ui:
            self.ui(self)
        self._flush()

    def _finished(self) -> bool:
        if self.hooks.running or any(r.stopping is not None for r in self.runs.values()):
            return False
        for r in self.runs.values():
            if not self._selected(r):
                continue
            if self.state.experiments[r.experiment.name].status != ExperimentStatus.running:
                continue
            if not r.record.state.terminal:
                return False
        return True

    def _selected_experiments(self) -> list[ExperimentRecord]:
        names = {r.experiment.name for r in self.runs.values() if self._selected(r)}
        return [self.state.experiments[n] for n in names]

    def _shutdown(self) -> int:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.state.controller["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
        self.state.controller["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
        if self.interrupted:
            active = [r for r in self.runs.values() if r.record.state.active and r.handle]
            if self.detach:
                self.event(f"detached: {len(active)} runs keep running; `run` re-attaches")
            else:
                self.event(f"{self.interrupted}: stopping {len(active)} runs")
                self._stop(active, RunState.stopped, reason=self.interrupted)
                self._wait_for_stops()
            self._flush(force=True)
            return 130
        self._wait_for_stops()
        self._reap_retired()
        self.state.finished = True
        self._flush(force=True)
        selected = self._selected_experiments()
        return 0 if all(e.status == ExperimentStatus.succeeded for e in selected) else 1

    def _reap_retired(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self._retired and time.monotonic() < deadline:
            self._retired = [h for h in self._retired if h.poll() is None]
            if self._retired:
                time.sleep(0.02)

    def _wait_for_stops(self) -> None:
        for live in self.runs.values():
            if live.stopping is not None:
                live.stopping.result()
                self._finish_stop(live)

    # -- metrics and decisions --------------------------------------------------------------

    def _ingest(self, lives: list[LiveRun]) -> None:
        """Read new records of these runs and act on them in the order they were written, so
        that of two records passing in the same tick the earlier one wins."""
        batch = []
        for n, live in enumerate(lives):
            new = self._read_source(live)
            batch += [(t, n, i, live, r) for i, (t, r) in enumerate(write_order_keys(new))]
        for _, _, _, live, record in sorted(batch, key=lambda b: b[:3]):
            self._accept(live, record, decide=live.stopping is None and live.handle is not None)

    def _read_source(self, live: LiveRun) -> list[dict[str, Any]]:
        """New records of one run (see LiveRun.read_new: never raises)."""
        before = live.record.metric_problems
        new, events = live.read_new(self.clock())
        for text in events:
            self.event(text)
        if live.record.metric_problems != before:
            self._dirty = True
        return new

    def _accept(self, live: LiveRun, record: dict[str, Any], *, decide: bool) -> None:
        """Add one record to a run's history; if ``decide``, check criteria and max_epochs."""
        rec = live.record
        live.history.add([record])
        rec.records += 1
        rec.last_record_at = self.clock()
        rec.stalled = False
        if "epoch" in record:
            rec.epoch = record["epoch"]
        rec.last_metrics = {k: v for k, v in record.items() if k != "time_s"}
        self._dirty = True
        if not decide:
            return
        if self._passes(live, record):
            self._declare_winner(live, record)
        elif rec.epoch is not None and rec.epoch >= live.max_epochs and live.handle is not None:
            self.event(f"{rec.key}: reached max_epochs {live.max_epochs}")
            self._stop([live], self._ended_state(live), reason="max_epochs")

    def _passes(self, live: LiveRun, record: dict[str, Any]) -> bool:
        if self.state.experiments[live.experiment.name].status != ExperimentStatus.running:
            return False
        epoch = record.get("epoch", record.get("step"))
        every = live.experiment.check_every
        if every > 1 and (epoch is None or epoch % every != 0):
            return False
        return all_pass(live.criteria, record)

    def _declare_winner(self, live: LiveRun, record: dict[str, Any]) -> None:
        exp = live.experiment
        erec = self.state.experiments[exp.name]
        erec.status = ExperimentStatus.succeeded
        erec.winner = live.worker.name
        erec.winner_epoch = record.get("epoch", record.get("step"))
        erec.winner_metrics = {k: v for k, v in record.items() if k != "time_s"}
        erec.decided_at = self.clock()
        self.event(
            f"{exp.name}: {live.worker.name} WINS at epoch {erec.winner_epoch} "
            f"({', '.join(c.source for c in live.criteria)})"
        )
        if exp.stop_losers:
            self._stop_losers(live, erec, record.get("time_s"))
            # The winner is done too: SIGTERM lets it write its final checkpoint.
            self._stop([live], RunState.succeeded, reason="won")
        if live.handle is None and not live.record.state.terminal:
            live.record.transition(RunState.succeeded, why="passed while no controller ran")
        self._start_hook(live)
        self._dirty = True
        self._flush(force=True)
        self.dashboard.push_now()

    def _stop_losers(self, live: LiveRun, erec: ExperimentRecord, written_at: float | None) -> None:
        losers = [
            r for r in self.runs.values()
            if r.experiment is live.experiment and r is not live and r.stopping is None
        ]
        for r in losers:
            if r.record.state == RunState.pending or (
                r.record.state == RunState.preparing and r.handle is None
            ):
                r.record.transition(RunState.cancelled, why="race decided")
                self.event(f"{r.record.key}: cancelled (race decided)")
        running = [r for r in losers if r.record.state.active and r.handle is not None]
        self._stop(running, RunState.stopped, reason=f"lost to {live.worker.name}",
                   decided_from=written_at, experiment=erec)

    def _decide_failures(self) -> None:
        for exp in self.plan.experiments:
            erec = self.state.experiments[exp.name]
            if erec.status != ExperimentStatus.running:
                continue
            runs = [r for r in self.runs.values() if r.experiment is exp]
            if all(r.record.state.terminal and r.stopping is None for r in runs):
                if any(r.record.stop_reason in ("interrupted", "user") for r in runs):
                    continue  # stopped by hand: resumable, not a failure
                erec.status = ExperimentStatus.failed
                erec.decided_at = self.clock()
                best = self.dashboard.best_run(exp, {k: r.history for k, r in self.runs.items()})
                what = f"; best {best}" if best else ""
                self.event(f"{exp.name}: FAILED, no worker met the criteria{what}")
                self._start_hook(None, exp=exp)
                self._dirty = True

    # -- exits, crashes, stalls -------------------------------------------------------------

    def _handle_exit(self, live: LiveRun, code: int) -> None:
        rec = live.record
        if live.handle is not None:
            self._cleanup_leftovers(live)
            # What the attempt's processes wrote until they were gone counts, and may decide
            # (a trainer whose launch wrapper was killed goes on until the cleanup stops it).
            for record in self._read_source(live):
                self._accept(live, record, decide=live.stopping is None)
            if live.stopping is not None:
                return  # those records won the race or reached max_epochs: the stop settles it
        now = self.clock()
        self._release(live, now)
        rec.exit_code = code
        rec.stderr_tail = tail_lines(live.paths.stderr, STDERR_TAIL_LINES)
        if code == 0:
            rec.transition(self._ended_state(live), why="exited 0")
            self.event(f"{rec.key}: exited 0 at epoch {rec.epoch} ({rec.state.value})")
        elif rec.attempt <= self.plan.max_retries:
            delay = self.plan.retry_backoff_s * (2 ** (rec.attempt - 1))
            rec.transition(RunState.pending, why="crashed, will retry")
            rec.retry_at = now + delay
            rec.resume = True
            rec.error = last_line(rec.stderr_tail) or f"exit {code}"
            self.event(
                f"{rec.key}: crashed (exit {code}) on attempt {rec.attempt}; "
                f"retrying with resume in {delay:.0f}s"
            )
        else:
            rec.transition(RunState.failed, why="out of retries")
            rec.error = last_line(rec.stderr_tail) or f"exit {code}"
            self.event(f"{rec.key}: FAILED (exit {code}) after {rec.attempt} attempts: {rec.error}")
        self._dirty = True

    def _cleanup_leftovers(self, live: LiveRun) -> None:
        """The attempt's leader exited: stop what outlived it (DataLoader workers, setsid
        helpers, the trainer itself when only the launch wrapper was killed) before its slot is
        reused or it is retried. Blocks this tick for at most ~1 s plus SIGKILL time, and only
        when something was left."""
        assert live.handle is not None
        try:
            report = self.launcher.cleanup(live.handle, self.plan.grace_s)
        except Exception as e:  # a bug here must not kill the race
            self.event(f"{live.record.key}: cleanup after exit failed: {e!r}")
            return
        if report is None:
            return
        self.event(f"{live.record.key}: stopped processes left behind by the exited attempt "
                   f"({report.killed} needed SIGKILL)")
        if report.survivors:
            self.event(f"{live.record.key}: processes {report.survivors} survived SIGKILL")

    def _ended_state(self, live: LiveRun) -> RunState:
        """A run that finished on its own: the winner (stop_losers: false) or exhausted."""
        erec = self.state.experiments[live.experiment.name]
        return RunState.succeeded if erec.winner == live.worker.name else RunState.exhausted

    def _check_stall(self, live: LiveRun, now: float) -> None:
        timeout = self.plan.stall_timeout_s
        rec = live.record
        if timeout is None or rec.started_at is None:
            return
        since = max(rec.last_record_at or 0.0, rec.started_at)
        if now - since < timeout:
            return
        if not rec.stalled:
            rec.stalled = True
            self.event(f"{rec.key}: STALLED, no metric for {now - since:.0f}s")
            self._dirty = True
        if self.plan.stall_action.value == "restart":
            self._stop([live], RunState.pending, reason="stalled")

    # -- stopping ---------------------------------------------------------------------------

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
                and self.state.experiments[r.experiment.name].status == ExperimentStatus.running
                and (r.record.retry_at or 0) <= now
            ),
            key=lambda r: (r.worker.priority, order[id(r.worker)]),
        )
        free_iter = iter(free)
        for live in waiting:
            if live.record.state != RunState.pending:
                continue  # cancelled: its race was decided while we were launching
            if self.state.experiments[live.experiment.name].status != ExperimentStatus.running:
                continue
            slot = next(free_iter, None)
            if slot is None:
                break
            self._start(live, slot)
            # Launching many runs takes a while: decide on records written meanwhile, so a
            # worker that passes early is not kept waiting behind the launch queue.
            self._ingest([r for r in self.runs.values() if r.handle is not None])

    def _start(self, live: LiveRun, slot: Slot) -> None:
        rec = live.record
        rec.transition(RunState.preparing, why="slot free")
        live.slot = slot
        rec.slot = slot.label()
        self._save_state()
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

    # -- on_success / failure hooks ---------------------------------------------------------

    def _start_hook(self, live: LiveRun | None, *, exp: ExperimentConfig | None = None) -> None:
        exp = exp or (live.experiment if live else None)
        assert exp is not None
        if exp.on_success is None:
            return
        if live is None:  # a failed race: the hook gets the best worker's run instead
            histories = {k: r.history for k, r in self.runs.items()}
            best = self.dashboard.best_worker(exp, histories)
            live = self.runs.get(f"{exp.name}/{best}") if best else None
            if live is None:
                return
        argv = expand(exp.on_success, self._placeholders(exp, live))
        log = self.paths.experiment_dir(exp.name) / "on_success.log"
        try:
            self.hooks.start(exp.name, argv, cwd=self.plan.repo, log=log)
        except OSError as e:
            self.event(f"{exp.name}: on_success hook cannot start: {e}")
            return
        self.state.experiments[exp.name].hook = "running"
        self.event(f"{exp.name}: on_success hook started: {' '.join(argv)}")

    def _check_hooks(self) -> None:
        for name, rc in self.hooks.finished():
            self.state.experiments[name].hook = "ok" if rc == 0 else f"exit {rc}"
            self.event(f"{name}: on_success hook finished ({'ok' if rc == 0 else f'exit {rc}'})")
            self._dirty = True
            self.dashboard.push_now()

    # -- control requests from other shells -------------------------------------------------

    def _read_control(self) -> None:
        path = self.paths.stop_request
        if not path.exists():
            return
        try:
            import json

            request = json.loads(path.read_text())
        except (OSError, ValueError):
            request = {}
        path.unlink(missing_ok=True)
        names = request.get("workers") or None
        if not names:
            self.event("stop requested from another shell: stopping the whole plan")
            self.request_interrupt("user")
            return
        targets = [r for r in self.runs.values() if r.worker.name in names]
        for r in targets:
            if r.record.state == RunState.pending:
                r.record.transition(RunState.stopped, why="user")
                r.record.stop_reason = "user"
        self._stop([r for r in targets if r.handle], RunState.stopped, reason="user")
        self.event(f"stop requested from another shell: {', '.join(names)}")

    # -- file events, state and dashboard ---------------------------------------------------

    def _start_watching(self) -> None:
        self._files.start()
        self._files.watch(self.paths.control_dir)
        for live in self.runs.values():
            if live.handle is not None:
                self._watch(live)

    def _watch(self, live: LiveRun) -> None:
        for folder in live.source.watch_paths():
            self._files.watch(folder)

    def event(self, text: str) -> None:
        """Record an event: recent-events list, events.jsonl and the terminal."""
        stamp = time.strftime("%H:%M:%S", time.localtime(self.clock()))
        self.events.append(f"{stamp} {text}")
        self.echo(f"[{stamp}] {text}")
        try:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            append_event(self.paths.events, {"time_s": self.clock(), "event": text})
        except OSError:
            pass

    def _save_state(self) -> None:
        try:
            self.state.save(self.paths.state)
        except OSError as e:
            self.dashboard.report_write_error("state", e)

    def _flush(self, force: bool = False) -> None:
        if self._dirty or force:
            self._dirty = False
            self._save_state()
        try:
            self.dashboard.maybe_refresh(self, force=force)
        except OSError as e:
            self.dashboard.report_write_error("dashboard", e)
        except Exception as e:  # a rendering bug must not end the race: report it, go on
            if not self._dashboard_failed:
                self._dashboard_failed = True
                self.event(f"dashboard cannot be rendered: {e!r}")


def _default_launcher(plan: Plan) -> Launcher:
    if plan.executor == "ray":
        from .ray_executor import RayLauncher  # imports ray only when the plan asks for it

        return RayLauncher(plan)
    return LocalLauncher()
