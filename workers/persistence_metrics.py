"""Metrics of the early-persistence race, exactly as shared/ML_NOTES.md (Job A) defines them.

Held-out data only; the video (clip) is the statistical unit, never the token.

- attention received by key j: a_j = mean over valid queries i and heads h of A[h, i, j].
- per-sample ratio r = mean a_j over persistent keys / mean a_j over transient keys
  (uniform attention gives r = 1 whatever the token counts). Clips without transients are
  excluded and counted; no sentinel values.
- attention_ratio = geometric mean of r over clips, with a percentile bootstrap 95% CI
  (scipy.stats.bootstrap on log r).
- consistency = fraction of clips with r > 1.3.
- separation_p = paired Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided) of per-clip
  persistent vs transient mean attention; effect size d_z = mean(log r) / sd(log r) (paired
  Cohen's d on the log scale), plus the fraction of clips with r > 1.
- val_accuracy at object (track) level: a track's probability is the mean of its tokens'
  persistent probabilities; also macro-F1, balanced accuracy and the confusion matrix.
- ECE of a confidence (Guo et al. 2017, equal-width bins).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

RATIO_CONSISTENCY_THRESHOLD = 1.3


def attention_received(attn: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """a_j for every key of every clip.

    Args:
        attn: float [B, H, L, S] softmax weights (rows over S sum to 1), S == L.
        valid: bool [B, L] real tokens (queries and keys).

    Returns:
        float [B, S]: mean over heads and valid queries of the attention key j receives;
        0 for padded keys.
    """
    q = valid.to(attn.dtype)  # [B, L]
    per_head = (attn * q[:, None, :, None]).sum(2) / q.sum(1).clamp(min=1)[
        :, None, None
    ]  # [B, H, S]
    return per_head.mean(1) * valid.to(attn.dtype)


def persistent_transient_attention(
    received: np.ndarray, labels: np.ndarray
) -> tuple[float, float | None]:
    """(mean a_j over persistent keys, mean over transient keys or None when there are none).

    received, labels: [S] over one clip's valid tokens (label 1 persistent, 0 transient).
    """
    p = float(received[labels == 1].mean()) if (labels == 1).any() else math.nan
    t = float(received[labels == 0].mean()) if (labels == 0).any() else None
    return p, t


def summarize_attention(
    persistent: np.ndarray, transient: np.ndarray, *, n_resamples: int = 2000, seed: int = 0
) -> dict[str, float | int | None]:
    """Race metrics from per-clip mean attention (clips without transients already removed).

    Args:
        persistent, transient: float [N] per-clip mean attention received.
        n_resamples: bootstrap resamples for the CI.
        seed: bootstrap seed.

    Returns:
        attention_ratio (geometric mean of r), attention_ratio_ci_low/_ci_high (95%),
        consistency, separation_p, effect_size_dz, frac_ratio_above_1, n_ratio_samples.
        Values that cannot be computed (too few clips) are None.
    """
    p = np.asarray(persistent, dtype=np.float64)
    t = np.asarray(transient, dtype=np.float64)
    n = len(p)
    out: dict[str, float | int | None] = {
        "attention_ratio": None,
        "attention_ratio_ci_low": None,
        "attention_ratio_ci_high": None,
        "consistency": None,
        "separation_p": None,
        "effect_size_dz": None,
        "frac_ratio_above_1": None,
        "n_ratio_samples": n,
    }
    if n == 0:
        return out
    with np.errstate(divide="ignore"):
        log_r = np.log(p) - np.log(t)
    r = np.exp(log_r)
    out["attention_ratio"] = float(np.exp(log_r.mean()))
    out["consistency"] = float(np.mean(r > RATIO_CONSISTENCY_THRESHOLD))
    out["frac_ratio_above_1"] = float(np.mean(r > 1.0))
    finite = np.isfinite(log_r).all()
    if n >= 3 and finite and np.ptp(log_r) > 0:
        ci = stats.bootstrap(
            (log_r,),
            np.mean,
            n_resamples=n_resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        out["attention_ratio_ci_low"] = float(np.exp(ci.low))
        out["attention_ratio_ci_high"] = float(np.exp(ci.high))
        out["effect_size_dz"] = float(log_r.mean() / log_r.std(ddof=1))
    if n >= 2 and np.any(p != t):
        out["separation_p"] = float(stats.wilcoxon(p, t).pvalue)
    elif n >= 2:
        out["separation_p"] = 1.0  # identical attention everywhere: no evidence of separation
    return out


def track_predictions(prob: np.ndarray, clip: np.ndarray, track: np.ndarray, label: np.ndarray):
    """Aggregate token probabilities per ground-truth track (evaluation only).

    Args:
        prob: float [K] persistent probability per token; clip, track, label: int [K].

    Returns:
        (track_prob [M], track_label [M], track_clip [M], track_id [M]) in (clip, track) order.
    """
    keys = clip.astype(np.int64) * 10_000 + track.astype(np.int64)
    uniq, inv = np.unique(keys, return_inverse=True)
    sums = np.bincount(inv, weights=prob)
    counts = np.bincount(inv)
    lab = np.zeros(len(uniq), dtype=np.int64)
    lab[inv] = label
    return sums / counts, lab, uniq // 10_000, uniq % 10_000


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | list]:
    """accuracy, macro_f1, balanced_accuracy and confusion [[TN, FP], [FN, TP]] (rows = truth,
    class 1 = persistent)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    conf = np.zeros((2, 2), dtype=np.int64)
    np.add.at(conf, (y_true, y_pred), 1)
    f1s, recalls = [], []
    for c in (0, 1):
        tp = conf[c, c]
        prec = tp / conf[:, c].sum() if conf[:, c].sum() else 0.0
        rec = tp / conf[c].sum() if conf[c].sum() else 0.0
        recalls.append(rec)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else math.nan,
        "macro_f1": float(np.mean(f1s)),
        "balanced_accuracy": float(np.mean(recalls)),
        "confusion": conf.tolist(),
    }


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10
) -> float:
    """ECE: sum over equal-width confidence bins of (bin weight) x |accuracy - mean confidence|."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return float(ece)
