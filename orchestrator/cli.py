"""Command line: ``python -m orchestrator {run,status,stop,rerun,validate,clean,watch}``.

User mistakes (bad plan, missing branch, locked plan, unreachable host) print one ``error:``
line, the problems it found and a hint, and exit 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from orchestrator.core.config import Plan, describe, expand, load_plan
from orchestrator.core.state import PlanState, RunState, controller_alive
from orchestrator.errors import ConfigError, OrchestratorError, StateError
from orchestrator.paths import ResultsPaths

if TYPE_CHECKING:
    from orchestrator.core.controller import Controller

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        _error(str(e), e.problems if len(e.problems) > 1 else [], e.hint)
        return EXIT_USAGE
    except OrchestratorError as e:
        _error(str(e), [], e.hint)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader went away; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _error(message: str, problems: list[str], hint: str | None) -> None:
    print(f"error: {message}", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator",
        description="Race experiment approaches in parallel git worktrees; "
        "stop the losers the moment one meets the success criteria.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run (or resume) a plan until every experiment is decided")
    p.add_argument("plan", nargs="?", default="experiments.yaml", help="plan file")
    p.add_argument("--only", nargs="+", metavar="WORKER", help="run only these workers")
    p.add_argument("--fresh", action="store_true",
                   help="discard earlier state and run directories and start over")
    p.add_argument("--leave-running", action="store_true",
                   help="on Ctrl-C/SIGTERM leave workers running; a later `run` re-attaches")
    p.add_argument("--background", action="store_true",
                   help="detach from the terminal (survives a dropped SSH session); "
                   "log to RESULTS/controller.log")
    p.add_argument("--plain", action="store_true", help="print events as lines, no live table")
    p.add_argument("--notify", action="store_true",
                   help="desktop notification when an experiment is decided or fails")
    p.add_argument("--wide", action="store_true",
                   help="live table: every column and full statuses, however narrow the terminal")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="show the state of a plan (works from any shell)")
    p.add_argument("plan", nargs="?", default="experiments.yaml")
    p.add_argument("--json", action="store_true", help="print the state file as JSON")
    p.add_argument("--wide", action="store_true", help="every column and full statuses")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stop", help="stop the whole plan, or named workers")
    p.add_argument("plan", nargs="?", default="experiments.yaml")
    p.add_argument("workers", nargs="*", metavar="WORKER")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("rerun", help="run one worker in the foreground, in its worktree")
    p.add_argument("plan")
    p.add_argument("worker", help="worker name (or experiment/worker)")
    p.add_argument("--resume", action="store_true", help="resume from its latest checkpoint")
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("validate", help="check a plan and print it as understood")
    p.add_argument("plan", nargs="?", default="experiments.yaml")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("clean", help="remove the plan's worktrees (refuses uncommitted work)")
    p.add_argument("plan", nargs="?", default="experiments.yaml")
    p.add_argument("--results", action="store_true", help="also delete run directories and state")
    p.set_defaults(func=cmd_clean)

    from orchestrator.views.report import add_report_arguments, run_report

    p = sub.add_parser("report", help="compare a plan's runs: markdown table and curves")
    add_report_arguments(p)
    p.set_defaults(func=run_report)

    from orchestrator.remote.watch import add_watch_arguments, run_watch

    p = sub.add_parser("watch", help="follow a remote plan's dashboard over SSH (laptop side)")
    add_watch_arguments(p)
    p.set_defaults(func=run_watch)
    return parser


# -- run ----------------------------------------------------------------------------------------


def install_signal_handlers(controller: Controller, *, leave_running: bool = False) -> None:
    """SIGINT/SIGTERM stop the race cleanly (or, with ``leave_running``, detach and leave the
    workers running for a later re-attach); SIGHUP (a dropped SSH session) is ignored.

    The handler only sets the controller's flags. It runs between two bytecodes of the main
    thread, possibly while that thread holds the lock inside ``controller.wake`` (a
    threading.Event it waits on and clears), so waking the loop from the handler could deadlock.
    A relay thread does it instead, fed by ``signal.set_wakeup_fd`` (written by the C-level
    handler, which is async-signal-safe)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def relay() -> None:
        while os.read(read_fd, 512):
            controller.wake.set()

    threading.Thread(target=relay, name="signal-relay", daemon=True).start()

    def on_signal(signum: int, _frame: Any) -> None:
        if not controller.interrupted:
            controller.interrupted = "interrupted"
            controller.detach = leave_running

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.session import build_controller

    plan = load_plan(args.plan)
    _check_only(plan, args.only)
    if args.background:
        return _run_in_background(plan, args)
    live_ui = None
    if sys.stdout.isatty() and not args.plain:
        from orchestrator.views.live import LiveTable

        live_ui = LiveTable(plan, wide=args.wide)
    echo = None if live_ui else (lambda line: print(line, flush=True))
    extra_views: list[Any] = [live_ui] if live_ui else []
    if args.notify:
        from orchestrator.terminal import Notifier, default_notify_command
        from orchestrator.views.live import DecisionNotifierView

        extra_views.append(DecisionNotifierView(Notifier(default_notify_command())))
    controller = build_controller(
        plan,
        only=args.only,
        fresh=args.fresh,
        extra_views=extra_views or None,
        subreaper=True,
        echo=echo,
    )
    install_signal_handlers(controller, leave_running=args.leave_running)
    if live_ui:
        live_ui.start()
    try:
        code = controller.run()
    finally:
        if live_ui:
            live_ui.stop(controller.snapshot())
    _print_outcome(plan, controller.state)
    return code


def _check_only(plan: Plan, only: list[str] | None) -> None:
    if not only:
        return
    names = {w.name for _, w in plan.workers()}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(
            f"--only names unknown worker(s) {', '.join(unknown)}; "
            f"workers in the plan: {', '.join(sorted(names))}"
        )


def _run_in_background(plan: Plan, args: argparse.Namespace) -> int:
    log = ResultsPaths(plan.results_dir).root / "controller.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "orchestrator", "run", str(plan.source), "--plain"]
    if args.only:
        argv += ["--only", *args.only]
    if args.fresh:
        argv.append("--fresh")
    if args.leave_running:
        argv.append("--leave-running")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=os.getcwd(),
        )
    print(f"controller running in the background (pid {proc.pid}); log: {log}")
    print(f"follow it with: python -m orchestrator status {args.plan}")
    return 0


def _print_outcome(plan: Plan, state: PlanState) -> None:
    for exp in plan.experiments:
        erec = state.experiments.get(exp.name)
        if erec is None:
            continue
        if erec.winner:
            lat = (
                f"; losers stopped {erec.decision_latency_s:.2f}s after the winning record"
                if erec.decision_latency_s is not None
                else ""
            )
            print(f"{exp.name}: {erec.winner} won at {erec.unit} {erec.winner_epoch}{lat}")
        else:
            print(f"{exp.name}: {erec.status.value}")
    print(f"dashboard: {plan.dashboard}")


# -- status, stop -------------------------------------------------------------------------------


def _load_state(plan: Plan) -> PlanState:
    return PlanState.load(ResultsPaths(plan.results_dir).state)


def cmd_status(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    state = _load_state(plan)
    alive = controller_alive(state.controller)
    if args.json:
        data = state.to_json()
        data["controller_alive"] = alive
        print(json.dumps(data, indent=1, default=str))
        return 0
    from rich.console import Console

    console = Console()
    when = time.strftime("%H:%M:%S", time.localtime(state.updated_at))
    who = f"controller pid {state.controller.get('pid')} running" if alive else "no controller"
    console.print(f"plan {plan.source} · state of {when} · {who}")
    from orchestrator.views.live import render_table

    console.print(render_table(plan, state, wide=args.wide))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from orchestrator.reporting import atomic_write_json
    from orchestrator.running.launchers import LocalLauncher

    plan = load_plan(args.plan)
    paths = ResultsPaths(plan.results_dir)
    state = _load_state(plan)
    names = {w.name for _, w in plan.workers()}
    unknown = [w for w in args.workers if w not in names]
    if unknown:
        raise ConfigError(
            f"unknown worker(s) {', '.join(unknown)}; workers: {', '.join(sorted(names))}"
        )
    if controller_alive(state.controller):
        request = {"workers": args.workers, "requested_at": time.time()}
        atomic_write_json(paths.stop_request, request)
        what = ", ".join(args.workers) if args.workers else "the whole plan"
        print(f"asked controller pid {state.controller['pid']} to stop {what}")
        return _wait_for_stop(paths, args.workers)
    # No controller: stop the runs ourselves, under the controller lock.
    from orchestrator.core.lock import ControllerLock

    lock = ControllerLock(paths.lock)
    lock.acquire()
    try:
        launcher = LocalLauncher()
        stopped = 0
        for rec in state.runs.values():
            if args.workers and rec.worker not in args.workers:
                continue
            if rec.state == RunState.running and rec.pid and rec.create_time and rec.run_id:
                handle = launcher.attach(rec.key, rec.pid, rec.create_time, rec.run_id,
                                         paths.run(rec.experiment, rec.worker), rec.attempt)
                if handle is not None:
                    launcher.stop([handle], plan.grace_s)
                    stopped += 1
                rec.transition(RunState.stopped, why="user")
                rec.stop_reason = "user"
                rec.pid = None
        state.save(paths.state)
    finally:
        lock.release()
    print(f"no controller was running; stopped {stopped} run(s) directly")
    return 0


def _wait_for_stop(paths: ResultsPaths, workers: list[str], timeout_s: float = 600) -> int:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            state = PlanState.load(paths.state)
        except StateError:
            time.sleep(0.2)
            continue
        runs = [r for r in state.runs.values() if not workers or r.worker in workers]
        alive = controller_alive(state.controller)
        if paths.stop_request.exists():
            if not alive:
                paths.stop_request.unlink(missing_ok=True)
                print("the controller exited before it handled the request", file=sys.stderr)
                return 0 if not any(r.state.active for r in runs) else 1
            time.sleep(0.1)
            continue
        if not any(r.state.active for r in runs) and (workers or not alive):
            print("stopped")
            return 0
        time.sleep(0.2)
    print("timed out waiting for the controller to stop the runs", file=sys.stderr)
    return 1


# -- rerun, validate, clean ---------------------------------------------------------------------


def cmd_rerun(args: argparse.Namespace) -> int:
    from orchestrator.core.environment import placeholder_values, worker_env
    from orchestrator.core.lock import ControllerLock
    from orchestrator.core.state import ExperimentRecord, RunRecord
    from orchestrator.running import worktrees

    plan = load_plan(args.plan)
    matches = [
        (e, w) for e, w in plan.workers()
        if args.worker in (w.name, f"{e.name}/{w.name}")
    ]
    if not matches:
        names = ", ".join(f"{e.name}/{w.name}" for e, w in plan.workers())
        raise ConfigError(f"no worker {args.worker!r} in {plan.source}; workers: {names}")
    if len(matches) > 1:
        raise ConfigError(f"worker name {args.worker!r} is ambiguous; use experiment/worker")
    exp, worker = matches[0]
    paths = ResultsPaths(plan.results_dir)
    lock = ControllerLock(paths.lock)
    lock.acquire()  # refuses while a controller runs this plan
    try:
        state = PlanState.load(paths.state) if paths.state.exists() else PlanState(str(plan.source))
        key = f"{exp.name}/{worker.name}"
        rec = state.runs.setdefault(key, RunRecord(exp.name, worker.name, worker.branch))
        state.experiments.setdefault(exp.name, ExperimentRecord(exp.name))
        wt = plan.worktree_path(worker, exp)
        worktrees.ensure_worktree(plan.repo, wt, worker.branch, plan.base_ref)
        run_paths = paths.run(exp.name, worker.name)
        run_paths.ensure()
        if rec.state != RunState.pending:
            rec.transition(RunState.pending, why="rerun by hand")
        rec.attempt += 1
        rec.transition(RunState.preparing, why="rerun")
        rec.transition(RunState.running, why="rerun")
        rec.pid, rec.started_at, rec.stop_reason, rec.error = os.getpid(), time.time(), None, None
        state.save(paths.state)
        values = placeholder_values(plan, exp, worker, run_paths, wt, rec.attempt)
        argv = expand(worker.command, values, shell=worker.shell)
        env = worker_env(
            exp, worker, run_paths, wt, rec.attempt, resume=args.resume,
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""), values=values,
        )
        print(f"rerun {key} attempt {rec.attempt} in {wt}: {' '.join(argv)}", flush=True)
        try:
            code = subprocess.call(argv, cwd=wt, env=env)
        except KeyboardInterrupt:
            code = 130
        except OSError as e:
            code = 127
            print(f"error: cannot start {argv[0]}: {e.strerror}", file=sys.stderr)
        rec.exit_code = code
        rec.pid = None
        rec.ended_at = time.time()
        rec.transition(RunState.exhausted if code == 0 else RunState.failed, why="rerun ended")
        state.save(paths.state)
        print(f"rerun {key} exited with {code}; metrics in {run_paths.metrics}")
        return code
    finally:
        lock.release()


def cmd_validate(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    print(describe(plan))
    from orchestrator.running.gpus import describe_slots

    print()  # the slots a controller on this machine would use (CUDA_VISIBLE_DEVICES honoured)
    for line in describe_slots(
        plan.gpus, workers_per_gpu=plan.workers_per_gpu, max_parallel=plan.max_parallel,
        cpu_slots=sum(len(e.workers) for e in plan.experiments), executor=plan.executor,
    ):
        print(line)
    print("\nplan is valid")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from orchestrator.core.lock import ControllerLock
    from orchestrator.running import worktrees

    plan = load_plan(args.plan)
    paths = ResultsPaths(plan.results_dir)
    lock = ControllerLock(paths.lock)
    lock.acquire()
    try:
        # Check every worktree first: remove nothing if any holds uncommitted work.
        dirty = []
        for exp, w in plan.workers():
            wt = plan.worktree_path(w, exp)
            if wt.exists() and (files := worktrees.dirty_files(wt)):
                dirty.append(f"{wt} ({len(files)} uncommitted files, e.g. {files[0].strip()})")
        if dirty:
            raise OrchestratorError(
                "not cleaning: worktrees hold uncommitted work: " + "; ".join(dirty),
                hint="commit or stash the changes in those worktrees, then run clean again",
            )
        removed = 0
        for exp, w in plan.workers():
            wt = plan.worktree_path(w, exp)
            if wt.exists():
                worktrees.remove_worktree(plan.repo, wt)
                removed += 1
        print(f"removed {removed} worktree(s) under {plan.worktree_root}")
        if args.results:
            for exp in plan.experiments:
                d = paths.experiment_dir(exp.name)
                if d.exists():
                    shutil.rmtree(d)
            for f in (paths.state, paths.events):
                f.unlink(missing_ok=True)
            print(f"removed run directories and state under {plan.results_dir}")
    finally:
        lock.release()
    return 0
