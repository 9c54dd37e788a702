"""Pruning in whole races: real worktrees, real fake-worker processes (``prune:``)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from conftest import fake, marked_processes, run_cli, wait_for, write_plan

from orchestrator.core.config import load_plan
from orchestrator.core.controller import Controller
from orchestrator.core.state import ExperimentStatus, PlanState, RunState
from orchestrator.paths import ResultsPaths
from orchestrator.session import build_controller
from orchestrator.sources.metrics import JsonlSource

FAST = 0.05  # seconds per fake epoch


def race(plan_path: Path) -> tuple[int, PlanState, Controller]:
    controller = build_controller(load_plan(plan_path))
    code = controller.run()
    controller.wait_for_views()
    return code, PlanState.load(ResultsPaths(controller.plan.results_dir).state), controller


def records(results: Path, worker: str) -> list[dict]:
    return JsonlSource(ResultsPaths(results).run("race", worker).metrics).read_new()


def events(results: Path) -> list[str]:
    path = ResultsPaths(results).events
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def test_pruned_worker_gives_its_slot_to_the_queue_and_reruns_from_its_checkpoint(
    repo: Path, leak_check: str
) -> None:
    plan = write_plan(repo, [
        {"name": "flat", "branch": "r/flat",
         "command": fake("--epochs", 60, "--interval", FAST, "--metric", "acc=0.3")},
        {"name": "steady", "branch": "r/steady",  # on course: would pass at epoch 57
         "command": fake("--epochs", 60, "--interval", 0.1, "--metric", "acc=0.016*epoch")},
        {"name": "queued", "branch": "r/queued", "priority": 1,  # passes 9 epochs after start
         "command": fake("--epochs", 60, "--interval", FAST, "--metric", "acc=0.1*epoch")},
    ], max_parallel=2, experiment={"max_epochs": 60, "prune": {}})
    code, state, _ = race(plan)
    assert code == 0
    results = repo / "results"
    exp = state.experiments["race"]
    assert exp.status == ExperimentStatus.succeeded and exp.winner == "queued"
    flat = state.run("race", "flat")
    assert flat.state == RunState.pruned
    # defaults: after 5 evaluations, 3 hopeless ones in a row -> pruned at evaluation 7
    assert flat.epoch is not None and 7 <= flat.epoch < 60
    assert flat.stop_reason is not None and flat.stop_reason.startswith("pruned: acc: ")
    assert "need >= 0.9" in flat.stop_reason
    assert state.run("race", "steady").state == RunState.stopped  # on course: never pruned
    assert state.run("race", "queued").attempt == 1
    assert any("race/flat: PRUNED at epoch 7" in e for e in events(results))
    # it checkpointed like any stopped worker
    ckpts = ResultsPaths(results).run("race", "flat").checkpoints
    assert any(p.name.endswith(".ckpt") for p in ckpts.iterdir())
    assert marked_processes(leak_check) == []
    # the race report counts what pruning saved apart from the decision
    report = ResultsPaths(results).race_report("race")
    text = wait_for(lambda: report.exists() and report.read_text())
    assert "saved by pruning" in text and "## Pruned" in text
    assert "flat" in text.split("## Pruned")[1]

    # `rerun --resume` continues it by hand from its checkpoint (pruned -> pending -> ...)
    last = records(results, "flat")[-1]["epoch"]
    out = run_cli("rerun", str(plan), "flat", "--resume", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert f"resumed at epoch {last + 1}" in out.stdout
    after = records(results, "flat")
    assert [r["epoch"] for r in after] == list(range(1, 61))
    assert all(r["resumed"] == 1 for r in after[last:])
    rec = PlanState.load(ResultsPaths(results).state).run("race", "flat")
    assert rec.state == RunState.exhausted and rec.attempt == 2


def test_a_lone_worker_is_never_pruned(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "flat", "branch": "r/flat",
         "command": fake("--epochs", 15, "--interval", 0.02, "--metric", "acc=0.3")},
    ], experiment={"max_epochs": 15, "prune": {"after": 3, "patience": 2}})
    code, state, _ = race(plan)
    assert code == 1
    assert state.run("race", "flat").state == RunState.exhausted
    assert not any("PRUNED" in e for e in events(repo / "results"))


def test_run_again_resumes_interrupted_workers_but_leaves_pruned_ones_pruned(
    repo: Path, leak_check: str
) -> None:
    plan = write_plan(repo, [
        {"name": "flat", "branch": "r/flat",
         "command": fake("--epochs", 40, "--interval", FAST, "--metric", "acc=0.3")},
        {"name": "steady", "branch": "r/steady",
         "command": fake("--epochs", 40, "--interval", FAST, "--metric", "acc=0.025*epoch")},
    ], experiment={"max_epochs": 40, "prune": {}})
    controller = build_controller(load_plan(plan))
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(controller.run()))
    thread.start()
    try:
        wait_for(lambda: (rec := controller.state.runs.get("race/flat")) is not None
                 and rec.state == RunState.pruned, timeout=60)
    finally:
        controller.request_interrupt()
        thread.join(60)
    controller.wait_for_views()
    assert codes == [130]
    state = PlanState.load(ResultsPaths(repo / "results").state)
    assert state.run("race", "flat").state == RunState.pruned
    assert state.run("race", "steady").state in (RunState.stopped, RunState.succeeded)
    if state.experiments["race"].status == ExperimentStatus.running:
        code, state, _ = race(plan)
        assert code == 0
    assert state.experiments["race"].winner == "steady"
    assert state.run("race", "flat").state == RunState.pruned
    assert state.run("race", "flat").attempt == 1
    assert marked_processes(leak_check) == []


def test_a_control_is_never_pruned(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "ctl", "branch": "r/ctl", "control": True,
         "command": fake("--epochs", 40, "--interval", FAST, "--metric", "acc=0.3")},
        {"name": "flat", "branch": "r/flat",
         "command": fake("--epochs", 40, "--interval", FAST, "--metric", "acc=0.3")},
        {"name": "steady", "branch": "r/steady",
         "command": fake("--epochs", 40, "--interval", FAST, "--metric", "acc=0.025*epoch")},
    ], experiment={"max_epochs": 40, "prune": {}})
    code, state, _ = race(plan)
    assert code == 0
    assert state.experiments["race"].winner == "steady"
    assert state.run("race", "flat").state == RunState.pruned  # the same curve, not a control
    ctl = state.run("race", "ctl")
    assert ctl.state != RunState.pruned and (ctl.epoch or 0) > 7
    assert not any("race/ctl: PRUNED" in e for e in events(repo / "results"))
    assert marked_processes(leak_check) == []


def test_saved_slot_seconds_are_split_by_cause() -> None:
    from orchestrator.core.accounting import RunUsage, compute_savings, saved_by_cause
    from orchestrator.core.state import RunRecord

    def rec(name: str, state: RunState, busy_s: float) -> RunRecord:
        return RunRecord("race", name, f"r/{name}", state=state, busy_s=busy_s)

    rows = compute_savings([
        RunUsage("winner", rec("winner", RunState.succeeded, 100.0), 10, 50, won=True),
        RunUsage("loser", rec("loser", RunState.stopped, 50.0), 5, 50),
        RunUsage("flat", rec("flat", RunState.pruned, 70.0), 7, 50),
        RunUsage("done", rec("done", RunState.exhausted, 500.0), 50, 50),
    ])
    assert [r.cause for r in rows] == ["decision", "decision", "pruning", ""]
    assert saved_by_cause(rows) == {"decision": 400.0 + 450.0, "pruning": 430.0}
    assert rows[2].note.startswith("pruned; 7 of 50 epochs")


def test_prune_config_in_the_plan(repo: Path) -> None:
    import pytest

    from orchestrator.core.config import describe
    from orchestrator.errors import ConfigError

    workers = [{"name": "w", "branch": "r/w", "command": fake("--epochs", 1)}]
    plan = load_plan(write_plan(repo, workers, experiment={"prune": {}}))
    assert plan.experiments[0].prune is not None and plan.experiments[0].prune.patience == 3
    assert "prune      after 5 evaluations, margin 0.5, patience 3" in describe(plan)
    assert load_plan(write_plan(repo, workers)).experiments[0].prune is None
    with pytest.raises(ConfigError) as err:
        load_plan(write_plan(repo, workers, experiment={"prune": {"pattience": 4}}))
    assert "unknown key 'pattience'" in str(err.value.problems)
    assert "after, margin, patience, window" in str(err.value.problems)
    with pytest.raises(ConfigError) as err:
        load_plan(write_plan(repo, workers, experiment={"prune": {"patience": 1}}))
    assert "prune.patience" in str(err.value.problems)
