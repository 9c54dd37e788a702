"""Trivial baseline of the video-distillation job: the non-learned colour rule, same frames.

    python scripts/distill_baselines.py --data-dir data/segvid --context-frames 4 \\
        [--student-eval runs/vd/evals/epoch_000000.json] [--out results/distill_colour_rule.json]
        [--thresholds residual_k=4,colour_tol=0.1,blur_px=3 | --thresholds default]

The rule (models/colour_rule.py) picks its few thresholds by grid search on the TRAIN videos'
query frames, then scores the val and test query frames (every frame t >= --context-frames,
the frames the worker scores) with the worker's own ``score_frame``: instance J&F (J = mask IoU,
F = DAVIS boundary F of Hungarian-matched instances; class-agnostic, not the DAVIS/SA-V tracking
J&F), mask IoU, detection F1 at IoU 0.5 and frame-level presence F1. The statistical unit is the
video: per-video means get a 95% BCa bootstrap CI. With ``--student-eval`` (an evals/epoch_*.json
of workers/video_distillation.py on the same split and context frames) the per-video difference
rule - student (each of the student's modes) is reported with its CI on the same frames.
``--thresholds`` skips the grid search: ``default`` is the worker's own thresholds (what it logs
as ``*_colour_rule``), ``K=V,...`` sets the GRID keys (e.g. the ones an earlier run chose; the
search takes about 16 CPU-minutes on 552 train videos).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from models.colour_rule import ColourRuleConfig, segment_frame
from models.set_criterion import score_frame
from synthvid.segmentation import SegVideo, load_sav_video
from workers.video_distillation import bootstrap_gain, prf

GRID = {
    "residual_k": (2.5, 3.0, 4.0),
    "colour_tol": (0.06, 0.1),
    "blur_px": (2, 3),
}


def query_frames(videos: list[SegVideo], context_frames: int) -> list[tuple[SegVideo, int]]:
    """Every (video, t) with t >= context_frames: the frames the worker scores."""
    return [(v, t) for v in videos for t in range(context_frames, v.num_frames)]


def gt_masks(video: SegVideo, t: int) -> np.ndarray:
    """Non-empty ground-truth masks bool [G, H, W] of frame t (as the worker's make_batch)."""
    m = video.masks[t]
    return m[m.reshape(len(m), -1).any(-1)]


def score_rule(frames: list[tuple[SegVideo, int]], cfg: ColourRuleConfig) -> list[dict]:
    """Per-frame records {video, t, degraded, n_gt, rule: score_frame(...)} of the rule."""
    out = []
    for v, t in frames:
        gt = gt_masks(v, t)
        sc = score_frame(segment_frame(v.frames[t], cfg), gt)
        out.append(
            {
                "video": v.video_id,
                "t": t,
                "degraded": bool(v.degraded[t]),
                "n_gt": len(gt),
                "rule": sc,
            }
        )
    return out


def choose_config(frames: list[tuple[SegVideo, int]]) -> tuple[ColourRuleConfig, list[dict]]:
    """Grid search of GRID on (train) frames by mean instance J&F; returns (best, all results)."""
    results = []
    for values in itertools.product(*GRID.values()):
        cfg = ColourRuleConfig(**dict(zip(GRID, values, strict=True)))
        jf = float(np.mean([r["rule"]["jf"] for r in score_rule(frames, cfg)]))
        results.append({**dict(zip(GRID, values, strict=True)), "jf": jf})
    best = max(results, key=lambda r: r["jf"])
    return ColourRuleConfig(**{k: best[k] for k in GRID}), results


def parse_thresholds(text: str) -> ColourRuleConfig:
    """``default`` -> ColourRuleConfig(); ``residual_k=4,colour_tol=0.1,...`` -> those GRID keys.

    Raises ValueError naming the bad part."""
    if text.strip() == "default":
        return ColourRuleConfig()
    values: dict[str, float | int] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in GRID:
            raise ValueError(f"{part!r}: expected KEY=VALUE with KEY one of {', '.join(GRID)}")
        kind = type(GRID[key][0])
        try:
            values[key] = kind(value)
        except ValueError:
            raise ValueError(
                f"{part!r}: {value!r} is not an {kind.__name__}"
                if kind is int
                else f"{part!r}: {value!r} is not a number"
            ) from None
    return ColourRuleConfig(**values)


def summarize(records: list[dict], mode: str, seed: int) -> dict:
    """Frame-mean instance J&F, its per-video 95% CI, clean/degraded split, det. and presence F1."""
    vids = sorted({r["video"] for r in records})
    per_video = np.array(
        [np.mean([r[mode]["jf"] for r in records if r["video"] == v]) for v in vids]
    )
    _, lo, hi, _ = bootstrap_gain(per_video, seed, 2000)
    rs = [r[mode] for r in records]
    det = pres = (float("nan"),) * 3  # the averaged "shuffled" records carry no counts
    if "tp" in rs[0]:
        det = prf(sum(x["tp"] for x in rs), sum(x["fp"] for x in rs), sum(x["fn"] for x in rs))
        gt_any = np.array([r["n_gt"] > 0 for r in records])
        pred_any = np.array([x["n_pred"] > 0 for x in rs])
        pres = prf(
            int((gt_any & pred_any).sum()),
            int((~gt_any & pred_any).sum()),
            int((gt_any & ~pred_any).sum()),
        )
    deg = [r[mode]["jf"] for r in records if r["degraded"]]
    clean = [r[mode]["jf"] for r in records if not r["degraded"]]
    return {
        "instance_jf": float(np.mean([x["jf"] for x in rs])),
        "instance_jf_video_ci": [lo, hi],
        "instance_jf_clean": float(np.mean(clean)) if clean else float("nan"),
        "instance_jf_degraded": float(np.mean(deg)) if deg else float("nan"),
        "mask_iou": float(np.mean([x["iou"] for x in rs])),
        "det_f1": det[2],
        "presence_f1": pres[2],
        "n_frames": len(records),
        "n_videos": len(vids),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", type=Path, required=True, help="SA-V layout with manifest.json")
    p.add_argument("--context-frames", type=int, default=4, help="query frames are t >= this")
    p.add_argument("--student-eval", type=Path, default=None, help="worker evals/epoch_*.json")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--thresholds",
        default=None,
        help="skip the grid search: 'default' (the worker's) or KEY=VALUE,... of "
        + ", ".join(GRID),
    )
    p.add_argument("--out", type=Path, default=None, help="write the full results as JSON")
    args = p.parse_args(argv)
    manifest = args.data_dir / "manifest.json"
    if not manifest.exists():
        print(
            f"error: {manifest} not found; run scripts/make_segmentation_videos.py", file=sys.stderr
        )
        return 2
    fixed = None
    if args.thresholds is not None:
        try:
            fixed = parse_thresholds(args.thresholds)
        except ValueError as e:
            print(f"error: --thresholds {e}", file=sys.stderr)
            return 2
    split = json.loads(manifest.read_text())["split"]
    splits = ("val", "test") if fixed is not None else ("train", "val", "test")
    load = {s: [load_sav_video(args.data_dir, v) for v in split[s]] for s in splits}
    if fixed is not None:
        cfg, grid = fixed, []
        print(f"given thresholds (no grid search): {cfg}")
    else:
        cfg, grid = choose_config(query_frames(load["train"], args.context_frames))
        print(f"chosen on {len(load['train'])} train videos: {cfg}")
    results: dict = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "grid": grid}
    records = {}
    print(
        "| split | instance J&F [95% CI, per video] | clean / degraded | mask IoU | det F1 | "
        "presence F1 | frames (videos) |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in ("val", "test"):
        records[s] = score_rule(query_frames(load[s], args.context_frames), cfg)
        sm = summarize(records[s], "rule", args.seed)
        results[s] = sm
        lo, hi = sm["instance_jf_video_ci"]
        print(
            f"| {s} | {sm['instance_jf']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{sm['instance_jf_clean']:.3f} / {sm['instance_jf_degraded']:.3f} | "
            f"{sm['mask_iou']:.3f} | {sm['det_f1']:.3f} | {sm['presence_f1']:.3f} | "
            f"{sm['n_frames']} ({sm['n_videos']}) |"
        )
    if args.student_eval is not None:
        ev = json.loads(args.student_eval.read_text())
        student, student_split = ev["samples"], ev["split"]
        key = {(r["video"], r["t"]): r for r in records[student_split]}
        missing = [r for r in student if (r["video"], r["t"]) not in key]
        if missing or len(student) != len(key):
            print("error: --student-eval does not score the same frames", file=sys.stderr)
            return 2
        for mode in [m for m in ("on", "off", "shuffled") if m in student[0]]:
            vids = sorted({r["video"] for r in student})
            diff = np.array(
                [
                    np.mean(
                        [
                            key[(r["video"], r["t"])]["rule"]["jf"] - r[mode]["jf"]
                            for r in student
                            if r["video"] == v
                        ]
                    )
                    for v in vids
                ]
            )
            mean, lo, hi, _ = bootstrap_gain(diff, args.seed, 2000)
            sm = summarize(student, mode, args.seed)
            results[f"student_{mode}"] = {**sm, "rule_minus_student": [mean, lo, hi]}
            print(
                f"student {mode} ({student_split}): instance J&F {sm['instance_jf']:.3f}; "
                f"rule - student {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] (per-video 95% CI)"
            )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
