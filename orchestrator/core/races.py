"""Races: every execution of a plan has an id and is kept.

The live race keeps the usual layout at the top of the results directory (state.json,
events.jsonl, one folder per experiment). ``run --fresh`` first moves the previous race's files
into ``results/races/<race-id>/`` (same layout) and then starts a new race with a new id; state
written before races had ids is adopted as a race whose id comes from its start time. ``history``
lists them, ``compare`` puts two side by side.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from orchestrator.core.accounting import RunUsage, compute_savings
from orchestrator.core.config import Plan
from orchestrator.core.state import ExperimentStatus, PlanState
from orchestrator.errors import StateError
from orchestrator.paths import ResultsPaths

# Files of a race at the top of its folder (besides one folder per experiment).
RACE_FILES = ("state.json", "events.jsonl", "software.json", "pip_freeze.txt", "controller.log")


def new_race_id(started_at: float | None = None) -> str:
    """``YYYYMMDD-HHMMSS-xxxx`` (local start time and 4 random hex digits): sorts by time and
    is a valid git ref component (it names the winner's tag)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started_at or time.time()))
    return f"{stamp}-{uuid.uuid4().hex[:4]}"


def adopted_race_id(state: PlanState) -> str:
    """The id of a state written before races had ids: from its start time (stable)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(state.started_at))
    return f"{stamp}-0000"


def archive_current(paths: ResultsPaths, plan: Plan) -> str | None:
    """Move the current race (state, event log, software files, experiment folders) into
    ``races/<race-id>/``; nothing happens when there is no current race.

    Returns:
        The archived race's id, or None.

    Raises:
        StateError: the state file cannot be read, or the race folder exists already.
    """
    if not paths.state.exists():
        return None
    state = PlanState.load(paths.state)
    wait_for_renderers(paths, plan)
    race_id = state.race_id or adopted_race_id(state)
    if state.race_id is None:
        state.race_id = race_id
        state.save(paths.state)
    dest = paths.archived_race(race_id)
    if dest.root.exists():
        raise StateError(f"cannot archive race {race_id}: {dest.root} exists already",
                         hint="move that folder away, then run again")
    dest.root.mkdir(parents=True)
    names = {e.name for e in plan.experiments} | set(state.experiments)
    for name in names:
        src = paths.experiment_dir(name)
        if src.is_dir():
            os.replace(src, dest.experiment_dir(name))
    for file in RACE_FILES:
        src = paths.root / file
        if src.exists():
            os.replace(src, dest.root / file)
    return race_id


def wait_for_renderers(paths: ResultsPaths, plan: Plan, timeout_s: float = 120.0) -> None:
    """Wait (at most ``timeout_s``) until no race report renderer of this race is still writing
    (``ResultsPaths.rendering_marker``), so moving the race cannot split its report between the
    old and the new race. Markers of processes that are gone are removed."""
    deadline = time.monotonic() + timeout_s
    for exp in plan.experiments:
        for marker in paths.race_report_dir(exp.name).glob(".rendering-*"):
            digits = marker.name.removeprefix(".rendering-")
            pid = int(digits) if digits.isdigit() else 0
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            marker.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass(frozen=True)
class RaceInfo:
    """One race of a plan: its id, its results folder and its state."""

    race_id: str
    root: Path
    state: PlanState
    live: bool  # the current race (at the top of the results directory)


def list_races(paths: ResultsPaths) -> list[RaceInfo]:
    """Every race of the plan (archived ones and the current one), oldest first. Unreadable
    race folders are skipped."""
    out = []
    if paths.races_dir.is_dir():
        for folder in sorted(paths.races_dir.iterdir()):
            try:
                state = PlanState.load(folder / "state.json")
            except StateError:
                continue
            out.append(RaceInfo(state.race_id or folder.name, folder, state, live=False))
    if paths.state.exists():
        try:
            live = PlanState.load(paths.state)
            out.append(RaceInfo(live.race_id or adopted_race_id(live), paths.root, live,
                                live=True))
        except StateError:
            pass
    return sorted(out, key=lambda r: r.state.started_at)


def find_race(paths: ResultsPaths, race_id: str | None) -> RaceInfo:
    """The race ``race_id`` (a unique prefix is enough), or the latest when None or
    ``"latest"``.

    Raises:
        StateError: no race yet, or no race (or several) match ``race_id``.
    """
    races = list_races(paths)
    if not races:
        raise StateError(f"no race under {paths.root}: this plan has not been run yet",
                         hint="start it with `python -m orchestrator run PLAN`")
    if race_id is None or race_id == "latest":
        return races[-1]
    matches = [r for r in races if r.race_id == race_id] or [
        r for r in races if r.race_id.startswith(race_id)]
    if len(matches) != 1:
        known = ", ".join(r.race_id for r in races)
        what = "no race" if not matches else "several races"
        raise StateError(f"{what} with id {race_id!r}; races: {known}",
                         hint="`python -m orchestrator history PLAN` lists them")
    return matches[0]


def experiment_summary(plan: Plan, state: PlanState, experiment: str) -> dict[str, Any]:
    """One experiment of one race, for ``history`` and ``compare`` (see docs/cli.md):
    outcome, winner, epoch/step, commit, wall time (s), slot-seconds used and saved."""
    erec = state.experiments.get(experiment)
    exp = next((e for e in plan.experiments if e.name == experiment), None)
    runs = [r for r in state.runs.values() if r.experiment == experiment]
    usages = []
    for rec in runs:
        budget = rec.budget or rec.max_epochs or 1
        won = erec is not None and erec.winner == rec.worker
        usages.append(RunUsage(rec.worker, rec, int(rec.progress or 0), budget, won=won))
    rows = compute_savings(usages, unit=exp.unit if exp is not None else "epoch")
    end = (erec.decided_at if erec and erec.decided_at else None) or state.updated_at
    start = (erec.started_at if erec and erec.started_at else None) or state.started_at
    status = erec.status.value if erec is not None else ExperimentStatus.running.value
    return {
        "experiment": experiment,
        "status": status,
        "winner": erec.winner if erec else None,
        "at": erec.winner_epoch if erec else None,
        "unit": erec.unit if erec else "epoch",
        "commit": (erec.winner_commit if erec else None),
        "tag": erec.tag if erec else None,
        "pinned": (erec.pin or {}).get("checkpoint") if erec else None,
        "wall_s": round(max(0.0, end - start), 3),
        "slot_s_used": round(sum(r.busy_s for r in rows), 3),
        "slot_s_saved": round(sum(r.saved_busy_s for r in rows), 3),
        "dirty": any(r.dirty for r in runs),
    }


def remove_races(paths: ResultsPaths, plan: Plan, *, keep: int) -> list[str]:
    """Delete every race but the newest ``keep`` (the current race counts as the newest).

    Returns:
        The ids of the races deleted.
    """
    races = list_races(paths)
    doomed = races[: max(0, len(races) - keep)]
    for race in doomed:
        if race.live:
            for name in {e.name for e in plan.experiments} | set(race.state.experiments):
                d = paths.experiment_dir(name)
                if d.is_dir():
                    shutil.rmtree(d)
            for file in RACE_FILES:
                (paths.root / file).unlink(missing_ok=True)
        else:
            shutil.rmtree(race.root)
        reruns = paths.root / "reruns" / race.race_id  # `rerun --race` of that race
        if reruns.is_dir():
            shutil.rmtree(reruns)
    return [r.race_id for r in doomed]
