"""Cache frozen context-frame features [T, 256, 18, 18] fp16 for every video of a SA-V folder.

    python scripts/cache_context_features.py --data-dir data/segvid --out data/segvid/features

Writes ``<out>/<video_id>.pt`` = {"features": float16 [T, 256, 18, 18], "extractor": str} for
each annotated frame of each video, and ``<out>/cache_info.json`` describing the extractor.
Resumable: a video whose file exists and passes the integrity check (shape, dtype, all finite)
is skipped; a broken file is recomputed. Files are written to a temp name and renamed.
``--verify`` only checks the cache and exits non-zero on a bad file.

Extractors (``--extractor``):

- ``tiny`` (default): a frozen, seeded, random-weight conv net (stride 4 on frames resized to
  72x72 -> 18x18 grid, 256 channels). A stand-in teacher for CPU runs and tests: random conv
  features keep where things are and their colours, nothing learned.
- ``hf``: a frozen Hugging Face vision encoder loaded with ``from_pretrained``; features are
  ``fpn_hidden_states[--fpn-level]`` (256 channels in SAM 2 / SAM 3), average-pooled to 18x18.
  On a GPU box, e.g. SAM 2.1's image encoder::

      python scripts/cache_context_features.py --data-dir data/sav --out data/sav/features \\
          --extractor hf --hf-model facebook/sam2.1-hiera-tiny --hf-class Sam2VisionModel \\
          --image-size 1024 --batch-size 16 --device cuda

  (SAM 3's vision encoder: ``--hf-class Sam3VisionModel --hf-model facebook/sam3``, 1008 px;
  the seed note cached FPN level 3 at 504 px.) ``--local-files-only`` loads offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from synthvid.segmentation import list_sav_videos, load_sav_video, num_annotated_frames

FEATURE_CHANNELS, FEATURE_GRID = 256, 18
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TinyRandomExtractor(nn.Module):
    """Frozen random conv net: uint8 [B, H, W, 3] frames -> float [B, 256, 18, 18] features."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(128, FEATURE_CHANNELS, 3, 1, 1),
        )
        for m in self.net:
            if isinstance(m, nn.Conv2d):  # seeded Kaiming init: the same weights everywhere
                fan_in = m.in_channels * 9
                m.weight.data = torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5
                m.bias.data.zero_()
        self.requires_grad_(False).eval()
        self.name = f"tiny-random-seed{seed}"

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float() / 255 - 0.5  # (B, 3, H, W)
        x = F.interpolate(
            x, size=(4 * FEATURE_GRID, 4 * FEATURE_GRID), mode="bilinear", align_corners=False
        )
        return self.net(x)  # (B, 256, 18, 18)


class HFVisionExtractor(nn.Module):
    """A frozen transformers vision encoder's FPN level: uint8 [B, H, W, 3] -> [B, 256, 18, 18].

    Args:
        model_id: hub id or local folder (``from_pretrained``).
        class_name: transformers class with ``fpn_hidden_states`` in its output, e.g.
            Sam2VisionModel, Sam3VisionModel.
        fpn_level: index into ``fpn_hidden_states``.
        image_size: frames are resized to this square size and ImageNet-normalised.
    """

    def __init__(
        self,
        model_id: str,
        class_name: str,
        fpn_level: int,
        image_size: int,
        local_files_only: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        import transformers

        cls = getattr(transformers, class_name, None)
        if cls is None:
            raise ValueError(f"transformers has no class {class_name!r}")
        self.model = cls.from_pretrained(model_id, local_files_only=local_files_only, dtype=dtype)
        self.model.requires_grad_(False).eval()
        self.fpn_level, self.image_size = fpn_level, image_size
        self.name = f"hf:{model_id}:{class_name}:fpn{fpn_level}:{image_size}px"
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(
            x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        feats = self.model(pixel_values=x).fpn_hidden_states[self.fpn_level]  # (B, 256, h, w)
        return F.adaptive_avg_pool2d(feats.float(), FEATURE_GRID)


def check_cache_file(path: Path, num_frames: int | None = None) -> str | None:
    """Integrity check of one cache file; returns None if good, else the problem in words."""
    try:
        feats = torch.load(path, map_location="cpu", weights_only=True)["features"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is simply "bad"
        return f"unreadable ({type(e).__name__}: {e})"
    if feats.dtype != torch.float16:
        return f"dtype {feats.dtype}, expected torch.float16"
    if feats.dim() != 4 or tuple(feats.shape[1:]) != (FEATURE_CHANNELS, FEATURE_GRID, FEATURE_GRID):
        return f"shape {tuple(feats.shape)}, expected [T, 256, 18, 18]"
    if num_frames is not None and feats.shape[0] != num_frames:
        return f"{feats.shape[0]} frames, expected {num_frames}"
    if not torch.isfinite(feats).all():
        return "non-finite values"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", type=Path, required=True, help="SA-V layout folder")
    p.add_argument("--out", type=Path, required=True, help="cache folder")
    p.add_argument("--extractor", choices=["tiny", "hf"], default="tiny", help="feature extractor")
    p.add_argument("--seed", type=int, default=0, help="weights seed of the tiny extractor")
    p.add_argument("--hf-model", default="facebook/sam2.1-hiera-tiny", help="hub id or folder (hf)")
    p.add_argument("--hf-class", default="Sam2VisionModel", help="transformers class (hf)")
    p.add_argument("--fpn-level", type=int, default=-1, help="fpn_hidden_states index (hf)")
    p.add_argument("--image-size", type=int, default=1024, help="teacher input size, px (hf)")
    p.add_argument("--local-files-only", action="store_true", help="no hub access (hf)")
    p.add_argument(
        "--frame-stride",
        type=int,
        default=None,
        help="frame files per annotated frame (SA-V: 4); default: inferred",
    )
    p.add_argument("--batch-size", type=int, default=32, help="frames per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 1) // 4), help="torch CPU threads"
    )
    p.add_argument("--verify", action="store_true", help="only check the cache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.data_dir.is_dir():
        print(f"error: --data-dir {args.data_dir} is not a folder", file=sys.stderr)
        return 2
    videos = list_sav_videos(args.data_dir)
    if not videos:
        print(f"error: no *_manual.json videos in {args.data_dir}", file=sys.stderr)
        return 2

    if args.verify:
        bad = [
            (v, problem)
            for v in videos
            if (problem := check_cache_file(args.out / f"{v}.pt")) is not None
        ]
        for v, problem in bad:
            print(f"bad: {v}: {problem}")
        print(f"{len(videos) - len(bad)}/{len(videos)} cache files good")
        return 1 if bad else 0

    if args.extractor == "tiny":
        extractor: nn.Module = TinyRandomExtractor(args.seed)
    else:
        extractor = HFVisionExtractor(
            args.hf_model, args.hf_class, args.fpn_level, args.image_size, args.local_files_only
        )
    extractor.to(args.device)
    info_path = args.out / "cache_info.json"
    info = {
        "extractor": extractor.name,
        "shape": ["T", FEATURE_CHANNELS, FEATURE_GRID, FEATURE_GRID],
        "dtype": "float16",
    }
    if info_path.exists() and json.loads(info_path.read_text())["extractor"] != extractor.name:
        print(
            f"error: {args.out} holds features of "
            f"{json.loads(info_path.read_text())['extractor']}, "
            f"not {extractor.name}; use another --out",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info, indent=1))

    done = skipped = 0
    for vid in tqdm(videos, desc="caching", mininterval=2):
        path = args.out / f"{vid}.pt"
        if (
            path.exists()
            and check_cache_file(path, num_annotated_frames(args.data_dir, vid)) is None
        ):
            skipped += 1
            continue
        video = load_sav_video(args.data_dir, vid, args.frame_stride)
        frames = torch.from_numpy(video.frames)  # (T, H, W, 3) uint8
        feats = torch.cat(
            [
                extractor(frames[i : i + args.batch_size].to(args.device)).cpu()
                for i in range(0, len(frames), args.batch_size)
            ]
        ).half()  # (T, 256, 18, 18)
        tmp = path.with_suffix(".tmp")
        torch.save({"features": feats, "extractor": extractor.name}, tmp)
        tmp.replace(path)
        if (problem := check_cache_file(path, video.num_frames)) is not None:
            print(f"error: {path} failed its integrity check: {problem}", file=sys.stderr)
            return 1
        done += 1
    print(f"cached {done} videos, {skipped} already cached, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
