"""Precompute DINOv2 patch features and SD-VAE latents for a folder of captioned videos.

    # GPU box, real encoders (facebook/dinov2-small, stabilityai/sd-vae-ft-mse), 256 px:
    python scripts/precompute_dino.py --videos data/webvid --out data/webvid_feats --num-frames 24
    # CPU / tests: tiny random-weight encoders of the same classes, 112 px:
    python scripts/precompute_dino.py --videos data/captioned_shapes --out data/cs_feats --tiny

Input: --videos folder with captions.jsonl (one {"id", "video", "caption", "split"} per line;
"video" relative to the folder), e.g. from scripts/make_captioned_videos.py. Videos are decoded
with PyAV; T frames are taken evenly spaced (--num-frames; all frames when the video has exactly T).

Output: one <id>.pt per video (written atomically; finished files are skipped on a rerun, so the
job is resumable) holding
    dino_features  [T, N, D]    Dinov2Model last_hidden_state (CLS + patches), N = 1 + (S // 14)^2
                                (325 at S = 256; D = 384 for dinov2-small), stored in --dtype
    latents        [T, 4, S/8, S/8]  AutoencoderKL latent_dist.mean * scaling_factor (0.18215)
    caption, id, split
and meta.json (encoders, N, D, latent shape, the split as a manifest of ids).

Frames are resized to S x S (bilinear, antialiased); DINO input is ImageNet-normalised, VAE input
is in [-1, 1]. References: Oquab et al. 2023 (DINOv2), Rombach et al. 2022 (the SD VAE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_NAME = "facebook/dinov2-small"
VAE_NAME = "stabilityai/sd-vae-ft-mse"
SD_SCALING_FACTOR = 0.18215
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def num_dino_tokens(image_size: int, patch_size: int = 14) -> int:
    """N = 1 + (S // p)^2: CLS plus the patch grid (the conv drops the remainder)."""
    return 1 + (image_size // patch_size) ** 2


def build_tiny_dino(image_size: int, seed: int = 0):
    """A random-weight Dinov2Model (hidden 64, 2 layers, patch 14): the class of dinov2-small."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        patch_size=14,
        image_size=image_size,
    )
    return Dinov2Model(cfg)


def build_tiny_vae(image_size: int, seed: int = 0):
    """A random-weight AutoencoderKL with the SD layout (4 blocks -> /8, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=image_size,
        scaling_factor=SD_SCALING_FACTOR,
    )


def load_encoders(
    tiny: bool, image_size: int, out: Path, dino_name: str, vae_name: str, local_files_only: bool
):
    """Load (dino, vae, names) with ``from_pretrained``.

    With ``tiny`` the random models are built once (seed 0), saved under out/tiny_encoders/ and
    loaded back from there, so a resumed job encodes with the very same weights and the
    ``from_pretrained`` code path is the one used on a GPU box.
    """
    from diffusers import AutoencoderKL
    from transformers import AutoModel

    if tiny:
        root = out / "tiny_encoders"
        if not (root / "dino" / "config.json").exists():
            build_tiny_dino(image_size).save_pretrained(root / "dino")
        if not (root / "vae" / "config.json").exists():
            build_tiny_vae(image_size).save_pretrained(root / "vae")
        dino_name, vae_name, local_files_only = str(root / "dino"), str(root / "vae"), True
    dino = AutoModel.from_pretrained(dino_name, local_files_only=local_files_only)
    vae = AutoencoderKL.from_pretrained(vae_name, local_files_only=local_files_only)
    return dino.eval(), vae.eval(), (dino_name, vae_name)


def read_frames(path: Path, num_frames: int) -> np.ndarray:
    """Decode a video with PyAV; return ``num_frames`` evenly spaced RGB frames uint8 [T, H, W, 3].

    Raises:
        ValueError: if the video has fewer than ``num_frames`` frames.
    """
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if len(frames) < num_frames:
        raise ValueError(f"{path} has {len(frames)} frames, need {num_frames}")
    idx = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return np.stack([frames[i] for i in idx])


@torch.no_grad()
def encode_frames(frames: torch.Tensor, dino, vae, image_size: int, device: torch.device):
    """uint8 frames [B, H, W, 3] -> (dino_features [B, N, D], latents [B, 4, S/8, S/8]), fp32."""
    x = frames.to(device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        ).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    use_amp = device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
        feats = dino(pixel_values=(x - mean) / std).last_hidden_state.float()  # (B, N, D)
    latents = vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor  # (B, 4, S/8, S/8)
    return feats, latents.float()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--videos", required=True, help="folder with captions.jsonl and the videos")
    p.add_argument("--out", required=True, help="output folder for <id>.pt files")
    p.add_argument("--tiny", action="store_true", help="tiny random-weight encoders (CPU, tests)")
    p.add_argument("--image-size", type=int, default=None, help="S (default 256; 112 with --tiny)")
    p.add_argument("--num-frames", type=int, default=8, help="T frames per video (evenly spaced)")
    p.add_argument("--batch-frames", type=int, default=64, help="frames per encoder batch")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="storage dtype")
    p.add_argument("--dino", default=DINO_NAME, help="DINOv2 model name or path")
    p.add_argument("--vae", default=VAE_NAME, help="AutoencoderKL model name or path")
    p.add_argument("--local-files-only", action="store_true", help="never reach the model hub")
    p.add_argument("--limit", type=int, default=None, help="encode at most this many videos")
    p.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 1) // 4), help="torch CPU threads"
    )
    args = p.parse_args(argv)
    image_size = args.image_size or (112 if args.tiny else 256)
    if image_size < 14 or image_size % 8:
        print(
            f"error: --image-size must be a multiple of 8 and >= 14, got {image_size}",
            file=sys.stderr,
        )
        return 2
    captions_path = Path(args.videos) / "captions.jsonl"
    if not captions_path.exists():
        print(
            f"error: {captions_path} not found (make it with scripts/make_captioned_videos.py)",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    entries = [json.loads(line) for line in captions_path.read_text().splitlines() if line.strip()]
    entries = entries[: args.limit] if args.limit else entries
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pending = [e for e in entries if not (out / f"{e['id']}.pt").exists()]
    print(f"{len(entries) - len(pending)} of {len(entries)} videos already encoded in {out}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dino, vae, names = load_encoders(
        args.tiny, image_size, out, args.dino, args.vae, args.local_files_only
    )
    dino, vae = dino.to(device), vae.to(device)
    videos_per_batch = max(1, args.batch_frames // args.num_frames)
    skipped: list[str] = []
    shapes = None
    for start in tqdm(range(0, len(pending), videos_per_batch), desc="encode", unit="batch"):
        group, clips = [], []
        for e in pending[start : start + videos_per_batch]:
            try:
                clips.append(
                    torch.from_numpy(read_frames(Path(args.videos) / e["video"], args.num_frames))
                )
                group.append(e)
            except (ValueError, av.error.FFmpegError) as err:
                skipped.append(f"{e['id']}: {err}")
        if not group:
            continue
        feats, latents = encode_frames(torch.cat(clips), dino, vae, image_size, device)
        T = args.num_frames
        for i, e in enumerate(group):
            record = {
                "dino_features": feats[i * T : (i + 1) * T]
                .to(DTYPES[args.dtype])
                .cpu(),  # [T, N, D]
                "latents": latents[i * T : (i + 1) * T]
                .to(DTYPES[args.dtype])
                .cpu(),  # [T, 4, h, w]
                "caption": e["caption"],
                "id": e["id"],
                "split": e.get("split", "train"),
            }
            shapes = (tuple(record["dino_features"].shape), tuple(record["latents"].shape))
            tmp = out / f".{e['id']}.pt.tmp"
            torch.save(record, tmp)
            os.replace(tmp, out / f"{e['id']}.pt")
    if shapes is None:  # nothing new: read the shapes back from an existing file
        done = next(
            (out / f"{e['id']}.pt" for e in entries if (out / f"{e['id']}.pt").exists()), None
        )
        if done is not None:
            rec = torch.load(done, weights_only=True)
            shapes = (tuple(rec["dino_features"].shape), tuple(rec["latents"].shape))
    split: dict[str, list[str]] = {}
    for e in entries:
        if (out / f"{e['id']}.pt").exists():
            split.setdefault(e.get("split", "train"), []).append(e["id"])
    meta = {
        "dino": names[0],
        "vae": names[1],
        "tiny": args.tiny,
        "image_size": image_size,
        "num_frames": args.num_frames,
        "dtype": args.dtype,
        "dino_features_shape": shapes[0] if shapes else None,
        "latents_shape": shapes[1] if shapes else None,
        "split": split,
    }
    tmp = out / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / "meta.json")
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    print(f"{out}: {sum(len(v) for v in split.values())} videos encoded, shapes {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
