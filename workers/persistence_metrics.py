"""Metrics of the early-persistence race, exactly as shared/ML_NOTES.md (Job A) defines them.

Held-out data only; the video (clip) is the statistical unit, never the token.

- attention received by key j: a_j = mean over valid queries i and heads h of A[h, i, j].
- per-sample ratio r = mean a_j over persistent keys / mean a_j over transient keys
  (uniform attention gives r = 1 whatever the token counts). Clips without transients are
  excluded and counted; no sentinel values.
- attention_ratio = geometric mean of r over clips, with a percentile bootstrap 95% CI
  (scipy.stats.bootstrap on log r).
- consistency = fraction of clips with r > 1.3.
- separation_p = ONE-SIDED Wilcoxon signed-rank test (scipy.stats.wilcoxon,
  alternative="greater") of per-clip log r against 0: small only when persistent tokens receive
  MORE attention (a two-sided test on raw differences passed a worker with r = 0.993). Effect
  size d_z = mean(log r) / sd(log r) (paired Cohen's d on the log scale), plus the fraction of
  clips with r > 1.
- association (the ratio alone does not show it: attention of every query to its own track only
  gives r = 1 exactly): per clip, the attention queries put on the OTHER observations of their
  own object, divided by the share those observations would get under uniform attention,
  summed over queries whose object has >= 2 observations. 1.0 = content-free, 0 = never looks
  at its own object (the ``--context frame`` control), > 1 = association. Mean over clips with a
  bootstrap 95% CI.
- val_accuracy is scored per observation: each token is classified on its own (p > 0.5) and each
  ground-truth track weighs 1 (its tokens 1/n each), so the score never uses the track's true
  extent (averaging token probabilities over the ground-truth track handed the label's duration
  to the scoring: a content-free frame prior scored 0.889 that way). Balanced accuracy,
  macro-F1 and the (track-weighted) confusion matrix use the same weights; clip-bootstrap CIs.
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
        consistency and its Wilson 95% CI (consistency_ci_low/_ci_high), separation_p (one-sided,
        per-clip log r), effect_size_dz, frac_ratio_above_1, n_ratio_samples.
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
        "consistency_ci_low": None,
        "consistency_ci_high": None,
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
    out["separation_p"] = one_sided_separation_p(log_r)
    if n >= 5:
        lo, hi = stats.binomtest(int(np.sum(r > RATIO_CONSISTENCY_THRESHOLD)), n).proportion_ci(
            confidence_level=0.95, method="wilson"
        )
        out["consistency_ci_low"], out["consistency_ci_high"] = float(lo), float(hi)
    return out


def one_sided_separation_p(log_r: np.ndarray) -> float | None:
    """One-sided Wilcoxon signed-rank p of per-clip log r > 0 (None below 2 clips; 1.0 when every
    log r is 0: no evidence of separation). Non-finite log r (zero attention) are kept at their
    sign by clipping to +-50, so a clip with no transient attention counts as a large positive."""
    log_r = np.clip(np.asarray(log_r, dtype=np.float64), -50.0, 50.0)
    if len(log_r) < 2:
        return None
    if not np.any(log_r != 0):
        return 1.0
    return float(stats.wilcoxon(log_r, alternative="greater").pvalue)


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


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, weight: np.ndarray | None = None
) -> dict[str, float | list]:
    """accuracy, macro_f1, balanced_accuracy and confusion [[TN, FP], [FN, TP]] (rows = truth,
    class 1 = persistent), each item weighted by ``weight`` (float [N], default 1; the race
    passes 1/(tokens of the token's track), so the confusion counts tracks)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    w = np.ones(len(y_true)) if weight is None else np.asarray(weight, dtype=np.float64)
    conf = np.zeros((2, 2), dtype=np.float64)
    np.add.at(conf, (y_true, y_pred), w)
    f1s, recalls = [], []
    for c in (0, 1):
        tp = conf[c, c]
        prec = tp / conf[:, c].sum() if conf[:, c].sum() else 0.0
        rec = tp / conf[c].sum() if conf[c].sum() else 0.0
        recalls.append(rec)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {
        "accuracy": float(np.trace(conf) / conf.sum()) if len(y_true) else math.nan,
        "macro_f1": float(np.mean(f1s)),
        "balanced_accuracy": float(np.mean(recalls)),
        "confusion": [[round(float(v), 3) for v in row] for row in conf],
    }


def track_weights_np(clip: np.ndarray, track: np.ndarray) -> np.ndarray:
    """float [K]: 1 / (tokens of the token's ground-truth track), so every track weighs 1.

    clip, track: int [K] clip index and object id of every token (evaluation only)."""
    keys = clip.astype(np.int64) * 10_000 + track.astype(np.int64)
    _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return 1.0 / counts[inv]


def per_clip_confusion(
    y_true: np.ndarray, y_pred: np.ndarray, weight: np.ndarray, clip: np.ndarray, n_clips: int
) -> np.ndarray:
    """float [N, 2, 2]: each clip's weighted confusion (rows = truth), for clip bootstraps."""
    conf = np.zeros((n_clips, 2, 2))
    np.add.at(conf, (clip, np.asarray(y_true, int), np.asarray(y_pred, int)), weight)
    return conf


def confusion_bootstrap_ci(
    conf: np.ndarray, *, n_resamples: int = 2000, seed: int = 0
) -> dict[str, tuple[float, float] | tuple[None, None]]:
    """Percentile 95% CIs of accuracy and balanced accuracy, resampling whole clips.

    Args:
        conf: float [N, 2, 2] per-clip confusion (``per_clip_confusion``).

    Returns:
        {"accuracy": (low, high), "balanced_accuracy": (low, high)}; (None, None) below 5 clips.
    """
    n = len(conf)
    if n < 5:
        return {"accuracy": (None, None), "balanced_accuracy": (None, None)}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples)  # [R, N]
    c = (counts @ conf.reshape(n, 4)).reshape(-1, 2, 2)  # [R, 2, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (c[:, 0, 0] + c[:, 1, 1]) / c.sum((1, 2))
        bal = 0.5 * (c[:, 0, 0] / c[:, 0].sum(1) + c[:, 1, 1] / c[:, 1].sum(1))
    out = {}
    for key, v in (("accuracy", acc), ("balanced_accuracy", bal)):
        lo, hi = np.nanpercentile(v, [2.5, 97.5])
        out[key] = (float(lo), float(hi))
    return out


def mean_bootstrap_ci(
    values: np.ndarray, *, n_resamples: int = 2000, seed: int = 0
) -> tuple[float | None, float | None]:
    """Percentile 95% CI of the mean of per-clip ``values`` float [N] (NaN dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 5:
        return None, None
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(v), np.full(len(v), 1.0 / len(v)), size=n_resamples)
    lo, hi = np.percentile(counts @ v / len(v), [2.5, 97.5])
    return float(lo), float(hi)


def own_track_association(
    attn: torch.Tensor, track: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Per clip: attention on the other observations of the query's own object / uniform share.

    Args:
        attn: float [B, H, L, L] softmax weights (one layer).
        track: long [B, L] ground-truth object id (evaluation only).
        valid: bool [B, L].

    Returns:
        float [B]: sum over queries of mass on same-object keys j != i, divided by the sum of
        (same-object keys - 1) / (valid keys); NaN for clips where no object has 2 tokens.
        Uniform attention gives exactly 1, attention only within the query's frame gives 0.
    """
    a = attn.mean(1)  # [B, L, L]
    eye = torch.eye(a.shape[-1], dtype=torch.bool, device=a.device)[None]
    same = (track[:, :, None] == track[:, None, :]) & valid[:, :, None] & valid[:, None, :] & ~eye
    mass = (a * same).sum((1, 2))  # [B]
    n_valid = valid.sum(1, keepdim=True).clamp(min=1).to(a.dtype)  # [B, 1]
    share = (same.sum(2).to(a.dtype) / n_valid).sum(1)  # [B]
    return torch.where(share > 0, mass / share.clamp(min=1e-12), torch.nan)


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
