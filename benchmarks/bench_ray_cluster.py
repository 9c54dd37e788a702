"""The 4-worker race on a simulated 3-node Ray cluster against the local executor, and node loss.

One Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and two worker raylets,
each with its own custom resource and scratch directory, as in tests/test_ray_cluster.py) is
started once; then, interleaved per repeat:

- local: ``python -m orchestrator run plan-local.yaml --plain`` (the race of
  benchmarks/bench_race.py: 4 fake workers reporting every 0.1 s, w00 passes at 1.3 s);
- cluster: the same race with ``executor: ray`` connected to the cluster, worktrees shipped
  (ORCH_RAY_SHIP=1), workers pinned round-robin to node_b, node_c, head, node_b.

Per race: wall (driver start -> exit), decision latency (winning record -> every loser stopped,
the controller's ``decision_latency_s``) and the controller's peak RSS (its own getrusage; the
raylets, actors and workers are not counted).

Node loss (in this process, controller and cluster alike): a run pinned to the ``pool``
resource (node_b or node_c) is started; after 20 epochs its node is removed
(``Cluster.remove_node``). Measured: removal -> the launcher reports the loss, and removal ->
the retried attempt's first new record in the controller's metrics.jsonl (with
``checkpoint_sync_s`` of --checkpoint-sync-s, the epochs since the last synced checkpoint are
re-run first).

    python benchmarks/bench_ray_cluster.py                 # 3 races each, 2 node losses
    python benchmarks/bench_ray_cluster.py --repeats 5 --losses 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FAKE = ROOT / "tests" / "fake_worker.py"
NODES = ("node_b", "node_c", "head")


def make_repo(root: Path) -> Path:
    repo = root / "bench repo"
    repo.mkdir()
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "b@b"],
                 ["config", "user.name", "b"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    shutil.copy(FAKE, repo / "fake_worker.py")  # shipped with the worktree
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True)
    return repo


def write_plan(repo: Path, name: str, *, address: str | None, workers: int = 4) -> Path:
    entries = []
    for i in range(workers):
        slope = 0.1 if i == 0 else 0.01  # w00 reaches 1.3 at epoch 13 (1.3 s)
        entry: dict[str, Any] = {
            "name": f"w{i:02d}", "branch": f"bench/w{i:02d}",
            "command": ["python", "fake_worker.py", "--epochs", "1000", "--interval", "0.1",
                        "--metric", f"score=0+{slope}*epoch"],
        }
        if address is not None:
            entry["env"] = {"ORCH_RAY_RESOURCES": json.dumps({NODES[i % len(NODES)]: 1})}
        entries.append(entry)
    plan: dict[str, Any] = {
        "gpus": "none", "max_parallel": workers, "poll_interval_s": 1.0, "grace_s": 10,
        "dashboard_interval_s": 2.0, "results_dir": f"results-{name}",
        "dashboard": f"PROGRESS-{name}.md",
        "experiments": [{"name": "race", "criteria": ["score >= 1.3"], "max_epochs": 1000,
                         "workers": entries}],
    }
    if address is not None:
        plan["executor"] = "ray"
        plan["ray"] = {"address": address, "num_cpus_per_worker": 0.25}
    path = repo / f"plan-{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def one_race(repo: Path, plan: Path, name: str, env: dict[str, str]) -> dict[str, float]:
    shutil.rmtree(repo / f"results-{name}", ignore_errors=True)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(plan), "--plain"],
                         cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{name} race failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    state = json.loads((repo / f"results-{name}" / "state.json").read_text())
    exp = state["experiments"]["race"]
    assert exp["winner"] == "w00", exp
    return {"wall_s": wall, "latency_s": exp["decision_latency_s"],
            "rss_mib": state["controller"]["peak_rss_mib"]}


def start_cluster(scratch: Path) -> Any:
    """Head + node_b + node_c, each with its own custom resource and scratch folder."""
    from ray.cluster_utils import Cluster

    def args(name: str) -> dict[str, Any]:
        (scratch / name).mkdir(parents=True, exist_ok=True)
        resources: dict[str, float] = {name: 4}
        if name != "head":
            resources["pool"] = 1
        return {"num_cpus": 1, "resources": resources, "object_store_memory": 80 << 20,
                "include_dashboard": False,
                "env_vars": {"ORCH_RAY_SCRATCH": str(scratch / name), "PYTHONPATH": ""}}

    cluster = Cluster(initialize_head=True, head_node_args=args("head"))
    cluster.node_args = args  # to add a node back after a loss
    cluster.named = {name: cluster.add_node(**args(name)) for name in ("node_b", "node_c")}
    return cluster


def node_loss(cluster: Any, repo: Path, checkpoint_sync_s: float) -> dict[str, float]:
    """One node loss in this process; returns seconds from removal to detection and to the
    retried attempt's first new record at the controller."""
    import ray

    from orchestrator.core.config import load_plan
    from orchestrator.ray_executor import RayLauncher
    from orchestrator.ray_executor.executor import job_runtime_env
    from orchestrator.session import build_controller

    plan_path = repo / "plan-loss.yaml"
    plan_path.write_text(yaml.safe_dump({
        "gpus": "none", "poll_interval_s": 1.0, "grace_s": 5, "retry_backoff_s": 0.1,
        "executor": "ray", "ray": {"num_cpus_per_worker": 0.25},
        "results_dir": "results-loss", "dashboard": "PROGRESS-loss.md",
        "experiments": [{"name": "loss", "criteria": ["score >= 4.0"], "max_epochs": 1000,
                         "workers": [{
                             "name": "solo", "branch": "bench/solo",
                             "command": ["python", "fake_worker.py", "--epochs", "1000",
                                         "--interval", "0.1", "--metric", "score=0+0.1*epoch"],
                             "env": {"ORCH_RAY_RESOURCES": json.dumps({"pool": 1})}}]}],
    }, sort_keys=False))
    shutil.rmtree(repo / "results-loss", ignore_errors=True)
    plan = load_plan(plan_path)
    ray.init(address=cluster.address, runtime_env=job_runtime_env(), log_to_driver=False)
    launcher = RayLauncher(plan, ship=True, checkpoint_sync_s=checkpoint_sync_s)
    metrics = plan.results_dir / "loss" / "solo" / "metrics.jsonl"
    out: dict[str, float] = {}

    def remove_and_watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            handles = [h for h in launcher._handles if h.node_id]
            if handles and metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
                break
            time.sleep(0.02)
        else:
            return
        handle = handles[0]
        name = next(n for n, node in cluster.named.items() if node.node_id == handle.node_id)
        lines_before = len(metrics.read_text().splitlines())
        removed = time.time()
        cluster.remove_node(cluster.named.pop(name))
        out["removed"] = removed
        out["node"] = name  # type: ignore[assignment]
        while time.monotonic() < deadline:
            if "detect_s" not in out and launcher.lost_nodes:
                out["detect_s"] = launcher.lost_nodes[0][2] - removed
            if len(metrics.read_text().splitlines()) > lines_before:
                out["first_record_s"] = time.time() - removed
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=remove_and_watch, daemon=True)
    watcher.start()
    controller = build_controller(plan, launcher=launcher)
    try:
        rc = controller.run()
        controller.wait_for_views()
    finally:
        watcher.join(timeout=30)
        ray.shutdown()
        if "node" in out:
            name = str(out.pop("node"))
            cluster.named[name] = cluster.add_node(**cluster.node_args(name))
    assert rc == 0 and "first_record_s" in out, out
    state = json.loads((plan.results_dir / "state.json").read_text())
    assert state["runs"]["loss/solo"]["attempt"] == 2, state["runs"]["loss/solo"]
    return out


def leftovers(root: Path, wait_s: float = 20.0) -> int:
    """Processes still working under ``root`` (a worker stopped on a lost node checkpoints
    after SIGTERM) after up to ``wait_s``: orphans, killed so the folder can go."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.cwd().startswith(str(root)):
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for proc in found:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(found)


def med(values: list[float]) -> str:
    if len(values) < 4:
        return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.2f} [{q[0]:.2f}, {q[2]:.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="races per way")
    p.add_argument("--losses", type=int, default=2, help="node-loss runs (0: skip)")
    p.add_argument("--checkpoint-sync-s", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_ray_cluster.json")
    args = p.parse_args()
    import ray

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = make_repo(Path(tmp))
        cluster = start_cluster(Path(tmp) / "scratch")
        try:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCH_RAY_SHIP": "1"}
            plans = {"local": write_plan(repo, "local", address=None),
                     "cluster": write_plan(repo, "cluster", address=cluster.address)}
            for name, plan in plans.items():  # warm-up: worktrees, first connection
                one_race(repo, plan, name, env)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in plans}
            for _ in range(args.repeats):
                for name, plan in plans.items():
                    runs[name].append(one_race(repo, plan, name, env))
            losses = [node_loss(cluster, repo, args.checkpoint_sync_s)
                      for _ in range(args.losses)]
        finally:
            if ray.is_initialized():
                ray.shutdown()
            orphans = leftovers(Path(tmp))
            cluster.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"races": runs, "losses": losses, "orphans": orphans},
                                   indent=1))
    print(f"\n4-worker race, {args.repeats} races per way, median [IQR or min, max]; "
          f"raw runs in {args.out}; processes left 20 s after the last run: {orphans}\n")
    print("| executor | wall s | decision latency s | controller peak RSS MiB |")
    print("|---|---|---|---|")
    labels = {"local": "local processes",
              "cluster": "Ray, simulated 3-node cluster (shipped)"}
    for name, rows in runs.items():
        print(f"| {labels[name]} | {med([r['wall_s'] for r in rows])} "
              f"| {med([r['latency_s'] for r in rows])} "
              f"| {med([r['rss_mib'] for r in rows])} |")
    if losses:
        print(f"\nnode loss ({len(losses)} runs, checkpoint_sync_s={args.checkpoint_sync_s}):\n")
        print("| removal -> loss reported s | removal -> retried run's first new record s |")
        print("|---|---|")
        print(f"| {med([x['detect_s'] for x in losses])} "
              f"| {med([x['first_record_s'] for x in losses])} |")


if __name__ == "__main__":
    main()
