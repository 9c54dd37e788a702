"""The everyday commands through a real `python -m orchestrator`: --version, exit codes, the
argument syntax, clean --results, logs -f, the dry run, rerun's tee."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fake, git, marked_processes, run_cli, wait_for, write_plan

from orchestrator import __version__, cli
from orchestrator.cli import commands
from orchestrator.core.state import PlanState, RunState

FAST = 0.05


def _state(repo: Path) -> PlanState | None:
    try:
        return PlanState.load(repo / "results" / "state.json")
    except Exception:
        return None


def test_version(tmp_path: Path) -> None:
    out = run_cli("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"orchestrator {__version__}"


def test_an_internal_error_exits_3_and_saves_the_traceback(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(repo, [{"name": "w", "branch": "r/w", "command": fake()}])

    def boom(*_a: object, **_k: object) -> str:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(commands, "describe", boom)
    code = cli.main(["validate", str(plan)])
    err = capsys.readouterr().err
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: internal error")
    assert "injected fault" in lines[0] and "Traceback" not in err
    saved = Path(lines[0].rsplit("traceback saved to ", 1)[1])
    assert saved.is_file() and "RuntimeError: injected fault" in saved.read_text()
    assert saved.parent == repo / "results" / "crashes"


def test_user_errors_exit_2_with_one_error_line(repo: Path) -> None:
    out = run_cli("status", "nope.yaml", cwd=repo)
    assert out.returncode == 2 and out.stderr.startswith("error: ")
    assert "Traceback" not in out.stderr
    out = run_cli("frobnicate", cwd=repo)
    assert out.returncode == 2


def test_stop_w1_is_a_worker_of_the_default_plan(repo: Path, leak_check: str) -> None:
    write_plan(repo, [{"name": "w1", "branch": "r/w1", "command": fake()}],
               file="experiments.yaml")
    out = run_cli("stop", "w1", cwd=repo)
    # w1 was read as a worker: the plan (experiments.yaml) has no state yet
    assert out.returncode == 2 and "has not been run yet" in out.stderr, out.stderr
    out = run_cli("stop", "nobody", cwd=repo)
    assert out.returncode == 2
    env = {**os.environ, "ORCH_PLAN": "other.yaml"}
    out = run_cli("status", cwd=repo, env=env)
    assert out.returncode == 2 and "other.yaml" in out.stderr
    out = run_cli("report", cwd=repo, env=env)  # report reads the same default
    assert out.returncode == 2 and "other.yaml" in out.stderr


def test_clean_results_without_yes_and_without_a_terminal_refuses(
    repo: Path, leak_check: str
) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
    ])
    assert run_cli("run", str(plan), "--plain", cwd=repo).returncode == 0
    out = run_cli("clean", str(plan), "--results", cwd=repo, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and out.stderr.count("error:") == 1 and "--yes" in out.stderr
    assert (repo / "results" / "state.json").exists()  # nothing deleted
    assert (repo / ".worktrees" / "race" / "w").exists()
    out = run_cli("clean", str(plan), "--results", "--yes", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert not (repo / "results" / "state.json").exists()


def test_fresh_keeps_the_earlier_race_and_history_lists_both(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
    ])
    assert run_cli("run", str(plan), "--plain", cwd=repo).returncode == 0
    first = _state(repo)
    assert first is not None and first.race_id
    again = run_cli("run", str(plan), "--plain", cwd=repo)
    assert again.returncode == 0 and len(again.stdout.strip().splitlines()) == 1
    assert "already decided" in again.stdout and "--fresh" in again.stdout
    assert run_cli("run", str(plan), "--plain", "--fresh", cwd=repo).returncode == 0
    second = _state(repo)
    assert second is not None and second.race_id != first.race_id
    kept = repo / "results" / "races" / first.race_id
    assert (kept / "state.json").exists() and (kept / "race" / "w" / "metrics.jsonl").exists()
    assert (kept / "race" / "race_report" / "RACE_REPORT.md").exists()
    out = run_cli("history", str(plan), "--json", cwd=repo)
    data = json.loads(out.stdout)
    assert [r["race_id"] for r in data["races"]] == [first.race_id, second.race_id]
    assert all(r["experiments"][0]["winner"] == "w" for r in data["races"])
    text = run_cli("history", str(plan), cwd=repo).stdout
    assert first.race_id in text and second.race_id in text
    cmp = run_cli("compare", str(plan), first.race_id, second.race_id, "--json", cwd=repo)
    rows = {r["field"]: r for r in json.loads(cmp.stdout)["rows"]}
    assert rows["race:winner"]["a"] == rows["race:winner"]["b"] == "w"
    csv = run_cli("compare", str(plan), second.race_id, "--csv", cwd=repo)
    assert csv.returncode == 2  # one race needs two workers
    # clean --keep 1 keeps the newest race only
    out = run_cli("clean", str(plan), "--results", "--yes", "--keep", "1", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert not kept.exists() and (repo / "results" / "state.json").exists()


def test_logs_follow_a_live_worker_and_end_when_it_ends(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 15, "--interval", 0.1, "--metric", "acc=0.1")},
    ])
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(plan), "--plain"],
                            cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (s := _state(repo)) and s.run("race", "w").state == RunState.running
                 and (s.run("race", "w").epoch or 0) >= 1)
        logs = run_cli("logs", str(plan), "w", "-f", cwd=repo, timeout=120)
        assert logs.returncode == 0, logs.stderr
        assert "==== attempt 1" in logs.stdout and "epoch 15 " in logs.stdout
        assert _state(repo).run("race", "w").state == RunState.exhausted
        assert proc.wait(timeout=60) == 1  # nobody won
    finally:
        if proc.poll() is None:
            proc.kill()
    out = run_cli("logs", str(plan), "w", "--stderr", cwd=repo)
    assert out.returncode == 0


def test_dry_run_starts_nothing_and_names_problems(repo: Path, leak_check: str) -> None:
    git(repo, "branch", "r/old")
    (repo / "x.txt").write_text("x\n")
    git(repo, "add", "x.txt")
    git(repo, "commit", "-q", "-m", "x")
    git(repo, "worktree", "add", "-q", str(repo.parent / "elsewhere"), "-b", "r/taken")
    plan = write_plan(repo, [
        {"name": "old", "branch": "r/old", "env": {"HF_TOKEN": "sekrit", "LR": "3"},
         "command": fake("--epochs", 3)},
        {"name": "new", "branch": "r/new", "command": fake("--epochs", 3)},
        {"name": "taken", "branch": "r/taken", "command": fake("--epochs", 3)},
        {"name": "missing", "branch": "r/missing", "command": ["no-such-program-xyz", "--go"]},
    ], base_ref="main")
    before = git(repo, "worktree", "list", "--porcelain")
    out = run_cli("run", str(plan), "--dry-run", cwd=repo)
    assert out.returncode == 2
    assert "1 commit behind main" in out.stdout and "r/new (new, from main)" in out.stdout
    assert "HF_TOKEN=<redacted>" in out.stdout and "sekrit" not in out.stdout
    assert "branch 'r/taken' is already checked out" in out.stderr
    assert "'no-such-program-xyz' not found" in out.stderr
    assert git(repo, "worktree", "list", "--porcelain") == before  # no worktree change
    assert not (repo / "results").exists() and not (repo / ".worktrees").exists()
    assert marked_processes(leak_check) == []
    val = run_cli("validate", str(plan), cwd=repo)
    assert val.returncode == 2 and "already checked out" in val.stderr
    bad = write_plan(repo, [{"name": "w", "branch": "bad~name", "command": fake()}],
                     file="bad.yaml")
    out = run_cli("run", str(bad), "--dry-run", cwd=repo)
    assert out.returncode == 2 and "'bad~name' is not a valid git branch name" in out.stderr


def test_rerun_tees_the_log_and_reads_a_regex_source(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a",
         "metrics": {"source": "regex",
                     "pattern": r"^epoch (?P<epoch>\d+) \{'acc': (?P<acc>[\d.]+)"},
         "command": fake("--epochs", 3, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
    ])
    out = run_cli("rerun", str(plan), "a", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "epoch 3" in out.stdout  # to the terminal
    log = (repo / "results" / "race" / "a" / "stdout.log").read_text()
    assert "epoch 3" in log and "==== attempt 1" in log  # and to the run's log
    last = out.stdout.strip().splitlines()[-1]
    assert "metrics (regex)" in last and "stdout.log" in last and "3 records" in last
    assert "HELD" in last and "epoch 3" in last
    rec = _state(repo).run("race", "a")
    assert rec.commit and rec.attempts[0]["slot"] == "by hand"
    # the one-worker syntax with the plan first keeps working; two workers do not
    assert run_cli("rerun", str(plan), "a", "b", cwd=repo).returncode == 2


def test_a_new_race_waits_for_the_last_race_report_renderer(repo: Path, leak_check: str) -> None:
    """`run --fresh` moves the last race's files only once its race report renderer (a detached
    process that may still be writing) is done: the report is never split between races."""
    import threading

    from orchestrator.core.config import load_plan
    from orchestrator.core.races import archive_current
    from orchestrator.paths import ResultsPaths

    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
    ])
    assert run_cli("run", str(plan), "--plain", cwd=repo).returncode == 0
    paths = ResultsPaths(repo / "results")
    wait_for(lambda: not list(paths.race_report_dir("race").glob(".rendering-*")), timeout=60)
    renderer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    marker = paths.rendering_marker("race", renderer.pid)
    marker.touch()
    moved: list[str | None] = []
    mover = threading.Thread(target=lambda: moved.append(archive_current(paths, load_plan(plan))))
    mover.start()
    mover.join(0.5)
    assert mover.is_alive() and (repo / "results" / "state.json").exists()  # still waiting
    renderer.terminate()
    renderer.wait()
    mover.join(30)
    assert not mover.is_alive() and moved and moved[0] is not None
    archived = paths.archived_race(moved[0])
    assert (archived.race_report("race")).exists() and not marker.exists()
    assert not list(archived.race_report_dir("race").glob(".rendering-*"))
