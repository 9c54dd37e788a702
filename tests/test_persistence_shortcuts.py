"""No shortcut in the early-persistence data: every cue alone is at chance (issue #16, item 1).

A persistent object is visible in every frame, so a track's own extent IS its label; that is for
a model to find out by association. Everything else must carry nothing:

- per observation (token): the frame index, the position, and the two together;
- per track: colour, size, shape.

Each cue is one-hot binned (so any function of it is linear in the features) and fed to a
class-balanced, L2-regularised logistic regression trained on the even clips of a generated set
of 2,400 clips and scored on the odd ones; held-out balanced accuracy must be <= 0.53. The same
classifier on the label's own cue (a track's visible-frame count) is the positive control.
Objects are drawn without rendering (``generate_clip(render=False)``: the same random draws).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from synthvid.persistence import PersistenceConfig, generate_clip

NUM_CLIPS = 2400
MAX_BALANCED_ACCURACY = 0.53


@pytest.fixture(scope="module")
def cues() -> dict[str, np.ndarray]:
    """Per-token and per-track cue arrays of NUM_CLIPS clips of the default config (seed 5)."""
    cfg = PersistenceConfig(num_samples=NUM_CLIPS, seed=5)
    tok = {k: [] for k in ("clip", "frame", "x", "y", "label")}
    trk = {k: [] for k in ("clip", "colour", "radius", "shape", "duration", "label")}
    for i in range(NUM_CLIPS):
        o = generate_clip(cfg, i, render=False)["objects"]
        obj, frame = np.nonzero(o["obj_visible"])
        xy = o["obj_centres"][obj, frame] / cfg.image_size  # [K, 2] in [0, 1]
        tok["clip"].append(np.full(len(obj), i))
        tok["frame"].append(frame)
        tok["x"].append(xy[:, 0])
        tok["y"].append(xy[:, 1])
        tok["label"].append(o["obj_kind"][obj])
        trk["clip"].append(np.full(len(o["obj_id"]), i))
        trk["colour"].append(o["obj_colour"])
        trk["radius"].append(o["obj_radius"])
        trk["shape"].append(o["obj_shape"])
        trk["duration"].append(o["obj_visible"].sum(1))
        trk["label"].append(o["obj_kind"])
    out = {f"tok_{k}": np.concatenate(v) for k, v in tok.items()}
    out.update({f"trk_{k}": np.concatenate(v) for k, v in trk.items()})
    return out


def _one_hot(codes: np.ndarray, n: int) -> np.ndarray:
    """int [N] in 0..n-1 -> float [N, n]."""
    return np.eye(n)[np.clip(codes, 0, n - 1)]


def _bins(values: np.ndarray, n: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """float [N] -> int [N] equal-width bin index in 0..n-1 over [lo, hi]."""
    return np.clip(((values - lo) / (hi - lo) * n).astype(int), 0, n - 1)


def held_out_balanced_accuracy(x: np.ndarray, y: np.ndarray, clip: np.ndarray) -> float:
    """Class-balanced logistic regression (L2 1e-3, L-BFGS) on even clips, balanced accuracy on
    odd clips. x float [N, F], y int [N] in {0, 1}, clip int [N]."""
    train, test = clip % 2 == 0, clip % 2 == 1
    xtr, ytr = np.c_[x[train], np.ones(train.sum())], y[train]
    xte, yte = np.c_[x[test], np.ones(test.sum())], y[test]
    w_cls = np.where(ytr == 1, 0.5 / ytr.mean(), 0.5 / (1 - ytr.mean()))

    def loss_grad(w):
        z = xtr @ w
        p = 1 / (1 + np.exp(-z))
        loss = np.mean(w_cls * (np.logaddexp(0, z) - ytr * z)) + 1e-3 * w @ w
        grad = xtr.T @ (w_cls * (p - ytr)) / len(ytr) + 2e-3 * w
        return loss, grad

    w = minimize(loss_grad, np.zeros(xtr.shape[1]), jac=True, method="L-BFGS-B").x
    pred = (xte @ w > 0).astype(int)
    return float(np.mean([np.mean(pred[yte == c] == c) for c in (0, 1)]))


def _token_features(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    frame = _one_hot(c["tok_frame"], 16)
    grid8 = _bins(c["tok_x"], 8) * 8 + _bins(c["tok_y"], 8)
    grid4 = _bins(c["tok_x"], 4) * 4 + _bins(c["tok_y"], 4)
    centre_dist = np.hypot(c["tok_x"] - 0.5, c["tok_y"] - 0.5)
    return {
        "frame index": frame,
        "position (8x8 grid)": _one_hot(grid8, 64),
        "distance to the centre": _one_hot(_bins(centre_dist, 12, 0.0, 0.71), 12),
        "frame x position (16 x 4x4)": _one_hot(c["tok_frame"] * 16 + grid4, 256),
    }


def _track_features(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rgb = c["trk_colour"]
    rgb_bin = _bins(rgb[:, 0], 4) * 16 + _bins(rgb[:, 1], 4) * 4 + _bins(rgb[:, 2], 4)
    colour = _one_hot(rgb_bin, 64)
    size = _one_hot(_bins(c["trk_radius"], 10, 3.0, 6.0), 10)
    shape = _one_hot(c["trk_shape"].astype(int), 3)
    return {
        "colour (4x4x4 RGB bins)": colour,
        "size": size,
        "shape": shape,
        "colour + size + shape": np.c_[colour, size, shape],
    }


def test_every_token_cue_alone_is_at_chance(cues):
    y, clip = cues["tok_label"].astype(int), cues["tok_clip"]
    assert len(np.unique(clip)) >= 2000 and 0.3 < y.mean() < 0.9
    scores = {
        name: held_out_balanced_accuracy(x, y, clip) for name, x in _token_features(cues).items()
    }
    print("per-token balanced accuracy:", {k: round(v, 3) for k, v in scores.items()})
    assert all(s <= MAX_BALANCED_ACCURACY for s in scores.values()), scores


def test_every_track_appearance_cue_alone_is_at_chance(cues):
    y, clip = cues["trk_label"].astype(int), cues["trk_clip"]
    scores = {
        name: held_out_balanced_accuracy(x, y, clip) for name, x in _track_features(cues).items()
    }
    print("per-track balanced accuracy:", {k: round(v, 3) for k, v in scores.items()})
    assert all(s <= MAX_BALANCED_ACCURACY for s in scores.values()), scores


def test_the_same_classifier_finds_a_cue_that_carries_the_label(cues):
    """Positive control: a track's visible-frame count (its extent, the label itself)."""
    y, clip = cues["trk_label"].astype(int), cues["trk_clip"]
    duration = _one_hot(cues["trk_duration"].astype(int), 17)
    assert held_out_balanced_accuracy(duration, y, clip) > 0.99


def test_every_frame_is_equally_likely_to_hold_a_transient(cues):
    """The fraction of observations that are transient is the same in every frame (chi-square
    test of independence of frame and label over tokens, p > 0.001)."""
    from scipy.stats import chi2_contingency

    table = np.zeros((16, 2))
    np.add.at(table, (cues["tok_frame"], cues["tok_label"].astype(int)), 1)
    assert chi2_contingency(table).pvalue > 1e-3, table[:, 0] / table.sum(1)


def test_rendering_does_not_change_the_objects():
    cfg = PersistenceConfig(num_samples=50, seed=5)
    for i in range(3):
        a, b = generate_clip(cfg, i)["objects"], generate_clip(cfg, i, render=False)["objects"]
        for key in a:
            if key != "obj_boxes":
                np.testing.assert_array_equal(a[key], b[key])
