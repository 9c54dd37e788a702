"""Statistics of the success figure and report: paired separation, CIs, compute savings.

Follows shared/ML_NOTES.md (Job A) with the clip (video) as the unit: ONE-SIDED Wilcoxon
signed-rank test of per-clip log r > 0 (the worker's separation_p, same function) and
d_z = mean(log r) / sd(log r); percentile bootstrap CIs over clips (2000 resamples, fixed
seed); consistency as a Wilson interval; Student-t intervals of clip means for the bar CIs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from orchestrator.core.accounting import ComputeRow, RunUsage
from orchestrator.core.accounting import compute_savings as core_savings
from orchestrator.core.state import RunState
from workers.persistence_report.outcome import Evaluation, RaceOutcome

RATIO_PASS = 1.3  # a clip passes when r > 1.3 (ML_NOTES: consistency threshold)
N_RESAMPLES = 2000


def _bootstrap_ci(data: Sequence[np.ndarray], statistic: Callable[..., Any],
                  paired: bool = False) -> tuple[float, float] | None:
    """Percentile bootstrap 95% CI over clips, or None (fewer than 5 clips, no spread, or a
    statistic that is not finite on some resamples, e.g. d_z of a resample without spread)."""
    if len(data[0]) < 5 or all(np.ptp(d) == 0 for d in data):
        return None
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-finite resamples: checked below
        res = stats.bootstrap(tuple(data), statistic, n_resamples=N_RESAMPLES, method="percentile",
                              paired=paired, vectorized=True, rng=np.random.default_rng(0))
    if not np.all(np.isfinite(res.bootstrap_distribution)):
        return None
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


@dataclass(frozen=True)
class Separation:
    """Paired comparison of per-clip persistent vs transient attention at one evaluation."""

    n: int  # clips with transients
    n_excluded: int  # clips without transients
    p_value: float | None  # one-sided Wilcoxon signed-rank of log r > 0
    statistic: float | None
    d_z: float | None  # mean(log r) / sd(log r)
    d_z_ci: tuple[float, float] | None
    frac_above_1: float | None
    geo_mean_ratio: float | None


def separation(ev: Evaluation) -> Separation:
    """One-sided Wilcoxon signed-rank test of log r > 0 and d_z from the per-clip records (the
    worker's definitions: workers.persistence_metrics.one_sided_separation_p)."""
    pairs = ev.paired
    n = len(pairs)
    log_r = ev.log_ratios()
    p_value = stat = d_z = None
    d_z_ci = None
    if n >= 2 and np.any(log_r != 0):
        res = stats.wilcoxon(np.clip(log_r, -50.0, 50.0), alternative="greater")
        p_value, stat = float(res.pvalue), float(res.statistic)
    elif n >= 2:
        p_value = 1.0
    if n >= 3 and np.ptp(log_r) > 0:
        d_z = float(log_r.mean() / log_r.std(ddof=1))
        d_z_ci = _bootstrap_ci([log_r], lambda x, axis: x.mean(axis) / x.std(axis=axis, ddof=1))
    return Separation(
        n=n, n_excluded=len(ev.clips) - n, p_value=p_value, statistic=stat, d_z=d_z, d_z_ci=d_z_ci,
        frac_above_1=float(np.mean(log_r > 0)) if n else None,
        geo_mean_ratio=float(np.exp(log_r.mean())) if n else None,
    )


def metric_cis(ev: Evaluation) -> dict[str, tuple[float, float] | None]:
    """95% CIs recomputed from the per-clip records: val_accuracy, consistency, effect_size_dz."""
    correct = np.array([c.objects_correct for c in ev.clips], dtype=np.float64)
    total = np.array([c.objects_total for c in ev.clips], dtype=np.float64)
    acc = _bootstrap_ci([correct, total], lambda c, n, axis: c.sum(axis) / n.sum(axis), paired=True)
    n = len(ev.paired)
    k = int(np.sum(ev.log_ratios() > math.log(RATIO_PASS)))
    cons = None
    if n:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        cons = (float(ci.low), float(ci.high))
    return {"val_accuracy": acc, "consistency": cons, "effect_size_dz": separation(ev).d_z_ci}


def mean_t_ci(x: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): Student-t 95% interval of the mean (low = high = mean for n < 2)."""
    m = float(np.mean(x)) if len(x) else math.nan
    if len(x) < 2 or np.ptp(x) == 0:
        return m, m, m
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=m, scale=stats.sem(x))
    return m, float(lo), float(hi)


def compute_savings(outcome: RaceOutcome) -> list[ComputeRow]:
    """Slot-seconds used and saved per worker (``orchestrator.core.accounting``'s definition)."""
    return core_savings([
        RunUsage(
            w.name, w.record, w.epochs_done if w.record is not None else 0, w.max_epochs,
            won=outcome.succeeded and w.record is not None and w.record.state == RunState.succeeded,
        )
        for w in outcome.workers
    ])
