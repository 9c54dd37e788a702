"""Trajectory-comparison data: the position target lies outside the input window, splits are
disjoint and stratified, labels are unambiguous, and the constant-velocity baseline is right."""

from __future__ import annotations

import numpy as np
import pytest

from synthvid.persistence import PersistenceConfig, generate_dataset, load_manifest, load_split
from synthvid.trajectory import (
    CLASSES,
    constant_position_baseline,
    constant_velocity_baseline,
    load_trajectory_split,
    single_object_ids,
)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "single"
    cfg = PersistenceConfig(
        num_samples=120, seed=4, num_frames=12, max_persistent=1, max_transient=2, shard_size=50
    )
    generate_dataset(out, cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "mixed"
    generate_dataset(
        out, PersistenceConfig(num_samples=60, seed=5, max_persistent=2), progress=False
    )
    return out


def test_target_frame_is_not_in_the_input(single):
    clips = load_trajectory_split(single, "val", input_frames=8, horizon=3)
    assert clips.video.shape[1:] == (8, 3, 64, 64) and clips.video.dtype == np.uint8
    assert clips.target_frame == 10 and clips.target_frame >= clips.video.shape[1]
    raw = load_split(single, "val")
    row = {sid: i for i, sid in enumerate(raw.sample_ids)}
    o = raw.objects
    for n, sid in enumerate(clips.sample_ids):
        k = np.flatnonzero((o["obj_sample"] == row[sid]) & (o["obj_kind"] == 1))
        assert len(k) == 1
        np.testing.assert_array_equal(clips.target[n], o["obj_centres"][k[0], 10])
        np.testing.assert_array_equal(clips.centres[n], o["obj_centres"][k[0], :8])
        np.testing.assert_array_equal(clips.video[n], raw.video[row[sid], :8])  # frames 0..7 only
        assert clips.label[n] == o["obj_trajectory"][k[0]]
    # the target is a position the model has not seen: farther than a pixel from every input centre
    dist = np.linalg.norm(clips.centres - clips.target[:, None], axis=-1).min(1)
    assert np.median(dist) > 1.0


def test_bad_windows_are_rejected(single):
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        load_trajectory_split(single, "train", input_frames=8, horizon=0)
    with pytest.raises(ValueError, match="at least 13 frames"):
        load_trajectory_split(single, "train", input_frames=10, horizon=3)
    with pytest.raises(ValueError, match="unknown split"):
        load_trajectory_split(single, "dev", input_frames=8, horizon=1)


def test_splits_disjoint_and_stratified(single):
    splits = {
        s: load_trajectory_split(single, s, input_frames=8, horizon=4)
        for s in ("train", "val", "test")
    }
    ids = {s: set(c.sample_ids) for s, c in splits.items()}
    assert (
        not ids["train"] & ids["val"]
        and not ids["train"] & ids["test"]
        and not ids["val"] & ids["test"]
    )
    assert sum(len(v) for v in ids.values()) == 120  # every clip has one persistent object here
    for s, c in splits.items():  # every split holds every class (the seed note's val held one)
        assert set(c.label.tolist()) == set(range(len(CLASSES))), s
    frac = np.bincount(splits["train"].label, minlength=4) / len(splits["train"])
    assert frac.min() > 0.1


def test_only_single_object_clips_from_a_mixed_dataset(mixed):
    meta = load_manifest(mixed)
    n_p = {s["sample_id"]: s["n_persistent"] for s in meta["samples"]}
    ids = single_object_ids(mixed)
    clips = load_trajectory_split(mixed, "train", input_frames=12, horizon=4)
    assert clips.sample_ids == ids["train"]
    assert all(n_p[i] == 1 for i in clips.sample_ids)
    assert 0 < len(clips) < len(meta["splits"]["train"])


def test_constant_velocity_baseline_is_exact_on_linear_motion(single):
    clips = load_trajectory_split(single, "train", input_frames=8, horizon=3)
    cv = constant_velocity_baseline(clips.centres, clips.horizon)
    err = np.linalg.norm(cv - clips.target, axis=1)
    linear = clips.label == CLASSES.index("linear")
    assert linear.any() and err[linear].max() < 1e-3
    assert err[clips.label == CLASSES.index("circular")].mean() > 0.5  # curvature is not free
    np.testing.assert_array_equal(constant_position_baseline(clips.centres), clips.centres[:, -1])
