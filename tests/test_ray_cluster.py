"""executor: ray on a simulated multi-node cluster (ray.cluster_utils.Cluster on this machine).

A head and two worker raylets, each with its own custom resource (``head``, ``node_b``,
``node_c``) so that a run can be pinned to a node (the worker's ``ORCH_RAY_RESOURCES`` env), and
its own scratch directory (``ORCH_RAY_SCRATCH``), so that a worktree or run directory is only
ever found where it was shipped. The raylets start with an empty PYTHONPATH: actors import the
orchestrator package from the job's py_modules, not from this checkout (a test checks where it
came from). Real raylets, real object transfers between their object stores, real fake-worker
processes; one cluster serves the module (starting it takes ~10-20 s on a small machine).

What this cannot show (docs/ray.md, "What is tested"): cross-host networking, an object store
over a real network, nodes with different file systems or Python installations.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import MARKER_ENV
from test_ray_executor import (
    RecordingLauncher,
    make_repo,
    read_metrics,
    tagged_processes,
)

from orchestrator.core.config import load_plan
from orchestrator.core.state import PlanState, RunState
from orchestrator.paths import ResultsPaths
from orchestrator.ray_executor.executor import RESOURCES_ENV, SCRATCH_ENV, job_runtime_env
from orchestrator.session import build_controller

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.slow,
]

ROOT = Path(__file__).resolve().parent.parent
RACE = f"raycluster-{uuid.uuid4().hex[:8]}"
OBJECT_STORE_BYTES = 80 << 20  # per node; Ray's minimum is 75 MiB


class SimCluster:
    """The module's cluster: ``nodes`` by name (head excluded), scratch folder per node."""

    def __init__(self, ray: Any, root: Path) -> None:
        from ray.cluster_utils import Cluster

        self.ray = ray
        self.root = root
        self.scratch: dict[str, Path] = {}
        self.cluster = Cluster(initialize_head=True, head_node_args=self._args("head"))
        self.nodes: dict[str, Any] = {}
        for name in ("node_b", "node_c"):
            self.add(name)

    def _args(self, name: str) -> dict[str, Any]:
        scratch = self.root / name
        scratch.mkdir(exist_ok=True)
        self.scratch[name] = scratch
        resources: dict[str, float] = {name: 4}
        if name != "head":
            resources["pool"] = 1  # a run asking for "pool" may land on node_b or node_c
        return {
            "num_cpus": 1, "resources": resources, "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False,
            # No leak-check marker: a node re-added inside a test belongs to the module.
            "env_vars": {SCRATCH_ENV: str(scratch), "PYTHONPATH": "", MARKER_ENV: ""},
        }

    def add(self, name: str) -> None:
        """Start a worker raylet called ``name`` (again, after a removal)."""
        self.nodes[name] = self.cluster.add_node(**self._args(name))

    def name_of(self, node_id: str) -> str:
        """The name of the node whose Ray id is ``node_id`` ("head" for the head)."""
        for name, node in self.nodes.items():
            if node.node_id == node_id:
                return name
        assert self.cluster.head_node.node_id == node_id, node_id
        return "head"

    def leftovers(self) -> dict[str, list[str]]:
        """Per node, what is left under its scratch folder (shipped attempts: should be none)."""
        out = {}
        for name, scratch in self.scratch.items():
            found = sorted(p.name for p in (scratch / "orch-ray").glob("*")) \
                if (scratch / "orch-ray").is_dir() else []
            if found:
                out[name] = found
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCluster]:
    """A head and two worker raylets on this machine; the test process connects as the driver
    with the job runtime_env the launcher needs (the orchestrator package as py_modules)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    if ray.is_initialized():
        ray.shutdown()
    sim = SimCluster(ray, tmp_path_factory.mktemp("scratch"))
    cwd = os.getcwd()
    try:
        # Ray puts the driver's cwd on every worker's sys.path: connect from an empty folder,
        # or the actors would import orchestrator from this checkout, not from py_modules.
        os.chdir(tmp_path_factory.mktemp("driver cwd"))
        try:
            ray.init(address=sim.cluster.address, runtime_env=job_runtime_env(),
                     log_to_driver=False)
        finally:
            os.chdir(cwd)
        yield sim
    finally:
        ray.shutdown()
        sim.cluster.shutdown()


def pinned(name: str, resources: dict[str, float], *args: str | int | float) -> dict[str, Any]:
    """A worker whose actor asks for ``resources`` (so it lands where they exist)."""
    return {"name": name, "branch": f"race/{name}",
            "command": ["python", "fake_worker.py", *map(str, args)],
            "env": {RESOURCES_ENV: json.dumps(resources)}}


def write_plan(repo: Path, workers: list[dict[str, Any]], criteria: list[str],
               max_epochs: int = 100) -> Path:
    plan = {
        "gpus": "none", "poll_interval_s": 0.1, "dashboard_interval_s": 0.2, "grace_s": 5,
        "retry_backoff_s": 0.1, "max_retries": 2, "executor": "ray",
        "ray": {"num_cpus_per_worker": 0.25},
        "experiments": [{"name": RACE, "criteria": criteria, "max_epochs": max_epochs,
                         "workers": workers}],
    }
    path = repo / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def wait_until(condition: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_race_spread_over_nodes(cluster: SimCluster, tmp_path: Path, leak_check: str) -> None:
    """Three runs pinned to three nodes: the winner's records and files come back from its node,
    the losers on the other nodes are stopped with their trees, every node copy is removed."""
    repo = make_repo(tmp_path)
    plan_path = write_plan(repo, [
        pinned("fast", {"node_b": 1}, "--epochs", 60, "--interval", 0.1,
               "--metric", "acc=0.5+0.025*epoch"),
        pinned("slow", {"node_c": 1}, "--epochs", 600, "--interval", 0.1,
               "--metric", "acc=0.1+0.001*epoch", "--children", 2),
        pinned("stubborn", {"head": 1}, "--epochs", 600, "--interval", 0.1,
               "--metric", "acc=0.1", "--ignore-sigterm", "--setsid-child"),
    ], ["acc >= 0.9"])
    plan = load_plan(plan_path)
    launcher = RecordingLauncher(plan, ship=True, checkpoint_sync_s=0.0)
    controller = build_controller(plan, launcher=launcher)
    rc = controller.run()
    controller.wait_for_views()

    assert rc == 0
    state = PlanState.load(plan.results_dir / "state.json")
    assert state.experiments[RACE].winner == "fast"
    assert state.experiments[RACE].winner_epoch == 16
    assert state.runs[f"{RACE}/slow"].state == RunState.stopped
    assert state.runs[f"{RACE}/stubborn"].state == RunState.stopped
    assert wait_until(lambda: tagged_processes(f"{RACE}/") == [], plan.grace_s + 10)
    assert wait_until(lambda: cluster.leftovers() == {}, 10), cluster.leftovers()

    where = {"fast": "node_b", "slow": "node_c", "stubborn": "head"}
    handles = {h.spec.key.split("/")[-1]: h for h in launcher.started}
    assert set(handles) == set(where)
    for name, h in handles.items():
        if name != "fast" and h.pid == -1:
            continue  # the race ended before Ray started this actor (a loaded machine)
        assert h.node_id is not None and cluster.name_of(h.node_id) == where[name]
        assert h.node_label is not None and f"[{where[name]}" in h.node_label
        # The worker ran in an unpacked copy under its own node's scratch folder ...
        assert h.node_cwd is not None
        assert Path(h.node_cwd).is_relative_to(cluster.scratch[where[name]])
        # ... with the orchestrator package from the job's py_modules, not this checkout.
        assert h.node_package is not None and not Path(h.node_package).is_relative_to(ROOT)
        assert h.spec.paths.stdout.read_text().startswith("==== attempt 1")

    fast = plan.results_dir / RACE / "fast"
    epochs = [r["epoch"] for r in read_metrics(fast)]
    assert epochs[:16] == list(range(1, 17))
    assert json.loads((fast / "checkpoints" / "latest.json").read_text())["epoch"] >= 16
    assert json.loads((fast / "attempts" / "0001.exit.json").read_text())["returncode"] == 0
    assert "epoch 16" in (fast / "stdout.log").read_text()


def test_node_loss_is_retried_on_a_surviving_node(
    cluster: SimCluster, tmp_path: Path, leak_check: str
) -> None:
    """The node holding a run is removed mid-race: the loss is reported with the node's name,
    the run resumes on the other pool node from the checkpoint shipped back, every epoch is
    recorded once, and no process of the race is left anywhere."""
    repo = make_repo(tmp_path)
    plan_path = write_plan(repo, [
        pinned("solo", {"pool": 1}, "--epochs", 60, "--interval", 0.1,
               "--metric", "acc=0.02*epoch", "--children", 1),
        pinned("steady", {"head": 1}, "--epochs", 10000, "--interval", 0.1, "--metric", "acc=0.1"),
    ], ["acc >= 0.5"], max_epochs=10000)
    plan = load_plan(plan_path)
    launcher = RecordingLauncher(plan, ship=True, checkpoint_sync_s=0.0)
    metrics = plan.results_dir / RACE / "solo" / "metrics.jsonl"
    lost: dict[str, Any] = {}

    def remove_solos_node() -> None:
        def ready() -> bool:
            solo = [h for h in launcher.started if h.spec.key.endswith("/solo")]
            return bool(solo and solo[0].node_id and metrics.exists()
                        and len(metrics.read_text().splitlines()) >= 5)

        if not wait_until(ready, 120):
            return
        handle = next(h for h in launcher.started if h.spec.key.endswith("/solo"))
        lost["name"] = cluster.name_of(handle.node_id or "")
        procs = []
        for pid in cluster.ray.get(handle.actor.node_pids.remote()):
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        lost["procs"] = procs
        cluster.cluster.remove_node(cluster.nodes.pop(lost["name"]))

    remover = threading.Thread(target=remove_solos_node, daemon=True)
    remover.start()
    controller = build_controller(plan, launcher=launcher)
    try:
        rc = controller.run()
        controller.wait_for_views()
    finally:
        remover.join(timeout=10)
        if "name" in lost:
            cluster.add(lost["name"])  # the module's cluster whole again for other tests

    assert rc == 0 and "name" in lost
    survivor = {"node_b": "node_c", "node_c": "node_b"}[lost["name"]]
    state = PlanState.load(plan.results_dir / "state.json")
    run = state.runs[f"{RACE}/solo"]
    assert run.attempt == 2 and run.state == RunState.succeeded
    assert state.experiments[RACE].winner_epoch == 25
    assert state.runs[f"{RACE}/steady"].state == RunState.stopped

    attempts = [h for h in launcher.started if h.spec.key.endswith("/solo")]
    assert [h.spec.attempt for h in attempts] == [1, 2]
    assert attempts[0].node_lost is not None and f"[{lost['name']}" in attempts[0].node_lost
    assert attempts[1].node_id is not None and cluster.name_of(attempts[1].node_id) == survivor
    assert launcher.lost_nodes and launcher.lost_nodes[0][1] == f"{RACE}/solo"

    # Resumed from the checkpoint the controller held; every epoch recorded exactly once.
    solo_dir = plan.results_dir / RACE / "solo"
    stdout = (solo_dir / "stdout.log").read_text()
    assert "==== attempt 2" in stdout and "resumed at epoch " in stdout
    assert int(stdout.split("resumed at epoch ")[1].split()[0]) >= 5
    epochs = [r["epoch"] for r in read_metrics(solo_dir)]
    assert epochs == list(range(1, epochs[-1] + 1)) and epochs[-1] >= 25

    # The loss is named in the run's stderr, the events and the dashboard.
    stderr = (solo_dir / "stderr.log").read_text()
    assert f"[{lost['name']}" in stderr and "was lost" in stderr
    events = ResultsPaths(plan.results_dir).events.read_text()
    assert f"[{lost['name']}" in events and "was lost" in events
    assert f"[{lost['name']}" in plan.dashboard.read_text()

    # Nothing left: not the lost node's worker tree (its sentinel stopped it), not the
    # survivors' runs, not a node copy.
    def alive(procs: list[psutil.Process]) -> list[int]:
        out = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    assert len(lost["procs"]) >= 2
    assert wait_until(lambda: alive(lost["procs"]) == [], plan.grace_s + 10)
    assert wait_until(lambda: tagged_processes(f"{RACE}/") == [], plan.grace_s + 10)
    left = {k: v for k, v in cluster.leftovers().items() if k != lost["name"]}
    assert left == {}
