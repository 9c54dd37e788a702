"""Command line: ``python -m orchestrator {run,status,stop,rerun,logs,history,compare,validate,
clean,report,watch}``.

Arguments: the plan first (optional; default ``$ORCH_PLAN`` or ``experiments.yaml``), then one
worker where a command takes exactly one, repeatable ``-w`` where it takes several. A first
argument that is neither an existing file nor ``*.yaml``/``*.yml`` is not a plan (``stop w1``
stops worker w1 of the default plan).

Exit codes (every command): 0 success (``run``: every experiment won), 1 ``run``: at least one
experiment failed, 2 user error (one ``error:`` line, the problems and a hint; never a
traceback), 3 internal error (the traceback is saved to the file the one error line names), 130
interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import __version__
from orchestrator.core.config import Plan, load_plan
from orchestrator.core.state import PlanState, controller_alive
from orchestrator.errors import ConfigError, OrchestratorError, StateError
from orchestrator.paths import ResultsPaths

if TYPE_CHECKING:
    from orchestrator.core.controller import Controller

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
DEFAULT_PLAN = "experiments.yaml"


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse exits 2
    try:
        _resolve_plan_args(args)
        return int(args.func(args) or 0)
    except ConfigError as e:
        _error(str(e), e.problems if len(e.problems) > 1 else [], e.hint)
        return EXIT_USAGE
    except OrchestratorError as e:
        _error(str(e), [], e.hint)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `... | head`: the reader went away; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:  # a bug of ours: one line, the traceback in a file
        path = _save_traceback(args)
        print(f"error: internal error ({type(e).__name__}: {e}); this is a bug in the "
              f"orchestrator, traceback saved to {path}", file=sys.stderr)
        return EXIT_INTERNAL


def _save_traceback(args: argparse.Namespace) -> str:
    """Write the current exception's traceback to results/crashes/ of the plan (or the temp
    folder when there is no plan) and return the file's path."""
    import tempfile
    import traceback

    text = f"python -m orchestrator {' '.join(sys.argv[1:])}\n\n" + traceback.format_exc()
    folder = Path(tempfile.gettempdir())
    try:
        plan = load_plan(getattr(args, "plan", None) or default_plan())
        folder = ResultsPaths(plan.results_dir).crash_dir
    except Exception:
        pass
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for where in (folder, Path(tempfile.gettempdir())):
        try:
            where.mkdir(parents=True, exist_ok=True)
            (where / name).write_text(text)
            return str(where / name)
        except OSError:
            continue
    return "(nowhere: no writable folder)"


def default_plan() -> str:
    """The plan a command uses when none is given: ``$ORCH_PLAN`` or experiments.yaml."""
    return os.environ.get("ORCH_PLAN") or DEFAULT_PLAN


def looks_like_plan(text: str) -> bool:
    """A plan argument is an existing file or ends in .yaml/.yml; anything else is a worker or
    race id (``stop w1`` must not read w1 as a plan)."""
    return text.endswith((".yaml", ".yml")) or Path(text).is_file()


def _resolve_plan_args(args: argparse.Namespace) -> None:
    """Fill ``args.plan`` (and the leading positional words) by the one argument syntax."""
    words = getattr(args, "words", None)
    if words is not None:
        if words and looks_like_plan(words[0]):
            args.plan, args.words = words[0], words[1:]
        else:
            args.plan = None
    if hasattr(args, "plan") and not args.plan:
        args.plan = default_plan()


def _error(message: str, problems: list[str], hint: str | None) -> None:
    print(f"error: {message}", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (``--help`` shows the argument syntax)."""
    from orchestrator.cli.commands import (
        cmd_clean,
        cmd_rerun,
        cmd_status,
        cmd_stop,
        cmd_validate,
    )
    from orchestrator.cli.queries import cmd_compare, cmd_history, cmd_logs

    parser = argparse.ArgumentParser(
        prog="python -m orchestrator",
        description="Race experiment approaches in parallel git worktrees; "
        "stop the losers the moment one meets the success criteria.",
        epilog="PLAN defaults to $ORCH_PLAN or experiments.yaml. Exit codes: 0 success, "
        "1 run: an experiment failed, 2 user error, 3 internal error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"orchestrator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plan_help = "plan file (default: $ORCH_PLAN or experiments.yaml)"

    p = sub.add_parser("run", help="run (or resume) a plan until every experiment is decided")
    p.add_argument("plan", nargs="?", help=plan_help)
    p.add_argument("--only", nargs="+", metavar="WORKER", help="run only these workers")
    p.add_argument("-w", "--worker", action="append", default=[], metavar="WORKER",
                   help="run only this worker (repeatable; same as --only)")
    p.add_argument("--fresh", action="store_true",
                   help="start a new race (the previous one is kept under RESULTS/races/)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what each worker would run (branch, commit, worktree, slot, argv, "
                   "env) and every problem a real run would meet; start nothing")
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
    p.add_argument("plan", nargs="?", help=plan_help)
    p.add_argument("--json", action="store_true",
                   help="print the state as JSON (schema: docs/cli.md)")
    p.add_argument("--wide", action="store_true", help="every column and full statuses")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stop", help="stop the whole plan, or named workers")
    p.add_argument("words", nargs="*", metavar="[PLAN] [WORKER ...]")
    p.add_argument("-w", "--worker", action="append", default=[], metavar="WORKER",
                   help="stop this worker (repeatable)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("rerun", help="run one worker in the foreground, in its worktree")
    p.add_argument("words", nargs="+", metavar="[PLAN] WORKER",
                   help="worker name (or experiment/worker)")
    p.add_argument("--resume", action="store_true", help="resume from its latest checkpoint")
    p.add_argument("--race", metavar="RACE_ID",
                   help="an earlier race: run the worker again at the commit that race ran, "
                        "into results/reruns/RACE_ID/ (default: the live race)")
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("logs", help="show (or follow) one worker's log")
    p.add_argument("words", nargs="+", metavar="[PLAN] WORKER")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing what the worker writes; ends when the worker ends")
    p.add_argument("--stderr", action="store_true", help="stderr.log instead of stdout.log")
    p.add_argument("--race", metavar="RACE_ID", help="a past race (default: the latest)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("history", help="list the plan's races (every race is kept)")
    p.add_argument("plan", nargs="?", help=plan_help)
    p.add_argument("--json", action="store_true", help="JSON (schema: docs/cli.md)")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("compare", help="two races side by side, or two workers of one race")
    p.add_argument("words", nargs="+", metavar="[PLAN] RACE [RACE_B]")
    p.add_argument("-w", "--worker", action="append", default=[], metavar="WORKER",
                   help="compare these workers of one race (give two)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON (schema: docs/cli.md)")
    fmt.add_argument("--csv", action="store_true", help="CSV")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("validate", help="check a plan (and its branches, base_ref, commands)")
    p.add_argument("plan", nargs="?", help=plan_help)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("clean", help="remove the plan's worktrees (refuses uncommitted work)")
    p.add_argument("plan", nargs="?", help=plan_help)
    p.add_argument("--results", action="store_true",
                   help="also delete races (run directories, state); asks first")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask (--results)")
    p.add_argument("--keep", type=int, default=0, metavar="N",
                   help="with --results: keep the newest N races")
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
    args.only = (args.only or []) + args.worker or None
    _check_only(plan, args.only)
    if args.dry_run:
        from orchestrator.cli.queries import dry_run

        return dry_run(plan, args.only)
    if not args.fresh and (decided := _decided_line(plan)) is not None:
        print(decided[0])
        return decided[1]
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


def _decided_line(plan: Plan) -> tuple[str, int] | None:
    """One line (and the exit code) when the plan's current race is already decided: `run`
    says so and how to start a new race instead of replaying the old verdict."""
    paths = ResultsPaths(plan.results_dir)
    if not paths.state.exists():
        return None
    try:
        state = PlanState.load(paths.state)
    except StateError:
        return None
    erecs = [state.experiments.get(e.name) for e in plan.experiments]
    if controller_alive(state.controller) or any(
        e is None or e.status.value == "running" for e in erecs
    ):
        return None
    if not state.finished:
        return None  # decided, but its controller died before it settled every run (a loser
        # still stopping, an untracked stray): `run` resumes and finishes that
    verdicts = "; ".join(
        f"{e.name}: {e.winner} won at {e.unit} {e.winner_epoch}" if e.winner
        else f"{e.name}: failed"
        for e in erecs if e is not None
    )
    line = (f"race {state.race_id or '(no id)'} of {plan.source} is already decided "
            f"({verdicts}); start a new race with: python -m orchestrator run "
            f"{plan.source} --fresh")
    return line, EXIT_OK if all(e is not None and e.winner for e in erecs) else EXIT_FAILED


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
            code = f" (commit {erec.winner_commit[:8]})" if erec.winner_commit else ""
            print(f"{exp.name}: {erec.winner} won at {erec.unit} {erec.winner_epoch}{code}{lat}")
        else:
            print(f"{exp.name}: {erec.status.value}")
    print(f"dashboard: {plan.dashboard}")


