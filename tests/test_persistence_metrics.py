"""Metric unit tests on hand-built attention matrices (ML_NOTES.md definitions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from workers.persistence_metrics import (
    attention_received,
    classification_metrics,
    confusion_bootstrap_ci,
    expected_calibration_error,
    mean_bootstrap_ci,
    own_track_association,
    per_clip_confusion,
    persistent_transient_attention,
    summarize_attention,
    track_predictions,
    track_weights_np,
)


def test_uniform_attention_gives_ratio_one_whatever_the_counts():
    for n_p, n_t in [(10, 2), (3, 7), (16, 1)]:
        n = n_p + n_t
        attn = torch.full((1, 4, n, n), 1.0 / n)
        valid = torch.ones(1, n, dtype=torch.bool)
        a = attention_received(attn, valid)[0].numpy()
        labels = np.array([1] * n_p + [0] * n_t)
        p, t = persistent_transient_attention(a, labels)
        assert p / t == pytest.approx(1.0)


def test_padding_is_ignored_as_query_and_key():
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, :3, :3] = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    attn[0, 0, 3, 3] = 1.0  # a padded query attending itself
    valid = torch.tensor([[True, True, True, False]])
    a = attention_received(attn, valid)[0]
    torch.testing.assert_close(a, torch.tensor([0.5, 0.25, 0.25, 0.0]))


def test_known_matrix_gives_known_ratio_and_heads_are_averaged():
    # 2 heads: head 0 gives key 0 (persistent) 0.6, head 1 gives it 0.2 -> a_0 = 0.4
    attn = torch.tensor([[[[0.6, 0.2, 0.2]] * 3, [[0.2, 0.4, 0.4]] * 3]])
    a = attention_received(attn, torch.ones(1, 3, dtype=torch.bool))[0].numpy()
    np.testing.assert_allclose(a, [0.4, 0.3, 0.3])
    p, t = persistent_transient_attention(a, np.array([1, 0, 0]))
    assert p / t == pytest.approx(4 / 3)
    assert persistent_transient_attention(a, np.array([1, 1, 1]))[1] is None  # no transients


def test_summary_geometric_mean_consistency_and_paired_wilcoxon():
    t = np.full(8, 0.1)
    p = t * np.array([2.0, 2.0, 2.0, 2.0, 0.5, 1.2, 1.4, 3.0])
    s = summarize_attention(p, t, n_resamples=500)
    r = p / t
    assert s["attention_ratio"] == pytest.approx(np.exp(np.log(r).mean()))
    assert s["consistency"] == pytest.approx(np.mean(r > 1.3)) == pytest.approx(6 / 8)
    log_r = np.log(p) - np.log(t)
    assert s["separation_p"] == pytest.approx(stats.wilcoxon(log_r, alternative="greater").pvalue)
    assert s["consistency_ci_low"] < s["consistency"] < s["consistency_ci_high"]
    assert s["attention_ratio_ci_low"] < s["attention_ratio"] < s["attention_ratio_ci_high"]
    assert s["effect_size_dz"] == pytest.approx(np.log(r).mean() / np.log(r).std(ddof=1))
    # uniform attention: ratio exactly 1, no separation
    u = summarize_attention(t, t)
    assert u["attention_ratio"] == 1.0 and u["separation_p"] == 1.0 and u["consistency"] == 0.0
    assert summarize_attention(np.array([]), np.array([]))["attention_ratio"] is None


def test_paired_test_is_per_clip_not_per_token():
    # 20 clips with ratios scattered around 1: many tokens would make a pooled test "significant",
    # the paired per-clip test must not be
    rng = np.random.default_rng(0)
    t = rng.uniform(0.05, 0.1, 20)
    p = t * np.exp(rng.normal(0.0, 0.3, 20))
    assert summarize_attention(p, t)["separation_p"] > 0.01


def test_track_aggregation_and_classification_metrics():
    prob = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1])
    clip = np.array([0, 0, 0, 1, 1, 1])
    track = np.array([0, 0, 1, 0, 0, 1])
    label = np.array([1, 1, 0, 1, 1, 0])
    tp, tl, tc, ti = track_predictions(prob, clip, track, label)
    np.testing.assert_allclose(tp, [0.85, 0.3, 0.4, 0.1])
    assert (
        tl.tolist() == [1, 0, 1, 0] and tc.tolist() == [0, 0, 1, 1] and ti.tolist() == [0, 1, 0, 1]
    )
    m = classification_metrics(tl, (tp > 0.5).astype(int))
    assert m["accuracy"] == 0.75 and m["confusion"] == [[2.0, 0.0], [1.0, 1.0]]
    assert m["balanced_accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx(
        np.mean([2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5])
    )


def test_ece():
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0
    assert expected_calibration_error(
        np.array([0.9] * 10), np.array([1] * 5 + [0] * 5)
    ) == pytest.approx(0.4)


def test_separation_p_is_one_sided_in_the_claimed_direction():
    """A model attending MORE to transients (r < 1 in every clip) must not pass; the same clips
    mirrored must. Two-sided, both passed."""
    rng = np.random.default_rng(1)
    t = rng.uniform(0.05, 0.1, 30)
    wrong = summarize_attention(t * np.exp(-rng.uniform(0.05, 0.3, 30)), t)
    assert wrong["attention_ratio"] < 1 and wrong["separation_p"] > 0.99
    right = summarize_attention(t * np.exp(rng.uniform(0.05, 0.3, 30)), t)
    assert right["separation_p"] < 1e-5


def test_scoring_is_per_token_with_each_track_weighted_once():
    """A track of 16 tokens and a track of 2: each weighs 1, whatever its token count; a track
    half right scores 0.5 (no pooling over the track's true extent)."""
    clip = np.zeros(18, dtype=int)
    track = np.array([0] * 16 + [1] * 2)
    label = np.array([1] * 16 + [0] * 2)
    w = track_weights_np(clip, track)
    assert w.sum() == pytest.approx(2.0)
    pred = np.array([1] * 8 + [0] * 8 + [0, 0])  # the persistent track half right
    m = classification_metrics(label, pred, w)
    assert m["accuracy"] == pytest.approx(0.75) and m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["confusion"] == [[1.0, 0.0], [0.5, 0.5]]


def test_confusion_and_mean_bootstrap_cis_cover_the_estimate():
    rng = np.random.default_rng(0)
    n_clips, per_clip = 60, 10
    clip = np.repeat(np.arange(n_clips), per_clip)
    label = rng.integers(0, 2, len(clip))
    pred = np.where(rng.random(len(clip)) < 0.8, label, 1 - label)
    conf = per_clip_confusion(label, pred, np.ones(len(clip)), clip, n_clips)
    assert conf.sum() == len(clip)
    ci = confusion_bootstrap_ci(conf)
    acc = classification_metrics(label, pred)
    assert ci["accuracy"][0] < acc["accuracy"] < ci["accuracy"][1]
    assert ci["balanced_accuracy"][0] < acc["balanced_accuracy"] < ci["balanced_accuracy"][1]
    lo, hi = mean_bootstrap_ci(np.r_[rng.normal(2.0, 0.5, 50), np.nan])
    assert lo < 2.0 < hi
    assert confusion_bootstrap_ci(conf[:3])["accuracy"] == (None, None)


def test_association_is_one_for_uniform_zero_within_frame_and_high_for_own_track():
    # one clip, 2 objects x 3 frames (tokens ordered object-major) + 1 one-token object
    track = torch.tensor([[0, 0, 0, 1, 1, 1, 2]])
    frame = torch.tensor([[0, 1, 2, 0, 1, 2, 1]])
    valid = torch.ones(1, 7, dtype=torch.bool)
    uniform = torch.full((1, 2, 7, 7), 1 / 7)
    assert float(own_track_association(uniform, track, valid)[0]) == pytest.approx(1.0)
    same_frame = (frame[0][:, None] == frame[0][None]).float()
    within = (same_frame / same_frame.sum(1, keepdim=True)).expand(1, 2, 7, 7)
    assert float(own_track_association(within, track, valid)[0]) == pytest.approx(0.0)
    own = ((track[0][:, None] == track[0][None]) & ~torch.eye(7, dtype=torch.bool)).float()
    own[6, 6] = 1.0  # the lone token can only attend to itself
    own = (own / own.sum(1, keepdim=True)).expand(1, 2, 7, 7)
    # every multi-token query puts all its mass on its own object: 1 / (2/7) = 3.5
    assert float(own_track_association(own, track, valid)[0]) == pytest.approx(3.5)
    assert torch.isnan(own_track_association(uniform, torch.arange(7)[None], valid)[0])
