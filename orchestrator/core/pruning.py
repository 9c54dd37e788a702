"""Pruning: a hopeless worker gives up its slot (opt-in per experiment with ``prune:``).

A racer's question, not a tuner's: not "is this trial worse than the others?" (ASHA, median
stopping, Hyperband rank trials against each other) but "can this worker still meet these
criteria before its budget runs out?". The answer comes from the projections of
``orchestrator.core.projection``: a worker is *hopeless at an evaluation* when some projectable
criterion's optimistic edge (the upper band of its fits) passes at no check point up to the
budget x (1 + ``margin``). It is pruned once it has at least ``after`` evaluations and has
been hopeless at ``patience`` consecutive evaluations (never on a single noisy one).

The controller adds the rules that need the race: controls (``control: true``) are never
pruned, and nothing is pruned while no other worker of the experiment is running or queued
(see ``orchestrator.core.pruner``). Criteria that are not projectable never prune.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from orchestrator.core.criteria import Criterion
    from orchestrator.core.projection import CriterionProjection, WorkerProjection


class PruneConfig(BaseModel):
    """``prune:`` of an experiment (``prune: {}`` takes every default).

    Attributes:
        after: evaluations (records holding the metric) a worker has before it may be pruned.
        margin: extra budget the optimistic projection may use, as a fraction of the budget:
            0.5 prunes only a worker whose optimistic edge misses the threshold until 1.5x its
            max_epochs (or max_steps). Larger is safer for late bloomers.
        patience: consecutive hopeless evaluations before the worker is pruned (>= 2).
        window: evaluations in the linear trend of the projection.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    after: int = Field(default=5, ge=3)
    margin: float = Field(default=0.5, ge=0)
    patience: int = Field(default=3, ge=2)
    window: int = Field(default=10, ge=3)


@dataclass(frozen=True)
class PruneVerdict:
    """The pruning rule at one evaluation.

    Attributes:
        hopeless: the optimistic edge of ``blocking`` misses the threshold until the horizon.
        streak: consecutive hopeless evaluations with at least ``after`` evaluations, this one
            included.
        prune: ``streak >= patience``.
        blocking: the criterion projection that is hopeless (None when not).
        horizon: the last check point the optimistic edge was allowed (epoch or step).
        projection: the worker's projection at this evaluation.
    """

    hopeless: bool
    streak: int
    prune: bool
    blocking: CriterionProjection | None
    horizon: int
    projection: WorkerProjection

    def reason(self) -> str:
        """One line for events and the race report (why it was pruned, with the projection)."""
        if self.blocking is None:
            return "on course"
        unit = self.projection.unit
        return (f"pruned: {self.blocking.describe(unit)}; optimistic edge misses it until "
                f"{unit} {self.horizon} ({self.streak} evaluations in a row)")


def horizon_for(config: PruneConfig, budget: int) -> int:
    """The last check point the optimistic edge may use: budget x (1 + margin), rounded."""
    return int(round(budget * (1.0 + config.margin)))


def prune_verdict(
    config: PruneConfig,
    criteria: Sequence[Criterion],
    records: Sequence[Mapping[str, Any]],
    *,
    streak: int,
    unit: str = "epoch",
    check_every: int = 1,
    budget: int,
    now: float | None = None,
) -> PruneVerdict:
    """Apply the pruning rule after a new evaluation.

    Args:
        config: the experiment's ``prune:``.
        criteria: the worker's criteria.
        records: its merged records, oldest first, the new one last.
        streak: hopeless evaluations in a row before this one.
        unit, check_every, budget: as in ``projection.project_worker``.
        now: Unix seconds (for the projection's ETA only).

    Returns:
        The verdict; ``prune`` is never true for a worker without ``after`` evaluations of the
        blocking metric, nor for criteria that are not projectable.
    """
    from orchestrator.core.projection import MET, NOT_PROJECTABLE, TOO_FEW, project_worker

    horizon = horizon_for(config, budget)
    proj = project_worker(criteria, records, unit=unit, check_every=check_every, budget=budget,
                          now=now, horizon=horizon, window=config.window)
    blocking = next(
        (p for p in proj.criteria
         if p.status not in (NOT_PROJECTABLE, TOO_FEW, MET) and p.optimistic_check_point is None),
        None,
    )
    hopeless = blocking is not None
    # The streak counts from the ``after``-th evaluation on: the earliest prune is at
    # evaluation after + patience - 1.
    enough = blocking is not None and blocking.evaluations >= config.after
    streak = streak + 1 if hopeless and enough else 0
    return PruneVerdict(hopeless, streak, streak >= config.patience, blocking, horizon, proj)
