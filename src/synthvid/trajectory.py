"""Trajectory-classification clips with a FUTURE position target, on the persistence generator.

The trajectory comparison (ML_NOTES.md, "Trajectory model comparison") reuses the clips of the
early-persistence job (``synthvid.persistence``) and adds the two things that dataset does not
give directly:

1. an unambiguous per-clip label: only clips with exactly ONE persistent object are used (its
   trajectory class is the label; with two persistent objects of different classes the clip
   label would be ambiguous). Generate with ``--max-persistent 1`` to use every clip, or reuse a
   default persistence dataset and the single-object clips are selected from it.
2. a position target the model cannot see: the model gets frames ``0..T_in-1`` and must predict
   the object's centre at frame ``T_in - 1 + horizon`` (>= T_in), which is cut off here and never
   reaches the model. The generator is run with ``num_frames >= T_in + horizon - 1 + 1``.

Seed note 003 "predicted the next position" from a window that contained it, and validated on a
one-class split; here the splits are the generator's stored stratified ones (stratum =
trajectory class / number of transients), so every split holds every class.

A dataset for the comparison (16 input frames, target 4 frames past the last input)::

    python scripts/generate_persistence_dataset.py --out data/trajectory --num-samples 1200 \\
        --num-frames 20 --max-persistent 1 --max-transient 2

Shape legend: N clips, T_in input frames, C = 3 channels, H = W image size in pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .persistence import SPLITS, TRAJECTORY_CLASSES, load_manifest, load_split

CLASSES = TRAJECTORY_CLASSES  # label k = TRAJECTORY_CLASSES[k]


@dataclass
class TrajectoryClips:
    """One split of single-object clips, cut to the input window, with the future target.

    Attributes:
        sample_ids: N ids (``clip_000042``), the stored split's ids with one persistent object.
        video: uint8 [N, T_in, 3, H, W], frames 0..T_in-1 only (the model's whole input).
        label: int64 [N], index into ``CLASSES`` (trajectory class of the persistent object).
        centres: float32 [N, T_in, 2], (x, y) pixels of the persistent object in the input
            frames. Ground truth, for the constant-velocity baseline and diagnostics only.
        target: float32 [N, 2], (x, y) pixels of the persistent object at ``target_frame``.
        input_frames: T_in.
        target_frame: frame index of ``target`` (== T_in - 1 + horizon, always >= T_in).
        image_size: H (== W), the unit of ``centres``/``target`` is pixels of this image.
    """

    sample_ids: list[str]
    video: np.ndarray
    label: np.ndarray
    centres: np.ndarray
    target: np.ndarray
    input_frames: int
    target_frame: int
    image_size: int

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def horizon(self) -> int:
        """Frames between the last input frame and the target frame (k >= 1)."""
        return self.target_frame - (self.input_frames - 1)


def single_object_ids(data_dir: str | os.PathLike[str]) -> dict[str, list[str]]:
    """The stored split ids restricted to clips with exactly one persistent object.

    Returns:
        {"train": [...], "val": [...], "test": [...]} (disjoint: subsets of the stored splits).
    """
    meta = load_manifest(data_dir)
    single = {s["sample_id"] for s in meta["samples"] if s["n_persistent"] == 1}
    return {split: [i for i in meta["splits"][split] if i in single] for split in SPLITS}


def load_trajectory_split(
    data_dir: str | os.PathLike[str],
    split: str,
    *,
    input_frames: int = 16,
    horizon: int = 4,
    limit: int | None = None,
) -> TrajectoryClips:
    """Load one split as model input (frames 0..T_in-1) and the centre at frame T_in-1+horizon.

    Args:
        data_dir: a dataset folder made by ``synthvid.persistence.generate_dataset``.
        split: train | val | test (the manifest's stored, stratified, disjoint splits).
        input_frames: T_in, frames given to the model.
        horizon: k >= 1; the target is k frames after the last input frame.
        limit: keep the first ``limit`` single-object clips of the split (None: all).

    Raises:
        ValueError: unknown split, missing dataset, horizon < 1, a window longer than the
            generated clips, or a split without single-object clips.
    """
    if horizon < 1:
        raise ValueError(
            f"--horizon must be >= 1 (a target inside the input is a leak), got {horizon}"
        )
    if input_frames < 2:
        raise ValueError(f"--input-frames must be >= 2, got {input_frames}")
    meta = load_manifest(data_dir)
    num_frames = meta["config"]["num_frames"]
    target_frame = input_frames - 1 + horizon
    if target_frame >= num_frames:
        raise ValueError(
            f"input frames ({input_frames}) + horizon ({horizon}) need clips of at least "
            f"{target_frame + 1} frames; {data_dir} has {num_frames} (regenerate with "
            f"--num-frames {target_frame + 1} or lower --input-frames/--horizon)"
        )
    data = load_split(data_dir, split)
    o = data.objects
    persistent = np.flatnonzero(o["obj_kind"] == 1)
    count = np.bincount(o["obj_sample"][persistent], minlength=len(data.sample_ids))
    keep = np.flatnonzero(count == 1)[: limit if limit else None]  # clip rows, split order
    if len(keep) == 0:
        raise ValueError(f"split {split!r} of {data_dir} has no clip with one persistent object")
    row_of = {int(o["obj_sample"][k]): int(k) for k in persistent}
    obj = np.array([row_of[int(i)] for i in keep])  # object row of each kept clip's object
    centres = o["obj_centres"][obj]  # [N, T, 2], finite: persistent objects are always visible
    return TrajectoryClips(
        sample_ids=[data.sample_ids[i] for i in keep],
        video=np.ascontiguousarray(data.video[keep, :input_frames]),
        label=o["obj_trajectory"][obj].astype(np.int64),
        centres=np.ascontiguousarray(centres[:, :input_frames]).astype(np.float32),
        target=centres[:, target_frame].astype(np.float32),
        input_frames=input_frames,
        target_frame=target_frame,
        image_size=int(data.video.shape[-1]),
    )


def constant_velocity_baseline(centres: np.ndarray, horizon: int) -> np.ndarray:
    """Extrapolate the last observed velocity: p[T-1] + horizon * (p[T-1] - p[T-2]).

    This baseline reads the GROUND-TRUTH centres of the input frames (a perfect tracker), so a
    learned model that localises from pixels has to be good to beat it; it is exact for linear
    motion and worst on circles.

    Args:
        centres: float [N, T_in, 2] pixels.
        horizon: k >= 1 frames past the last input frame.

    Returns:
        float32 [N, 2] pixels.
    """
    last, prev = centres[:, -1], centres[:, -2]
    return (last + horizon * (last - prev)).astype(np.float32)


def constant_position_baseline(centres: np.ndarray) -> np.ndarray:
    """The last observed ground-truth centre, float32 [N, 2] pixels (the object stands still)."""
    return centres[:, -1].astype(np.float32)


def mean_position_baseline(train_target: np.ndarray, n: int) -> np.ndarray:
    """The constant predictor: the mean TRAIN target centre for every one of ``n`` clips.

    A model whose position head learned nothing from the video converges to this; its error is
    the floor a position error must beat before it says anything about the clip.

    Args:
        train_target: float [N_train, 2] target centres of the train split, pixels.
        n: number of held-out clips to predict.

    Returns:
        float32 [n, 2] pixels, every row the train mean.

    Raises:
        ValueError: if ``train_target`` is empty or not [N, 2].
    """
    if train_target.ndim != 2 or train_target.shape[1] != 2 or len(train_target) == 0:
        raise ValueError(f"train_target must be a non-empty [N, 2] array, got {train_target.shape}")
    return np.repeat(train_target.mean(0, keepdims=True), n, axis=0).astype(np.float32)


def single_frame_video(video: np.ndarray, frame: int) -> np.ndarray:
    """Control input: frame ``frame`` of each clip repeated over the whole input window.

    A backbone fed this sees the object's appearance and ONE position but no motion, so its
    accuracy is what a single frame gives away (e.g. the height of a parabolic bump).

    Args:
        video: uint8 [N, T_in, 3, H, W].
        frame: index in [0, T_in).

    Returns:
        uint8 [N, T_in, 3, H, W], a contiguous copy.

    Raises:
        ValueError: if ``frame`` is outside the input window.
    """
    T = video.shape[1]
    if not 0 <= frame < T:
        raise ValueError(f"--single-frame must be in [0, {T - 1}] (the input window), got {frame}")
    return np.ascontiguousarray(np.repeat(video[:, frame : frame + 1], T, axis=1))
