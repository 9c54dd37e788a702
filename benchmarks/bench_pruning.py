"""Pruning benchmark: does giving up hopeless workers' slots reach the decision sooner?

Race 1 (16 fake workers, 4 slots, ``acc >= 0.9``, max_epochs 40, 0.1 s an epoch, noise sd
0.005): 12 plateau below the threshold (6 flat at 0.55-0.65, 6 saturating towards 0.6-0.7),
3 improve slowly and would pass late (epoch ~35), 1 passes soonest (epoch 8) but is queued
last. Run three ways, each a real driver process:

- ``python -m orchestrator run`` without ``prune:`` and with ``prune: {}`` (defaults: after 5
  evaluations, margin 0.5, patience 3): time to the decision (race start -> winning record
  accepted, from the state file), slot-seconds used (sum of ``busy_s``), workers started;
- Ray Tune with ``ASHAScheduler`` (grace_period 5 = our ``after``, max_t 40 = the budget,
  reduction factor 4, 4 concurrent trials, a Stopper that ends the experiment at the first
  passing report), the same curves in a function trainable: time to the decision from the
  first trial's start (Ray's start-up excluded), trials started. Skipped without Ray.

Race 2 (late bloomers, the cost of a wrong prune): 8 workers on 4 slots: 6 plateaus, 1 slow
(passes at ~35) and 1 late bloomer, the true winner, whose early slope is flat for 12 epochs
and then steep. Two bloomers: "mild" (0.01/epoch, then 0.04: passes at epoch 21) and "steep"
(0.004/epoch, then 0.06: passes at 19). Real races with pruning for ``--seeds`` noise seeds,
one race without pruning for comparison, and the pure pruning rule replayed on the same curve
for 200 seeds (no processes): how often the true winner was pruned.

    python benchmarks/bench_pruning.py   # race 1: ours 3x each way, Tune once; race 2: 3 seeds
    python benchmarks/bench_pruning.py --seeds 1 --no-tune
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_worker.py"
THRESHOLD = 0.9
BUDGET = 40
INTERVAL_S = 0.1
NOISE = 0.005
SLOTS = 4


# -- the curves (identical for the fake workers and the Tune trainables) --------------------


def race1_workers() -> list[dict[str, Any]]:
    """name, fake-worker metric flags and priority of race 1's workers, in queue order."""
    out = []
    for i in range(6):
        out.append({"name": f"flat{i}", "args": ["--metric", f"acc={0.55 + 0.02 * i:.2f}"]})
    for i in range(6):
        top = 0.6 + 0.02 * i  # saturating towards top with tau 4 from 0.4
        out.append({"name": f"bend{i}",
                    "args": ["--metric", f"acc=0.4+{(top - 0.4) / 4:.4f}*epoch",
                             "--saturate", "4"]})
    for i in range(3):
        out.append({"name": f"slow{i}", "args": ["--metric", "acc=0.5+0.0115*epoch"]})
    out.append({"name": "winner", "args": ["--metric", "acc=0.5+0.05*epoch"], "priority": 1})
    return out


BLOOMERS = {
    "mild": ["--metric", "acc=0.45+0.01*epoch", "--knee", "12:4"],
    "steep": ["--metric", "acc=0.45+0.004*epoch", "--knee", "12:15"],
}


def race2_workers(bloomer: str) -> list[dict[str, Any]]:
    out = [{"name": f"flat{i}", "args": ["--metric", f"acc={0.55 + 0.02 * i:.2f}"]}
           for i in range(6)]
    out.insert(2, {"name": "bloomer", "args": BLOOMERS[bloomer]})
    out.append({"name": "slow", "args": ["--metric", "acc=0.5+0.0115*epoch"]})
    return out


def value(args: list[str], seed: int, epoch: int) -> float:
    """The fake worker's metric for these flags (tests/fake_worker.py's ``curve``)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_worker

    p = argparse.ArgumentParser()
    p.add_argument("--metric")
    p.add_argument("--saturate", type=float, default=None)
    p.add_argument("--knee", default=None)
    ns = p.parse_args(args)
    ns.noise, ns.seed = NOISE, seed
    _, a, b = fake_worker.parse_metric(ns.metric)
    return round(fake_worker.curve(a, b, epoch, ns), 6)


# -- our orchestrator ------------------------------------------------------------------------


def make_repo(root: Path) -> Path:
    repo = root / "bench repo"
    repo.mkdir(parents=True)
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "b@b"],
                 ["config", "user.name", "b"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    (repo / "README.md").write_text("bench\n")
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True)
    return repo


def write_plan(repo: Path, name: str, workers: list[dict[str, Any]], *, prune: bool,
               seed: int) -> Path:
    entries = []
    for i, w in enumerate(workers):
        entries.append({
            "name": w["name"], "branch": f"bench/{w['name']}", "priority": w.get("priority", 0),
            "command": ["python", str(FAKE), "--epochs", str(BUDGET), "--interval",
                        str(INTERVAL_S), *w["args"], "--noise", str(NOISE),
                        "--seed", str(seed * 1000 + i)],
        })
    exp: dict[str, Any] = {"name": "race", "criteria": [f"acc >= {THRESHOLD}"],
                           "max_epochs": BUDGET, "workers": entries}
    if prune:
        exp["prune"] = {}
    plan = {"gpus": "none", "max_parallel": SLOTS, "poll_interval_s": 0.2, "grace_s": 5,
            "dashboard_interval_s": 1.0, "results_dir": f"results-{name}",
            "dashboard": f"PROGRESS-{name}.md", "experiments": [exp]}
    path = repo / f"plan-{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def run_ours(repo: Path, plan: Path) -> dict[str, Any]:
    row = _run_ours(repo, plan)
    print(f"{plan.stem}: {row}", file=sys.stderr, flush=True)
    return row


def _run_ours(repo: Path, plan: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(plan), "--plain",
                          "--fresh"], cwd=repo, capture_output=True, text=True, env=env,
                         timeout=900)
    wall = time.perf_counter() - start
    if out.returncode not in (0, 1):
        raise SystemExit(f"race failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    state = json.loads((plan.parent / yaml.safe_load(plan.read_text())["results_dir"]
                        / "state.json").read_text())
    exp = state["experiments"]["race"]
    runs = state["runs"].values()
    return {
        "wall_s": wall,
        "decision_s": (exp["decided_at"] or 0) - (exp["started_at"] or 0),
        "slot_s": sum(r["busy_s"] for r in runs),
        "started": sum(1 for r in runs if r["attempt"] > 0),
        "epochs": sum(r["epoch"] or 0 for r in runs),
        "winner": exp["winner"],
        "pruned": sorted(r["worker"] for r in runs if r["state"] == "pruned"),
    }


# -- Ray Tune with ASHA ----------------------------------------------------------------------


def run_tune(workers: list[dict[str, Any]], seed: int, storage: Path) -> dict[str, Any] | None:
    try:
        import ray
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
    except ImportError:
        return None
    curves = [[value(w["args"], seed * 1000 + i, e) for e in range(1, BUDGET + 1)]
              for i, w in enumerate(workers)]
    order = sorted(range(len(workers)), key=lambda i: (workers[i].get("priority", 0), i))

    def trainable(config: dict[str, Any]) -> None:
        for epoch in range(1, BUDGET + 1):
            time.sleep(INTERVAL_S)
            tune.report({"epoch": epoch, "acc": config["curve"][epoch - 1],
                         "time_s": time.time()})

    class RaceStopper(tune.Stopper):
        def __init__(self) -> None:
            self.passed = False

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            self.passed = self.passed or result["acc"] >= THRESHOLD
            return self.passed

        def stop_all(self) -> bool:
            return self.passed

    class Timing(tune.Callback):
        def __init__(self) -> None:
            self.first_start: float | None = None
            self.win_s: float | None = None
            self.winner: str | None = None
            self.started = 0
            self.epochs: dict[str, int] = {}

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            self.started += 1
            if self.first_start is None:
                self.first_start = time.time()

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                            result: dict[str, Any], **info: Any) -> None:
            self.epochs[trial.trial_id] = result["epoch"]
            if self.win_s is None and result["acc"] >= THRESHOLD:
                self.win_s = result["time_s"]
                self.winner = workers[result["config"]["index"]]["name"]

    ray.init(address="local", num_cpus=SLOTS, log_to_driver=False, include_dashboard=False)
    timing = Timing()
    start = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"index": tune.grid_search(order),
                     "curve": tune.sample_from(lambda spec: curves[spec.config.index])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=SLOTS,
            scheduler=ASHAScheduler(time_attr="training_iteration", metric="acc", mode="max",
                                    grace_period=5, max_t=BUDGET, reduction_factor=4),
        ),
        run_config=tune.RunConfig(name="asha", storage_path=str(storage), stop=RaceStopper(),
                                  callbacks=[timing], verbose=0),
    )
    tuner.fit()
    wall = time.perf_counter() - start
    ray.shutdown()
    decision = (timing.win_s - timing.first_start
                if timing.win_s is not None and timing.first_start is not None else None)
    return {"wall_s": wall, "decision_s": decision, "started": timing.started,
            "winner": timing.winner, "epochs": sum(timing.epochs.values())}


# -- the pure rule over many seeds -----------------------------------------------------------


def replay_pruned(args: list[str], seeds: int) -> float:
    """Fraction of seeds at which the pruning rule (defaults) prunes this curve before it
    passes (the worker alone; no processes)."""
    sys.path.insert(0, str(ROOT))
    from orchestrator.core.criteria import Criterion
    from orchestrator.core.pruning import PruneConfig, prune_verdict

    crit, config, pruned = Criterion.parse(f"acc >= {THRESHOLD}"), PruneConfig(), 0
    for seed in range(seeds):
        records: list[dict[str, Any]] = []
        streak = 0
        for epoch in range(1, BUDGET + 1):
            records.append({"epoch": epoch, "time_s": epoch * INTERVAL_S,
                            "acc": value(args, 10_000 + seed, epoch)})
            if crit.evaluate(records[-1]):
                break
            verdict = prune_verdict(config, [crit], records, streak=streak, budget=BUDGET)
            streak = verdict.streak
            if verdict.prune:
                pruned += 1
                break
    return pruned / seeds


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time to the decision (its other columns kept together)."""
    return sorted(rows, key=lambda r: r["decision_s"])[len(rows) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="race 1 runs per way (median)")
    p.add_argument("--seeds", type=int, default=3, help="real races per bloomer in race 2")
    p.add_argument("--replay-seeds", type=int, default=200)
    p.add_argument("--no-tune", action="store_true", help="skip the Ray Tune + ASHA run")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_pruning.json",
                   help="raw results (JSON)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = make_repo(Path(tmp))
        workers = race1_workers()
        offs, ons = [], []
        for _ in range(args.repeats):  # interleaved, so that load drifts hit both alike
            offs.append(run_ours(repo, write_plan(repo, "off", workers, prune=False, seed=0)))
            ons.append(run_ours(repo, write_plan(repo, "on", workers, prune=True, seed=0)))
        off, on = median_row(offs), median_row(ons)
        tune_row = None if args.no_tune else run_tune(workers, 0, Path(tmp) / "tune")
        late: dict[str, list[dict[str, Any]]] = {}
        unpruned: dict[str, dict[str, Any]] = {}
        for bloomer in BLOOMERS:
            late[bloomer] = [
                run_ours(repo, write_plan(repo, f"late-{bloomer}-{s}", race2_workers(bloomer),
                                          prune=True, seed=s))
                for s in range(args.seeds)
            ]
            unpruned[bloomer] = run_ours(repo, write_plan(
                repo, f"late-{bloomer}-off", race2_workers(bloomer), prune=False, seed=0))
        shutil.rmtree(repo / ".worktrees", ignore_errors=True)
    raw = {"race1": {"off": offs, "on": ons, "tune": tune_row}, "race2": late,
           "race2_unpruned": unpruned}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(raw, indent=1))
    print(f"\nrace 1: 16 fake workers on {SLOTS} slots, {BUDGET} epochs of {INTERVAL_S} s, "
          f"12 plateaus, 3 slow, the winner queued last (ours: the run with the median time "
          f"of {args.repeats}; all times: off {[round(r['decision_s'], 1) for r in offs]}, "
          f"on {[round(r['decision_s'], 1) for r in ons]})\n")
    print("| way | time to the decision s | slot-s used | epochs run (all workers) "
          "| workers started | winner | pruned |")
    print("|---|---|---|---|---|---|---|")
    for label, r in (("orchestrator, no pruning", off), ("orchestrator, `prune: {}`", on)):
        print(f"| {label} | {r['decision_s']:.1f} | {r['slot_s']:.1f} | {r['epochs']} | "
              f"{r['started']} | {r['winner']} | {len(r['pruned'])} |")
    print(f"| ratio (no pruning / pruning) | {off['decision_s'] / on['decision_s']:.2f}x | "
          f"{off['slot_s'] / on['slot_s']:.2f}x | {off['epochs'] / on['epochs']:.2f}x | | | |")
    if tune_row is not None:
        d = tune_row["decision_s"]
        print(f"| Ray Tune + ASHA (grace 5, max_t {BUDGET}, rf 4) | "
              f"{'—' if d is None else f'{d:.1f}'} (first trial start ->; fit() wall "
              f"{tune_row['wall_s']:.1f}) | — | {tune_row['epochs']} | {tune_row['started']} "
              f"| {tune_row['winner']} | — |")
    print(f"\nrace 2: late bloomers (8 workers on {SLOTS} slots; the bloomer is the true "
          "winner)\n")
    print("| bloomer | passes at epoch | real races: winner pruned | time to the decision s "
          f"(median) | same race without pruning s (winner) | rule replay: pruned of "
          f"{args.replay_seeds} seeds |")
    print("|---|---|---|---|---|---|")
    for bloomer, rows in late.items():
        wrong = sum("bloomer" in r["pruned"] for r in rows)
        times = sorted(r["decision_s"] for r in rows if r["winner"])
        median = f"{times[len(times) // 2]:.1f}" if times else "—"
        winners = ", ".join(str(r["winner"]) for r in rows)
        passes = next(e for e in range(1, BUDGET + 1)
                      if value(BLOOMERS[bloomer], 0, e) >= THRESHOLD)
        rate = replay_pruned(BLOOMERS[bloomer], args.replay_seeds)
        base = unpruned[bloomer]
        print(f"| {bloomer} | ~{passes} | {wrong} of {len(rows)} (winners: {winners}) | "
              f"{median} | {base['decision_s']:.1f} ({base['winner']}) | {rate:.0%} |")


if __name__ == "__main__":
    main()
