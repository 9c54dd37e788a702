"""Which run is closest to the criteria: pure functions of the plan and the metric histories.

The controller uses them for the failure event and for the run whose directory a failed race's
``on_success`` hook gets; the views use them for "Best so far" and the race report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.core.config import ExperimentConfig
from orchestrator.core.criteria import Criterion
from orchestrator.formatting import code, fmt, fmt_against
from orchestrator.sources.metrics import MetricHistory


def checked_records(exp: ExperimentConfig, history: MetricHistory) -> list[dict[str, Any]]:
    """The records at check points (epoch/step a multiple of ``check_every``)."""
    every = exp.check_every
    return [
        r for r in history.records
        if every <= 1 or (r.get("epoch", r.get("step", 1)) or 0) % every == 0
    ]


def missing_text(criteria: Sequence[Criterion], metrics: Mapping[str, Any]) -> list[str]:
    """What a record still misses, e.g. ``val_accuracy 0.81 (need >= 0.9)``."""
    out = []
    for c in criteria:
        if c.evaluate(metrics):
            continue
        if c.threshold is not None:
            value = metrics.get(c.threshold.metric)
            out.append(
                f"{c.threshold.metric} {fmt_against(value, c.threshold)} "
                f"(need {c.threshold.op} {fmt(c.threshold.value)})"
            )
        else:
            out.append(code(c.source))
    return out


def best_record(
    exp: ExperimentConfig, worker_criteria: Sequence[Criterion], history: MetricHistory
) -> tuple[int, float, dict[str, Any]] | None:
    """The record (at a check point) passing most criteria, closest to the rest.

    Returns:
        (criteria passed, closeness score, record), or None without records. The score sums
        the relative gaps to the thresholds not met (0 when all are met; a missing metric
        counts as -1e6).
    """
    best = None
    for r in checked_records(exp, history) or history.records[-1:]:
        passed = sum(c.evaluate(r) for c in worker_criteria)
        score = 0.0
        for c in worker_criteria:
            if c.threshold is None or c.evaluate(r):
                continue
            v = r.get(c.threshold.metric)
            if not isinstance(v, (int, float)):
                score -= 1e6  # a missing metric is further than any reported value
            elif c.threshold.value:
                gap = (v - c.threshold.value) / abs(c.threshold.value)
                score += gap if c.threshold.higher_is_better else -gap
        key = (passed, score)
        if best is None or key > best[:2]:
            best = (passed, score, r)
    return best


def best_worker(
    exp: ExperimentConfig, histories: Mapping[str, MetricHistory]
) -> tuple[str, int, dict[str, Any]] | None:
    """The worker of ``exp`` whose best record is closest to the criteria.

    Args:
        histories: metric history per run key ``experiment/worker``.

    Returns:
        (worker name, criteria passed, its best record), or None when no worker reported.
    """
    found = []
    for w in exp.workers:
        hist = histories.get(f"{exp.name}/{w.name}")
        if hist and hist.records:
            b = best_record(exp, exp.criteria_for(w), hist)
            if b is not None:
                found.append((b[0], b[1], w.name, b[2]))
    if not found:
        return None
    passed, _, name, record = max(found, key=lambda t: (t[0], t[1]))
    return name, passed, record


def best_summary(exp: ExperimentConfig, histories: Mapping[str, MetricHistory]) -> str:
    """``mlp at epoch 5: 1/2 criteria; missing val_acc 0.7 (need >= 0.9)`` or ``""``; the
    unit is the experiment's (``step`` with a max_steps budget)."""
    best = best_worker(exp, histories)
    if best is None:
        return ""
    name, passed, record = best
    criteria = exp.criteria_for(exp.worker(name))
    missing = missing_text(criteria, record)
    at = record.get(exp.unit, record.get("epoch", record.get("step")))
    text = f"{name} at {exp.unit} {at}: {passed}/{len(criteria)} criteria"
    return text + (f"; missing {', '.join(missing)}" if missing else " (all met)")
