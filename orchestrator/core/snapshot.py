"""What the controller hands its views, and the small interface it sees them through.

The race core imports no view: the CLI (``orchestrator.session``) builds the dashboard, the live
table and the race report and hands them to the controller as ``RaceView`` objects. After every
tick the controller gives each view a ``RaceSnapshot`` (data, never the controller itself); a
view hands back what it learned (the sync status) through ``sync_status``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.core.config import Plan
from orchestrator.core.state import PlanState
from orchestrator.errors import WriteErrors
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


class Views:
    """The controller's views, refreshed, published, waited for and closed together. A view
    that cannot write is reported through ``write_errors`` (throttled); one that raises
    anything else is reported once through ``event``: a view never ends the race."""

    def __init__(self, views: Iterable[RaceView], write_errors: WriteErrors,
                 event: Callable[[str], None]) -> None:
        self._views = list(views)
        self._write_errors = write_errors
        self._event = event
        self._failed = False

    def __iter__(self) -> Iterator[RaceView]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def refresh(self, snapshot: RaceSnapshot, *, force: bool) -> dict[str, Any] | None:
        """Refresh every view; returns the last sync status a view handed back (or None)."""
        sync = None
        for view in self._views:
            try:
                view.refresh(snapshot, force=force)
                sync = view.sync_status() or sync
            except OSError as e:
                self._write_errors.report(type(view).__name__.lower(), e)
            except Exception as e:  # a rendering bug must not end the race: report it, go on
                if not self._failed:
                    self._failed = True
                    self._event(f"{type(view).__name__} cannot be rendered: {e!r}")
        return sync

    def publish(self) -> None:
        for view in self._views:
            try:
                view.publish()
            except Exception as e:  # never let a view end the race
                self._event(f"{type(view).__name__} cannot publish: {e!r}")

    def wait(self, timeout_s: float) -> None:
        for view in self._views:
            view.wait(timeout_s)

    def close(self) -> None:
        for view in reversed(self._views):  # the dashboard's syncer flushes last
            view.close()
