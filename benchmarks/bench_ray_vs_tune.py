"""The same race run three ways: our local executor, our Ray executor, and Ray Tune.

Four fake workers report every ``--interval-s`` (0.1 s); worker 0 passes ``acc >= 0.65`` at
epoch 13 (1.3 s after it starts), the others never pass. Each way is a separate driver process
started by this script, so start-up costs count:

- local:  ``python -m orchestrator run plan_local.yaml --plain --fresh`` (tests/fake_worker.py
  subprocesses, one process session each);
- ray:    the same plan with ``executor: ray``, connected to a Ray cluster this script starts
  once (``ray.init(num_cpus=...)``; each run an actor reserving 1 CPU, worktrees used in
  place, or shipped with ``--ship``);
- tune:   a Ray Tune driver on the same cluster: a function trainable per worker (same metric
  curve, ``tune.report`` every interval, 1 CPU each) and a Stopper whose ``stop_all()`` ends
  the experiment when any trial passes.

Measured per run: wall time (driver start -> driver exit), decision latency (the winning record
written -> every loser stopped: our controller's ``decision_latency_s``; for Tune, the winning
``tune.report`` -> ``on_experiment_end``, i.e. all trials stopped and cleaned up) and the
driver's peak RSS (psutil, sampled every 20 ms; the Ray cluster's own processes are not
counted for either Ray way). The three ways are interleaved (repeat i runs all three) so that
machine load drifts hit all of them alike. Prints medians with IQRs and ratios against Tune.

    python benchmarks/bench_ray_vs_tune.py                 # median of 10
    python benchmarks/bench_ray_vs_tune.py --repeats 3     # quick look
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

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE_WORKER = ROOT / "tests" / "fake_worker.py"
THRESHOLD = 0.65  # worker 0: acc = 0.05 * epoch -> passes at epoch 13
# The experiment's name, unique to this benchmark process: the orphan check matches the run-id
# tag (ORCH_RUN_ID=<experiment>/<worker>/...) of every process of this user, on any cwd.
EXPERIMENT = f"race-{os.getpid()}"
WAYS = ("local", "ray", "tune")


def worker_metric(index: int, epoch: int) -> float:
    """The race's metric curve (identical for the fake workers and the Tune trainables)."""
    return round(0.05 * epoch, 6) if index == 0 else 0.1


def make_repo(root: Path) -> Path:
    repo = root / "bench repo"
    repo.mkdir(parents=True)
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "bench@example.com"],
                 ["config", "user.name", "bench"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    shutil.copy(FAKE_WORKER, repo / "fake_worker.py")
    subprocess.run(["git", "add", "fake_worker.py"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "bench"], cwd=repo, check=True)
    return repo


def write_plan(repo: Path, name: str, *, workers: int, interval_s: float,
               ray_address: str | None) -> Path:
    entries = []
    for i in range(workers):
        metric = "acc=0+0.05*epoch" if i == 0 else "acc=0.1"
        entries.append({
            "name": f"w{i}", "branch": f"bench/w{i}",
            "command": ["python", "fake_worker.py", "--epochs", "100000",
                        "--interval", str(interval_s), "--metric", metric],
        })
    plan: dict[str, Any] = {
        "gpus": "none", "results_dir": f"results-{name}", "dashboard": f"PROGRESS-{name}.md",
        "grace_s": 5, "max_retries": 0,
        "experiments": [{"name": EXPERIMENT, "criteria": [f"acc >= {THRESHOLD}"],
                         "max_epochs": 100000, "workers": entries}],
    }
    if ray_address is not None:
        plan["executor"] = "ray"
        plan["ray"] = {"address": ray_address, "num_cpus_per_worker": 1}
    path = repo / f"plan-{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def run_driver(argv: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float
               ) -> tuple[float, float, str]:
    """Run a driver process; returns (wall seconds, peak RSS MiB of that process, stdout)."""
    peak = 0
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                try:
                    peak = max(peak, ps.memory_info().rss)
                except psutil.Error:
                    return
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = -9
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        out.seek(0)
        text = out.read().decode(errors="replace")
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} exited {rc}:\n{text[-2000:]}")
    return wall, peak / 2**20, text


def leftovers(wait_s: float = 10.0) -> int:
    """Processes still tagged with a run of this benchmark ``wait_s`` after the controller
    exited (orphans: should be 0); they are killed so the next run starts clean."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("ORCH_RUN_ID", "").startswith(f"{EXPERIMENT}/"):
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


def run_ours(plan: Path, repo: Path, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    wall, rss, _ = run_driver(
        [sys.executable, "-m", "orchestrator", "run", str(plan), "--plain", "--fresh"],
        cwd=repo, env=env, timeout_s=timeout_s,
    )
    orphans = leftovers()
    state = json.loads((repo / f"results-{plan.stem.removeprefix('plan-')}" / "state.json")
                       .read_text())
    race = state["experiments"][EXPERIMENT]
    return {"wall_s": wall, "decision_s": race["decision_latency_s"], "peak_rss_mib": rss,
            "winner": race["winner"], "winner_epoch": race["winner_epoch"], "orphans": orphans}


def run_tune(address: str, storage: Path, args: argparse.Namespace, env: dict[str, str]
             ) -> dict[str, Any]:
    wall, rss, text = run_driver(
        [sys.executable, str(Path(__file__).resolve()), "--tune-driver", "--address", address,
         "--storage", str(storage), "--workers", str(args.workers),
         "--interval-s", str(args.interval_s)],
        cwd=storage, env=env, timeout_s=args.timeout_s,
    )
    line = next(x for x in reversed(text.splitlines()) if x.startswith("TUNE_RESULT "))
    result = json.loads(line.removeprefix("TUNE_RESULT "))
    return {"wall_s": wall, "peak_rss_mib": rss, **result}


# -- the Ray Tune side (runs in its own driver process) -------------------------------------


def tune_driver(args: argparse.Namespace) -> int:
    import ray
    from ray import tune

    def trainable(config: dict[str, Any]) -> None:
        epoch = 0
        while True:
            time.sleep(config["interval_s"])
            epoch += 1
            tune.report({"epoch": epoch, "acc": worker_metric(config["worker"], epoch),
                         "time_s": time.time()})

    class RaceStopper(tune.Stopper):
        """Stops the passing trial, and (stop_all) the whole experiment once one passed."""

        def __init__(self) -> None:
            self.passed = False

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            if result["acc"] >= THRESHOLD:
                self.passed = True
            return self.passed

        def stop_all(self) -> bool:
            return self.passed

    class Timing(tune.Callback):
        """Winning report -> experiment end (all trials stopped and cleaned up)."""

        def __init__(self) -> None:
            self.win: dict[str, Any] | None = None
            self.decision_s: float | None = None

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                            result: dict[str, Any], **info: Any) -> None:
            if self.win is None and result["acc"] >= THRESHOLD:
                self.win = {"winner": f"w{result['config']['worker']}",
                            "winner_epoch": result["epoch"], "time_s": result["time_s"]}

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            if self.win is not None:
                self.decision_s = time.time() - self.win["time_s"]

    ray.init(address=args.address, log_to_driver=False)
    timing = Timing()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"worker": tune.grid_search(list(range(args.workers))),
                     "interval_s": args.interval_s},
        tune_config=tune.TuneConfig(max_concurrent_trials=args.workers),
        run_config=tune.RunConfig(
            name="race", storage_path=str(args.storage), stop=RaceStopper(),
            callbacks=[timing], verbose=0,
        ),
    )
    tuner.fit()
    ray.shutdown()
    win = timing.win or {}
    print("TUNE_RESULT " + json.dumps({"decision_s": timing.decision_s,
                                        "winner": win.get("winner"),
                                        "winner_epoch": win.get("winner_epoch")}), flush=True)
    return 0


# -- reporting ------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    """Median and interquartile range (25th, 75th percentile) of ``key`` over ``rows``."""
    values = sorted(r[key] for r in rows if r.get(key) is not None)
    if not values:
        return float("nan"), float("nan"), float("nan")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q1, q3


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| way | wall s (median [IQR]) | x Tune | decision s | x Tune | peak RSS MiB | x Tune "
        "| correct winner | orphans |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tune_stats = {k: summarize(results["tune"], k)[0]
                  for k in ("wall_s", "decision_s", "peak_rss_mib")}
    names = {"local": "orchestrator, local executor", "ray": "orchestrator, Ray executor",
             "tune": "Ray Tune + Stopper.stop_all"}
    for way in WAYS:
        rows = results[way]
        cells = [names[way]]
        for key, fmt in (("wall_s", "{:.2f}"), ("decision_s", "{:.2f}"),
                         ("peak_rss_mib", "{:.0f}")):
            med, q1, q3 = summarize(rows, key)
            cells.append(f"{fmt.format(med)} [{fmt.format(q1)}, {fmt.format(q3)}]")
            cells.append(f"{med / tune_stats[key]:.2f}")
        ok = sum(r.get("winner") == "w0" and r.get("winner_epoch") == 13 for r in rows)
        cells.append(f"{ok}/{len(rows)}")
        cells.append("n/a" if way == "tune" else str(sum(r.get("orphans", 0) for r in rows)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
                                    "results": results}, indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="runs of each way (median of these)")
    p.add_argument("--workers", type=int, default=4, help="racing workers / trials")
    p.add_argument("--interval-s", type=float, default=0.1, help="seconds between reports")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="logical CPUs of the benchmark's Ray cluster (default: --workers)")
    p.add_argument("--ship", action="store_true",
                   help="Ray executor: ship worktrees (runtime_env) instead of using them in place")
    p.add_argument("--timeout-s", type=float, default=300, help="limit per driver run")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_ray_vs_tune.json",
                   help="raw per-run results (JSON)")
    p.add_argument("--table-from", type=Path, default=None,
                   help="only print the table of an earlier run's --out file")
    p.add_argument("--tune-driver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--storage", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tune_driver:
        return tune_driver(args)
    if args.table_from is not None:
        try:
            saved = json.loads(args.table_from.read_text())
        except (OSError, ValueError) as e:
            print(f"error: cannot read {args.table_from}: {e}", file=sys.stderr)
            return 2
        print(table(saved["results"]))
        return 0
    if args.repeats < 1 or args.workers < 2 or args.interval_s <= 0:
        print("error: need --repeats >= 1, --workers >= 2 and --interval-s > 0", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        print("error: Ray Tune is not installed; pip install -e '.[ray]'", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="bench-ray-vs-tune-"))
    ray.init(num_cpus=args.ray_cpus or args.workers, include_dashboard=False,
             log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH")) if x)
    if args.ship:
        env["ORCH_RAY_SHIP"] = "1"
    results: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    try:
        repo = make_repo(work)
        plans = {
            "local": write_plan(repo, "local", workers=args.workers, interval_s=args.interval_s,
                                ray_address=None),
            "ray": write_plan(repo, "ray", workers=args.workers, interval_s=args.interval_s,
                              ray_address=address),
        }
        for i in range(args.repeats):
            for way in WAYS:
                if way == "tune":
                    storage = work / f"tune-{i}"
                    storage.mkdir()
                    row = run_tune(address, storage, args, env)
                else:
                    row = run_ours(plans[way], repo, env, args.timeout_s)
                results[way].append(row)
                save(args, results)  # after every run: an interrupted benchmark keeps its data
                print(f"repeat {i + 1}/{args.repeats} {way:5s}: wall {row['wall_s']:.2f} s, "
                      f"decision {row['decision_s']:.2f} s, peak RSS "
                      f"{row['peak_rss_mib']:.0f} MiB, winner {row['winner']} "
                      f"at epoch {row['winner_epoch']}, orphans {row.get('orphans', '-')}",
                      flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{args.workers} workers, a report every {args.interval_s} s, the winner passes at "
          f"epoch 13; median of {args.repeats}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; Ray executor "
          f"{'shipping worktrees' if args.ship else 'in place'}")
    print(table(results))
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
