"""Whole races with real git worktrees and real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import fake, git, marked_processes, run_cli, wait_for, write_plan

from orchestrator.core.config import load_plan
from orchestrator.core.controller import Controller
from orchestrator.core.state import ExperimentStatus, PlanState, RunState
from orchestrator.paths import ResultsPaths
from orchestrator.session import build_controller
from orchestrator.sources.metrics import JsonlSource

FAST = 0.05  # seconds per fake epoch


def race(plan_path: Path, **kw) -> tuple[int, PlanState, Controller]:
    controller = build_controller(load_plan(plan_path), **kw)
    code = controller.run()
    controller.wait_for_views()  # the race report renders in a detached process
    return code, PlanState.load(ResultsPaths(controller.plan.results_dir).state), controller


def epochs(state_dir: Path, exp: str, worker: str) -> list[int]:
    src = JsonlSource(ResultsPaths(state_dir).run(exp, worker).metrics)
    return [r["epoch"] for r in src.read_new()]


def test_winner_stops_losers_and_cancels_the_queue(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "winner", "branch": "r/winner", "command": fake("--epochs", 200, "--interval", FAST, "--metric", "acc=0.5+0.1*epoch")},
        {"name": "loser", "branch": "r/loser", "command": fake("--epochs", 200, "--interval", FAST, "--metric", "acc=0.1", "--children", 2)},
        {"name": "queued", "branch": "r/queued", "priority": 5, "command": fake("--epochs", 5)},
    ], max_parallel=2, criteria=["acc >= 0.9"])
    code, state, _ = race(plan)
    assert code == 0
    exp = state.experiments["race"]
    assert exp.status == ExperimentStatus.succeeded and exp.winner == "winner"
    assert exp.winner_epoch == 4
    assert state.run("race", "winner").state == RunState.succeeded
    assert state.run("race", "loser").state == RunState.stopped
    assert state.run("race", "loser").stop_reason == "lost to winner"
    assert state.run("race", "queued").state == RunState.cancelled
    assert state.run("race", "queued").attempt == 0  # never started
    assert exp.decision_latency_s is not None and exp.decision_latency_s > 0
    assert marked_processes(leak_check) == []
    # each worker ran in its own worktree on its own branch
    wt = repo / ".worktrees" / "race" / "winner"
    assert git(wt, "rev-parse", "--abbrev-ref", "HEAD").strip() == "r/winner"


def test_check_every_and_per_worker_criteria(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a", "command": fake("--epochs", 50, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
        {"name": "b", "branch": "r/b", "criteria": ["acc >= 100"], "command": fake("--epochs", 50, "--interval", FAST, "--metric", "acc=0.5+0.3*epoch")},
    ], experiment={"check_every": 5})
    code, state, _ = race(plan)
    exp = state.experiments["race"]
    # a passes acc >= 0.9 from epoch 2, b from epoch 2 too; only epoch 5 is checked,
    # and b's own criterion (acc >= 100) never holds
    assert code == 0 and exp.winner == "a" and exp.winner_epoch == 5


def test_all_exhausted_or_failed_is_a_failed_experiment(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "short", "branch": "r/short", "command": fake("--epochs", 3, "--interval", FAST, "--metric", "acc=0.5")},
        {"name": "capped", "branch": "r/capped", "max_epochs": 4, "command": fake("--epochs", 100, "--interval", FAST, "--metric", "acc=0.6")},
        {"name": "crasher", "branch": "r/crasher", "command": fake("--epochs", 10, "--interval", FAST, "--crash-at", 2, "--crash-attempts", 9)},
    ], max_retries=1)
    code, state, controller = race(plan)
    assert code == 1
    assert state.experiments["race"].status == ExperimentStatus.failed
    assert state.run("race", "short").state == RunState.exhausted
    assert state.run("race", "capped").state == RunState.exhausted
    assert state.run("race", "capped").stop_reason == "max_epochs"  # stopped by the controller
    crasher = state.run("race", "crasher")
    assert crasher.state == RunState.failed and crasher.attempt == 2
    assert "simulated crash at epoch 2" in crasher.error
    text = Path(controller.plan.dashboard).read_text()
    assert "FAILED" in "\n".join(controller.events) and "capped" in text
    assert "Best so far: **capped**" in text and "acc 0.6 (need >= 0.9)" in text


def test_crash_resumes_from_checkpoint_without_duplicate_epochs(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.1*epoch", "--crash-at", 4)},
    ], max_retries=2)
    code, state, controller = race(plan)
    rec = state.run("race", "w")
    assert code == 0 and rec.state == RunState.succeeded and rec.attempt == 2
    history = controller.runs["race/w"].history
    assert state.experiments["race"].winner_epoch == 9
    seen = [r["epoch"] for r in history.records]
    assert seen == list(range(1, len(seen) + 1))  # no epoch lost or duplicated
    assert [r["resumed"] for r in history.records][:9] == [0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_on_success_hook_gets_the_winner_run_dir_and_checkpoint(repo: Path, leak_check: str) -> None:
    hook = repo / "hook.py"
    hook.write_text("import sys, json, pathlib; pathlib.Path(sys.argv[1]).write_text(json.dumps(sys.argv[2:]))\n")
    out = repo / "hook-out.json"
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
    ], experiment={"on_success": ["python", "hook.py", str(out), "{run_dir}", "{checkpoint}", "{viz_dir}"]})
    code, state, _ = race(plan)
    assert code == 0 and state.experiments["race"].hook == "ok"
    run_dir, ckpt, viz = json.loads(out.read_text())
    assert Path(run_dir) == ResultsPaths(repo / "results").run("race", "w").run_dir
    assert ckpt.endswith("checkpoints/latest.pt") and viz.endswith("race/success_viz")


def test_fake_gpus_are_shared_per_workers_per_gpu(repo: Path, leak_check: str) -> None:
    workers = [
        {"name": f"w{i}", "branch": f"r/w{i}", "command": fake("--epochs", 4, "--interval", FAST, "--metric", "acc=0")}
        for i in range(4)
    ]
    plan = write_plan(repo, workers, gpus=[0, 1], workers_per_gpu=2)
    code, state, controller = race(plan)
    assert code == 1  # nobody passes
    gpus = sorted(controller.runs[f"race/w{i}"].history.last["gpu"] for i in range(4))
    assert gpus == [0, 0, 1, 1]


def test_bad_branch_fails_that_worker_only(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "bad", "branch": "main", "command": fake("--epochs", 2)},  # checked out in repo
        {"name": "good", "branch": "r/good", "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=1")},
    ])
    code, state, _ = race(plan)
    assert code == 0 and state.experiments["race"].winner == "good"
    assert state.run("race", "bad").state == RunState.failed
    assert "already checked out" in state.run("race", "bad").error


def _start_cli_run(plan: Path, repo: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(plan), "--plain"],
        cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _state(repo: Path) -> PlanState | None:
    try:
        return PlanState.load(repo / "results" / "state.json")
    except Exception:
        return None


def test_status_and_stop_from_another_shell_then_resume(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a", "command": fake("--epochs", 1000, "--interval", 0.02, "--metric", "acc=0.002*epoch")},
        {"name": "b", "branch": "r/b", "command": fake("--epochs", 1000, "--interval", 0.05, "--metric", "acc=0")},
    ], experiment={"max_epochs": 1000})
    proc = _start_cli_run(plan, repo)
    try:
        wait_for(lambda: (s := _state(repo)) and s.run("race", "a").epoch and s.run("race", "a").epoch >= 3)
        status = run_cli("status", str(plan), "--json", cwd=repo)
        data = json.loads(status.stdout)
        assert data["controller_alive"] is True
        assert data["runs"]["race/a"]["state"] == "running"
        assert "running" in run_cli("status", str(plan), cwd=repo).stdout
        stopped = run_cli("stop", str(plan), "b", cwd=repo)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert _state(repo).run("race", "b").state == RunState.stopped
        assert _state(repo).run("race", "a").state == RunState.running
        out = run_cli("stop", str(plan), cwd=repo)  # the whole plan
        assert out.returncode == 0
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    s = _state(repo)
    a = s.run("race", "a")
    assert a.state == RunState.stopped and a.stop_reason == "user"
    epoch_at_stop = a.epoch
    assert marked_processes(leak_check) == []
    # `run` again resumes the stopped runs from their checkpoints and finishes the race
    again = run_cli("run", str(plan), "--plain", cwd=repo)
    assert again.returncode == 0, again.stdout
    s = _state(repo)
    assert s.experiments["race"].winner == "a"
    assert s.run("race", "a").attempt == 2
    assert epochs(repo / "results", "race", "a") == list(range(1, s.run("race", "a").epoch + 1))
    assert epoch_at_stop < s.run("race", "a").epoch


def test_sigint_stops_every_worker_and_leaves_resumable_state(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a", "command": fake("--epochs", 400, "--interval", 0.1, "--metric", "acc=0", "--children", 1)},
    ], experiment={"max_epochs": 1000})
    proc = _start_cli_run(plan, repo)
    wait_for(lambda: (s := _state(repo)) and (s.run("race", "a").epoch or 0) >= 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    rec = _state(repo).run("race", "a")
    assert rec.state == RunState.stopped and rec.stop_reason == "interrupted"
    assert marked_processes(leak_check) == []


HANDLER_UNDER_LOCK = """
import os, signal, threading, time
from orchestrator.cli import install_signal_handlers
from orchestrator.core.controller import Controller

class Loop:  # what the handlers touch of a Controller
    interrupted = None
    detach = False
    wake = threading.Event()
    request_interrupt = Controller.request_interrupt

loop = Loop()
install_signal_handlers(loop)
with loop.wake._cond:  # the main thread inside wake.wait()/clear(), where a signal may land
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # the handler runs here; a handler calling wake.set() would block forever
assert loop.interrupted == "interrupted"
assert loop.wake.wait(10), "the relay thread did not wake the loop"
print("ok")
"""


def test_the_controller_signal_handler_takes_no_lock(tmp_path: Path) -> None:
    """Signal handlers run between two bytecodes of the main thread, maybe while it holds the
    lock of the Event the loop waits on: the handler must only set flags, and a relay thread
    must wake the loop."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", HANDLER_UNDER_LOCK], capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_controller_killed_then_rerun_reattaches(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a", "command": fake("--epochs", 100, "--interval", 0.1, "--metric", "acc=0.05*epoch")},
    ])
    proc = _start_cli_run(plan, repo)
    wait_for(lambda: (s := _state(repo)) and (s.run("race", "a").epoch or 0) >= 2)
    pid = _state(repo).run("race", "a").pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = run_cli("run", str(plan), "--plain", cwd=repo)
    assert again.returncode == 0, again.stdout
    assert f"re-attached to pid {pid}" in again.stdout
    s = _state(repo)
    assert s.run("race", "a").attempt == 1 and s.experiments["race"].winner_epoch == 18
    assert epochs(repo / "results", "race", "a")[:18] == list(range(1, 19))


def test_rerun_one_worker_by_hand(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a", "command": fake("--epochs", 3, "--interval", FAST, "--metric", "acc=0.1")},
    ])
    out = run_cli("rerun", str(plan), "a", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "epoch 3" in out.stdout  # the worker's output went to the terminal
    assert epochs(repo / "results", "race", "a") == [1, 2, 3]
    rec = _state(repo).run("race", "a")
    assert rec.attempt == 1 and rec.state == RunState.exhausted
    out = run_cli("rerun", str(plan), "nope", cwd=repo)
    assert out.returncode == 2 and "no worker 'nope'" in out.stderr


def test_second_controller_on_the_same_plan_is_refused(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a", "command": fake("--epochs", 400, "--interval", 0.1, "--metric", "acc=0")},
    ], experiment={"max_epochs": 1000})
    proc = _start_cli_run(plan, repo)
    try:
        wait_for(lambda: (s := _state(repo)) and s.run("race", "a").state == RunState.running)
        out = run_cli("run", str(plan), cwd=repo)
        assert out.returncode == 2 and "another controller" in out.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_the_verdict_is_drawn_after_the_stops_or_while_a_slow_one_runs(
    repo: Path, leak_check: str
) -> None:
    """The dashboard is not redrawn while the losers checkpoint and exit (the CPU is theirs),
    but a loser that checkpoints for seconds does not hide the verdict: it shows as stopping."""
    def plan_with(slow_checkpoint_s: float, file: str) -> Path:
        return write_plan(repo, [
            {"name": "win", "branch": "r/win",
             "command": fake("--epochs", 50, "--interval", FAST, "--metric", "acc=0.1*epoch")},
            {"name": "loser", "branch": "r/loser",
             "command": fake("--epochs", 500, "--interval", FAST, "--metric", "acc=0.01",
                             "--checkpoint-s", slow_checkpoint_s)},
        ], criteria=["acc >= 0.5"], file=file, dashboard=f"results/{file}.md",
            results_dir=f"results/{file}", grace_s=30, dashboard_interval_s=0.05)

    def first_page_with_the_verdict(plan: Path) -> tuple[str, subprocess.Popen[bytes]]:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(plan),
                                 "--plain"], cwd=repo, stdout=subprocess.DEVNULL)
        page = repo / "results" / f"{plan.name}.md"
        text = wait_for(lambda: (t := page.read_text() if page.exists() else "")
                        and "won at" in t and t, timeout=60, interval=0.005)
        return text, proc

    # a loser that stops at once: the first page with the verdict already shows it stopped
    text, proc = first_page_with_the_verdict(plan_with(0, "quick"))
    row = next(line for line in text.splitlines() if line.startswith("| loser "))
    assert "stopped: lost to win" in row and "running" not in row, row
    assert proc.wait(timeout=60) == 0
    # a loser that checkpoints for 4 s: the verdict is drawn while it is still stopping
    text, proc = first_page_with_the_verdict(plan_with(4, "slow"))
    row = next(line for line in text.splitlines() if line.startswith("| loser "))
    assert "⏹ stopping: lost to win" in row, row
    state = PlanState.load(repo / "results" / "slow" / "state.json")
    assert state.run("race", "loser").state == RunState.running  # its stop is not over
    assert proc.wait(timeout=60) == 0
    state = PlanState.load(repo / "results" / "slow" / "state.json")
    assert state.run("race", "loser").state == RunState.stopped
