"""Launching in a session and stopping whole process trees: nothing survives a stop."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import FAKE_WORKER, marked_processes, wait_for

from orchestrator.running.processes import attach, launch, stop_trees

DATALOADER_WORKER = textwrap.dedent(
    """
    import time, torch
    from torch.utils.data import DataLoader, Dataset

    class Slow(Dataset):
        def __len__(self): return 10**6
        def __getitem__(self, i):
            time.sleep(0.01)
            return torch.zeros(4)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        for batch in DataLoader(Slow(), batch_size=2, num_workers=2):
            pass
    """
)


def start(tmp_path: Path, argv: list[str], name: str = "run"):
    run_dir = tmp_path / name
    run_dir.mkdir()
    import os

    env = dict(os.environ)
    env["ORCH_RUN_DIR"] = str(run_dir)
    return launch(
        argv, cwd=tmp_path, env=env, stdout=run_dir / "stdout.log", stderr=run_dir / "stderr.log",
        exit_status=run_dir / "exit.json", run_id=f"test-{name}",
    ), run_dir


def descendants(tree) -> list[psutil.Process]:
    proc = tree.leader_process()
    return proc.children(recursive=True) if proc else []


def test_dataloader_workers_are_stopped_with_their_trainer(tmp_path: Path, leak_check: str) -> None:
    script = tmp_path / "train.py"
    script.write_text(DATALOADER_WORKER)
    tree, _ = start(tmp_path, [sys.executable, str(script)])
    # wrapper -> trainer -> 2 DataLoader workers
    wait_for(lambda: len(descendants(tree)) >= 3, timeout=60)
    reports = stop_trees([tree], grace_s=5)
    assert reports[0].survivors == []
    assert marked_processes(leak_check) == []


def test_sigterm_ignoring_worker_is_killed_after_grace(tmp_path: Path, leak_check: str) -> None:
    tree, run_dir = start(tmp_path, [sys.executable, str(FAKE_WORKER), "--epochs", "1000",
                                     "--interval", "0.05", "--ignore-sigterm", "--children", "2"])
    wait_for(lambda: (run_dir / "metrics.jsonl").exists())
    reports = stop_trees([tree], grace_s=0.5)
    assert reports[0].killed >= 1 and reports[0].survivors == []
    assert marked_processes(leak_check) == []


def test_setsid_escapee_is_found_by_its_run_tag(tmp_path: Path, leak_check: str) -> None:
    tree, run_dir = start(tmp_path, [sys.executable, str(FAKE_WORKER), "--epochs", "1000",
                                     "--interval", "0.05", "--setsid-child"])
    wait_for(lambda: (run_dir / "metrics.jsonl").exists())
    import os

    # the helper left the run's session and process group: killpg alone would miss it
    escapees = wait_for(lambda: [
        p for p in marked_processes(leak_check) if os.getsid(p.pid) != tree.leader.pid
    ])
    assert all(os.getpgid(p.pid) != tree.leader.pid for p in escapees)
    reports = stop_trees([tree], grace_s=2)
    assert reports[0].survivors == []
    assert marked_processes(leak_check) == []


def test_graceful_worker_exits_zero_and_wrapper_records_it(tmp_path: Path, leak_check: str) -> None:
    tree, run_dir = start(tmp_path, [sys.executable, str(FAKE_WORKER), "--epochs", "1000",
                                     "--interval", "0.05"])
    wait_for(lambda: (run_dir / "metrics.jsonl").exists())
    reports = stop_trees([tree], grace_s=10)
    assert reports[0].killed == 0
    status = json.loads((run_dir / "exit.json").read_text())
    assert status["returncode"] == 0
    assert (run_dir / "checkpoints" / "latest.ckpt").exists()


def test_attach_checks_create_time_not_just_pid(tmp_path: Path, leak_check: str) -> None:
    tree, run_dir = start(tmp_path, [sys.executable, str(FAKE_WORKER), "--epochs", "1000",
                                     "--interval", "0.05"])
    assert attach(tree.leader.pid, tree.leader.create_time, "x") is not None
    assert attach(tree.leader.pid, tree.leader.create_time - 100, "x") is None  # reused pid
    stop_trees([tree], grace_s=5)
    assert attach(tree.leader.pid, tree.leader.create_time, "x") is None


def test_missing_executable_is_reported_by_the_wrapper(tmp_path: Path, leak_check: str) -> None:
    tree, run_dir = start(tmp_path, ["/no/such/program"])
    wait_for(lambda: (run_dir / "exit.json").exists())
    assert json.loads((run_dir / "exit.json").read_text())["returncode"] == 127
    assert "cannot start" in (run_dir / "stderr.log").read_text()
    stop_trees([tree], grace_s=1)


CHECKPOINT_S = 1.5  # longer than stop_trees' term_wait_s (1 s): only grace_s can cover it


@pytest.mark.parametrize("grace_s, finishes", [(15.0, True), (0.3, False)])
def test_grace_covers_a_slow_stop_checkpoint_or_sigkill_ends_it(
    tmp_path: Path, leak_check: str, grace_s: float, finishes: bool
) -> None:
    """A worker that needs CHECKPOINT_S after SIGTERM exits 0 under a longer grace_s and is
    killed (no checkpoint) under a shorter one."""
    tree, run_dir = start(tmp_path, [sys.executable, str(FAKE_WORKER), "--epochs", "1000",
                                     "--interval", "0.05", "--checkpoint-s", str(CHECKPOINT_S)])
    wait_for(lambda: (run_dir / "metrics.jsonl").exists())
    reports = stop_trees([tree], grace_s=grace_s)
    assert reports[0].survivors == []
    stdout = (run_dir / "stdout.log").read_text()
    assert "SIGTERM: writing a stop checkpoint" in stdout  # SIGTERM came first in both cases
    status = json.loads((run_dir / "exit.json").read_text()) if finishes else None
    if finishes:
        assert reports[0].killed == 0
        assert status is not None and status["returncode"] == 0
        assert (run_dir / "stop.ckpt").exists() and "stop checkpoint written" in stdout
    else:
        assert reports[0].killed >= 1
        assert not (run_dir / "stop.ckpt").exists()
        assert "stop checkpoint written" not in stdout
    assert marked_processes(leak_check) == []
