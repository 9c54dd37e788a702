"""The commands that look at a plan without running it: history, compare, logs, and the checks
behind ``run --dry-run`` and ``validate`` (see ``orchestrator.cli`` for the argument syntax; the
JSON schemas are in docs/cli.md)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.cli.args import find_worker, one_worker
from orchestrator.core import races
from orchestrator.core.config import ExperimentConfig, Plan, WorkerConfig, expand, load_plan
from orchestrator.core.state import PlanState, RunState, controller_alive
from orchestrator.errors import ConfigError, OrchestratorError, StateError
from orchestrator.formatting import duration
from orchestrator.paths import ResultsPaths

JSON_SCHEMA_VERSION = 1
FOLLOW_POLL_S = 0.2


# -- preflight: run --dry-run and validate -------------------------------------------------------


def _plan_for_worker(plan: Plan, exp: ExperimentConfig, w: WorkerConfig) -> dict[str, Any]:
    """What a run of worker ``w`` would use: branch, commit, behind-count, worktree, argv, and
    the problems it would meet (read-only git commands; nothing is created)."""
    from orchestrator.core.environment import placeholder_values
    from orchestrator.core.provenance import redact_env
    from orchestrator.errors import WorktreeError
    from orchestrator.running import worktrees

    wt = plan.worktree_path(w, exp)
    run_paths = ResultsPaths(plan.results_dir).run(exp.name, w.name)
    argv = expand(w.command, placeholder_values(plan, exp, w, run_paths, wt, 1), shell=w.shell)
    out: dict[str, Any] = {"experiment": exp.name, "worker": w.name, "branch": w.branch,
                           "worktree": str(wt), "argv": argv, "env": redact_env(dict(w.env)),
                           "commit": None, "behind": None, "new_branch": False, "problems": []}
    problems: list[str] = out["problems"]
    key = f"{exp.name}/{w.name}"
    try:
        commit = worktrees.resolve_commit(plan.repo, f"refs/heads/{w.branch}")
    except WorktreeError as e:
        problems.append(f"{key}: {e}")
        return out
    base = worktrees.resolve_commit(plan.repo, plan.base_ref)
    if commit is None:
        out["new_branch"] = True
        out["commit"] = base
        out["behind"] = 0 if base else None
    else:
        out["commit"] = commit
        out["behind"] = worktrees.commits_behind(plan.repo, commit, plan.base_ref)
    if base is None:
        problems.append(f"{key}: base_ref {plan.base_ref!r} is not a commit in {plan.repo}")
    try:
        where = worktrees.branch_checked_out_at(plan.repo, w.branch)
    except WorktreeError as e:
        problems.append(f"{key}: {e}")
        where = None
    if where is not None and where != wt.resolve():
        problems.append(f"{key}: branch {w.branch!r} is already checked out at {where}")
    if wt.exists() and where == wt.resolve() and not plan.allow_dirty:
        dirty = worktrees.tracked_changes(wt)
        if dirty:
            problems.append(f"{key}: worktree {wt} has uncommitted changes ({len(dirty)} files, "
                            f"e.g. {dirty[0].strip()}); commit them or set allow_dirty: true")
    if not w.shell and argv:
        program = argv[0]
        if "/" in program:
            target = Path(program) if Path(program).is_absolute() else wt / program
            found = target.exists() if (Path(program).is_absolute() or wt.exists()) else True
        else:
            found = shutil.which(program) is not None
        if not found:
            problems.append(f"{key}: command {program!r} not found")
    return out


def preflight(plan: Plan, only: list[str] | None) -> list[str]:
    """Every problem a run of ``plan`` (its workers in ``only``, or all) would meet before
    anything starts: branches checked out elsewhere, a missing base_ref, a dirty worktree, a
    program that is not found. Reads only."""
    problems: list[str] = []
    for exp, w in plan.workers():
        if only is None or w.name in only:
            problems += _plan_for_worker(plan, exp, w)["problems"]
    return list(dict.fromkeys(problems))


def dry_run(plan: Plan, only: list[str] | None) -> int:
    """``run --dry-run``: print what each worker would run and every problem; start nothing.

    Returns:
        0 when a run could start, 2 when it would meet problems (listed).
    """
    from orchestrator.core.provenance import behind_text, short_sha
    from orchestrator.running.gpus import make_slots

    slots = make_slots("none" if plan.executor == "ray" else plan.gpus,
                       workers_per_gpu=plan.workers_per_gpu, max_parallel=plan.max_parallel,
                       cpu_slots=sum(len(e.workers) for e in plan.experiments))
    chosen = [(e, w) for e, w in plan.workers() if only is None or w.name in only]
    order = {id(w): i for i, (_, w) in enumerate(plan.workers())}
    ranked = sorted(chosen, key=lambda ew: (ew[1].priority, order[id(ew[1])]))
    slot_of = {id(w): slots[i].label() if i < len(slots) else "queued (no free slot)"
               for i, (_, w) in enumerate(ranked)}
    problems: list[str] = []
    print(f"dry run of {plan.source}: nothing is started, no worktree is touched")
    for exp, w in chosen:
        info = _plan_for_worker(plan, exp, w)
        problems += info["problems"]
        behind = behind_text(info["behind"], plan.base_ref)
        branch = f"{w.branch} (new, from {plan.base_ref})" if info["new_branch"] else w.branch
        print(f"\n{exp.name}/{w.name}")
        print(f"  branch    {branch}")
        print(f"  commit    {short_sha(info['commit'])}" + (f" ({behind})" if behind else ""))
        print(f"  worktree  {info['worktree']}" + ("" if Path(info["worktree"]).exists()
                                                    else " (would be created)"))
        print(f"  slot      {slot_of[id(w)]}")
        print(f"  argv      {' '.join(info['argv'])}")
        env = " ".join(f"{k}={v}" for k, v in info["env"].items())
        print(f"  env       {env or '(plan sets none)'} + ORCH_* contract, CUDA_VISIBLE_DEVICES")
    problems = list(dict.fromkeys(problems))
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) a run would meet", problems,
                          hint="fix them, then `run` again")
    print("\nno problems found: `run` would start these workers")
    return 0


# -- history and compare -----------------------------------------------------------------------


def _race_json(plan: Plan, race: races.RaceInfo) -> dict[str, Any]:
    state = race.state
    return {
        "race_id": race.race_id,
        "live": race.live,
        "folder": str(race.root),
        "started_at": state.started_at,
        "updated_at": state.updated_at,
        "finished": state.finished,
        "experiments": [races.experiment_summary(plan, state, name)
                        for name in state.experiments],
    }


def cmd_history(args: argparse.Namespace) -> int:
    """``history [PLAN] [--json]``: every race of the plan, oldest first."""
    plan = load_plan(args.plan)
    found = races.list_races(ResultsPaths(plan.results_dir))
    data = [_race_json(plan, r) for r in found]
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA_VERSION, "plan": str(plan.source),
                          "races": data}, indent=1, default=str))
        return 0
    if not data:
        print(f"no races of {plan.source} yet")
        return 0
    rows = [["race", "date", "experiment", "outcome", "at", "commit", "wall", "slot-s used",
             "slot-s saved"]]
    for race in data:
        date = time.strftime("%Y-%m-%d %H:%M", time.localtime(race["started_at"]))
        for e in race["experiments"]:
            outcome = f"{e['winner']} won" if e["winner"] else e["status"]
            rows.append([race["race_id"] + (" *" if race["live"] else ""), date,
                         e["experiment"], outcome + (" (dirty)" if e["dirty"] else ""),
                         "—" if e["at"] is None else str(e["at"]),
                         (e["commit"] or "—")[:8], duration(e["wall_s"]),
                         f"{e['slot_s_used']:,.0f}", f"{e['slot_s_saved']:,.0f}"])
    print(_table(rows))
    print("* the current race")
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()
                     for r in rows)


def _race(plan: Plan, race_id: str) -> races.RaceInfo:
    return races.find_race(ResultsPaths(plan.results_dir),
                           None if race_id == "latest" else race_id)


def _worker_fields(state: PlanState, key: str) -> dict[str, Any]:
    rec = state.runs.get(key)
    if rec is None:
        raise OrchestratorError(f"race {state.race_id} has no run {key}")
    out: dict[str, Any] = {"state": rec.state.value, "epoch": rec.epoch, "attempts": rec.attempt,
                           "commit": rec.commit, "behind": rec.behind, "dirty": rec.dirty,
                           "exit": rec.exit_code, "slot_s": round(rec.busy_s, 3),
                           "stop_reason": rec.stop_reason}
    out.update({f"metric:{k}": v for k, v in sorted(rec.last_metrics.items())})
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    """``compare [PLAN] RACE_A RACE_B`` or ``compare [PLAN] RACE -w W1 -w W2``."""
    plan = load_plan(args.plan)
    words = args.words
    if args.worker:
        if len(words) != 1 or len(args.worker) != 2:
            raise ConfigError("compare RACE -w W1 -w W2 takes one race and two workers",
                              hint="or two races: compare RACE_A RACE_B")
        race = _race(plan, words[0])
        keys = [f"{e.name}/{w.name}" for e, w in (find_worker(plan, n) for n in args.worker)]
        a, b = (_worker_fields(race.state, k) for k in keys)
        labels = [f"{race.race_id}:{k}" for k in keys]
    else:
        if len(words) != 2:
            raise ConfigError(f"compare takes two races, got {len(words)}",
                              hint="compare RACE_A RACE_B, or compare RACE -w W1 -w W2")
        ra, rb = (_race(plan, w) for w in words)
        a, b = ({f"{e['experiment']}:{k}": v for e in _race_json(plan, r)["experiments"]
                 for k, v in e.items() if k != "experiment"} for r in (ra, rb))
        labels = [ra.race_id, rb.race_id]
    fields = list(dict.fromkeys([*a, *b]))
    rows = [{"field": f, "a": a.get(f), "b": b.get(f)} for f in fields]
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA_VERSION, "a": labels[0], "b": labels[1],
                          "rows": rows}, indent=1, default=str))
    elif args.csv:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["field", *labels])
        writer.writerows([[r["field"], _cell(r["a"]), _cell(r["b"])] for r in rows])
        print(buf.getvalue(), end="")
    else:
        table = [["", *labels]] + [[str(r["field"]), _cell(r["a"]), _cell(r["b"])] for r in rows]
        print(_table(table))
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str) and len(value) == 40 and all(c in "0123456789abcdef" for c in value):
        return value[:8]  # a commit SHA
    return str(value)


# -- logs ---------------------------------------------------------------------------------------


def _last_attempt_offset(path: Path) -> int:
    """Byte offset of the last attempt header (``====``) in a run log (0 if none)."""
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    at = data.rfind(b"\n==== attempt ")
    if at >= 0:
        return at + 1
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """``logs [PLAN] WORKER [-f] [--stderr] [--race ID]``: the worker's log from the start of
    its live (or last) attempt; ``-f`` follows it until the worker ends."""
    plan = load_plan(args.plan)
    exp, w = find_worker(plan, one_worker(args.words, "logs"))
    race = races.find_race(ResultsPaths(plan.results_dir), args.race)
    run = ResultsPaths(race.root).run(exp.name, w.name)
    path = run.stderr if args.stderr else run.stdout
    if not path.exists():
        raise StateError(f"no log of {exp.name}/{w.name} yet at {path}",
                         hint="it appears once the worker starts")
    offset = _last_attempt_offset(path)
    out = sys.stdout.buffer
    with open(path, "rb") as fh:
        fh.seek(offset)
        while True:
            chunk = fh.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not args.follow or not race.live or _worker_ended(race.root, f"{exp.name}/{w.name}"):
                rest = fh.read()  # what it wrote while we looked
                out.write(rest)
                out.flush()
                return 0
            time.sleep(FOLLOW_POLL_S)


def _worker_ended(root: Path, key: str) -> bool:
    """Whether run ``key`` has no live attempt (its state says so, or its controller and its
    process are both gone)."""
    try:
        state = PlanState.load(ResultsPaths(root).state)
    except StateError:
        return True
    rec = state.runs.get(key)
    if rec is None or not rec.state.active:
        return rec is None or rec.state != RunState.pending or not controller_alive(
            state.controller)
    if controller_alive(state.controller):
        return False
    import psutil

    return rec.pid is None or not psutil.pid_exists(rec.pid)
