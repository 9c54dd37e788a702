"""The commands that act on a plan: status, stop, rerun, validate, clean (see
``orchestrator.cli`` for the argument syntax and exit codes)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from orchestrator.cli.args import find_worker, one_worker
from orchestrator.core import provenance
from orchestrator.core.config import (
    ExperimentConfig,
    Plan,
    WorkerConfig,
    _fill,
    describe,
    expand,
    load_plan,
)
from orchestrator.core.state import PlanState, RunState, controller_alive
from orchestrator.errors import ConfigError, OrchestratorError, StateError
from orchestrator.paths import ResultsPaths, RunPaths

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
    from orchestrator.core.provenance import behind_text

    for rec in state.runs.values():  # the code each run ran (also when the table is narrow)
        if rec.commit:
            notes = [behind_text(rec.behind, plan.base_ref)] if rec.behind else []
            notes += ["DIRTY: uncommitted changes, diff saved"] if rec.dirty else []
            console.print(f"{rec.key}: commit {rec.commit[:8]} on {rec.branch}"
                          + (f" ({'; '.join(notes)})" if notes else ""), highlight=False)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from orchestrator.reporting import atomic_write_json
    from orchestrator.running.launchers import LocalLauncher

    plan = load_plan(args.plan)
    args.workers = list(args.words) + list(args.worker)
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
    """Run one worker in the foreground in its worktree, as the controller would launch it (the
    live race's next attempt); with ``--race`` naming an earlier race, see ``_rerun_past_race``."""
    from orchestrator.core import races
    from orchestrator.core.environment import placeholder_values, worker_env
    from orchestrator.core.lock import ControllerLock
    from orchestrator.core.state import ExperimentRecord, RunRecord
    from orchestrator.running import worktrees

    plan = load_plan(args.plan)
    args.worker = one_worker(args.words, "rerun")
    exp, worker = find_worker(plan, args.worker)
    paths = ResultsPaths(plan.results_dir)
    if args.race is not None:
        race = races.find_race(paths, args.race)
        if not race.live:
            return _rerun_past_race(plan, exp, worker, paths, race, resume=args.resume)
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
        prov = provenance.attempt_provenance(
            repo=plan.repo, worktree=wt, branch=worker.branch, base_ref=plan.base_ref,
            attempt=rec.attempt, argv=argv, plan_env=dict(worker.env), slot="by hand",
            software=provenance.write_race_software(paths), allow_dirty=plan.allow_dirty,
            run_paths=run_paths,
        )
        rec.attempts.append(prov)
        rec.commit, rec.behind, rec.dirty = prov["commit"], prov["behind"], prov["dirty"]
        state.save(paths.state)
        header = (f"==== attempt {rec.attempt} {time.strftime('%Y-%m-%d %H:%M:%S')} rerun by "
                  f"hand resume={int(args.resume)}: {' '.join(argv)}")
        print(f"rerun {key} attempt {rec.attempt} in {wt} (commit {prov['commit'][:8]}): "
              f"{' '.join(argv)}", flush=True)
        code = _run_tee(argv, wt, env, run_paths, header)
        rec.exit_code = code
        rec.pid = None
        rec.ended_at = time.time()
        provenance.close_attempt(prov, run_paths, started_at=rec.started_at,
                                 ended_at=rec.ended_at, exit_code=code)
        rec.transition(RunState.exhausted if code == 0 else RunState.failed, why="rerun ended")
        state.save(paths.state)
        print(f"rerun {key} exited with {code}; "
              f"{_metrics_summary(plan, exp, worker, run_paths)}")
        return code
    finally:
        lock.release()


def _rerun_past_race(plan: Plan, exp: ExperimentConfig, worker: WorkerConfig,
                     paths: ResultsPaths, race: Any, *, resume: bool) -> int:
    """Run ``worker`` again at the commit it ran in the earlier race ``race``: in a detached
    worktree at that commit (``worktree_root/_reruns/<race-id>/...``), with the plan's current
    command and env, into ``results/reruns/<race-id>/<experiment>/<worker>/`` (attempts numbered
    there, each with its provenance). The race's own files are not touched, and no controller
    lock is needed (the live race is not involved).

    Raises:
        StateError: the race recorded no commit for the worker (it never started there).
        WorktreeError: that commit is no longer in the repository, or git fails.
    """
    from orchestrator.core.environment import placeholder_values, worker_env
    from orchestrator.running import worktrees

    key = f"{exp.name}/{worker.name}"
    rec = race.state.runs.get(key)
    commit = rec.commit if rec is not None else None
    if not commit:
        raise StateError(f"race {race.race_id} recorded no commit for {key}: it never started "
                         "there", hint="`python -m orchestrator compare PLAN RACE` shows what ran")
    wt = worktrees.ensure_detached_worktree(
        plan.repo, plan.rerun_worktree_path(worker, exp, race.race_id), commit)
    run_paths = paths.rerun(race.race_id, exp.name, worker.name)
    run_paths.ensure()
    attempt = len(list(run_paths.attempts_dir.glob("*.provenance.json"))) + 1
    values = placeholder_values(plan, exp, worker, run_paths, wt, attempt)
    values["race_dir"] = str(race.root)
    argv = expand(worker.command, values, shell=worker.shell)
    env = worker_env(exp, worker, run_paths, wt, attempt, resume=resume,
                     cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                     values=values)
    prov = provenance.attempt_provenance(
        repo=plan.repo, worktree=wt, branch=worker.branch, base_ref=plan.base_ref,
        attempt=attempt, argv=argv, plan_env=dict(worker.env), slot="by hand",
        software=provenance.write_race_software(ResultsPaths(run_paths.run_dir)),
        allow_dirty=False, run_paths=run_paths,
    )
    prov["rerun_of"] = race.race_id
    started = time.time()
    print(f"rerun {key} of race {race.race_id} at its commit {commit[:8]} (attempt {attempt}) "
          f"in {wt}: {' '.join(argv)}", flush=True)
    header = (f"==== attempt {attempt} {time.strftime('%Y-%m-%d %H:%M:%S')} rerun of race "
              f"{race.race_id} at {commit[:12]} resume={int(resume)}: {' '.join(argv)}")
    code = _run_tee(argv, wt, env, run_paths, header)
    provenance.close_attempt(prov, run_paths, started_at=started, ended_at=time.time(),
                             exit_code=code)
    print(f"rerun {key} of race {race.race_id} exited with {code}; "
          f"{_metrics_summary(plan, exp, worker, run_paths)}; files in {run_paths.run_dir}")
    return code


def _run_tee(argv: list[str], cwd: Path, env: dict[str, str], run_paths: RunPaths,
             header: str) -> int:
    """Run ``argv``; its stdout and stderr go to the terminal and are appended to the run's
    stdout.log/stderr.log (as in a race). Returns its exit code (127: cannot start, 130:
    Ctrl-C)."""
    for log in (run_paths.stdout, run_paths.stderr):
        with open(log, "a") as fh:
            fh.write(header + "\n")
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    except OSError as e:
        print(f"error: cannot start {argv[0]}: {e.strerror}", file=sys.stderr)
        return 127
    assert proc.stdout is not None and proc.stderr is not None

    def copy(src: IO[bytes], term: IO[bytes], log: Path) -> None:
        with open(log, "ab") as fh:
            while chunk := os.read(src.fileno(), 65536):
                fh.write(chunk)
                fh.flush()
                term.write(chunk)
                term.flush()

    threads = [
        threading.Thread(target=copy, args=(proc.stdout, sys.stdout.buffer, run_paths.stdout)),
        threading.Thread(target=copy, args=(proc.stderr, sys.stderr.buffer, run_paths.stderr)),
    ]
    for t in threads:
        t.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the worker got the same Ctrl-C: let it checkpoint and exit
        code = proc.wait()
        code = 130 if code in (0, -2) else code
    for t in threads:
        t.join()
    return code


def _metrics_summary(
    plan: Plan, exp: ExperimentConfig, worker: WorkerConfig, run_paths: RunPaths
) -> str:
    """Where the run's metrics are (its metric source, read as in a race: placeholders in its
    path filled, names renamed) and whether the criteria held at the last record."""
    from orchestrator.core.criteria import all_pass
    from orchestrator.core.environment import placeholder_values
    from orchestrator.core.runs import metric_source
    from orchestrator.sources.metrics import MetricHistory

    m = worker.metrics
    source = metric_source(plan, exp, worker, ResultsPaths(plan.results_dir))
    where = {"jsonl": m.path or str(run_paths.metrics),
             "regex": m.path or str(run_paths.stdout)}.get(m.source, m.path or "")
    where = _fill(where, placeholder_values(
        plan, exp, worker, run_paths, plan.worktree_path(worker, exp)))
    history = MetricHistory()
    try:
        history.add(source.read_new())
    except Exception as e:  # the closing line must not crash on a bad file
        return f"metrics ({m.source}) in {where}: cannot read them: {e}"
    last = history.last
    if not last:
        return f"metrics ({m.source}) in {where}: no record"
    at = ", ".join(f"{k} {last[k]}" for k in ("epoch", "step") if k in last)
    held = all_pass(exp.criteria_for(worker), last)
    return (f"metrics ({m.source}) in {where}: {len(history.records)} records; the criteria "
            f"{'HELD' if held else 'did not hold'} at the last record ({at})")


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.cli.queries import preflight

    plan = load_plan(args.plan)
    print(describe(plan))
    from orchestrator.running.gpus import describe_slots

    print()  # the slots a controller on this machine would use (CUDA_VISIBLE_DEVICES honoured)
    for line in describe_slots(
        plan.gpus, workers_per_gpu=plan.workers_per_gpu, max_parallel=plan.max_parallel,
        cpu_slots=sum(len(e.workers) for e in plan.experiments), executor=plan.executor,
    ):
        print(line)
    problems = preflight(plan, None)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) a run of {plan.source} would meet",
                          problems if len(problems) > 1 else [],
                          hint="fix them before `run`")
    print("\nplan is valid")
    return 0


def _confirm(question: str) -> None:
    """Ask ``question`` on the terminal.

    Raises:
        OrchestratorError: no terminal to ask (use --yes), or the answer was not yes.
    """
    if not sys.stdin.isatty():
        raise OrchestratorError("clean --results deletes races and needs a yes: no terminal to "
                                "ask on", hint="add --yes (and --keep N to keep the newest N)")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise OrchestratorError("nothing deleted", hint="answer y to delete")


def cmd_clean(args: argparse.Namespace) -> int:
    from orchestrator.core import races
    from orchestrator.core.lock import ControllerLock
    from orchestrator.running import worktrees

    plan = load_plan(args.plan)
    paths = ResultsPaths(plan.results_dir)
    if args.keep < 0:
        raise ConfigError(f"--keep must be 0 or more, not {args.keep}")
    if args.results:
        doomed = races.list_races(paths)[: max(0, len(races.list_races(paths)) - args.keep)]
        if doomed and not args.yes:
            _confirm(f"delete {len(doomed)} race(s) of {plan.source} under {plan.results_dir} "
                     f"({', '.join(r.race_id for r in doomed)}), with their checkpoints?")
    lock = ControllerLock(paths.lock)
    lock.acquire()
    try:
        # Check every worktree first: remove nothing if any holds uncommitted work.
        dirty = []
        trees = [plan.worktree_path(w, exp) for exp, w in plan.workers()]
        trees += worktrees.worktrees_under(plan.repo, plan.worktree_root / "_reruns")
        for wt in trees:
            if wt.exists() and (files := worktrees.dirty_files(wt)):
                dirty.append(f"{wt} ({len(files)} uncommitted files, e.g. {files[0].strip()})")
        if dirty:
            raise OrchestratorError(
                "not cleaning: worktrees hold uncommitted work: " + "; ".join(dirty),
                hint="commit or stash the changes in those worktrees, then run clean again",
            )
        removed = 0
        for wt in trees:
            if wt.exists():
                worktrees.remove_worktree(plan.repo, wt)
                removed += 1
        for folder, _, _ in os.walk(plan.worktree_root / "_reruns", topdown=False):
            if not os.listdir(folder):
                os.rmdir(folder)
        print(f"removed {removed} worktree(s) under {plan.worktree_root}")
        if args.results:
            gone = races.remove_races(paths, plan, keep=args.keep)
            kept = f"; kept the newest {args.keep}" if args.keep else ""
            print(f"removed {len(gone)} race(s) under {plan.results_dir}{kept}")
    finally:
        lock.release()
    return 0
