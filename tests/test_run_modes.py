"""How a race is started and what wakes it: file events (with polling out of the picture),
`run --fresh`, `run --only`, `rerun --resume`, and `stop_losers: false`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from conftest import fake, run_cli, wait_for, write_plan

from orchestrator.core.config import load_plan
from orchestrator.core.state import ExperimentStatus, PlanState, RunState
from orchestrator.paths import ResultsPaths
from orchestrator.session import build_controller
from orchestrator.sources.metrics import JsonlSource

FAST = 0.05  # seconds per fake epoch


def status(plan: Path, repo: Path) -> dict[str, Any]:
    out = run_cli("status", str(plan), "--json", cwd=repo)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def metric_epochs(repo: Path, worker: str) -> list[int]:
    src = JsonlSource(ResultsPaths(repo / "results").run("race", worker).metrics)
    return [r["epoch"] for r in src.read_new()]


def test_file_events_wake_the_loop_without_waiting_for_the_poll(
    repo: Path, leak_check: str
) -> None:
    """With an hour between polls, only inotify can bring the records to the decision: a broken
    watcher leaves this race waiting (caught by the deadline below, not by a timing)."""
    plan = write_plan(repo, [
        {"name": "winner", "branch": "r/winner", "command": fake(
            "--epochs", 200, "--interval", FAST, "--metric", "acc=0.5+0.1*epoch")},
        {"name": "loser", "branch": "r/loser", "command": fake(
            "--epochs", 200, "--interval", FAST, "--metric", "acc=0.1")},
    ], poll_interval_s=3600)
    controller = build_controller(load_plan(plan))
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(code=controller.run()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: "code" in result, timeout=60)
    except AssertionError:
        raise AssertionError("no decision: file events did not wake the loop") from None
    finally:
        if thread.is_alive():
            controller.request_interrupt("test over")
        thread.join(60)
        controller.wait_for_views()
    state = controller.state
    assert result["code"] == 0 and state.experiments["race"].winner == "winner"
    assert state.experiments["race"].winner_epoch == 4
    assert state.run("race", "loser").state == RunState.stopped


def test_run_fresh_starts_a_new_race_from_nothing(repo: Path, leak_check: str) -> None:
    """--fresh must not read the old race's records and restarts attempt numbers (whether the
    old race is deleted or kept aside)."""
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake(
            "--epochs", 10, "--interval", FAST, "--crash-at", 2, "--crash-attempts", 9)},
    ], max_retries=1)
    first = run_cli("run", str(plan), "--plain", cwd=repo)
    assert first.returncode == 1, first.stdout + first.stderr
    old = status(plan, repo)["runs"]["race/w"]
    assert old["attempt"] == 2 and old["state"] == "failed" and old["records"] >= 1
    # the same worker, now healthy: without --fresh the decided race would be left alone
    write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake(
            "--epochs", 3, "--interval", FAST, "--metric", "acc=0.2")},
    ], max_retries=1)
    again = run_cli("run", str(plan), "--plain", "--fresh", cwd=repo)
    assert again.returncode == 1, again.stdout + again.stderr
    new = status(plan, repo)["runs"]["race/w"]
    assert new["attempt"] == 1 and new["state"] == "exhausted" and new["epoch"] == 3
    assert new["records"] == 3  # the new race's records only, none replayed from the old one
    assert new["last_metrics"]["acc"] == 0.2 and new["last_metrics"]["resumed"] == 0


def test_run_only_leaves_the_other_workers_untouched(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a", "command": fake(
            "--epochs", 2, "--interval", FAST, "--metric", "acc=0.1")},
        {"name": "b", "branch": "r/b", "command": fake(
            "--epochs", 2, "--interval", FAST, "--metric", "acc=0.1")},
    ])
    out = run_cli("run", str(plan), "--plain", "--only", "a", cwd=repo)
    assert out.returncode == 1, out.stdout + out.stderr  # a ran and did not win
    runs = status(plan, repo)["runs"]
    assert runs["race/a"]["state"] == "exhausted" and runs["race/a"]["attempt"] == 1
    assert runs["race/b"]["state"] == "pending" and runs["race/b"]["attempt"] == 0
    assert not ResultsPaths(repo / "results").run("race", "b").metrics.exists()
    assert not (repo / ".worktrees" / "race" / "b").exists()


def test_rerun_resume_continues_from_the_latest_checkpoint(repo: Path, leak_check: str) -> None:
    def plan_with(epochs: int) -> Path:
        return write_plan(repo, [
            {"name": "w", "branch": "r/w", "command": fake(
                "--epochs", epochs, "--interval", FAST, "--metric", "acc=0.1")},
        ])

    plan = plan_with(3)
    out = run_cli("rerun", str(plan), "w", cwd=repo)
    assert out.returncode == 0, out.stderr
    plan_with(5)
    out = run_cli("rerun", str(plan), "w", "--resume", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "resumed at epoch 4" in out.stdout
    assert metric_epochs(repo, "w") == [1, 2, 3, 4, 5]  # nothing redone
    rec = PlanState.load(repo / "results" / "state.json").run("race", "w")
    assert rec.attempt == 2 and rec.state == RunState.exhausted


def _stop_losers_false_race(repo: Path) -> tuple[int, PlanState]:
    plan = write_plan(repo, [
        {"name": "winner", "branch": "r/winner", "command": fake(
            "--epochs", 6, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
        {"name": "other", "branch": "r/other", "command": fake(
            "--epochs", 6, "--interval", FAST, "--metric", "acc=0.1")},
    ], experiment={"stop_losers": False})
    controller = build_controller(load_plan(plan))
    code = controller.run()
    controller.wait_for_views()
    return code, controller.state


def test_stop_losers_false_records_the_winner_and_stops_nobody(
    repo: Path, leak_check: str
) -> None:
    code, state = _stop_losers_false_race(repo)
    exp = state.experiments["race"]
    assert code == 0 and exp.status == ExperimentStatus.succeeded
    assert exp.winner == "winner" and exp.winner_epoch == 2
    for name in ("winner", "other"):
        rec = state.run("race", name)
        assert rec.stop_reason is None and rec.state != RunState.stopped, (name, rec.state)
        # nobody got SIGTERM: each worker writes all its epochs
        wait_for(lambda n=name: metric_epochs(repo, n) == [1, 2, 3, 4, 5, 6])


def test_stop_losers_false_waits_for_every_worker_to_finish(repo: Path, leak_check: str) -> None:
    _, state = _stop_losers_false_race(repo)
    assert state.run("race", "winner").state == RunState.succeeded
    assert state.run("race", "other").state == RunState.exhausted
    assert state.run("race", "other").epoch == 6
