"""Shared fixtures: a real git repository (in a path with spaces), plan files, leak checks."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

TESTS = Path(__file__).resolve().parent
FAKE_WORKER = TESTS / "fake_worker.py"
MARKER_ENV = "PYTEST_PROC_MARKER"
CHAOS_SEED_DEFAULT = 20261206


def chaos_seed() -> int:
    """The chaos suite's seed: fixed unless CHAOS_SEED names one (or says ``random``)."""
    value = os.environ.get("CHAOS_SEED", "").strip()
    if value == "random":
        value = os.environ["CHAOS_SEED"] = str(random.SystemRandom().randrange(1 << 30))
    return int(value) if value else CHAOS_SEED_DEFAULT


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the chaos seed at the end of every run (also under -q, which hides the header)."""
    seed = chaos_seed()
    terminalreporter.write_line(
        f"chaos seed: {seed} (rerun with CHAOS_SEED={seed}; CHAOS_SEED=random explores)"
    )


# The longest test files, longest first (wall seconds of `pytest -n 2 --dist loadfile
# --durations=0`, summed per file). CI runs the files on two workers in collection order; starting
# the long ones first (longest-processing-time-first) keeps one worker from finishing a long file
# alone at the end. Only the order changes; a file missing here runs after these, as collected.
LONGEST_FILES = (
    "test_ray_executor.py",
    "test_chaos.py",
    "test_race.py",
    "test_persistence_worker.py",
    "test_third_party.py",
    "test_trajectory_worker.py",
    "test_reliability.py",
    "test_ray_cluster.py",
    "test_fvlm_worker.py",
    "test_distill_worker.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of LONGEST_FILES first, in that order; the rest keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


def fake(*args: str | int | float) -> list[str]:
    """Command list running the fake worker with ``args``."""
    return ["python", str(FAKE_WORKER), *map(str, args)]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit, at a path containing spaces."""
    path = tmp_path / "my repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "user.name", "Test")
    (path / "README.md").write_text("test repo\n")
    git(path, "add", "README.md")
    git(path, "commit", "-q", "-m", "init")
    return path


def write_plan(
    repo: Path,
    workers: list[dict[str, Any]],
    *,
    criteria: list[str] | None = None,
    name: str = "race",
    experiment: dict[str, Any] | None = None,
    file: str = "plan.yaml",
    **settings: Any,
) -> Path:
    """Write a plan with one experiment into ``repo`` and return its path."""
    exp = {
        "name": name,
        "criteria": criteria or ["acc >= 0.9"],
        "max_epochs": 50,
        "workers": workers,
    }
    exp.update(experiment or {})
    plan = {
        "gpus": "none",
        "poll_interval_s": 0.1,
        "dashboard_interval_s": 0.2,
        "grace_s": 5,
        "retry_backoff_s": 0.1,
        "experiments": [exp],
    }
    plan.update(settings)
    path = repo / file
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    """``python -m orchestrator ARGS`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw,
    )


REPORT_RENDERER = "orchestrator.views.race_report"


def marked_processes(marker: str, *, report_wait_s: float = 60.0) -> list[psutil.Process]:
    """Live processes (not this one) whose environment carries ``marker``.

    A race report renderer (the detached process a decided race starts) is waited for, up to
    ``report_wait_s``, rather than counted: it ends on its own once the report is written. So
    is a process caught in passing, whose command line cannot be read (it is exiting, or being
    born). Any process still alive after that is returned like any other leak.
    """
    deadline = time.monotonic() + report_wait_s
    while True:
        found = _marked(marker)
        transient = [p for p in found if _is_renderer(p)]
        if not transient or time.monotonic() > deadline:
            return [p for p in found if p.is_running()]
        time.sleep(0.05)


def _is_renderer(proc: psutil.Process) -> bool:
    """A race report renderer, or a process whose command line cannot be read right now."""
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return True  # gone (or going) while we looked: look again
    return not cmdline or REPORT_RENDERER in cmdline


def _marked(marker: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER_ENV) == marker:
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


@pytest.fixture
def leak_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Tag every process the test starts; fail if any survives the test."""
    marker = uuid.uuid4().hex
    monkeypatch.setenv(MARKER_ENV, marker)
    yield marker
    deadline = time.monotonic() + 5
    leaked = marked_processes(marker)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = marked_processes(marker)
    info = [(p.pid, " ".join(p.cmdline()[:4])) for p in leaked if p.is_running()]
    for p in leaked:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not info, f"processes survived the test: {info}"


def wait_for(condition: Any, timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll ``condition()`` until truthy (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
