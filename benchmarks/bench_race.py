"""Race benchmark: how fast the controller decides and stops the losers.

A race of N fake workers (tests/fake_worker.py) that each report every 0.1 s; one passes the
criterion at epoch 13 (1.3 s after it starts). Each race is a real `python -m orchestrator run`
in a real git repository with real worktrees (created once, reused). Reported per race size:

- wall: `run` start to exit (s)
- latency: the winning record's write time -> last loser reaped (s), from the state file
- controller CPU seconds and peak RSS, measured by the controller itself (getrusage)
- the race's overhead (wall minus the winner's 1.3 s of work) split into phases, from the
  event log's timestamps: `run` -> first launch; first launch -> the winner's first record
  (the worker's own interpreter start); winning record -> decision; decision -> last loser
  reaped; last event -> process exit (final rendering and shutdown)
- the controller's import time (`import orchestrator.cli, orchestrator.session`, minus an
  empty interpreter)

    python benchmarks/bench_race.py                    # 20 races of 4, 3 races of 64
    python benchmarks/bench_race.py --repeats 5 --large-repeats 1
    # before/after: races of each code version one after the other (interleaved, so a change
    # in the machine's load hits every version alike), PYTHONPATH pointing at each checkout
    git worktree add --detach /tmp/before a8023b1
    python benchmarks/bench_race.py --code before=/tmp/before --code after=. --repeats 10
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
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_worker.py"


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


def write_plan(repo: Path, n: int) -> Path:
    workers = []
    for i in range(n):
        slope = 0.1 if i == 0 else 0.01  # worker 0 reaches 1.3 at epoch 13 (1.3 s)
        workers.append({
            "name": f"w{i:02d}",
            "branch": f"bench/w{i:02d}",
            "command": ["python", str(FAKE), "--epochs", "1000", "--interval", "0.1",
                        "--metric", f"score=0+{slope}*epoch"],
        })
    plan = {
        "gpus": "none", "max_parallel": n, "poll_interval_s": 1.0, "grace_s": 10,
        "dashboard_interval_s": 2.0,
        "experiments": [{"name": "race", "criteria": ["score >= 1.3"], "max_epochs": 1000,
                         "workers": workers}],
    }
    path = repo / f"plan-{n}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def one_race(repo: Path, plan: Path, code: str | None = None) -> dict:
    """One race; ``code``: a checkout of the project to run (PYTHONPATH), default this one."""
    shutil.rmtree(repo / "results", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())} if code else None
    start = time.perf_counter()
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(plan), "--plain"],
                         cwd=repo, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    t_exit = time.time()
    if out.returncode != 0:
        raise SystemExit(f"race failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    state = json.loads((repo / "results" / "state.json").read_text())
    exp = state["experiments"]["race"]
    assert exp["winner"] == "w00", exp
    started = sum(1 for r in state["runs"].values() if r["attempt"] > 0)
    events = [json.loads(line) for line in (repo / "results" / "events.jsonl").open()]
    first_launch = min(e["time_s"] for e in events if "started attempt" in e["event"])
    decided = next(e["time_s"] for e in events if " WINS at " in e["event"])
    records = [json.loads(line) for line in
               (repo / "results" / "race" / "w00" / "metrics.jsonl").open()]
    first_record = records[0]["time_s"]
    won = next(r["time_s"] for r in records if r["epoch"] == exp["winner_epoch"])
    phases = {
        "start": first_launch - t0,
        "worker start": first_record - first_launch,
        "decide": decided - won,
        "reap": won + exp["decision_latency_s"] - decided,
        "exit": t_exit - events[-1]["time_s"],
    }
    return {"wall_s": wall, "latency_s": exp["decision_latency_s"], "started": started,
            "cpu_s": state["controller"]["cpu_s"], "rss_mib": state["controller"]["peak_rss_mib"],
            "phases": phases, "overhead_s": wall - (won - first_record)}


def import_time_s(repeats: int = 5, code: str | None = None) -> float:
    """Median seconds to import the controller's modules, an empty interpreter subtracted."""
    env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())} if code else None

    def run(stmt: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", stmt], check=True, env=env)
        return time.perf_counter() - t

    full = statistics.median(run("import orchestrator.cli, orchestrator.session")
                             for _ in range(repeats))
    empty = statistics.median(run("pass") for _ in range(repeats))
    return full - empty


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summary(runs: list[dict]) -> tuple:
    lat = [r["latency_s"] for r in runs]
    return (statistics.median(r["started"] for r in runs),
            statistics.median(r["wall_s"] for r in runs),
            statistics.median(lat), pct(lat, 0.95),
            statistics.median(r["cpu_s"] for r in runs), max(r["rss_mib"] for r in runs))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=20, help="races of --workers workers")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--large", type=int, default=64, help="workers in the large race (0: skip)")
    p.add_argument("--large-repeats", type=int, default=3)
    p.add_argument("--code", action="append", default=[], metavar="NAME=PATH",
                   help="a checkout of the project to race with (repeatable: the versions' "
                        "races are interleaved); default: this checkout")
    args = p.parse_args()
    codes: dict[str, str | None] = {}
    for item in args.code:
        name, sep, path = item.partition("=")
        if not sep or not (Path(path) / "orchestrator").is_dir():
            p.error(f"--code {item!r}: give NAME=PATH, PATH a checkout with orchestrator/")
        codes[name] = path
    codes = codes or {"this": None}
    rows = []
    small: dict[str, list[dict]] = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, repeats in ((args.workers, args.repeats), (args.large, args.large_repeats)):
            if n <= 0 or repeats <= 0:
                continue
            setups = {}
            for name, code in codes.items():
                repo = make_repo(Path(tmp) / f"{name}-{n}")
                plan = write_plan(repo, n)
                one_race(repo, plan, code)  # warm-up: creates the worktrees
                setups[name] = (repo, plan, code)
            runs: dict[str, list[dict]] = {name: [] for name in codes}
            for _ in range(repeats):
                for name, (repo, plan, code) in setups.items():
                    runs[name].append(one_race(repo, plan, code))
                loads.append(os.getloadavg()[0])
            if n == args.workers:
                small = runs
            rows += [(name, n, repeats, *summary(runs[name])) for name in codes]
    print(f"\nrace benchmark ({Path(sys.argv[0]).name}; fake workers report every 0.1 s, "
          "the winner passes at 1.3 s); 1-minute load average during the races: "
          f"{min(loads):.1f}-{max(loads):.1f}\n")
    print("| code | workers | races | started before the decision (median) | wall s (median) "
          "| win record -> losers reaped s (median) | (p95) | controller CPU s (median) "
          "| controller peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, k, started, wall, lat, p95, cpu, rss in rows:
        print(f"| {name} | {n} | {k} | {started:.0f} | {wall:.2f} | {lat:.3f} | {p95:.3f} "
              f"| {cpu:.2f} | {rss:.0f} |")
    names = list(next(iter(small.values()))[0]["phases"])
    print(f"\n{args.workers}-worker race: overhead (wall minus the winner's work), medians\n")
    print("| code | overhead s | " + " | ".join(f"{n} s" for n in names) + " | import s |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for name, runs_ in small.items():
        print(f"| {name} | {statistics.median(r['overhead_s'] for r in runs_):.2f} | " + " | ".join(
            f"{statistics.median(r['phases'][n] for r in runs_):.2f}" for n in names)
            + f" | {import_time_s(code=codes[name]):.2f} |")


if __name__ == "__main__":
    main()
