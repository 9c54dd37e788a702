"""Small synthetic captioned videos: coloured shapes that move, with a caption describing them.

Each clip holds one or two objects (a coloured shape) on a noisy grey background. Every object
moves in one direction for the first half of the clip and in another for the second half, and
the caption says so: "a red circle moves left then up and a blue square moves down then right".
Everything is deterministic from ``(seed, index)``; the split is a seeded, stratified (by object
count) manifest of sample ids, disjoint by construction (one id = one independently drawn clip,
no augmented copies).

Shapes: frames are ``uint8 [T, H, W, 3]`` (RGB, H = W = ``image_size``), centres are float
``[T, 2]`` in pixels (x, y).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
BACKGROUND = 96  # grey level of the background, noise added on top
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ShapeTrack:
    """One moving object: what it is, where it goes, and its per-frame centre [T, 2] (x, y px)."""

    color: str
    shape: str
    directions: tuple[str, str]
    radius_px: float
    centers: np.ndarray

    def describe(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        first, then = self.directions
        return f"{article} {self.color} {self.shape} moves {first} then {then}"


@dataclass(frozen=True)
class CaptionedClip:
    """A generated clip: ``frames`` uint8 [T, H, W, 3], its ``caption`` and the ground truth."""

    sample_id: str
    frames: np.ndarray
    caption: str
    objects: tuple[ShapeTrack, ...]


def sample_id(index: int) -> str:
    """The id of the index-th clip (stable across runs: ``clip_000042``)."""
    return f"clip_{index:06d}"


def _rng(seed: int, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"captioned_shapes:{seed}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with radius ``r`` given pixel offsets from its centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _track(
    rng: np.random.Generator,
    num_frames: int,
    image_size: int,
    speed_px: float,
    radius_px: float,
    color: str,
    shape: str,
) -> ShapeTrack:
    d1, d2 = rng.choice(list(DIRECTIONS), size=2, replace=False)
    half = num_frames // 2
    steps = np.array([DIRECTIONS[d1]] * half + [DIRECTIONS[d2]] * (num_frames - 1 - half))
    steps = steps.astype(np.float64) * speed_px  # [T-1, 2]
    offsets = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])  # [T, 2]
    margin = radius_px + 1
    lo = margin - offsets.min(axis=0)
    hi = image_size - 1 - margin - offsets.max(axis=0)
    if np.any(hi <= lo):
        raise ValueError(
            f"image_size {image_size} too small for speed {speed_px} px/frame "
            f"over {num_frames} frames"
        )
    start = rng.uniform(lo, hi)
    return ShapeTrack(color, shape, (str(d1), str(d2)), radius_px, start + offsets)


def generate_clip(
    seed: int,
    index: int,
    *,
    num_frames: int = 8,
    image_size: int = 112,
    max_objects: int = 2,
    noise_std: float = 6.0,
) -> CaptionedClip:
    """Generate clip ``index`` of the set drawn with ``seed`` (deterministic).

    Args:
        seed: the set's seed; index: the clip's position in the set (its id is sample_id(index)).
        num_frames: T (>= 4); image_size: H = W in pixels (>= 48).
        max_objects: 1 or 2 objects per clip (count drawn uniformly in [1, max_objects]).
        noise_std: std of the Gaussian pixel noise on the background, in grey levels.

    Returns:
        CaptionedClip with frames uint8 [T, H, W, 3].

    Raises:
        ValueError: on sizes that cannot hold the motion, or max_objects not in {1, 2}.
    """
    if num_frames < 4 or image_size < 48:
        raise ValueError(
            f"need num_frames >= 4 and image_size >= 48, got {num_frames}, {image_size}"
        )
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    rng = _rng(seed, index)
    num_objects = object_count(seed, index, max_objects)
    radius = image_size / 11
    # total travel per half ~ image_size / 4, whatever T is
    speed = image_size / 4 / max(1, num_frames // 2)
    colors = rng.choice(list(COLORS), size=num_objects, replace=False)
    shapes = rng.choice(SHAPES, size=num_objects, replace=True)
    tracks = tuple(
        _track(rng, num_frames, image_size, speed, radius, str(c), str(s))
        for c, s in zip(colors, shapes, strict=True)
    )
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    noise = rng.normal(0.0, noise_std, size=(num_frames, image_size, image_size, 1))
    frames = np.clip(BACKGROUND + noise, 0, 255).repeat(3, axis=-1)
    for t in range(num_frames):
        for tr in tracks:
            cx, cy = tr.centers[t]
            mask = _shape_mask(tr.shape, xx - cx, yy - cy, tr.radius_px)
            frames[t][mask] = COLORS[tr.color]
    caption = " and ".join(tr.describe() for tr in tracks)
    return CaptionedClip(sample_id(index), frames.astype(np.uint8), caption, tracks)


def object_count(seed: int, index: int, max_objects: int = 2) -> int:
    """How many objects clip ``index`` holds (the stratum of the split); cheap, no rendering."""
    return int(_rng(seed, index).integers(1, max_objects + 1))


def make_split(
    num_samples: int,
    seed: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    max_objects: int = 2,
) -> dict[str, list[str]]:
    """Seeded split of the ids of a set, stratified by object count.

    Returns:
        {"train": [...], "val": [...], "test": [...]}: disjoint lists of sample ids covering
        all ``num_samples`` clips.

    Raises:
        ValueError: if fractions do not sum to 1 or a split would be empty.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    rng = np.random.default_rng(seed + 7919)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    strata: dict[int, list[int]] = {}
    for i in range(num_samples):
        strata.setdefault(object_count(seed, i, max_objects), []).append(i)
    for _, idx in sorted(strata.items()):
        idx = list(rng.permutation(idx))
        n_val = int(round(fractions[1] * len(idx)))
        n_test = int(round(fractions[2] * len(idx)))
        n_train = len(idx) - n_val - n_test
        for name, part in zip(
            SPLITS,
            (idx[:n_train], idx[n_train : n_train + n_val], idx[n_train + n_val :]),
            strict=True,
        ):
            out[name].extend(sample_id(int(i)) for i in part)
    for name in SPLITS:
        if not out[name] and fractions[SPLITS.index(name)] > 0:
            raise ValueError(f"split {name!r} is empty with {num_samples} samples; generate more")
        out[name].sort()
    return out


# -- the text prior: what a caption costs a model that never sees the video ---------------------

WORD_TYPES = ("colour", "shape", "direction", "structure")


def caption_word_nats(caption: str, max_objects: int = 2) -> list[tuple[str, str, float]]:
    """Exact text-only cost of each word of a caption of this generator, and of its end.

    -log P(word | previous words) in nats under the generator's own distribution (object count
    uniform in [1, max_objects]; colours drawn without replacement from COLORS; shapes uniform
    with replacement; first direction uniform, second uniform over the other three). No model
    that reads only the text can do better on average (the Bayes-optimal text prior); a
    captioner's CE minus this floor is what the video is worth to it. The article carries part
    of the colour ("an" -> orange), so it is typed "colour"; "moves", "then", "and" and the end
    of caption are "structure". By the chain rule the per-word costs equal the sum of the
    per-token costs under any tokenizer that never merges across spaces (the fVLM BPE).

    Args:
        caption: as produced by generate_clip, e.g. "a red circle moves left then up".
        max_objects: the generator's max_objects (1 or 2).

    Returns:
        [(word, type, nats)] for every word, then ("</s>", "structure", nats of ending here).

    Raises:
        ValueError: if the caption is not one this generator can produce.
    """
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    parts = caption.split(" and ")
    if not 1 <= len(parts) <= max_objects:
        raise ValueError(f"{caption!r}: {len(parts)} objects, generator makes 1..{max_objects}")
    out: list[tuple[str, str, float]] = []
    used: list[str] = []
    for k, part in enumerate(parts):
        words = part.split(" ")
        if len(words) != 7 or words[3] != "moves" or words[5] != "then":
            raise ValueError(f"{caption!r}: object {k + 1} is not 'a COLOUR SHAPE moves D then D'")
        article, colour, shape, _, d1, _, d2 = words
        free = [c for c in COLORS if c not in used]
        vowel = [c for c in free if c[0] in "aeiou"]
        same = vowel if article == "an" else [c for c in free if c[0] not in "aeiou"]
        if colour not in same or article not in ("a", "an"):
            raise ValueError(f"{caption!r}: '{article} {colour}' is not a possible colour here")
        if shape not in SHAPES or d1 not in DIRECTIONS or d2 not in DIRECTIONS or d1 == d2:
            raise ValueError(f"{caption!r}: unknown shape or direction pair in object {k + 1}")
        if k:
            out.append(("and", "structure", math.log(2.0)))  # a second object: P = 1/2
        out += [
            (article, "colour", -math.log(len(same) / len(free))),
            (colour, "colour", math.log(len(same))),
            (shape, "shape", math.log(len(SHAPES))),
            ("moves", "structure", 0.0),
            (d1, "direction", math.log(len(DIRECTIONS))),
            ("then", "structure", 0.0),
            (d2, "direction", math.log(len(DIRECTIONS) - 1)),
        ]
        used.append(colour)
    ends_early = len(parts) < max_objects  # the end competes with "and" (P = 1/2 each)
    out.append(("</s>", "structure", math.log(2.0) if ends_early else 0.0))
    return out
