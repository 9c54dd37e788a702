"""Persistent-vs-transient object clips for the early-persistence race (ML_NOTES.md, Job A).

Each clip is T frames (16) of 3x64x64 in [0, 1]. It holds 1..``max_persistent`` persistent
objects, visible in every frame and moving on a trajectory of one class (linear, parabolic,
circular, helical), and 1..6 transient objects, visible for 1-3 consecutive frames. Nothing but
temporal extent tells persistent from transient (tests/test_persistence_shortcuts.py trains a
classifier on each cue alone and requires chance):

- shape, colour and size of EVERY object come from one distribution (the original data leaked
  the label through a fixed red colour);
- every object, transient or not, follows a trajectory drawn the same way, and a transient's
  window of frames starts uniformly in -(dur-1)..T-1 (clipped), so per observation neither the
  frame index nor the position carries the label (format 1 started transients in 0..T-dur at a
  uniform place: edge frames held fewer transients and persistent paths stay nearer the centre).

Everything is deterministic from ``(seed, sample index)`` (numpy ``default_rng([seed, i])``), so a
sample does not depend on how many others were generated or in what order.

Storage (one cache directory, reused when the arguments match)::

    manifest.json          args, split ids, per-sample summary (objects, kinds, counts)
    shard_0000.npz ...     video uint8 [N, T, 3, 64, 64], instance uint8 [N, T, 64, 64]
                           (0 = background, k = object id k-1, topmost object wins),
                           per-object ground truth (see ``OBJECT_FIELDS``)

Shape legend: N clips, T frames, M objects, K tokens (object observations), P crop size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TRAJECTORY_CLASSES = ("linear", "parabolic", "circular", "helical")
SHAPES = ("circle", "square", "triangle")
KINDS = ("transient", "persistent")  # label 0 = transient, 1 = persistent
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 2  # 2: transients follow hidden trajectories, frame-uniform windows
OBJECT_FIELDS = (
    "obj_sample",  # int32 [M]: index of the clip (within the shard) the object belongs to
    "obj_id",  # int16 [M]: object id within its clip (0-based)
    "obj_kind",  # int8 [M]: 1 persistent, 0 transient
    "obj_shape",  # int8 [M]: index into SHAPES
    "obj_colour",  # float32 [M, 3]: RGB in [0, 1]
    "obj_radius",  # float32 [M]: half-extent in pixels
    "obj_trajectory",  # int8 [M]: index into TRAJECTORY_CLASSES; -1 for transients
    "obj_visible",  # bool [M, T]
    "obj_centres",  # float32 [M, T, 2]: (x, y) pixels; NaN where not visible
    "obj_boxes",  # float32 [M, T, 4]: xyxy pixels of the visible mask; NaN where not visible
)


@dataclass(frozen=True)
class PersistenceConfig:
    """Generator arguments; the cache is reused only when all of them match.

    Attributes:
        num_samples: number of clips.
        seed: master seed.
        num_frames: T.
        image_size: H = W in pixels.
        max_persistent: persistent objects per clip are uniform in 1..max_persistent.
        max_transient: transient objects per clip are uniform in 1..max_transient.
        max_transient_frames: a transient is visible for 1..max_transient_frames frames.
        radius_range: object half-extent in pixels, uniform.
        split_fractions: train/val/test fractions.
        shard_size: clips per shard file.
    """

    num_samples: int = 2000
    seed: int = 0
    num_frames: int = 16
    image_size: int = 64
    max_persistent: int = 2
    max_transient: int = 6
    max_transient_frames: int = 3
    radius_range: tuple[float, float] = (3.0, 6.0)
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    shard_size: int = 500

    def validate(self) -> None:
        """Raise ValueError with one sentence naming the bad argument."""
        if self.num_samples < 20:
            raise ValueError(f"--num-samples must be >= 20, got {self.num_samples}")
        if self.num_frames < 4:
            raise ValueError(f"--num-frames must be >= 4, got {self.num_frames}")
        if self.image_size < 32:
            raise ValueError(f"--image-size must be >= 32, got {self.image_size}")
        if not 1 <= self.max_transient_frames < self.num_frames:
            raise ValueError("--max-transient-frames must be in 1..num_frames-1")
        if self.max_persistent < 1 or self.max_transient < 1:
            raise ValueError("clips need at least one persistent and one transient object")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) <= 0:
            raise ValueError(
                f"split fractions must be positive and sum to 1: {self.split_fractions}"
            )

    def fingerprint(self) -> str:
        """Short hash of the arguments and format version (the cache key)."""
        blob = json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- trajectories ---------------------------------------------------------------------------


def _trajectory(rng: np.random.Generator, cls: str, cfg: PersistenceConfig, r: float) -> np.ndarray:
    """Centres [T, 2] (x, y) in pixels of one persistent object, kept inside the frame."""
    t_count, size = cfg.num_frames, cfg.image_size
    lo, hi = r + 1.0, size - 2.0 - r
    s = np.linspace(0.0, 1.0, t_count)[:, None]  # [T, 1] normalised time
    if cls in ("linear", "parabolic"):
        p0, p1 = rng.uniform(lo, hi, 2), rng.uniform(lo, hi, 2)
        while np.linalg.norm(p1 - p0) < size * 0.25:  # visible motion
            p1 = rng.uniform(lo, hi, 2)
        xy = p0 + s * (p1 - p0)
        if cls == "parabolic":
            bump = rng.uniform(10.0, 22.0) * rng.choice([-1.0, 1.0])
            xy[:, 1] += 4.0 * bump * s[:, 0] * (1.0 - s[:, 0])
    else:  # circular or helical: a circle, whose centre drifts for helical (a projected helix)
        radius = rng.uniform(8.0, 18.0)
        theta0 = rng.uniform(0, 2 * math.pi)
        turns = rng.uniform(0.5, 1.0) * rng.choice([-1.0, 1.0])
        theta = theta0 + 2 * math.pi * turns * s[:, 0]
        c0 = rng.uniform(lo + radius, hi - radius, 2)
        drift = rng.uniform(-12.0, 12.0, 2) if cls == "helical" else np.zeros(2)
        centre = c0 + s * drift
        xy = centre + radius * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return np.clip(xy, lo, hi).astype(np.float32)


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray):
    """Bool [H, W] mask of one object centred at (cx, cy) with half-extent r pixels."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        side = r * 0.85  # same area scale as the circle
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    # upward triangle inscribed in the circle of radius r*1.1
    rr = r * 1.1
    return (dy <= rr * 0.5) & (dy >= -rr + 1.732 * np.abs(dx)) & (np.abs(dx) <= rr * 0.866)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour in [0, 1] (HSV with h uniform, s in [0.5, 1], v in [0.6, 1])."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


def generate_clip(cfg: PersistenceConfig, index: int, *, render: bool = True) -> dict:
    """Render clip ``index`` of the dataset defined by ``cfg`` (deterministic).

    With ``render=False`` only the object ground truth is drawn (the same random draws, so the
    same objects), ``video`` and ``instance`` are None and ``obj_boxes`` is all NaN: the shortcut
    tests use it to measure cue distributions over thousands of clips in seconds.

    Returns:
        dict with ``video`` uint8 [T, 3, H, W], ``instance`` uint8 [T, H, W] (0 background,
        k = object k-1 on top), ``trajectory`` (class of the clip's first persistent object,
        used for stratification) and ``objects``: dict of the ``OBJECT_FIELDS`` arrays without
        ``obj_sample`` (M objects).
    """
    rng = np.random.default_rng([cfg.seed, index])
    t_count, size = cfg.num_frames, cfg.image_size
    n_p = int(rng.integers(1, cfg.max_persistent + 1))
    n_t = int(rng.integers(1, cfg.max_transient + 1))
    m = n_p + n_t
    kinds = np.array([1] * n_p + [0] * n_t, dtype=np.int8)
    shapes = rng.integers(0, len(SHAPES), m).astype(np.int8)
    colours = np.stack([_colour(rng) for _ in range(m)])
    radii = rng.uniform(*cfg.radius_range, m).astype(np.float32)
    traj = np.full(m, -1, dtype=np.int8)
    visible = np.zeros((m, t_count), dtype=bool)
    centres = np.full((m, t_count, 2), np.nan, dtype=np.float32)
    for k in range(m):
        # Every object, persistent or not, moves on a trajectory drawn the same way, so the
        # position (and motion) of an observation at frame t has the same distribution for both
        # kinds. A transient is that trajectory seen through a window of ``dur`` consecutive
        # frames whose start is uniform in -(dur-1)..T-1, clipped to the clip: every frame is
        # covered with the same probability dur / (T + dur - 1), so per observation the frame
        # index carries no label either (a start uniform in 0..T-dur made edge frames rarer).
        traj[k] = rng.integers(0, len(TRAJECTORY_CLASSES))
        path = _trajectory(rng, TRAJECTORY_CLASSES[traj[k]], cfg, float(radii[k]))
        if kinds[k] == 1:
            centres[k] = path
            visible[k] = True
        else:
            dur = int(rng.integers(1, cfg.max_transient_frames + 1))
            start = int(rng.integers(-(dur - 1), t_count))
            window = slice(max(start, 0), min(start + dur, t_count))
            centres[k, window] = path[window]
            visible[k, window] = True
            traj[k] = -1  # the hidden path of a transient is no trajectory class of the clip
    order = rng.permutation(m)  # drawing order (depth): later objects are on top
    background = rng.uniform(0.0, 0.25, 3).astype(np.float32)
    objects = {
        "obj_id": np.arange(m, dtype=np.int16),
        "obj_kind": kinds,
        "obj_shape": shapes,
        "obj_colour": colours,
        "obj_radius": radii,
        "obj_trajectory": traj,
        "obj_visible": visible,
        "obj_centres": centres,
        "obj_boxes": np.full((m, t_count, 4), np.nan, dtype=np.float32),
    }
    clip = {"video": None, "instance": None, "trajectory": TRAJECTORY_CLASSES[traj[0]]}
    if not render:
        return {**clip, "objects": objects}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # a flat background (no pixel noise: it made the shards incompressible, ~10x larger)
    frames = np.broadcast_to(background, (t_count, size, size, 3)).copy()
    instance = np.zeros((t_count, size, size), dtype=np.uint8)
    boxes = objects["obj_boxes"]
    for t in range(t_count):
        for k in order:
            if not visible[k, t]:
                continue
            cx, cy = centres[k, t]
            mask = _shape_mask(SHAPES[shapes[k]], cx, cy, float(radii[k]), yy, xx)
            frames[t][mask] = colours[k]
            instance[t][mask] = k + 1
    for k in range(m):  # boxes of the drawn (un-occluded) extent
        for t in np.flatnonzero(visible[k]):
            mask = _shape_mask(SHAPES[shapes[k]], *centres[k, t], float(radii[k]), yy, xx)
            ys, xs = np.nonzero(mask)
            boxes[k, t] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    video = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 3, 1, 2)
    return {**clip, "video": video, "instance": instance, "objects": objects}


# -- splits -----------------------------------------------------------------------------------


def stratified_split(
    strata: list[str], fractions: tuple[float, float, float], seed: int
) -> dict[str, list[int]]:
    """Seeded stratified split of indices 0..N-1 into train/val/test (disjoint, exhaustive).

    Each stratum is shuffled with ``default_rng([seed, 7919])`` and cut by the fractions
    (rounded), so every split holds each stratum in about the same proportion.
    """
    rng = np.random.default_rng([seed, 7919])
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    by_stratum: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        by_stratum.setdefault(s, []).append(i)
    for key in sorted(by_stratum):
        idx = np.array(by_stratum[key])
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fractions[1]))
        n_test = int(round(len(idx) * fractions[2]))
        n_train = len(idx) - n_val - n_test
        out["train"] += idx[:n_train].tolist()
        out["val"] += idx[n_train : n_train + n_val].tolist()
        out["test"] += idx[n_train + n_val :].tolist()
    return {k: sorted(v) for k, v in out.items()}


# -- generation and cache -----------------------------------------------------------------------


def sample_id(index: int) -> str:
    """Stable id of clip ``index``: ``clip_000042``."""
    return f"clip_{index:06d}"


def _write_shard(path: Path, clips: list[dict]) -> None:
    objs = {f: [] for f in OBJECT_FIELDS}
    for i, clip in enumerate(clips):
        o = clip["objects"]
        objs["obj_sample"].append(np.full(len(o["obj_id"]), i, dtype=np.int32))
        for f in OBJECT_FIELDS[1:]:
            objs[f].append(o[f])
    arrays = {f: np.concatenate(v) for f, v in objs.items()}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        video=np.stack([c["video"] for c in clips]),
        instance=np.stack([c["instance"] for c in clips]),
        **arrays,
    )
    os.replace(tmp, path)


def cache_matches(out_dir: Path, cfg: PersistenceConfig) -> bool:
    """True when ``out_dir`` holds a complete dataset generated with exactly ``cfg``."""
    manifest = out_dir / "manifest.json"
    if not manifest.exists():
        return False
    meta = json.loads(manifest.read_text())
    if meta.get("fingerprint") != cfg.fingerprint():
        return False
    return all((out_dir / s).exists() for s in meta["shards"])


def generate_dataset(
    out_dir: str | os.PathLike[str],
    cfg: PersistenceConfig,
    *,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Generate the dataset into ``out_dir`` (or reuse it when it already matches ``cfg``).

    Returns:
        Path of manifest.json.

    Raises:
        ValueError: bad arguments, or ``out_dir`` holds a dataset made with other arguments
            (pass ``force=True`` to overwrite it).
    """
    from tqdm import tqdm

    cfg.validate()
    out = Path(out_dir)
    if cache_matches(out, cfg) and not force:
        return out / "manifest.json"
    if (out / "manifest.json").exists() and not force:
        old = json.loads((out / "manifest.json").read_text()).get("config")
        raise ValueError(
            f"{out} holds a dataset generated with other arguments ({old}); "
            "use another --out or --force"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    samples, shards, strata, clips = [], [], [], []
    bar = tqdm(range(cfg.num_samples), desc="persistence clips", unit="clip", disable=not progress)
    for i in bar:
        clip = generate_clip(cfg, i)
        o = clip["objects"]
        n_t = int((o["obj_kind"] == 0).sum())
        strata.append(f"{clip['trajectory']}/{n_t}")
        samples.append(
            {
                "sample_id": sample_id(i),
                "shard": len(shards),
                "index": len(clips),
                "trajectory": clip["trajectory"],
                "n_persistent": int(o["obj_kind"].sum()),
                "n_transient": n_t,
            }
        )
        clips.append(clip)
        if len(clips) == cfg.shard_size or i == cfg.num_samples - 1:
            name = f"shard_{len(shards):04d}.npz"
            _write_shard(out / name, clips)
            shards.append(name)
            clips = []
    split_idx = stratified_split(strata, cfg.split_fractions, cfg.seed)
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": cfg.fingerprint(),
        "config": asdict(cfg),
        "trajectory_classes": list(TRAJECTORY_CLASSES),
        "shapes": list(SHAPES),
        "kinds": list(KINDS),
        "shards": shards,
        "splits": {k: [sample_id(i) for i in v] for k, v in split_idx.items()},
        "samples": samples,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")  # the manifest last: it marks the cache complete
    return out / "manifest.json"


# -- loading ---------------------------------------------------------------------------------------


@dataclass
class PersistenceSplit:
    """One split, loaded into memory.

    Attributes:
        sample_ids: N ids.
        video: uint8 [N, T, 3, H, W].
        instance: uint8 [N, T, H, W].
        objects: dict of ``OBJECT_FIELDS`` arrays over the split's M objects; ``obj_sample``
            indexes into the split's N clips.
    """

    sample_ids: list[str]
    video: np.ndarray
    instance: np.ndarray
    objects: dict[str, np.ndarray]


def load_manifest(data_dir: str | os.PathLike[str]) -> dict:
    """Read manifest.json; ValueError with a hint when it is missing."""
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise ValueError(
            f"no dataset at {data_dir} (manifest.json missing); "
            "run scripts/generate_persistence_dataset.py --out DIR first"
        )
    return json.loads(path.read_text())


def load_split(
    data_dir: str | os.PathLike[str], split: str, limit: int | None = None
) -> PersistenceSplit:
    """Load split ``split`` (train/val/test), optionally its first ``limit`` clips.

    Raises:
        ValueError: unknown split or missing dataset.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    meta = load_manifest(data_dir)
    wanted = meta["splits"][split][: limit if limit else None]
    by_id = {s["sample_id"]: s for s in meta["samples"]}
    videos, instances, obj_parts, ids = [], [], [], []
    by_shard: dict[int, list[dict]] = {}
    for sid in wanted:
        by_shard.setdefault(by_id[sid]["shard"], []).append(by_id[sid])
    for shard, entries in sorted(by_shard.items()):
        with np.load(Path(data_dir) / meta["shards"][shard]) as z:
            local = np.array([e["index"] for e in entries])
            videos.append(z["video"][local])
            instances.append(z["instance"][local])
            remap = np.full(int(z["obj_sample"].max()) + 1, -1)
            remap[local] = np.arange(len(local)) + len(ids)
            keep = np.isin(z["obj_sample"], local)
            part = {f: z[f][keep] for f in OBJECT_FIELDS}
            part["obj_sample"] = remap[part["obj_sample"]].astype(np.int32)
            obj_parts.append(part)
            ids += [e["sample_id"] for e in entries]
    objects = {f: np.concatenate([p[f] for p in obj_parts]) for f in OBJECT_FIELDS}
    return PersistenceSplit(ids, np.concatenate(videos), np.concatenate(instances), objects)


# -- object tokens -----------------------------------------------------------------------------


@dataclass
class ObjectTokens:
    """One token per object observation (object k visible in frame t), grouped by clip.

    The model never sees track identity: ``track`` is kept for evaluation only.

    Attributes:
        crops: uint8 [K, 3, P, P], the P x P window centred on the object's GT centre.
        frame: int64 [K], frame index t.
        centre: float32 [K, 2], (x, y) / image size, in [0, 1].
        label: int64 [K], 1 persistent, 0 transient.
        duration: float32 [K], frames the token's object is visible in its clip.
        track: int64 [K], object id within the clip (evaluation only).
        offsets: int64 [N + 1], tokens of clip i are offsets[i]:offsets[i+1].
        sample_ids: N ids.
    """

    crops: np.ndarray
    frame: np.ndarray
    centre: np.ndarray
    label: np.ndarray
    duration: np.ndarray
    track: np.ndarray
    offsets: np.ndarray
    sample_ids: list[str]

    def __len__(self) -> int:
        return len(self.sample_ids)


def extract_tokens(split: PersistenceSplit, crop_size: int = 16) -> ObjectTokens:
    """Cut one crop per object observation at its ground-truth centre (edge-padded frames).

    Tokens are ordered by clip, then frame, then object id.
    """
    o = split.objects
    size = split.video.shape[-1]
    half = crop_size // 2
    padded = np.pad(split.video, ((0, 0), (0, 0), (0, 0), (half, half), (half, half)), mode="edge")
    obj_idx, frames = np.nonzero(o["obj_visible"])  # row-major: object then frame
    samples = o["obj_sample"][obj_idx]
    order = np.lexsort((o["obj_id"][obj_idx], frames, samples))
    obj_idx, frames, samples = obj_idx[order], frames[order], samples[order]
    centres = o["obj_centres"][obj_idx, frames]  # [K, 2] (x, y)
    x0 = np.rint(centres[:, 0]).astype(np.int64)  # window x0..x0+P in padded coordinates
    y0 = np.rint(centres[:, 1]).astype(np.int64)
    ar = np.arange(crop_size)
    rows = (y0[:, None] + ar[None, :])[:, :, None]  # [K, P, 1]
    cols = (x0[:, None] + ar[None, :])[:, None, :]  # [K, 1, P]
    crops = padded[samples[:, None, None], frames[:, None, None], :, rows, cols]  # [K, P, P, 3]
    counts = np.bincount(samples, minlength=len(split.sample_ids))
    return ObjectTokens(
        crops=np.ascontiguousarray(crops.transpose(0, 3, 1, 2)),
        frame=frames.astype(np.int64),
        centre=(centres / size).astype(np.float32),
        label=o["obj_kind"][obj_idx].astype(np.int64),
        duration=o["obj_visible"].sum(1)[obj_idx].astype(np.float32),
        track=o["obj_id"][obj_idx].astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        sample_ids=list(split.sample_ids),
    )


@dataclass
class TrackSequences:
    """Per ground-truth track, the crops a tracker would hand a per-track classifier.

    From the track's first visible frame (onset) on: the crop at its GT centre while visible, at
    its last seen centre after it vanished (a tracker's last known position). Sequences are
    left-aligned: step s is frame onset + s; steps past the clip end are padding.

    Attributes:
        crops: uint8 [M, T, 3, P, P].
        valid: bool [M, T] (a prefix: T - onset steps).
        visible: bool [M, T], the object is visible at that step.
        label: int64 [M], 1 persistent.
        duration: int64 [M], visible frames.
        onset: int64 [M]; clip: int64 [M] index into sample_ids; track: int64 [M] object id.
        sample_ids: N ids.
    """

    crops: np.ndarray
    valid: np.ndarray
    visible: np.ndarray
    label: np.ndarray
    duration: np.ndarray
    onset: np.ndarray
    clip: np.ndarray
    track: np.ndarray
    sample_ids: list[str]


def extract_track_sequences(split: PersistenceSplit, crop_size: int = 16) -> TrackSequences:
    """Build TrackSequences for every object of ``split`` (see the class docstring)."""
    o = split.objects
    m, t_count = o["obj_visible"].shape
    half = crop_size // 2
    vis = o["obj_visible"]
    onset = vis.argmax(1)
    steps = np.arange(t_count)
    frame = onset[:, None] + steps[None]  # [M, T]
    valid = frame < t_count
    frame = np.minimum(frame, t_count - 1)
    rows = np.arange(m)[:, None]
    visible = vis[rows, frame] & valid
    # last seen centre: forward-fill the centres over frames
    cen = o["obj_centres"].copy()  # [M, T, 2], NaN where not visible
    last = np.where(vis, np.arange(t_count)[None], -1)
    last = np.maximum.accumulate(last, axis=1)  # [M, T] frame of the last sighting
    filled = cen[rows, np.maximum(last, 0)]
    centres = filled[rows, frame]  # [M, T, 2]
    padded = np.pad(split.video, ((0, 0), (0, 0), (0, 0), (half, half), (half, half)), mode="edge")
    x0 = np.rint(centres[..., 0]).astype(np.int64)
    y0 = np.rint(centres[..., 1]).astype(np.int64)
    ar = np.arange(crop_size)
    r_idx = (y0[..., None] + ar)[..., :, None]  # [M, T, P, 1]
    c_idx = (x0[..., None] + ar)[..., None, :]  # [M, T, 1, P]
    s_idx = o["obj_sample"][:, None, None, None]
    crops = padded[s_idx, frame[..., None, None], :, r_idx, c_idx]  # [M, T, P, P, 3]
    crops = np.where(valid[..., None, None, None], crops, 0).astype(np.uint8)
    return TrackSequences(
        crops=np.ascontiguousarray(crops.transpose(0, 1, 4, 2, 3)),
        valid=valid,
        visible=visible,
        label=o["obj_kind"].astype(np.int64),
        duration=vis.sum(1).astype(np.int64),
        onset=onset.astype(np.int64),
        clip=o["obj_sample"].astype(np.int64),
        track=o["obj_id"].astype(np.int64),
        sample_ids=list(split.sample_ids),
    )
