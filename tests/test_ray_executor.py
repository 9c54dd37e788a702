"""executor: ray on a local Ray instance (2 CPUs, no GPU): races, stops, a killed actor, results.

Real git repositories (in a path with spaces), real fake-worker subprocesses started by Ray
actors, real worktrees shipped as the actors' working directories. One Ray instance serves the
whole module (starting one takes ~10 s on a small machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import run_cli

from orchestrator.core.config import load_plan
from orchestrator.core.state import PlanState, RunState
from orchestrator.paths import RunPaths
from orchestrator.ray_executor.executor import (
    WORKING_DIR_EXCLUDES,
    NodeSpec,
    Pull,
    RayLauncher,
    RayRunHandle,
    RunActor,
    is_append_only,
    job_runtime_env,
    last_recorded,
)
from orchestrator.ray_executor.packaging import pack_worktree, unpack_worktree
from orchestrator.running.gpus import Slot
from orchestrator.running.launchers import LaunchSpec, read_exit_status
from orchestrator.running.processes import RUN_ID_ENV
from orchestrator.session import build_controller

pytestmark = [
    # Ray's own modules warn on import/shutdown (deprecations, unclosed sockets): not ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

FAKE_WORKER = Path(__file__).resolve().parent / "fake_worker.py"
# A name no other test on this machine uses: the orphan check scans every process of the user.
RACE = f"rayrace-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """One local Ray instance (2 CPUs, no GPU) for the module; skips without Ray."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    if ray.is_initialized():  # an earlier test's call may have auto-started one
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env=job_runtime_env())
    yield ray
    ray.shutdown()


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def make_repo(tmp_path: Path) -> Path:
    """A git repo (path with spaces) whose commit holds the fake worker: it must travel with
    the worktree, since the command runs it by a relative path."""
    repo = tmp_path / "my repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "Test")
    shutil.copy(FAKE_WORKER, repo / "fake_worker.py")
    git(repo, "add", "fake_worker.py")
    git(repo, "commit", "-q", "-m", "init")
    return repo


def write_plan(repo: Path, workers: list[dict[str, Any]], criteria: list[str],
               **settings: Any) -> Path:
    plan = {
        "gpus": "none",
        "poll_interval_s": 0.1,
        "dashboard_interval_s": 0.5,
        "grace_s": 5,  # a stopped fake worker exits in ms; 5 s leaves room on a loaded CI box
        "retry_backoff_s": 0.1,
        "max_retries": 2,
        "executor": "ray",
        "ray": {"num_cpus_per_worker": 0.5},
        "experiments": [{"name": RACE, "criteria": criteria, "max_epochs": 100,
                         "workers": workers}],
    }
    plan.update(settings)
    path = repo / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def worker(name: str, *args: str | int | float) -> dict[str, Any]:
    return {"name": name, "branch": f"race/{name}",
            "command": ["python", "fake_worker.py", *map(str, args)]}


class RecordingLauncher(RayLauncher):
    """A RayLauncher that keeps every handle it made (the controller drops them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[RayRunHandle] = []

    def start(self, spec: LaunchSpec) -> RayRunHandle:
        handle = super().start(spec)
        self.started.append(handle)
        return handle


def tagged_processes(prefix: str) -> list[str]:
    """Live processes of this user whose ORCH_RUN_ID starts with ``prefix`` (orphans)."""
    found = []
    for proc in psutil.process_iter(["pid", "uids"]):
        try:
            if proc.info["uids"].real != os.getuid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            run_id = proc.environ().get(RUN_ID_ENV, "")
            if run_id.startswith(prefix):
                found.append(f"{proc.pid} {run_id} {' '.join(proc.cmdline())[-80:]}")
        except (psutil.Error, OSError):
            continue
    return found


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_core_does_not_import_ray() -> None:
    code = ("import sys, orchestrator.core.controller, orchestrator.cli, "
            "orchestrator.running.launchers; sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_public_ray_apis_only() -> None:
    """No module of the orchestrator imports Ray's private modules (they change without notice
    between Ray versions)."""
    root = Path(__file__).resolve().parent.parent / "orchestrator"
    private = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py"))
               for i, line in enumerate(p.read_text().splitlines(), 1)
               if "ray._private" in line or "from ray._" in line or "import ray._" in line]
    assert private == []


def test_worktree_package_is_deterministic_and_honours_excludes(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / ".gitignore").write_text("ignored.bin\n")
    (repo / "ignored.bin").write_bytes(b"x")
    (repo / "untracked.py").write_text("print('hi')\n")
    (repo / "results").mkdir()
    (repo / "results" / "old.json").write_text("{}")
    (repo / "big.mp4").write_bytes(b"y")
    os.chmod(repo / "fake_worker.py", 0o755)
    excludes = [*WORKING_DIR_EXCLUDES, "*.mp4"]
    digest, data = pack_worktree(repo, excludes)
    assert pack_worktree(repo, excludes) == (digest, data)  # same files, same bytes
    out = tmp_path / "node copy"
    unpack_worktree(data, out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        ".gitignore", "fake_worker.py", "untracked.py"]
    assert os.stat(out / "fake_worker.py").st_mode & 0o777 == 0o755
    (repo / "untracked.py").write_text("print('changed')\n")
    assert pack_worktree(repo, excludes)[0] != digest


def test_resumed_attempt_drops_records_the_controller_holds(tmp_path: Path) -> None:
    """A retry re-runs the epochs between its checkpoint (4) and the controller's last record
    (6): those records are dropped, split lines included, and the drop is noted in stderr."""
    paths = RunPaths(tmp_path / "run")
    paths.ensure()
    held = "".join(json.dumps({"epoch": e, "acc": 0.1}) + "\n" for e in range(1, 7))
    paths.metrics.write_text(held)
    assert last_recorded(paths.metrics) == 6
    spec = LaunchSpec(key="r/w", argv=["x"], cwd=tmp_path, env={}, paths=paths, run_id="r/w/2/x",
                      attempt=2, slot=Slot(0, None))
    handle = RayRunHandle(spec, None, None, recorded_upto=last_recorded(paths.metrics))
    handle.apply(Pull({"metrics.jsonl": b'{"epoch": 5, "acc": 0.2}\n{"epo'}, {}, None, 0.0))
    handle.apply(Pull({"metrics.jsonl": b'ch": 6, "acc": 0.2}\n{"epoch": 7, "acc": 0.3}\n{"e'},
                      {}, None, 0.0))
    handle.apply(Pull({"metrics.jsonl": b'poch": 8, "acc": 0.4}\n'}, {}, 0, 0.0))
    epochs = [json.loads(line)["epoch"] for line in paths.metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "re-ran epochs (or steps) 5..6" in paths.stderr.read_text()


def test_append_only_classification() -> None:
    assert is_append_only("metrics.jsonl") and is_append_only("stdout.log")
    assert is_append_only("logs/version_0/metrics.csv")
    assert is_append_only("tb/events.out.tfevents.1700000000.host")
    assert not is_append_only("checkpoints/latest.pt")
    assert not is_append_only("attempts/0001.exit.json")


def sentinels(run_id: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "sentinel" in (p.info["cmdline"] or []) and run_id in (p.info["cmdline"] or [])]


def test_node_side_seeds_rewrites_streams_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RunActor without Ray, in shipped mode: the node run directory is seeded with the
    controller's checkpoint, controller paths are rewritten, only new bytes stream back, the
    published files come back at the end and the node copy and the sentinel are gone."""
    node_copy = tmp_path / "node copy"  # what Ray would unpack the worktree into
    node_copy.mkdir()
    shutil.copy(FAKE_WORKER, node_copy / "fake_worker.py")
    monkeypatch.chdir(node_copy)
    controller_wt = tmp_path / "controller worktree"  # never created: must not be used
    controller_run = tmp_path / "controller run"
    seeded = "".join(json.dumps({"epoch": e, "acc": 0.1 * e}) + "\n" for e in (1, 2, 3))
    run_id = f"{RACE}/node/2/abc"
    spec = NodeSpec(
        argv=["/controller/python", "fake_worker.py", "--epochs", "5", "--interval", "0.02",
              "--metric", "acc=0+0.1*epoch", "--run-dir", str(controller_run)],
        env={"ORCH_RUN_DIR": str(controller_run), "ORCH_RESUME": "1", "ORCH_ATTEMPT": "2",
             "PYTHONPATH": f"{controller_wt}/src:{controller_wt}"},
        cwd=str(controller_wt), run_dir=str(controller_run), run_id=run_id, attempt=2,
        header="==== attempt 2", shipped=True, controller_python="/controller/python",
        checkpoint_sync_s=0.0,
        files={"metrics.jsonl": seeded.encode(),
               "checkpoints/latest.ckpt": json.dumps({"epoch": 3}).encode()},
    )
    actor = RunActor(spec)
    info = actor.start()
    assert info["cwd"] == str(node_copy) and Path(info["run_dir"]) != controller_run
    appends: dict[str, bytes] = {}
    snapshots: dict[str, bytes] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pull = actor.pull(wait_s=0.5)
        for rel, data in pull.appends.items():
            appends[rel] = appends.get(rel, b"") + data
        snapshots.update(pull.snapshots)
        if pull.returncode is not None:
            break
    assert pull.returncode == 0
    assert [json.loads(x)["epoch"] for x in appends["metrics.jsonl"].splitlines()] == [4, 5]
    assert b"resumed at epoch 4" in appends["stdout.log"]
    assert appends["stdout.log"].startswith(b"==== attempt 2")
    assert json.loads(snapshots["checkpoints/latest.ckpt"]) == {"epoch": 5}
    assert json.loads(snapshots["attempts/0002.exit.json"])["returncode"] == 0
    assert not Path(info["run_dir"]).exists()  # the node copy is removed after the last pull
    assert not controller_run.exists() and not controller_wt.exists()
    deadline = time.monotonic() + 10
    while sentinels(run_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sentinels(run_id) == []


def test_wrapper_killed_with_worker_running_is_not_an_exit_and_the_sentinel_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a dying actor does: Ray SIGKILLs its direct children (the launch wrapper) while
    the actor's pull is still running. The worker, further down, runs on. The actor must not
    take the wrapper's death for the run's end (which dismissed the sentinel and left the
    worker training with no controller): the pull reports no exit while the worker lives, the
    sentinel stays and stops it, and only then is the attempt over, as killed (-9)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(FAKE_WORKER, tmp_path / "fake_worker.py")
    run_dir = tmp_path / "run"
    run_id = f"{RACE}/wrapper-killed/1/abc"
    spec = NodeSpec(
        argv=[sys.executable, "fake_worker.py", "--epochs", "2000", "--interval", "0.05",
              "--metric", "acc=0.1", "--checkpoint-s", "2", "--run-dir", str(run_dir)],
        env={"ORCH_RUN_DIR": str(run_dir)}, cwd=str(tmp_path), run_dir=str(run_dir),
        run_id=run_id, attempt=1, header="==== attempt 1", shipped=False,
        controller_python=sys.executable, checkpoint_sync_s=0.0, files={},
    )
    actor = RunActor(spec)
    actor.start()
    assert wait_until(lambda: (run_dir / "metrics.jsonl").exists(), 30)
    worker_pids = actor.node_pids()
    wrapper = psutil.Process(actor._tree.leader.pid)  # type: ignore[union-attr]
    assert wrapper.pid in worker_pids and len(worker_pids) >= 2
    wrapper.kill()  # not reaped here: the actor's Popen must see its status
    assert wait_until(lambda: wrapper.status() == psutil.STATUS_ZOMBIE, 10)
    # The worker takes 2 s to checkpoint on the sentinel's SIGTERM: it is alive meanwhile.
    assert actor.pull(wait_s=0.2).returncode is None  # so the attempt has not ended
    actor.close()  # as the last pull would: must not dismiss the sentinel
    workers = [psutil.Process(p) for p in worker_pids if p != wrapper.pid]
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                      for p in workers), 30)  # the sentinel stopped them
    assert wait_until(lambda: actor.pull(wait_s=0.1).returncode is not None, 10)
    assert actor.pull(wait_s=0.1).returncode == -9  # cut short: resumed, never "finished"
    assert wait_until(lambda: sentinels(run_id) == [], 10)


@pytest.mark.parametrize("ship", [True, False], ids=["shipped", "in-place"])
@pytest.mark.slow
def test_race_decides_stops_losers_and_returns_results(
    local_ray: Any, tmp_path: Path, ship: bool
) -> None:
    repo = make_repo(tmp_path)
    plan_path = write_plan(repo, [
        worker("fast", "--epochs", 60, "--interval", 0.1, "--metric", "acc=0.5+0.025*epoch"),
        worker("slow", "--epochs", 600, "--interval", 0.1, "--metric", "acc=0.1+0.001*epoch",
               "--children", 2),
        worker("stubborn", "--epochs", 600, "--interval", 0.1, "--metric", "acc=0.1",
               "--ignore-sigterm", "--setsid-child"),
    ], ["acc >= 0.9"])
    plan = load_plan(plan_path)
    launcher = RecordingLauncher(plan, ship=ship, checkpoint_sync_s=0.0)
    assert launcher.ship is ship
    controller = build_controller(plan, launcher=launcher)
    rc = controller.run()
    controller.wait_for_views()

    assert rc == 0
    state = PlanState.load(plan.results_dir / "state.json")
    assert state.experiments[RACE].winner == "fast"
    assert state.experiments[RACE].winner_epoch == 16
    assert state.runs[f"{RACE}/slow"].state == RunState.stopped
    assert state.runs[f"{RACE}/stubborn"].state == RunState.stopped
    assert state.experiments[RACE].decision_latency_s is not None
    # No orphan on the node: the children, the setsid helper and the SIGTERM-ignorer are gone
    # (a run whose actor was still starting is cleaned up by its sentinel, within grace_s).
    deadline = time.monotonic() + plan.grace_s + 10
    while tagged_processes(f"{RACE}/") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tagged_processes(f"{RACE}/") == []

    fast = plan.results_dir / RACE / "fast"
    epochs = [r["epoch"] for r in read_metrics(fast)]
    assert epochs[:16] == list(range(1, 17))  # streamed once each, in order
    assert (fast / "checkpoints" / "latest.ckpt").is_file()
    assert json.loads((fast / "checkpoints" / "latest.json").read_text())["epoch"] >= 16
    assert json.loads((fast / "attempts" / "0001.exit.json").read_text())["returncode"] == 0
    assert "==== attempt 1" in (fast / "stdout.log").read_text()
    assert "epoch 16" in (fast / "stdout.log").read_text()

    handles = {h.spec.key: h for h in launcher.started}
    assert set(handles) == {f"{RACE}/fast", f"{RACE}/slow", f"{RACE}/stubborn"}
    assert handles[f"{RACE}/fast"].pid is not None and handles[f"{RACE}/fast"].pid > 0
    for h in launcher.started:
        if h.pid == -1:  # the race ended before Ray started this actor (a busy machine)
            assert h.spec.key != f"{RACE}/fast"
            continue
        assert h.node is not None
        # Every started run's logs came back, header first.
        assert (h.spec.paths.stdout).read_text().startswith("==== attempt 1")
        if ship:  # ran in Ray's unpacked copy of the worktree, wrote a node-local run dir
            assert h.node_cwd is not None and Path(h.node_cwd) != h.spec.cwd
            assert h.node_run_dir is not None and not Path(h.node_run_dir).exists()
        else:
            assert h.node_cwd == str(h.spec.cwd)


@pytest.mark.slow
def test_killed_actor_is_retried_with_resume(local_ray: Any, tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    plan_path = write_plan(repo, [
        worker("solo", "--epochs", 60, "--interval", 0.1, "--metric", "acc=0.02*epoch",
               "--children", 1),
    ], ["acc >= 0.5"])
    plan = load_plan(plan_path)
    launcher = RecordingLauncher(plan, ship=True, checkpoint_sync_s=0.0)
    metrics = plan.results_dir / RACE / "solo" / "metrics.jsonl"
    killed: dict[str, Any] = {}

    def kill_after_five_epochs() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
                handle = launcher.started[0]
                killed["pids"] = local_ray.get(handle.actor.node_pids.remote())
                killed["procs"] = []  # with their create times: a reused pid is not a survivor
                for pid in killed["pids"]:
                    try:
                        killed["procs"].append(psutil.Process(pid))
                    except psutil.NoSuchProcess:
                        pass
                local_ray.kill(handle.actor, no_restart=True)
                killed["at"] = time.monotonic()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_five_epochs, daemon=True)
    killer.start()
    controller = build_controller(plan, launcher=launcher)
    rc = controller.run()
    controller.wait_for_views()
    killer.join(timeout=5)

    assert rc == 0 and "pids" in killed
    state = PlanState.load(plan.results_dir / "state.json")
    run = state.runs[f"{RACE}/solo"]
    assert run.attempt == 2 and run.state == RunState.succeeded
    assert state.experiments[RACE].winner_epoch == 25
    # The killed actor's worker (and its child) did not outlive it: the sentinel stops them,
    # asynchronously (SIGTERM, then SIGKILL after grace_s), so allow it that long.
    assert len(killed["pids"]) >= 2

    def survivors() -> list[psutil.Process]:
        alive = []
        for proc in killed["procs"]:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        return alive

    deadline = time.monotonic() + plan.grace_s + 10
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = survivors()
    assert not left, [(p.pid, " ".join(p.cmdline())) for p in left]
    assert tagged_processes(f"{RACE}/") == []
    # Attempt 2 resumed from the checkpoint the controller held (shipped back to the node).
    stdout = (plan.results_dir / RACE / "solo" / "stdout.log").read_text()
    assert "==== attempt 2" in stdout and "resume=1" in stdout
    resumed_at = int(stdout.split("resumed at epoch ")[1].split()[0])
    assert resumed_at >= 5
    epochs = [r["epoch"] for r in read_metrics(plan.results_dir / RACE / "solo")]
    assert epochs[-1] >= 25
    assert sorted(set(epochs)) == list(range(1, epochs[-1] + 1))  # no gap across attempts
    assert "Ray actor of" in (plan.results_dir / RACE / "solo" / "stderr.log").read_text()


# -- the CLI under executor: ray: Ctrl-C, `stop`, and a controller killed mid-race ---------------
#
# The controller is a real `python -m orchestrator run` process that connects to the module's
# Ray instance as a second driver (ray.address), so these tests pay no Ray start-up of their own.


def gcs_address(ray: Any) -> str:
    return str(ray.get_runtime_context().gcs_address)


def start_cli(repo: Path, plan: Path) -> subprocess.Popen:
    log = open(repo.parent / "controller.log", "ab")  # noqa: SIM115 (the child keeps it)
    with log:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", str(plan), "--plain"],
            cwd=repo, stdout=log, stderr=subprocess.STDOUT,
        )


def load_state(repo: Path) -> PlanState | None:
    try:
        return PlanState.load(repo / "results" / "state.json")
    except Exception:  # not written yet, or being replaced
        return None


def all_running_from(repo: Path, workers: list[str], epoch: int) -> PlanState | None:
    """The state once every worker in ``workers`` is running and has reported ``epoch``."""
    state = load_state(repo)
    if state is None:
        return None
    recs = [state.runs.get(f"{RACE}/{w}") for w in workers]
    if all(r is not None and r.state == RunState.running and r.run_id and (r.epoch or 0) >= epoch
           for r in recs):
        return state
    return None


def actor_processes(ray: Any, state: PlanState) -> dict[str, psutil.Process]:
    """Run key -> the process of its attempt's Ray actor (asked of the actor itself)."""
    out = {}
    for key, rec in state.runs.items():
        actor = ray.get_actor(f"run:{rec.run_id}", namespace="orchestrator")
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        out[key] = psutil.Process(pid)
    return out


def tagged_process_objects(prefix: str) -> list[psutil.Process]:
    """Like ``tagged_processes``, as process objects (a reused pid is then not a survivor)."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"].real == os.getuid() \
                    and proc.environ().get(RUN_ID_ENV, "").startswith(prefix):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[-80:]}")
        except psutil.NoSuchProcess:
            pass
    return out


def actor_is_gone(ray: Any, run_id: str) -> bool:
    try:
        ray.get_actor(f"run:{run_id}", namespace="orchestrator")
    except ValueError:
        return True
    return False


def wait_until(condition: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "stop"])
def test_ctrl_c_and_stop_under_ray_end_every_process_and_keep_checkpoints(
    local_ray: Any, tmp_path: Path, leak_check: str, how: str
) -> None:
    """Ctrl-C (SIGINT to the controller) or `orchestrator stop` from another shell: each
    worker gets SIGTERM on its node, checkpoints and exits 0; its actor is killed; the state says
    stopped (interrupted / user) and the checkpoints stay; no worker, child or actor process is
    left."""
    repo = make_repo(tmp_path)
    plan = write_plan(repo, [
        worker("a", "--epochs", 1000, "--interval", 0.1, "--metric", "acc=0", "--children", 1),
        worker("b", "--epochs", 1000, "--interval", 0.1, "--metric", "acc=0"),
    ], ["acc >= 0.9"], ray={"num_cpus_per_worker": 0.5, "address": gcs_address(local_ray)})
    proc = start_cli(repo, plan)
    try:
        state = wait_until(lambda: all_running_from(repo, ["a", "b"], 2), 120)
        assert state, (repo.parent / "controller.log").read_text()[-3000:]
        actors = actor_processes(local_ray, state)
        workers = tagged_process_objects(f"{RACE}/")
        assert len(workers) >= 5  # a: wrapper, trainer, child; b: wrapper, trainer
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
            reason = "interrupted"
        else:
            out = run_cli("stop", str(plan), cwd=repo)
            assert out.returncode == 0, out.stdout + out.stderr
            reason = "user"
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    final = PlanState.load(repo / "results" / "state.json")
    for name in ("a", "b"):
        rec = final.runs[f"{RACE}/{name}"]
        assert rec.state == RunState.stopped and rec.stop_reason == reason
        run_dir = repo / "results" / RACE / name
        # SIGTERM reached the trainer on its node: it stopped at a safe point and exited 0 ...
        exit_status = json.loads((run_dir / "attempts" / "0001.exit.json").read_text())
        assert exit_status["returncode"] == 0
        # ... and its checkpoints are kept, at least as far as the epoch seen before the stop.
        assert (run_dir / "checkpoints" / "latest.ckpt").is_file()
        saved = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["epoch"]
        assert saved >= state.runs[f"{RACE}/{name}"].epoch
        assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(1, saved + 1))
    procs = [*workers, *actors.values()]
    assert wait_until(lambda: alive(procs) == [], 30), alive(procs)
    assert tagged_processes(f"{RACE}/") == []
    assert wait_until(
        lambda: all(actor_is_gone(local_ray, r.run_id) for r in state.runs.values()), 30)


@pytest.mark.slow
def test_controller_killed_under_ray_then_run_again_resumes_and_decides(
    local_ray: Any, tmp_path: Path, leak_check: str
) -> None:
    """SIGKILL the controller mid-race: its actors die with it (they belong to its Ray job) and
    their sentinels stop the workers, so nothing runs on without a controller. `run` again
    resumes every run from the checkpoint it left (attempt 2) and decides exactly as an
    undisturbed race would (a at epoch 90), with every epoch recorded once. The winner needs
    9 s of training: the kill lands well before it, however slowly the state shows progress
    or Ray notices its driver is gone."""
    repo = make_repo(tmp_path)
    plan = write_plan(repo, [
        worker("a", "--epochs", 200, "--interval", 0.1, "--metric", "acc=0.01*epoch",
               "--children", 1),
        # b's own budget is 1000 epochs, not the shared 100: under load one actor can start
        # seconds after the other, and b, that far ahead, would exhaust 100 before a reached 90.
        {**worker("b", "--epochs", 1000, "--interval", 0.1, "--metric", "acc=0.1"),
         "max_epochs": 1000},
    ], ["acc >= 0.9"], ray={"num_cpus_per_worker": 0.5, "address": gcs_address(local_ray)})
    exit_files = [repo / "results" / RACE / name / "attempts" / "0001.exit.json"
                  for name in ("a", "b")]
    seen: set[int] = set()  # every exit code a restarted controller could have read
    watching = threading.Event()

    def watch_exit_files() -> None:
        while watching.is_set():
            seen.update(read_exit_status(f) for f in exit_files)
            time.sleep(0.001)

    proc = start_cli(repo, plan)
    watcher = threading.Thread(target=watch_exit_files, daemon=True)
    try:
        state = wait_until(lambda: all_running_from(repo, ["a", "b"], 3), 120)
        assert state, (repo.parent / "controller.log").read_text()[-3000:]
        actors = actor_processes(local_ray, state)
        workers = tagged_process_objects(f"{RACE}/")
        assert len(workers) >= 5
    finally:
        watching.set()
        watcher.start()
        proc.kill()
        proc.wait()
    run_ids = [r.run_id for r in state.runs.values()]
    # No controller: the actors die with their driver, the sentinels stop the trees.
    procs = [*workers, *actors.values()]
    try:
        assert wait_until(lambda: alive(procs) == [], 60), alive(procs)
        assert wait_until(lambda: all(sentinels(r or "") == [] for r in run_ids), 30)
    finally:
        watching.clear()
        watcher.join(timeout=5)
    assert tagged_processes(f"{RACE}/") == []
    # The trainers exited 0 on the sentinels' SIGTERM, but the attempts were cut short: at no
    # moment may their exit status say 0, or a controller restarted then would take the runs
    # as finished (exhausted) instead of resuming them.
    assert seen == {-9}, seen
    killed_at = {name: int(json.loads((repo / "results" / RACE / name / "checkpoints"
                                       / "latest.json").read_text())["epoch"])
                 for name in ("a", "b")}
    assert killed_at["a"] >= 3

    again = run_cli("run", str(plan), "--plain", cwd=repo, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    final = PlanState.load(repo / "results" / "state.json")
    exp = final.experiments[RACE]
    assert exp.winner == "a" and exp.winner_epoch == 90
    a, b = final.runs[f"{RACE}/a"], final.runs[f"{RACE}/b"]
    a_log = (repo / "results" / RACE / "a" / "stdout.log").read_text()[-2500:]
    assert a.state == RunState.succeeded and a.attempt == 2, (killed_at, a_log, again.stdout[-2500:])
    assert b.state == RunState.stopped and b.stop_reason == "lost to a" and b.attempt == 2
    for name in ("a", "b"):
        run_dir = repo / "results" / RACE / name
        stdout = (run_dir / "stdout.log").read_text()
        assert "==== attempt 2" in stdout
        assert f"resumed at epoch {killed_at[name] + 1}" in stdout  # from the checkpoint left
        epochs = [r["epoch"] for r in read_metrics(run_dir)]
        assert epochs == list(range(1, epochs[-1] + 1))  # every epoch once, across attempts
    assert [r["epoch"] for r in read_metrics(repo / "results" / RACE / "a")][:90] \
        == list(range(1, 91))
    assert wait_until(lambda: tagged_processes(f"{RACE}/") == [], plan_grace_s(plan) + 10)
    assert wait_until(lambda: all(actor_is_gone(local_ray, r or "") for r in run_ids), 30)


def plan_grace_s(plan: Path) -> float:
    return float(load_plan(plan).grace_s)
