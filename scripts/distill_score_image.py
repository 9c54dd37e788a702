"""Score a video-distillation run's stage-1 image model (memory off) on each split's query frames.

    python scripts/distill_score_image.py --data-dir data/segvid_hard --run-dir runs/vdh/s1500

Loads ``<run-dir>/student_image.pt`` and prints the mean instance J&F of the image model over
the query frames t >= --context-frames of the train, val and test videos (the worker's
``evaluate_image``: the frames and ``score_frame`` of its "off" mode). Train next to val tells
underfitting (both low) from overfitting (train high, val low).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from models.detr_student import DETRStudent, StudentConfig
from workers.video_distillation import evaluate_image, load_split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="SA-V layout with manifest.json")
    p.add_argument("--run-dir", type=Path, required=True, help="worker run with student_image.pt")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny", help="student sizes")
    p.add_argument("--context-frames", type=int, default=4, help="query frames are t >= this")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="splits to score")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.run_dir / "student_image.pt"
    if not path.exists():
        print(f"error: {path} not found (stage 1 of the worker writes it)", file=sys.stderr)
        return 2
    cfg = StudentConfig.tiny() if args.preset == "tiny" else StudentConfig.full()
    student = DETRStudent(cfg)
    missing, unexpected = student.load_state_dict(
        torch.load(path, map_location="cpu", weights_only=True), strict=False
    )
    assert not unexpected and all(k.startswith(("perceiver_", "memory_")) for k in missing)
    split = json.loads((args.data_dir / "manifest.json").read_text())["split"]
    scores = {}
    for name in args.splits:
        videos, _ = load_split(
            args.data_dir, args.data_dir / "features", split[name], cfg.image_size, 0
        )
        scores[name] = evaluate_image(student, videos, args.context_frames, torch.device("cpu"), 32)
        n = sum(v.num_frames - args.context_frames for v in videos.values())
        print(f"{name}: instance J&F (memory off) {scores[name]:.4f} on {n} frames")
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
