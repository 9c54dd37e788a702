"""Small synthetic segmentation videos in the SA-V annotation layout, and the SA-V loader.

Each video holds several coloured shapes (ellipses, rectangles, triangles) moving on straight
lines that bounce off a box LARGER than the frame, so objects leave the frame and re-enter it
later; they occlude each other by depth order (masks are the visible parts only). A fraction
of frames is "degraded" (low contrast + noise, like motion blur or a camera glitch): on those
frames a single-frame model is unsure where the objects are, while the context frames before
them still show it. That is what a temporal memory can exploit; the flag is stored per frame
so results can be split by it.

On-disk layout (the SA-V release, https://ai.meta.com/datasets/segment-anything-video/,
read by the same code for real and synthetic data)::

    root/
      JPEGImages_24fps/<video_id>/00000.png ...   frames (SA-V: JPEGs extracted at 24 fps)
      <video_id>_manual.json                      masklets, one COCO RLE per object per frame

The JSON follows SA-V's ``*_manual.json``: ``masklet`` is a list over annotated frames, each a
list over objects (``masklet_num`` of them) of COCO RLE dicts ``{"size": [H, W], "counts":
str}`` written with ``pycocotools.mask.encode``; an object absent from a frame has an all-zero
mask. SA-V annotates at 6 fps (every 4th frame of the 24 fps JPEGs); the loader maps annotated
frame i to frame file ``i * frame_stride``. Synthetic videos annotate every frame
(``frame_stride`` 1). Extra synthetic-only keys: ``frame_degraded`` (list of bool).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

FRAMES_DIR = "JPEGImages_24fps"
ANNOTATION_SUFFIX = "_manual.json"
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class VideoSpec:
    """Generation parameters of the synthetic videos (all sizes in pixels)."""

    num_frames: int = 16
    size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    min_radius: float = 6.0
    max_radius: float = 12.0
    min_speed: float = 2.0  # pixels per frame
    max_speed: float = 5.0
    bounce_margin: float = 0.45  # the bounce box extends this fraction of the size past each edge
    degraded_prob: float = 0.35  # probability that a frame is degraded
    degraded_contrast: float = 0.25  # degraded frame = contrast * frame + (1 - contrast) * grey
    degraded_noise: float = 0.12  # std of the Gaussian noise added to degraded frames (0-1 scale)
    # harder data (both off by default; off, the videos are bit-identical to earlier versions):
    texture: float = 0.0  # amplitude of a random multi-scale texture added to the background
    palette_size: int = 0  # > 0: objects AND background draw colours from one small palette


@dataclass
class SegVideo:
    """One video in memory.

    Attributes:
        video_id: name (folder and JSON stem).
        frames: uint8 [T, H, W, 3] RGB.
        masks: bool [T, K, H, W] visible mask of each masklet in each annotated frame.
        degraded: bool [T] (all False for real SA-V data).
    """

    video_id: str
    frames: np.ndarray
    masks: np.ndarray
    degraded: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def _shape_mask(kind: int, cx: float, cy: float, r: float, aspect: float, size: int) -> np.ndarray:
    """Full (unoccluded) bool [size, size] mask of one shape centred at (cx, cy), may be empty."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    rx, ry = r * aspect, r / aspect
    if kind == 0:  # ellipse
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    if kind == 1:  # axis-aligned rectangle
        return (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
    # upward triangle: inside the box and below both slanted edges
    top, bottom = cy - ry, cy + ry
    t = np.clip((yy - top) / (2 * ry), 0, 1)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= rx * t)


def generate_video(rng: np.random.Generator, spec: VideoSpec, video_id: str) -> SegVideo:
    """Render one synthetic video.

    ``spec.texture`` > 0 adds a random multi-scale texture to the background (so it is no longer
    a plane) and ``spec.palette_size`` > 0 draws object and background colours from one small
    palette (objects can share a colour with each other and with the background): both defeat
    the colour rule of models/colour_rule.py, which solves the default data.

    Returns:
        SegVideo with frames uint8 [T, S, S, 3], masks bool [T, K, S, S] (visible parts, after
        occlusion by the objects in front), degraded bool [T].
    """
    S, T = spec.size, spec.num_frames
    K = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    lo, hi = -spec.bounce_margin * S, (1 + spec.bounce_margin) * S
    kinds = rng.integers(0, 3, K)
    radii = rng.uniform(spec.min_radius, spec.max_radius, K)
    aspects = rng.uniform(0.7, 1.4, K)
    colours = rng.uniform(0.0, 1.0, (K, 3))
    pos = rng.uniform(0.1 * S, 0.9 * S, (K, 2))  # start inside the frame
    angle = rng.uniform(0, 2 * np.pi, K)
    speed = rng.uniform(spec.min_speed, spec.max_speed, K)
    vel = np.stack([np.cos(angle), np.sin(angle)], 1) * speed[:, None]
    depth = rng.permutation(K)  # depth[k] = rank; higher is in front

    # background: a smooth colour gradient, far enough from nothing in particular (same
    # distribution for every video, so colour alone never identifies an object)
    c0, c1 = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
    ramp = np.linspace(0, 1, S, dtype=np.float32)
    direction = rng.uniform(0, 1)
    g = direction * ramp[None, :] + (1 - direction) * ramp[:, None]  # [S, S]
    background = c0[None, None] * (1 - g[..., None]) + c1[None, None] * g[..., None]

    frames = np.zeros((T, S, S, 3), np.uint8)
    masks = np.zeros((T, K, S, S), bool)
    degraded = rng.random(T) < spec.degraded_prob
    if spec.palette_size > 0:  # shared colours: objects may match each other and the background
        palette = rng.uniform(0.0, 1.0, (spec.palette_size, 3))
        colours = palette[rng.integers(0, spec.palette_size, K)]
        c0, c1 = palette[rng.integers(0, spec.palette_size, 2)]
        background = c0[None, None] * (1 - g[..., None]) + c1[None, None] * g[..., None]
    if spec.texture > 0:  # sums of random oriented sinusoids, 3 to 16 px periods, per channel
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        tex = np.zeros((S, S, 3))
        for _ in range(6):
            period, theta = rng.uniform(3.0, 16.0), rng.uniform(0, np.pi)
            phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(-1, 1, 3)
            wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
            tex += wave[..., None] * amp[None, None]
        background = background + spec.texture * tex / np.abs(tex).max()
    order = np.argsort(depth)  # back to front
    for t in range(T):
        img = background.copy()
        full = [_shape_mask(kinds[k], *pos[k], radii[k], aspects[k], S) for k in range(K)]
        covered = np.zeros((S, S), bool)
        for k in order[::-1]:  # front to back: visible = full minus what is in front
            masks[t, k] = full[k] & ~covered
            covered |= full[k]
        for k in order:
            img[full[k]] = colours[k]
        img = img + rng.normal(0, 0.02, img.shape)
        if degraded[t]:
            grey = img.mean()
            img = spec.degraded_contrast * img + (1 - spec.degraded_contrast) * grey
            img = img + rng.normal(0, spec.degraded_noise, img.shape)
        frames[t] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        # move, bouncing off the enlarged box (objects leave the frame and come back)
        pos += vel
        for d in range(2):
            out_lo, out_hi = pos[:, d] < lo, pos[:, d] > hi
            vel[out_lo | out_hi, d] *= -1
            pos[out_lo, d] = 2 * lo - pos[out_lo, d]
            pos[out_hi, d] = 2 * hi - pos[out_hi, d]
    return SegVideo(video_id, frames, masks, degraded)


def encode_masklets(masks: np.ndarray) -> list[list[dict]]:
    """COCO RLE of bool [T, K, H, W] masks as SA-V's ``masklet`` field (counts as str)."""
    out = []
    for frame_masks in masks:
        rles = mask_utils.encode(np.asfortranarray(frame_masks.transpose(1, 2, 0).astype(np.uint8)))
        out.append([{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles])
    return out


def decode_masklets(
    masklet: list[list[dict]], num_objects: int, height: int, width: int
) -> np.ndarray:
    """Inverse of ``encode_masklets``: bool [T, K, H, W] (K = num_objects; may be 0)."""
    out = np.zeros((len(masklet), num_objects, height, width), bool)
    for t, objs in enumerate(masklet):
        if len(objs) != num_objects:
            raise ValueError(f"annotated frame {t} has {len(objs)} masks, expected {num_objects}")
        if objs:
            with warnings.catch_warnings():  # pycocotools' Cython decode under NumPy 2
                warnings.filterwarnings(
                    "ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning
                )
                out[t] = mask_utils.decode(list(objs)).transpose(2, 0, 1).astype(bool)
    return out


def write_sav_video(root: Path, video: SegVideo, fps: float = 6.0) -> None:
    """Write one video in the SA-V layout (PNG frames + ``<id>_manual.json``) under ``root``."""
    frame_dir = root / FRAMES_DIR / video.video_id
    frame_dir.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(video.frames):
        Image.fromarray(frame).save(frame_dir / f"{t:05d}.png")
    T, K, H, W = video.masks.shape
    present = video.masks.reshape(T, K, -1).any(-1)  # [T, K]
    area = video.masks.reshape(T, K, -1).sum(-1)
    ann = {
        "video_id": video.video_id,
        "video_duration": T / fps,
        "video_frame_count": T,
        "video_height": H,
        "video_width": W,
        "video_resolution": H * W,
        "masklet_id": list(range(K)),
        "masklet_num": K,
        "masklet_first_appeared_frame": [
            float(np.argmax(present[:, k])) if present[:, k].any() else -1.0 for k in range(K)
        ],
        "masklet_frame_count": [int(present[:, k].sum()) for k in range(K)],
        "masklet_size_abs": [
            float(area[:, k][present[:, k]].mean()) if present[:, k].any() else 0.0
            for k in range(K)
        ],
        "masklet_type": ["manual"] * K,
        "masklet": encode_masklets(video.masks),
        "frame_degraded": [bool(d) for d in video.degraded],
    }
    tmp = root / f".{video.video_id}{ANNOTATION_SUFFIX}.tmp"
    tmp.write_text(json.dumps(ann))
    tmp.replace(root / f"{video.video_id}{ANNOTATION_SUFFIX}")  # JSON last: marks completion


def list_sav_videos(root: Path) -> list[str]:
    """Sorted video ids under ``root`` (those with a ``*_manual.json``)."""
    return sorted(
        p.name[: -len(ANNOTATION_SUFFIX)] for p in Path(root).glob(f"*{ANNOTATION_SUFFIX}")
    )


def num_annotated_frames(root: Path, video_id: str) -> int:
    """Number of annotated frames of a SA-V-layout video (reads only its JSON)."""
    return len(json.loads((Path(root) / f"{video_id}{ANNOTATION_SUFFIX}").read_text())["masklet"])


def load_sav_video(root: Path, video_id: str, frame_stride: int | None = None) -> SegVideo:
    """Load one SA-V-layout video: annotated frames and their masklets.

    Args:
        root: folder with ``<video_id>_manual.json`` and ``JPEGImages_24fps/<video_id>/``.
        frame_stride: frame files per annotated frame (SA-V: 4, 24 fps frames and 6 fps
            masks); None infers it as round(#frame files / #annotated frames).

    Raises:
        FileNotFoundError: if the JSON or the frames folder is missing.
        ValueError: if frames are missing for an annotated frame or sizes disagree.
    """
    root = Path(root)
    ann = json.loads((root / f"{video_id}{ANNOTATION_SUFFIX}").read_text())
    frame_dir = root / FRAMES_DIR / video_id
    files = sorted(p for p in frame_dir.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
    n_ann = len(ann["masklet"])
    if frame_stride is None:
        frame_stride = max(1, round(len(files) / max(n_ann, 1)))
    idx = [i * frame_stride for i in range(n_ann)]
    if n_ann and idx[-1] >= len(files):
        raise ValueError(
            f"{video_id}: {n_ann} annotated frames need frame file {idx[-1]}, "
            f"found {len(files)} in {frame_dir}"
        )
    frames = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in idx])
    H, W = frames.shape[1:3]
    K = int(ann.get("masklet_num", len(ann["masklet"][0]) if n_ann else 0))
    masks = decode_masklets(ann["masklet"], K, H, W)
    degraded = np.asarray(ann.get("frame_degraded", [False] * n_ann), bool)
    return SegVideo(video_id, frames, masks, degraded)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes of bool [N, H, W] masks, in pixels (x1, y1 inclusive; x2, y2 exclusive).

    Returns:
        float32 [N, 4]; all zeros for an empty mask.
    """
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


def split_manifest(video_ids: list[str], seed: int, val_frac: float, test_frac: float) -> dict:
    """Seeded video-level train/val/test split (videos never straddle splits).

    Returns:
        {"seed": int, "train": [...], "val": [...], "test": [...]} (sorted id lists).
    """
    ids = sorted(video_ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_val, n_test = round(val_frac * len(ids)), round(test_frac * len(ids))
    pick = lambda sel: sorted(ids[i] for i in sel)  # noqa: E731
    return {
        "seed": seed,
        "val": pick(perm[:n_val]),
        "test": pick(perm[n_val : n_val + n_test]),
        "train": pick(perm[n_val + n_test :]),
    }
