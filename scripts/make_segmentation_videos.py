"""Generate synthetic segmentation videos in the SA-V layout, plus a seeded split manifest.

    python scripts/make_segmentation_videos.py --out data/segvid --num-videos 120 --cache-features
    python scripts/make_segmentation_videos.py --out data/sav --split-existing   # real SA-V

Idempotent: when ``<out>/manifest.json`` exists with the same parameters, nothing is done
(the plan's ``setup:`` step calls this on every run). Video i is generated from the seed
(seed, i), so the same parameters always give the same videos. ``--cache-features`` then runs
scripts/cache_context_features.py (default tiny extractor, resumable) on the result, so one
command prepares everything. ``--split-existing`` writes only the seeded split manifest for a
folder that already holds SA-V-layout videos (e.g. the real SA-V release); with
``--cache-features --cache-args "..."`` it also caches
teacher features (the full plan's setup step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from synthvid.segmentation import (
    VideoSpec,
    generate_video,
    list_sav_videos,
    split_manifest,
    write_sav_video,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (SA-V layout)")
    p.add_argument("--num-videos", type=int, default=120, help="number of videos")
    p.add_argument("--num-frames", type=int, default=16, help="annotated frames per video")
    p.add_argument("--size", type=int, default=64, help="frame height = width, pixels")
    p.add_argument("--max-objects", type=int, default=4, help="max objects per video (min 1)")
    p.add_argument(
        "--degraded-prob",
        type=float,
        default=0.35,
        help="probability that a frame is degraded (low contrast + noise)",
    )
    p.add_argument(
        "--texture",
        type=float,
        default=0.0,
        help="harder data: amplitude (0-1 scale) of a random background texture (default 0: none)",
    )
    p.add_argument(
        "--palette-size",
        type=int,
        default=0,
        help="harder data: objects and background share a palette of N colours (default 0: off)",
    )
    p.add_argument("--val-frac", type=float, default=0.2, help="fraction of videos for val")
    p.add_argument("--test-frac", type=float, default=0.2, help="fraction of videos for test")
    p.add_argument("--seed", type=int, default=0, help="generation and split seed")
    p.add_argument(
        "--cache-features",
        action="store_true",
        help="then cache tiny-extractor features in <out>/features",
    )
    p.add_argument(
        "--cache-args",
        default="",
        help="extra flags for cache_context_features.py, one string (e.g. '--extractor hf ...')",
    )
    p.add_argument(
        "--split-existing",
        action="store_true",
        help="only write manifest.json for the SA-V videos already in --out",
    )
    args = p.parse_args(argv)
    if args.split_existing:
        ids = list_sav_videos(args.out)
        if len(ids) < 3:
            print(
                f"error: --split-existing found {len(ids)} *_manual.json videos in {args.out}; "
                "need 3+",
                file=sys.stderr,
            )
            return 2
        params = {
            "existing": True,
            "seed": args.seed,
            "val_frac": args.val_frac,
            "test_frac": args.test_frac,
        }
        manifest = {
            "params": params,
            "split": split_manifest(ids, args.seed, args.val_frac, args.test_frac),
        }
        (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        print(f"wrote the split of {len(ids)} videos to {args.out / 'manifest.json'}")
        return cache(args)
    if args.num_videos < 3 or args.num_frames < 2 or args.size < 16 or args.max_objects < 1:
        print(
            "error: need --num-videos >= 3, --num-frames >= 2, --size >= 16, --max-objects >= 1",
            file=sys.stderr,
        )
        return 2
    if not (
        0 < args.val_frac < 1 and 0 <= args.test_frac < 1 and args.val_frac + args.test_frac < 1
    ):
        print(
            "error: --val-frac and --test-frac must be in (0, 1) and sum below 1", file=sys.stderr
        )
        return 2
    if not 0 <= args.degraded_prob <= 1:
        print("error: --degraded-prob must be in [0, 1]", file=sys.stderr)
        return 2
    if args.texture < 0 or args.palette_size < 0:
        print("error: --texture and --palette-size must be >= 0", file=sys.stderr)
        return 2

    spec = VideoSpec(
        num_frames=args.num_frames,
        size=args.size,
        max_objects=args.max_objects,
        degraded_prob=args.degraded_prob,
        texture=args.texture,
        palette_size=args.palette_size,
    )
    params = {
        "num_videos": args.num_videos,
        "seed": args.seed,
        "val_frac": args.val_frac,
        "test_frac": args.test_frac,
        "spec": dataclasses.asdict(spec),
    }
    manifest_path = args.out / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("params") == params:
        print(f"{manifest_path} is up to date; nothing to generate")
        return cache(args)
    args.out.mkdir(parents=True, exist_ok=True)
    ids = [f"syn_{i:06d}" for i in range(args.num_videos)]
    for i, vid in enumerate(tqdm(ids, desc="videos")):
        write_sav_video(args.out, generate_video(np.random.default_rng([args.seed, i]), spec, vid))
    manifest = {
        "params": params,
        "split": split_manifest(ids, args.seed, args.val_frac, args.test_frac),
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(manifest_path)
    print(f"wrote {args.num_videos} videos to {args.out}")
    return cache(args)


def cache(args: argparse.Namespace) -> int:
    """Run the feature cache script (resumable: cached videos are skipped) if asked to."""
    if not args.cache_features:
        return 0
    script = Path(__file__).resolve().parent / "cache_context_features.py"
    cmd = [
        sys.executable,
        str(script),
        "--data-dir",
        str(args.out),
        "--out",
        str(args.out / "features"),
        *shlex.split(args.cache_args),
    ]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
