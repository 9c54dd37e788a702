"""Projections to the criteria and the pruning rule, on known synthetic curves (pure functions).

Tolerances, per curve (check points in the records' unit):
- linear, saturating above the threshold, p-values (log-linear), lower-is-better loss,
  step-based: the exact check point (saturating: +-1), ETA within 1% of the true seconds;
- saturating below the threshold: "not on course", projected value at the budget within 0.02
  of the asymptote;
- slow start then steep: "not on course" while slow (it would pass at epoch 60 > 50), the true
  check point +-1 once most of the trend's window (7 of 10) is steep;
- noisy linear (noise sd = one epoch of progress), 20 seeds: median error <= 2 epochs, worst
  <= 8.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import numpy as np
import pytest

from orchestrator.core.criteria import Criterion
from orchestrator.core.projection import (
    MET,
    NOT_ON_COURSE,
    NOT_PROJECTABLE,
    ON_COURSE,
    TOO_FEW,
    project_criterion,
    project_worker,
)
from orchestrator.core.pruning import PruneConfig, horizon_for, prune_verdict

SECONDS_PER_EPOCH = 10.0
T0 = 1_000_000.0


def records(
    curve: Callable[[int], float], n: int, *, metric: str = "acc", noise: float = 0.0,
    seed: int = 0, every: int = 1, unit: str = "epoch",
) -> list[dict[str, float | int]]:
    rng = np.random.default_rng(seed)
    return [
        {unit: x, "time_s": T0 + SECONDS_PER_EPOCH * x,
         metric: curve(x) + noise * float(rng.standard_normal())}
        for x in range(every, n + 1, every)
    ]


def linear(x: int) -> float:
    return 0.3 + 0.02 * x  # >= 0.89 from epoch 29.5


def late_bloomer(x: int) -> float:
    return 0.3 + 0.01 * x if x <= 15 else 0.45 + 0.04 * (x - 15)  # >= 0.9 from 26.25


ACC = Criterion.parse("acc >= 0.89")


def test_linear_curve_projects_its_check_point_and_eta() -> None:
    recs = records(linear, 10)
    now = T0 + SECONDS_PER_EPOCH * 10
    proj = project_worker([ACC], recs, check_every=5, budget=50, now=now)
    assert proj.status == ON_COURSE
    assert proj.check_point == 30
    assert proj.eta_s == pytest.approx(20 * SECONDS_PER_EPOCH, rel=0.01)
    assert proj.text() == "~3m (epoch 30)"
    # time since the last record counts: 60 s later the ETA is 60 s shorter
    later = project_worker([ACC], recs, check_every=5, budget=50, now=now + 60)
    assert later.eta_s == pytest.approx(20 * SECONDS_PER_EPOCH - 60, rel=0.01)


def test_saturating_below_the_threshold_is_not_on_course() -> None:
    def curve(x: int) -> float:
        return 0.8 - 0.5 * math.exp(-x / 5)

    for n in (6, 10, 20):
        proj = project_worker([ACC], records(curve, n), budget=50, now=T0)
        assert proj.status == NOT_ON_COURSE, n
        assert proj.blocking == "acc"
        assert proj.text() == "not on course: acc"
        part = proj.criteria[0]
        assert part.model == "saturating"
        assert part.at_budget is not None and part.at_budget[0] == pytest.approx(0.8, abs=0.02)


def test_saturating_above_the_threshold_passes_where_it_crosses() -> None:
    def curve(x: int) -> float:
        return 0.95 - 0.5 * math.exp(-x / 8)  # >= 0.89 from 8 ln(0.5/0.06) = 16.96

    proj = project_worker([ACC], records(curve, 8), budget=50, now=T0)
    assert proj.status == ON_COURSE
    assert proj.criteria[0].model == "saturating"
    assert proj.check_point is not None and abs(proj.check_point - 17) <= 1


def test_slow_start_then_steep_follows_the_recent_trend() -> None:
    crit = Criterion.parse("acc >= 0.9")
    early = project_worker([crit], records(late_bloomer, 10), budget=50, now=T0)
    assert early.status == NOT_ON_COURSE  # at 0.01/epoch it would pass at epoch 60
    proj = project_worker([crit], records(late_bloomer, 22), budget=50, now=T0)
    assert proj.status == ON_COURSE
    assert proj.criteria[0].model == "linear"
    assert proj.check_point is not None and abs(proj.check_point - 27) <= 1


def test_noisy_linear_curve_within_tolerance_over_seeds() -> None:
    errors = []
    for seed in range(20):
        proj = project_worker([ACC], records(linear, 20, noise=0.02, seed=seed), budget=50)
        assert proj.status == ON_COURSE, seed
        assert proj.check_point is not None
        errors.append(abs(proj.check_point - 30))
    assert statistics.median(errors) <= 2
    assert max(errors) <= 8


def test_p_values_are_projected_on_a_log_scale() -> None:
    crit = Criterion.parse("separation_p < 0.01")
    recs = records(lambda x: 0.5 * math.exp(-0.3 * x), 6, metric="separation_p")
    proj = project_worker([crit], recs, budget=50, now=T0)
    assert proj.check_point == 14  # 0.5 exp(-0.3 x) < 0.01 from x = 13.04
    assert proj.criteria[0].model == "linear"  # a straight line in -log10 p


def test_lower_is_better_metric() -> None:
    crit = Criterion.parse("loss <= 0.5")
    recs = records(lambda x: 2.0 - 0.05 * x, 8, metric="loss")
    assert project_worker([crit], recs, budget=50).check_point == 30


def test_step_budget_with_many_check_points_bisects_to_the_exact_one() -> None:
    recs = [{"step": s, "time_s": T0 + s / 100, "acc": 0.3 + 1e-5 * s}
            for s in range(1000, 20001, 1000)]
    crit = Criterion.parse("acc >= 0.8849")  # from step 58,490
    proj = project_worker([crit], recs, unit="step", check_every=100, budget=1_000_000,
                          now=T0 + 200)
    assert proj.check_point == 58_500
    assert proj.eta_s == pytest.approx((58_500 - 20_000) / 100, rel=0.01)
    assert proj.text().endswith("(step 58,500)")


def test_records_without_the_metric_are_not_evaluations() -> None:
    # the metric every 5 epochs, a training-loss record every epoch: no carried-forward
    # plateau between evaluations
    recs = []
    for e in range(1, 21):
        rec: dict[str, float | int] = {"epoch": e, "time_s": T0 + 10 * e, "train_loss": 1 / e}
        if e % 5 == 0:
            rec["acc"] = linear(e)
        recs.append(rec)
    part = project_criterion(ACC, recs, check_every=5, budget=50)
    assert part.evaluations == 4
    assert part.check_point == 30


def test_or_criterion_and_arithmetic_are_not_projectable() -> None:
    either = Criterion.parse("acc >= 0.9 or loss < 0.1")
    proj = project_worker([either], records(linear, 10), budget=50)
    assert proj.status == NOT_PROJECTABLE
    assert proj.text() == "not projectable: `acc >= 0.9 or loss < 0.1`"
    mixed = project_worker([ACC, Criterion.parse("acc - loss > 0.5")],
                           records(linear, 10), check_every=5, budget=50, now=T0)
    assert mixed.status == ON_COURSE and mixed.check_point == 30
    assert "not projectable" in mixed.text()


def test_too_few_evaluations_and_already_met() -> None:
    assert project_worker([ACC], records(linear, 1), budget=50).status == TOO_FEW
    assert project_worker([ACC], records(linear, 2), budget=50).check_point == 30
    met = project_worker([ACC], records(linear, 31), check_every=5, budget=50)
    assert met.status == MET and met.check_point == 35
    assert met.text() == "all met (epoch 35)"


# -- pruning ---------------------------------------------------------------------------------


def first_prune(curve: Callable[[int], float], *, noise: float, seed: int, budget: int = 50,
                config: PruneConfig | None = None, crit: Criterion = ACC) -> int | None:
    """Feed a curve evaluation by evaluation; the epoch it is pruned at, or None."""
    config = config or PruneConfig()
    recs = records(curve, budget, noise=noise, seed=seed)
    streak = 0
    for n in range(1, budget + 1):
        if crit.evaluate(recs[n - 1]):
            return None
        verdict = prune_verdict(config, [crit], recs[:n], streak=streak, budget=budget)
        streak = verdict.streak
        if verdict.prune:
            assert verdict.reason().startswith("pruned: acc")
            return n
    return None


def test_plateau_below_the_threshold_is_pruned_after_patience() -> None:
    config = PruneConfig()
    # noise-free: hopeless from the first evaluation, pruned at after + patience - 1
    assert first_prune(lambda x: 0.6, noise=0.0, seed=0) == config.after + config.patience - 1
    for seed in range(10):
        at = first_prune(lambda x: 0.6, noise=0.01, seed=seed)
        assert at is not None and at <= 20, seed  # within 40% of its budget


def test_late_bloomer_is_not_pruned_under_the_default_margin() -> None:
    crit = Criterion.parse("acc >= 0.9")
    for seed in range(10):
        assert first_prune(late_bloomer, noise=0.005, seed=seed, crit=crit) is None, seed
    # ... while a margin of 0 would have pruned it, noise-free
    assert first_prune(late_bloomer, noise=0.0, seed=0, crit=crit,
                       config=PruneConfig(margin=0.0)) is not None


def test_never_pruned_on_a_single_noisy_evaluation() -> None:
    recs = records(linear, 12)
    recs[9]["acc"] = 0.0  # one broken evaluation, then back on the line
    config = PruneConfig(after=3, patience=2)
    streak = 0
    for n in range(1, len(recs) + 1):
        verdict = prune_verdict(config, [ACC], recs[:n], streak=streak, budget=50)
        streak = verdict.streak
        assert not verdict.prune, n


def test_not_projectable_never_prunes() -> None:
    crit = Criterion.parse("acc >= 0.9 or loss < 0.1")
    recs = records(lambda x: 0.1, 20)
    streak = 0
    for n in range(1, 21):
        verdict = prune_verdict(PruneConfig(), [crit], recs[:n], streak=streak, budget=20)
        streak = verdict.streak
        assert not verdict.hopeless and not verdict.prune


def test_prune_config_defaults_and_horizon() -> None:
    config = PruneConfig.model_validate({})
    assert (config.after, config.margin, config.patience) == (5, 0.5, 3)
    assert horizon_for(config, 40) == 60
    with pytest.raises(ValueError):
        PruneConfig(patience=1)


def test_a_curve_bending_over_below_the_threshold_is_pruned_early() -> None:
    def bend(x: int) -> float:
        return 0.4 + 0.3 * (1 - math.exp(-x / 4))  # towards 0.7

    for seed in range(10):
        at = first_prune(bend, noise=0.005, seed=seed)
        assert at is not None and at <= 10, seed  # the recent line alone would wait to ~21


def test_a_slow_steady_improver_is_never_pruned() -> None:
    crit = Criterion.parse("acc >= 0.9")
    for seed in range(20):
        assert first_prune(lambda x: 0.45 + 0.0095 * x, noise=0.01, seed=seed,
                           crit=crit) is None, seed
