"""Trajectory comparison table: models, controls and trivial baselines on the same test clips.

    python scripts/trajectory_table.py runs/traj --pair i3d:i3d-single7

Reads ``<root>/<name>-seed<k>/metrics.jsonl`` and ``evals/test_final.json`` of workers/trajectory.py
runs (one folder per run; runs whose names differ only by ``-seedK`` form a group), and prints
one markdown row per group: test accuracy, macro-F1 and position error (mean ± sample sd over
seeds, with the seeds), then the trivial baselines scored by the same worker on the same clips:
majority class (train), constant-velocity and static extrapolation of the ground-truth track, and
the constant predictor (train-mean position). ``--pair A:B`` adds the seed-matched accuracy
difference A - B on the same test clips: the mean over seeds and a 95% bootstrap CI over clips
(clips resampled jointly for all seeds, 2000 resamples) with the one-sided bootstrap p of
A - B <= 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

SEED = re.compile(r"^(?P<group>.+)-seed(?P<seed>\d+)$")


def load_runs(root: Path) -> dict[str, dict[int, dict]]:
    """{group: {seed: {"last": last metrics record, "test": per-clip test records}}}."""
    groups: dict[str, dict[int, dict]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = SEED.match(d.name)
        metrics, test = d / "metrics.jsonl", d / "evals" / "test_final.json"
        if not m or not metrics.exists() or not test.exists():
            continue
        last = json.loads(metrics.read_text().splitlines()[-1])
        if "test_accuracy" not in last:
            continue  # unfinished run
        groups.setdefault(m["group"], {})[int(m["seed"])] = {
            "last": last,
            "test": json.loads(test.read_text())["samples"],
        }
    return groups


def paired_accuracy(a: dict[int, dict], b: dict[int, dict], seed: int = 0) -> dict:
    """Seed-matched accuracy difference a - b on the same clips, bootstrap CI over clips."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common")
    diffs = []
    for s in seeds:
        ra = {r["sample_id"]: r["pred"] == r["label"] for r in a[s]["test"]}
        rb = {r["sample_id"]: r["pred"] == r["label"] for r in b[s]["test"]}
        if set(ra) != set(rb):
            raise ValueError(f"seed {s}: the runs scored different clips")
        ids = sorted(ra)
        diffs.append(np.array([float(ra[i]) - float(rb[i]) for i in ids]))
    d = np.stack(diffs)  # (seeds, clips)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.shape[1], size=(2000, d.shape[1]))
    boot = d[:, idx].mean(axis=(0, 2))  # (2000,)
    return {
        "seeds": seeds,
        "mean": float(d.mean()),
        "ci": (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))),
        "p_greater": float((boot <= 0).mean()),
    }


def cell(values: list[float], digits: int) -> str:
    """Mean ± sample sd of ``values`` (the mean alone for one value), ``digits`` decimals."""
    v = np.array(values, float)
    sd = f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else ""
    return f"{v.mean():.{digits}f}{sd}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("root", type=Path, help="folder holding <name>-seed<k> run folders")
    p.add_argument("--pair", action="append", default=[], help="A:B, seed-matched A - B")
    args = p.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    groups = load_runs(args.root)
    if not groups:
        print(f"error: no finished <name>-seed<k> runs under {args.root}", file=sys.stderr)
        return 2
    print("| model (test split) | seeds | accuracy | macro-F1 | position error (px) | params |")
    print("|---|---|---|---|---|---|")
    for name, runs in groups.items():
        last = [r["last"] for r in runs.values()]
        print(
            f"| {name} | {','.join(map(str, sorted(runs)))} | "
            f"{cell([x['test_accuracy'] for x in last], 3)} | "
            f"{cell([x['test_macro_f1'] for x in last], 3)} | "
            f"{cell([x['test_position_error_px'] for x in last], 1)} | {last[0]['params']:,} |"
        )
    first = next(iter(groups.values()))
    ref = next(iter(first.values()))["last"]
    print(f"| majority class (train) | | {ref['test_majority_accuracy']:.3f} | | | |")
    for key, label in (
        ("test_baseline_position_error_px", "constant velocity (ground-truth track)"),
        ("test_static_position_error_px", "static (last ground-truth centre)"),
        ("test_mean_position_error_px", "constant predictor (train-mean position)"),
    ):
        print(f"| {label} | | | | {ref[key]:.2f} | |")
    for pair in args.pair:
        a, _, b = pair.partition(":")
        if a not in groups or b not in groups:
            print(f"error: --pair {pair}: groups are {sorted(groups)}", file=sys.stderr)
            return 2
        r = paired_accuracy(groups[a], groups[b])
        print(
            f"\n{a} - {b}, test accuracy, seeds {r['seeds']}: {r['mean']:+.3f} "
            f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] (95% bootstrap CI over clips), "
            f"one-sided p = {r['p_greater']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
