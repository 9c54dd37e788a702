"""What the controller hands its views, and the small interface it sees them through.

The race core imports no view: the CLI (``orchestrator.session``) builds the dashboard, the live
table and the race report and hands them to the controller as ``RaceView`` objects. After every
tick the controller gives each view a ``RaceSnapshot`` (data, never the controller itself); a
view hands back what it learned (the sync status) through ``sync_status``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.core.config import Plan
from orchestrator.core.state import PlanState
from orchestrator.sources.metrics import MetricHistory


@dataclass(frozen=True)
class RaceSnapshot:
    """The race as the views see it.

    Attributes:
        plan: the validated plan.
        state: the controller's state (views read it; only ``sync`` is written back, by the
            controller, from ``RaceView.sync_status``).
        histories: metric history per run key ``experiment/worker``.
        events: recent events, oldest first.
        now: Unix seconds of the snapshot.
    """

    plan: Plan
    state: PlanState
    histories: Mapping[str, MetricHistory]
    events: Sequence[str]
    now: float


class RaceView(Protocol):
    """A view of a race: the dashboard, the live table, the race report."""

    def refresh(self, snapshot: RaceSnapshot, *, force: bool) -> None:
        """Render (throttled unless ``force``). May raise OSError (the controller reports it)."""

    def publish(self) -> None:
        """Something decisive happened (a decision, a hook finished): push what it has now."""

    def sync_status(self) -> dict[str, Any] | None:
        """What the view learned about the sync link, to keep in the state; None: nothing."""

    def close(self) -> None:
        """Finish pending work (bounded) and release threads."""

    def wait(self, timeout_s: float) -> None:
        """Wait for work the view started in the background (plots, reports): for tests and
        benchmarks; the controller never calls it."""
