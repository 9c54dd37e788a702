"""Reliability gaps, each proven with real processes: GPU memory release before a slot is reused
(with a fake NVML: only the GPU is faked), metric sources for unmodified training scripts
(regex over stdout, Lightning-style CSV, TensorBoard event files) in a real race, controller
signals (SIGTERM, --leave-running, SIGHUP, --background), re-attach after a controller died while
stopping a decided race, strays of an attempt whose pid never reached the state file, and the
pieces underneath (fsynced metric lines, glued-line salvage, in-place rewrites, bad CSV rows).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import fake, marked_processes, run_cli, wait_for, write_plan

from orchestrator.core.config import load_plan
from orchestrator.core.controller import Controller
from orchestrator.core.state import (
    ExperimentRecord,
    ExperimentStatus,
    PlanState,
    RunRecord,
    RunState,
)
from orchestrator.paths import ResultsPaths
from orchestrator.reporting import Reporter
from orchestrator.running.gpus import Slot, make_slots, wait_gpu_memory_released
from orchestrator.running.launchers import LaunchSpec, LocalLauncher
from orchestrator.running.processes import find_strays
from orchestrator.session import build_controller
from orchestrator.sources.metrics import CsvSource, JsonlSource, MetricHistory

pytestmark = pytest.mark.slow  # whole races, on purpose; still part of the default suite

FAST = 0.05


def state_of(results: Path) -> PlanState:
    return PlanState.load(ResultsPaths(results).state)


def try_state(results: Path) -> PlanState | None:
    try:
        return state_of(results)
    except Exception:
        return None


# -- GPU memory release -------------------------------------------------------------------------


class FakeNVML(types.ModuleType):
    """A stand-in for pynvml: GPU 0 lists the pids in ``held`` as holding memory until their
    release time (seconds after the first query once the test marks them released), like a
    driver that frees a dead process's memory late."""

    class NVMLError(Exception):
        pass

    def __init__(self, lag_s: float | None) -> None:
        super().__init__("pynvml")
        self.lag_s = lag_s  # None: never released
        self.held: dict[int, float | None] = {}  # pid -> release time (None: not yet known)
        self.queries = 0
        self.released_at: float | None = None

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index != 0:
            raise self.NVMLError("no such device")
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        self.queries += 1
        now = time.time()
        out = []
        for pid, release in list(self.held.items()):
            if release is None and self.lag_s is not None:
                release = self.held[pid] = now + self.lag_s
            if release is None or now < release:
                out.append(types.SimpleNamespace(pid=pid, usedGpuMemory=512 << 20))
            elif self.released_at is None:
                self.released_at = now
        return out


def _gpu_race(
    repo: Path, nvml: FakeNVML, monkeypatch: pytest.MonkeyPatch, timeout_s: float
) -> tuple[Controller, PlanState]:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    plan = write_plan(
        repo,
        [
            {
                "name": "first",
                "branch": "r/first",
                "command": fake("--epochs", 3, "--interval", FAST, "--metric", "acc=0"),
            },
            {
                "name": "next",
                "branch": "r/next",
                "command": fake("--epochs", 2, "--interval", FAST, "--metric", "acc=0"),
            },
        ],
        gpus=[0],
        max_parallel=1,
    )
    controller = build_controller(load_plan(plan))
    controller.slot_holds.timeout_s = timeout_s
    done: list[int] = []
    def run() -> None:
        done.append(controller.run())
        controller.wait_for_views()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def first_pid() -> int | None:
        live = controller.runs.get("race/first")
        return live.handle.pid if live is not None and live.handle is not None else None

    nvml.held[wait_for(first_pid, timeout=60, interval=0.002)] = None
    thread.join(120)
    assert done == [1]  # nobody meets acc >= 0.9: both exhausted
    return controller, state_of(repo / "results")


def test_gpu_slot_waits_until_nvml_shows_the_memory_released(
    repo: Path, leak_check: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = FakeNVML(lag_s=1.5)
    controller, state = _gpu_race(repo, nvml, monkeypatch, timeout_s=30)
    first, nxt = state.run("race", "first"), state.run("race", "next")
    assert first.ended_at is not None and nvml.released_at is not None
    assert nvml.released_at - first.ended_at >= 1.4  # the driver lagged...
    assert nxt.started_at >= nvml.released_at  # ...and the next run waited for it
    assert first.gpu_release.startswith("released in ")
    assert float(first.gpu_release.split()[2].rstrip("s")) >= 1.4
    assert nxt.slot == "gpu0" and nvml.queries >= 2
    assert marked_processes(leak_check) == []


def test_gpu_memory_never_released_is_reported_and_the_slot_handed_over(
    repo: Path, leak_check: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = FakeNVML(lag_s=None)
    controller, state = _gpu_race(repo, nvml, monkeypatch, timeout_s=1.0)
    first, nxt = state.run("race", "first"), state.run("race", "next")
    assert first.gpu_release.startswith("NOT released after 1s (pids [")
    assert nxt.started_at - first.ended_at >= 1.0
    assert nxt.state == RunState.exhausted  # the race went on
    assert any("GPU 0 memory still held by pids" in e for e in controller.events)
    assert marked_processes(leak_check) == []


def test_gpu_wait_without_nvml_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: NVML not installed

    class NeverWait(threading.Event):  # the wait between two NVML polls must not happen
        def wait(self, timeout: float | None = None) -> bool:
            raise AssertionError(f"waited {timeout}s for an NVML that is not there")

    assert wait_gpu_memory_released(0, {1, 2}, timeout_s=30, cancel=NeverWait())[0] == []


def test_gpus_auto_takes_the_devices_nvml_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 3  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-{h:08d}"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda h: b"Fake GPU"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("ORCH_FAKE_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = make_slots("auto", workers_per_gpu=2, max_parallel=None, cpu_slots=8)
    # GPU-major: runs spread over the GPUs before two share one
    assert [s.cuda_visible_devices for s in slots] == ["0", "1", "2", "0", "1", "2"]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML (and no nvidia-smi here)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert [s.gpu for s in make_slots("auto", workers_per_gpu=2, max_parallel=None,
                                      cpu_slots=2)] == [None, None]  # CPU slots


# -- metric sources for unmodified scripts ------------------------------------------------------


REGEX_SCRIPT = textwrap.dedent(
    """
    # an unmodified training script: it only prints
    import sys, time
    for step in range(1, 200):
        print(f"loading batch {step}...", flush=True)
        train, test = 2 - 0.1 * step, 1 - 0.05 * step
        print(f"step {step} train loss: {train:.3f} test loss: {test:.3f}", flush=True)
        time.sleep(0.05)
    """
)

CSV_SCRIPT = textwrap.dedent(
    """
    # writes metrics like Lightning's CSVLogger: {save_dir}/lightning_logs/version_0/metrics.csv,
    # one row per log call, empty cells for keys not logged then, and the whole file rewritten
    # with a wider header when a new key appears
    import csv, os, sys, time
    path = os.path.join(sys.argv[1], "lightning_logs", "version_0", "metrics.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows, keys = [], []
    def log(row):
        global keys
        rows.append(row)
        new = sorted(set(keys) | set(row))
        mode = "a"
        if new != keys:
            keys, mode = new, "w"
        with open(path, mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            if mode == "w":
                w.writeheader()
                w.writerows(rows)
            else:
                w.writerow(row)
    for epoch in range(0, 200):
        log({"epoch": epoch, "step": 10 * epoch + 9, "train_loss": 2 - 0.1 * epoch})
        if epoch >= 1:  # validation starts at epoch 1: a new column
            log({"epoch": epoch, "step": 10 * epoch + 9, "test_loss": 1 - 0.05 * epoch})
        time.sleep(0.05)
    """
)

TB_SCRIPT = textwrap.dedent(
    """
    # writes TensorBoard event files (as SummaryWriter does), flushing after each step
    import sys, time
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    writer = EventFileWriter(sys.argv[1])
    for step in range(1, 200):
        values = [Summary.Value(tag="test_loss", simple_value=1 - 0.05 * step),
                  Summary.Value(tag="train_loss", simple_value=2 - 0.1 * step)]
        writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        writer.flush()
        time.sleep(0.05)
    """
)


def test_unmodified_scripts_race_on_regex_csv_and_tensorboard_metrics(
    repo: Path, leak_check: str
) -> None:
    pytest.importorskip("tensorboard")
    scripts = {}
    for name, text in (("regex", REGEX_SCRIPT), ("csv", CSV_SCRIPT), ("tb", TB_SCRIPT)):
        scripts[name] = repo.parent / f"{name}_train.py"
        scripts[name].write_text(text)

    def experiment(name: str, command: list[str], metrics: dict[str, str]) -> dict[str, Any]:
        return {
            "name": name,
            "criteria": ["test_loss <= 0.5"],
            "max_epochs": 1000,
            "workers": [
                {"name": "w", "branch": f"{name}/w", "command": command, "metrics": metrics}
            ],
        }

    plan = {
        "gpus": "none",
        "poll_interval_s": 0.1,
        "dashboard_interval_s": 0.5,
        "grace_s": 5,
        "experiments": [
            experiment(
                "regex",
                ["python", str(scripts["regex"])],
                {
                    "source": "regex",
                    "pattern": r"step (?P<step>\d+) train loss: (?P<train_loss>\S+) test loss: (?P<test_loss>\S+)",  # noqa: E501
                },
            ),
            experiment(
                "csv",
                ["python", str(scripts["csv"]), "{run_dir}"],
                {"source": "csv", "path": "lightning_logs/version_0/metrics.csv"},
            ),
            experiment(
                "tb",
                ["python", str(scripts["tb"]), "{run_dir}/tb"],
                {"source": "tensorboard", "path": "tb"},
            ),
        ],
    }
    path = repo / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    controller = build_controller(load_plan(path))
    assert controller.run() == 0
    controller.wait_for_views()
    state = state_of(repo / "results")
    # test_loss = 1 - 0.05 x: <= 0.5 first at step 10 (regex, tensorboard), at epoch 10 (csv)
    assert state.experiments["regex"].winner_epoch == 10
    assert state.experiments["tb"].winner_epoch == 10
    assert state.experiments["csv"].winner_epoch == 10
    for exp in ("regex", "csv", "tb"):
        assert state.experiments[exp].status == ExperimentStatus.succeeded
        records = controller.runs[f"{exp}/w"].history.records
        xs = [r["step"] for r in records]
        assert xs == sorted(set(xs)), (exp, xs)  # in order, none twice
        assert state.run(exp, "w").metric_problems == {}, exp
    regex = controller.runs["regex/w"].history.records
    assert [r["step"] for r in regex[:10]] == list(range(1, 11))
    assert regex[9] == {"step": 10, "train_loss": 1.0, "test_loss": 0.5}
    tb = controller.runs["tb/w"].history.records
    assert [r["step"] for r in tb[:10]] == list(range(1, 11))
    assert abs(tb[9]["test_loss"] - 0.5) < 1e-6 and abs(tb[9]["train_loss"] - 1.0) < 1e-6
    csv_records = controller.runs["csv/w"].history.records
    # one record per step: the validation row replaced the training row of the same step
    assert [r["step"] for r in csv_records[:11]] == [10 * e + 9 for e in range(11)]
    assert csv_records[10]["test_loss"] == 0.5 and csv_records[0]["train_loss"] == 2.0
    assert marked_processes(leak_check) == []


# -- signals to the controller ------------------------------------------------------------------


def _long_plan(repo: Path) -> Path:
    return write_plan(
        repo,
        [
            {
                "name": "a",
                "branch": "r/a",
                "command": fake(
                    "--epochs",
                    400,
                    "--interval",
                    0.05,
                    "--metric",
                    "acc=0.01*epoch",
                    "--children",
                    1,
                ),
            },
            {
                "name": "b",
                "branch": "r/b",
                "command": fake("--epochs", 400, "--interval", 0.05, "--metric", "acc=0.001*epoch"),
            },
        ],
        experiment={"max_epochs": 400},
    )


def _start(plan: Path, repo: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(plan), "--plain", *extra],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _both_running(repo: Path, epochs: int = 2) -> PlanState:
    return wait_for(
        lambda: (
            (s := try_state(repo / "results"))
            and all((s.run("race", w).epoch or 0) >= epochs for w in ("a", "b"))
            and s
        ),
        timeout=60,
    )


def test_sigterm_to_the_controller_stops_every_worker_cleanly(repo: Path, leak_check: str) -> None:
    proc = _start(_long_plan(repo), repo)
    _both_running(repo)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    state = state_of(repo / "results")
    for w in ("a", "b"):
        rec = state.run("race", w)
        assert (
            rec.state == RunState.stopped and rec.stop_reason == "interrupted" and rec.pid is None
        )
        # SIGTERM reached the worker, which exited 0 at a safe point (no SIGKILL needed)
        assert rec.exit_code == 0
    assert marked_processes(leak_check) == []


def test_leave_running_then_run_again_reattaches(repo: Path, leak_check: str) -> None:
    plan = _long_plan(repo)
    proc = _start(plan, repo, "--leave-running")
    before = _both_running(repo)
    pids = {w: before.run("race", w).pid for w in ("a", "b")}
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert b"detached: 2 runs keep running" in out
    for w, pid in pids.items():
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert state_of(repo / "results").run("race", w).state == RunState.running
    again = run_cli("run", str(plan), "--plain", cwd=repo)
    assert again.returncode == 0, again.stdout + again.stderr
    for w, pid in pids.items():
        assert f"race/{w}: re-attached to pid {pid} (attempt 1)" in again.stdout
    state = state_of(repo / "results")
    assert state.experiments["race"].winner == "a" and state.experiments["race"].winner_epoch == 90
    assert state.run("race", "a").attempt == 1
    assert marked_processes(leak_check) == []


def test_sighup_does_not_kill_the_controller(repo: Path, leak_check: str) -> None:
    plan = write_plan(
        repo,
        [
            {
                "name": "a",
                "branch": "r/a",
                "command": fake("--epochs", 400, "--interval", 0.05, "--metric", "acc=0.02*epoch"),
            },
        ],
        experiment={"max_epochs": 400},
    )
    proc = _start(plan, repo)
    wait_for(
        lambda: (s := try_state(repo / "results")) and (s.run("race", "a").epoch or 0) >= 2,
        timeout=60,
    )
    proc.send_signal(signal.SIGHUP)  # what a dropped SSH session sends
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    state = state_of(repo / "results")
    assert state.experiments["race"].winner == "a" and state.experiments["race"].winner_epoch == 45
    assert marked_processes(leak_check) == []


def test_background_run_survives_its_shell_and_terminal_going_away(
    repo: Path, leak_check: str
) -> None:
    plan = write_plan(
        repo,
        [
            {
                "name": "a",
                "branch": "r/a",
                "command": fake("--epochs", 400, "--interval", 0.05, "--metric", "acc=0.02*epoch"),
            },
        ],
        experiment={"max_epochs": 400},
    )
    # a login shell of its own session (like an SSH session) starts the controller and waits
    shell = subprocess.Popen(
        [
            "bash",
            "-c",
            f"{sys.executable} -m orchestrator run {json.dumps(str(plan))} --background; sleep 60",
        ],
        cwd=repo,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    state = wait_for(
        lambda: (s := try_state(repo / "results")) and (s.run("race", "a").epoch or 0) >= 2 and s,
        timeout=60,
    )
    controller_pid = state.controller["pid"]
    assert os.getsid(controller_pid) != os.getsid(shell.pid)  # its own session
    os.killpg(shell.pid, signal.SIGHUP)  # the connection drops: the session gets SIGHUP...
    os.killpg(shell.pid, signal.SIGKILL)  # ...and the shell is gone
    out, _ = shell.communicate(timeout=10)
    assert b"controller running in the background" in out
    assert psutil.pid_exists(controller_pid)
    done = wait_for(lambda: (s := try_state(repo / "results")) and s.finished and s, timeout=120)
    assert done.experiments["race"].winner == "a" and done.experiments["race"].winner_epoch == 45
    log = (repo / "results" / "controller.log").read_text()
    assert "a WINS at epoch 45" in log
    wait_for(
        lambda: (
            not psutil.pid_exists(controller_pid)
            or psutil.Process(controller_pid).status() == psutil.STATUS_ZOMBIE
        ),
        timeout=30,
    )
    assert marked_processes(leak_check) == []


# -- re-attach edge cases (deterministic versions of what the chaos suite hits by chance) -------


def _launch_fake(
    repo: Path, results: Path, worker: str, run_id: str, *args: str | float | int
) -> Any:
    """Start a fake worker the way a controller does (launch wrapper, session, env tags)."""
    paths = ResultsPaths(results).run("race", worker)
    env = dict(
        os.environ,
        ORCH_RUN_DIR=str(paths.run_dir),
        ORCH_EXPERIMENT="race",
        ORCH_WORKER=worker,
        ORCH_ATTEMPT="1",
        ORCH_RESUME="0",
    )
    spec = LaunchSpec(
        key=f"race/{worker}",
        argv=[sys.executable, *fake(*args)[1:]],
        cwd=repo,
        env=env,
        paths=paths,
        run_id=run_id,
        attempt=1,
        slot=Slot(0, None),
    )
    return LocalLauncher().start(spec)


def test_rerun_after_controller_died_while_stopping_a_decided_race(
    repo: Path, leak_check: str
) -> None:
    """The old controller saved 'a won' and was killed while stopping loser b: `run` must stop
    b (lost to a), not leave it running nor resume the race."""
    plan = write_plan(
        repo,
        [
            {"name": "a", "branch": "r/a", "command": fake("--epochs", 5)},
            {"name": "b", "branch": "r/b", "command": fake("--epochs", 5)},
        ],
    )
    results = repo / "results"
    handle = _launch_fake(
        repo,
        results,
        "b",
        "race/b/1/deadbeef",
        "--epochs",
        1000,
        "--interval",
        0.05,
        "--metric",
        "acc=0",
        "--children",
        1,
    )
    wait_for(lambda: ResultsPaths(results).run("race", "b").metrics.exists(), timeout=30)
    state = PlanState(plan=str(plan))
    state.experiments["race"] = ExperimentRecord(
        "race", status=ExperimentStatus.succeeded, winner="a", winner_epoch=3
    )
    a = RunRecord("race", "a", "r/a", state=RunState.succeeded, attempt=1)
    b = RunRecord(
        "race",
        "b",
        "r/b",
        state=RunState.running,
        attempt=1,
        run_id="race/b/1/deadbeef",
        pid=handle.pid,
        create_time=handle.create_time,
        slot="cpu1",
    )
    state.runs = {"race/a": a, "race/b": b}
    state.save(ResultsPaths(results).state)
    controller = build_controller(load_plan(plan))
    assert controller.run() == 0
    controller.wait_for_views()
    events = "\n".join(controller.events)
    assert f"race/b: re-attached to pid {handle.pid}" in events
    after = state_of(results).run("race", "b")
    assert after.state == RunState.stopped and after.stop_reason == "lost to a"
    assert handle.tree.popen.wait(timeout=10) == 0  # stopped with SIGTERM: it exited cleanly
    assert marked_processes(leak_check) == []


def test_attempt_launched_just_before_the_controller_died_is_not_run_twice(
    repo: Path, leak_check: str
) -> None:
    """The old controller launched b's attempt but died before saving its pid (state still
    'preparing'): `run` finds the untracked attempt by its environment tag and stops it before
    starting b again, so two copies never run at once."""
    plan = write_plan(
        repo,
        [
            {
                "name": "b",
                "branch": "r/b",
                "command": fake("--epochs", 4, "--interval", FAST, "--metric", "acc=0"),
            },
        ],
    )
    results = repo / "results"
    stray = _launch_fake(
        repo,
        results,
        "b",
        "race/b/1/cafebabe",
        "--epochs",
        1000,
        "--interval",
        0.05,
        "--metric",
        "acc=0",
        "--setsid-child",
    )
    wait_for(lambda: ResultsPaths(results).run("race", "b").metrics.exists(), timeout=30)
    state = PlanState(plan=str(plan))
    state.experiments["race"] = ExperimentRecord("race")
    state.runs = {
        "race/b": RunRecord("race", "b", "r/b", state=RunState.preparing, attempt=0, slot="cpu0")
    }
    state.save(ResultsPaths(results).state)
    found = find_strays({str(ResultsPaths(results).run("race", "b").run_dir): set()})
    assert len(next(iter(found.values()))) >= 3  # wrapper, trainer, setsid helper
    controller = build_controller(load_plan(plan))
    assert controller.run() == 1  # acc never passes: exhausted
    controller.wait_for_views()
    events = "\n".join(controller.events)
    assert "race/b: stopping" in events and "untracked process(es)" in events
    assert events.index("untracked process(es)") < events.index("race/b: started attempt 1")
    assert stray.tree.popen.wait(timeout=10) == 0  # it got SIGTERM and exited at a safe point
    assert state_of(results).run("race", "b").attempt == 1
    assert marked_processes(leak_check) == []


# -- the pieces underneath ----------------------------------------------------------------------


def test_reporter_fsyncs_every_metric_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    rep = Reporter(tmp_path / "run", handle_signals=False)
    rep.log(epoch=1, acc=0.5)
    rep.log(epoch=2, acc=0.6)
    metrics = str(tmp_path / "run" / "metrics.jsonl")
    assert synced.count(metrics) == 2


def test_jsonl_salvages_a_record_glued_to_a_dead_writers_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "acc": 0.1}\n{"epoch": 2, "ac')  # writer died mid-line
    src = JsonlSource(path)
    assert src.read_new() == [{"epoch": 1, "acc": 0.1}]
    with open(path, "a") as f:  # the resumed attempt appends its first record
        f.write('{"epoch": 2, "acc": 0.2}\n{"epoch": 3, "acc": 0.3}\n')
    assert src.read_new() == [{"epoch": 2, "acc": 0.2}, {"epoch": 3, "acc": 0.3}]
    assert src.stats.as_dict() == {"bad_lines": 1, "salvaged": 1}


def test_jsonl_notices_a_file_rewritten_in_place_past_the_read_offset(tmp_path: Path) -> None:
    """A script that rewrites its whole log every epoch (open(path, 'w')) can truncate and grow
    the file past the reader's offset between two reads: the reader must start over, not read
    from the middle of a line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "acc": e / 10}) + "\n" for e in (1, 2)))
    src = JsonlSource(path)
    history = MetricHistory()
    history.add(src.read_new())
    with open(path, "w") as f:  # same inode, rewritten with longer lines
        f.write(
            "".join(json.dumps({"epoch": e, "acc": e / 10, "loss": 1.0}) + "\n" for e in (1, 2, 3))
        )
    history.add(src.read_new())
    assert [r["epoch"] for r in history.records] == [1, 2, 3]
    assert all(r["loss"] == 1.0 for r in history.records)
    assert src.stats.as_dict() == {"truncations": 1}


def test_csv_one_bad_row_does_not_hide_the_rows_after_it(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,acc\n1,0.1\n" + "x" * 200_000 + "\n2,0.2\n")
    src = CsvSource(path)
    assert src.read_new() == [{"epoch": 1, "acc": 0.1}, {"epoch": 2, "acc": 0.2}]
    with open(path, "a") as f:
        f.write("3,0.3\n")
    assert src.read_new() == [{"epoch": 3, "acc": 0.3}]
    assert src.stats.as_dict() == {"bad_lines": 1}
