"""The controller loop: schedule runs onto slots, watch their metrics, decide races, stop losers.

One thread owns all state. File events (watchdog) only wake the loop early; polling every
``poll_interval_s`` is the fallback. Stops run on worker threads so that a slow stop of one
experiment's losers never delays another experiment's decision; a slot is free again only once
every process of the stopped run is gone. State is saved atomically after every change.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from orchestrator.core.config import ExperimentConfig, Plan, expand
from orchestrator.core.controls import ControlsMixin
from orchestrator.core.criteria import all_pass
from orchestrator.core.file_events import FileWatcher
from orchestrator.core.hooks import HookRunner, last_line, run_setup, tail_lines
from orchestrator.core.lock import ControllerLock
from orchestrator.core.pinning import Pinner
from orchestrator.core.pruner import PruningMixin
from orchestrator.core.ranking import best_summary, best_worker
from orchestrator.core.resume import ResumeMixin
from orchestrator.core.runs import LiveRun
from orchestrator.core.scheduling import SchedulingMixin
from orchestrator.core.snapshot import RaceSnapshot, RaceView, Views
from orchestrator.core.state import (
    ExperimentRecord,
    ExperimentStatus,
    PlanState,
    RunState,
    append_event,
)
from orchestrator.errors import WriteErrors
from orchestrator.paths import ResultsPaths
from orchestrator.running.gpus import SlotHolds, make_slots
from orchestrator.running.launchers import Launcher, LocalLauncher, RunHandle
from orchestrator.running.processes import reap_orphans
from orchestrator.sources.metrics import write_order_keys

STDERR_TAIL_LINES = 20
# After a decision the views (dashboard, live table, sync push) wait for the losers' stops, at
# most this long (seconds): a worker that checkpoints for a minute must not hide the verdict.
VIEWS_AFTER_DECISION_S = 1.0
# A run's progress (new records) reaches state.json at most this often (seconds); transitions
# (launch, exit, decision, stop) are written at once.
STATE_PROGRESS_INTERVAL_S = 0.5


class Controller(ResumeMixin, SchedulingMixin, ControlsMixin, PruningMixin):
    """Runs a plan to a decision.

    Args:
        plan: the validated plan.
        only: run only these worker names (others stay as they are).
        fresh: discard earlier state and run directories, recreate worktrees.
        launcher: executor (default: local processes; ``orchestrator.session`` picks Ray).
        views: what renders the race (dashboard, live table, race report); see
            ``orchestrator.session.build_controller``, which wires the usual ones.
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
        views: list[RaceView] | None = None,
        subreaper: bool = False,
        clock: Callable[[], float] = time.time,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.plan = plan
        self.only = set(only) if only else None
        self.fresh = fresh
        self.launcher = launcher or LocalLauncher()
        self.write_errors = WriteErrors(clock)
        self.views = Views(views or [], self.write_errors, self.event)
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
        self.pins = Pinner(self.wake)  # the winner's checkpoint and tag (issue #15)
        self.interrupted: str | None = None  # "interrupted" once Ctrl-C/SIGTERM arrived
        self.detach = False
        self._dirty = True
        self._progress_dirty = False
        self._next_progress_save = 0.0
        self._views_due_at: float | None = None  # see _declare_winner
        self._replay: dict[str, list[dict[str, Any]]] = {}
        self._retired: list[RunHandle] = []  # released handles whose process is not reaped yet
        self._stopper = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stop")
        # GPU slots whose last run's memory is not yet confirmed released.
        self.slot_holds = SlotHolds(self.wake, timeout_s=30.0)
        self._lock = ControllerLock(self.paths.lock)
        self._files = FileWatcher(self.wake)

    # -- setup ------------------------------------------------------------------------------

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
                if self._finished():
                    break  # at once: not after the next wake-up
                wait_s = self.plan.poll_interval_s
                if self._views_due_at is not None:  # wake for a decision's held views
                    wait_s = min(wait_s, max(0.0, self._views_due_at - self.clock()))
                if self._progress_dirty:  # and for progress not yet saved
                    wait_s = min(wait_s, max(0.0, self._next_progress_save - time.monotonic()))
                self.wake.wait(wait_s)
                self.wake.clear()
            return self._shutdown()
        finally:
            self._files.stop()
            self._stopper.shutdown(wait=True)
            self.slot_holds.close()
            self.views.close()
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
                self._check_time_budget(live, now)
        self._settle_controls()
        self._check_hooks()
        self._check_slot_holds()
        self._decide_failures()
        self._schedule(now)
        self._flush()

    def _finished(self) -> bool:
        if self.hooks.running or self.pins.running or any(
            r.stopping is not None for r in self.runs.values()
        ):
            return False
        for r in self.runs.values():
            if not self._selected(r):
                continue
            erec = self.state.experiments[r.experiment.name]
            awaited = r.worker.name in erec.awaiting_controls
            if erec.status != ExperimentStatus.running and not awaited and (
                r.experiment.stop_losers or not r.record.state.active
            ):
                continue  # decided (with stop_losers: false its live runs train on to the end)
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
        """Merge one record into a run's history; if ``decide``, check the criteria (on the
        merged record of that point) and the budget."""
        rec = live.record
        merged = live.history.add([record])[0]
        rec.records += 1
        rec.last_record_at = self.clock()
        rec.stalled = False
        last = live.history.last or merged
        rec.epoch = last.get("epoch", rec.epoch)
        rec.step = last.get("step", rec.step)
        rec.last_metrics = {k: v for k, v in last.items() if k != "time_s"}
        self._progress_dirty = True  # saved within STATE_PROGRESS_INTERVAL_S (see _flush)
        at = self._check_point(live, merged)
        if at is not None:
            self._note_unreported(live, merged)
        if live.worker.control:
            self._control_record(live, merged, at)
        if not decide:
            return
        if at is not None and self._racing(live) and not live.worker.control and all_pass(
            live.criteria, merged
        ):
            self._declare_winner(live, merged)
            return
        progress = rec.progress
        if progress is not None and progress >= live.budget and live.handle is not None:
            self.event(f"{rec.key}: reached max_{rec.unit}s {live.budget:,}")
            self._stop([live], self._ended_state(live), reason=f"max_{rec.unit}s")
            return
        self._maybe_prune(live, merged)

    def _check_point(self, live: LiveRun, record: dict[str, Any]) -> int | None:
        """The record's epoch or step (in the experiment's unit) if it is a check point."""
        unit = live.experiment.unit
        x = record.get(unit, record.get("step" if unit == "epoch" else "epoch"))
        if not isinstance(x, int) or x <= 0:
            return None  # epoch/step 0 (an untrained evaluation) is never a check point
        every = live.experiment.check_every
        return x if every <= 1 or x % every == 0 else None

    def _racing(self, live: LiveRun) -> bool:
        return self.state.experiments[live.experiment.name].status == ExperimentStatus.running

    def _note_unreported(self, live: LiveRun, record: dict[str, Any]) -> None:
        """Flag, once, a criterion metric the run never reported at two check points where it
        reported other values (a name that does not match what its logger writes)."""
        reported = live.history.reported_names() - {"epoch", "step", "time_s", "attempt"}
        if not reported:
            return
        for name in sorted({n for c in live.criteria for n in c.names} - reported):
            live.unreported_checks[name] = live.unreported_checks.get(name, 0) + 1
            if live.unreported_checks[name] == 2 and name not in live.record.unreported:
                live.record.unreported.append(name)
                self.event(
                    f"{live.record.key}: `{name}` never reported by {live.worker.name}; it "
                    f"reports: {', '.join(sorted(reported)[:12])} (quote names with '/' or '.' "
                    "in backquotes, or map them with metrics.rename)"
                )

    def _check_time_budget(self, live: LiveRun, now: float) -> None:
        rec = live.record
        limit = rec.max_time_s
        if limit is None or rec.started_at is None or live.handle is None:
            return
        if now - rec.started_at >= limit:
            self.event(f"{rec.key}: reached max_time_s {limit:g} (this attempt)")
            self._stop([live], self._ended_state(live), reason="max_time_s")

    def _declare_winner(self, live: LiveRun, record: dict[str, Any]) -> None:
        exp = live.experiment
        erec = self.state.experiments[exp.name]
        erec.status = ExperimentStatus.succeeded
        erec.winner = live.worker.name
        erec.unit = exp.unit
        erec.winner_epoch = record.get(exp.unit, record.get("epoch", record.get("step")))
        erec.winner_metrics = {k: v for k, v in record.items() if k != "time_s"}
        erec.decided_at = self.clock()
        self.event(
            f"{exp.name}: {live.worker.name} WINS at {exp.unit} {erec.winner_epoch} "
            f"({', '.join(c.source for c in live.criteria)})"
        )
        self._controls_at_decision(live, erec)
        if exp.stop_losers:
            self._stop_losers(live, erec, record.get("time_s"))
            # The winner is done too: SIGTERM lets it write its final checkpoint.
            self._stop([live], RunState.succeeded, reason="won")
        if live.handle is None and not live.record.state.terminal:
            live.record.transition(RunState.succeeded, why="passed while no controller ran")
        exp_runs = [r for r in self.runs.values() if r.experiment is exp]
        self.pins.start(  # off the decision path, once the losers' stops are done
            self.plan, self.state, live, record,
            after=lambda: all(r.stopping is None or r is live for r in exp_runs),
        )
        self._start_hook(live)
        self._dirty = True
        self._flush(force=True, views=False)  # the decision is on disk now
        # The views render once the stops are done (or after VIEWS_AFTER_DECISION_S): drawing
        # the dashboard now would compete for the CPU with the losers' checkpoints and exits.
        self._views_due_at = self.clock() + VIEWS_AFTER_DECISION_S

    def _stop_losers(self, live: LiveRun, erec: ExperimentRecord, written_at: float | None) -> None:
        losers = [
            r for r in self.runs.values()
            if r.experiment is live.experiment and r is not live and r.stopping is None
            and r.worker.name not in erec.awaiting_controls  # evaluated at the winning point first
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
            real = [r for r in runs if not r.worker.control]
            if all(r.record.state.terminal and r.stopping is None for r in real):
                if any(r.record.stop_reason in ("interrupted", "user") for r in runs):
                    continue  # stopped by hand: resumable, not a failure
                self._end_controls(exp, reason="race failed")
                erec.status = ExperimentStatus.failed
                erec.decided_at = self.clock()
                best = best_summary(exp, self._histories())
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
                return  # those records won the race or used the budget: the stop settles it
        now = self.clock()
        self._release(live, now)
        rec.exit_code = code
        rec.stderr_tail = tail_lines(live.paths.stderr, STDERR_TAIL_LINES)
        if code == 0:
            rec.transition(self._ended_state(live), why="exited 0")
            self.event(f"{rec.key}: exited 0 at {rec.unit} {rec.progress} ({rec.state.value})")
        elif rec.attempt <= self.plan.max_retries:
            delay = self.plan.retry_backoff_s * (2 ** (rec.attempt - 1))
            rec.transition(RunState.pending, why="crashed, will retry")
            rec.retry_at = now + delay
            rec.resume = True
            rec.error = last_line(rec.stderr_tail) or f"exit {code}"
            self.event(
                f"{rec.key}: crashed (exit {code}) on attempt {rec.attempt}: {rec.error}; "
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

    # -- on_success / failure hooks ---------------------------------------------------------

    def _start_hook(self, live: LiveRun | None, *, exp: ExperimentConfig | None = None) -> None:
        exp = exp or (live.experiment if live else None)
        assert exp is not None
        if exp.on_success is None:
            return
        if live is None:  # a failed race: the hook gets the best worker's run instead
            best = best_worker(exp, self._histories())
            live = self.runs.get(f"{exp.name}/{best[0]}") if best else None
            if live is None:
                return
        argv = expand(exp.on_success, self._placeholders(exp, live))
        log = self.paths.experiment_dir(exp.name) / "on_success.log"
        try:
            self.hooks.start(exp.name, argv, cwd=self.plan.repo, log=log,
                             after=self.pins.future(exp.name))  # hook reads winner.json
        except OSError as e:
            self.event(f"{exp.name}: on_success hook cannot start: {e}")
            return
        self.state.experiments[exp.name].hook = "running"
        self.event(f"{exp.name}: on_success hook started: {' '.join(argv)}")

    def _check_hooks(self) -> None:
        for text in self.pins.settle(self.state):
            self.event(text)
            self._dirty = True
        for name, rc in self.hooks.finished():
            self.state.experiments[name].hook = "ok" if rc == 0 else f"exit {rc}"
            self.event(f"{name}: on_success hook finished ({'ok' if rc == 0 else f'exit {rc}'})")
            self._dirty = True
            self.views.publish()

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
            self.write_errors.report("state", e)

    def _histories(self) -> dict[str, Any]:
        return {k: r.history for k, r in self.runs.items()}

    def snapshot(self) -> RaceSnapshot:
        """The race as views see it (data only)."""
        return RaceSnapshot(
            plan=self.plan, state=self.state, histories=self._histories(),
            events=list(self.events), now=self.clock(),
        )

    def _flush(self, force: bool = False, *, views: bool = True) -> None:
        now = time.monotonic()
        if self._dirty or force or (self._progress_dirty and now >= self._next_progress_save):
            # Transitions are saved at once; a run's progress (epochs, last metrics: derived
            # from its metrics file, replayed on resume) at most every few hundred ms.
            self._dirty = self._progress_dirty = False
            self._next_progress_save = now + STATE_PROGRESS_INTERVAL_S
            self._save_state()
        if not self.views or not views:
            return
        publish = False
        if self._views_due_at is not None:  # a decision's views, held while the stops run
            stopping = any(r.stopping is not None for r in self.runs.values())
            if stopping and self.clock() < self._views_due_at and not force:
                return
            self._views_due_at = None
            force = publish = True
        status = self.views.refresh(self.snapshot(), force=force)
        if status is not None:
            self.state.sync = status
        if publish:
            self.views.publish()  # the decision goes out to the laptop now

    def wait_for_views(self, timeout_s: float = 60.0) -> None:
        """Wait for what the views render in the background after the race (the race report,
        the last plot). For tests and benchmarks: ``run`` itself never waits."""
        self.views.wait(timeout_s)
