"""Seeds of a video-distillation worker side by side: the memory's gains at the last epoch.

    python scripts/distill_seeds.py runs/vd/memory-t4-seed0 runs/vd/memory-t4-seed1 ...

Reads each run's ``metrics.jsonl`` (workers/video_distillation.py) and prints, per run, the last
epoch's val and test instance J&F with the memory on / off / shuffled, the gains vs off and vs
shuffled with the worker's 95% BCa CI over videos, tanh(gate) and the colour rule on the same
frames; then the mean +- sd over runs (sd with ddof 1) of each number and a t-interval of the
mean gain over runs (the seed is the unit there; with 3 seeds it is wide).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

GAINS = ("gain_vs_off", "gain_vs_shuffled")


def last_record(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="worker run folders (metrics.jsonl)")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").exists()]
    if missing:
        print(f"error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    recs = [last_record(r) for r in args.runs]
    summary: dict[str, dict[str, float]] = {}
    for split in ("val", "test"):
        print(f"\n{split}, epoch {[r['epoch'] for r in recs]}")
        print(
            "| run | on / off / shuffled | gain vs off [95% CI] | gain vs shuffled [95% CI] "
            "| tanh(gate) | colour rule |"
        )
        print("|---|---|---|---|---|---|")
        for run, r in zip(args.runs, recs, strict=True):
            k = f"{split}_instance_jf"
            cells = [f"{r[f'{k}_on']:.4f} / {r[f'{k}_off']:.4f} / {r[f'{k}_shuffled']:.4f}"]
            for g in GAINS:
                cells.append(
                    f"{r[f'{k}_{g}']:+.4f} [{r[f'{k}_{g}_ci_low']:+.4f}, "
                    f"{r[f'{k}_{g}_ci_high']:+.4f}]"
                )
            cells += [f"{r['memory_gate']:+.3f}", f"{r[f'{k}_colour_rule']:.4f}"]
            print(f"| {run.name} | " + " | ".join(cells) + " |")
        for name in ("on", "off", "shuffled", *GAINS):
            v = np.array([r[f"{split}_instance_jf_{name}"] for r in recs])
            sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
            line = f"{split} {name}: mean {v.mean():+.4f} sd {sd:.4f} over {len(v)} runs"
            summary[f"{split}_{name}"] = {"mean": float(v.mean()), "sd": sd}
            if name in GAINS and len(v) > 1:
                half = stats.t.ppf(0.975, len(v) - 1) * sd / np.sqrt(len(v))
                line += (
                    f"; 95% t-interval over runs [{v.mean() - half:+.4f}, {v.mean() + half:+.4f}]"
                )
                summary[f"{split}_{name}"].update(lo=v.mean() - half, hi=v.mean() + half)
            print(line)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
