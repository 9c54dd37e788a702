"""Write the synthetic captioned-shapes set as real video files plus a captions file.

    python scripts/make_captioned_videos.py --out data/captioned_shapes --num-samples 600

Writes (under --out):
    videos/<id>.mp4     H.264 (libx264, yuv420p) via PyAV, one per clip
    captions.jsonl      one {"id", "video", "caption", "split"} per line
    manifest.json       the generator's arguments and the seeded split {"train": [ids], ...}

With --features-out DIR it then runs ``precompute_dino.py --tiny`` into DIR (one command for a
plan's ``setup:``). Idempotent: when manifest.json already holds the same arguments and every
video exists, it
does nothing (so a plan's ``setup:`` can run it every time). Other arguments -> error (use a new
--out or delete the folder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from synthvid.captioned_shapes import generate_clip, make_split, sample_id


def write_video(path: Path, frames: np.ndarray, fps: int, crf: int = 12) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames as H.264 mp4 (H, W even), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "fast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, default=600, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="seed of the set (clips and split)")
    p.add_argument("--num-frames", type=int, default=8, help="frames per clip (T)")
    p.add_argument("--image-size", type=int, default=112, help="frame side in pixels (even)")
    p.add_argument(
        "--max-objects", type=int, default=2, choices=(1, 2), help="objects per clip, at most"
    )
    p.add_argument("--fps", type=int, default=8, help="frames per second of the mp4 files")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of clips in val")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction of clips in test")
    p.add_argument(
        "--features-out",
        default=None,
        help="then run precompute_dino.py --tiny on the set into this folder (cached)",
    )
    args = p.parse_args(argv)
    if args.num_samples < 10:
        print(f"error: --num-samples must be >= 10, got {args.num_samples}", file=sys.stderr)
        return 2
    if args.image_size % 2 or args.image_size < 48:
        print(f"error: --image-size must be even and >= 48, got {args.image_size}", file=sys.stderr)
        return 2
    out = Path(args.out)
    params = {
        k: getattr(args, k)
        for k in (
            "num_samples",
            "seed",
            "num_frames",
            "image_size",
            "max_objects",
            "fps",
            "val_fraction",
            "test_fraction",
        )
    }
    manifest_path = out / "manifest.json"
    ids = [sample_id(i) for i in range(args.num_samples)]
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("params") != params:
            print(
                f"error: {manifest_path} was made with other arguments {old.get('params')}; "
                "use another --out or delete it",
                file=sys.stderr,
            )
            return 2
        if all((out / "videos" / f"{i}.mp4").exists() for i in ids):
            print(f"{out}: {len(ids)} videos already there")
            return precompute_tiny(args)
    try:
        split = make_split(
            args.num_samples,
            args.seed,
            (1 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction),
            max_objects=args.max_objects,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split_of = {i: name for name, members in split.items() for i in members}
    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in tqdm(range(args.num_samples), desc="videos", unit="clip"):
        clip = generate_clip(
            args.seed,
            index,
            num_frames=args.num_frames,
            image_size=args.image_size,
            max_objects=args.max_objects,
        )
        path = out / "videos" / f"{clip.sample_id}.mp4"
        if not path.exists():
            write_video(path, clip.frames, args.fps)
        lines.append(
            json.dumps(
                {
                    "id": clip.sample_id,
                    "video": f"videos/{clip.sample_id}.mp4",
                    "caption": clip.caption,
                    "split": split_of[clip.sample_id],
                }
            )
        )
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    manifest_path.write_text(json.dumps({"params": params, "split": split}, indent=1) + "\n")
    print(
        f"{out}: wrote {args.num_samples} videos "
        f"({', '.join(f'{k} {len(v)}' for k, v in split.items())})"
    )
    return precompute_tiny(args)


def precompute_tiny(args: argparse.Namespace) -> int:
    """With --features-out: encode the set with the tiny encoders (resumable: skips done files)."""
    if not args.features_out:
        return 0
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("precompute_dino.py")),
        "--videos",
        args.out,
        "--out",
        args.features_out,
        "--tiny",
        "--image-size",
        str(args.image_size),
        "--num-frames",
        str(args.num_frames),
    ]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
