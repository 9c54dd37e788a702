"""The terminal view: a rich table of the race, live while ``run`` is in the foreground, and
the body of ``status``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from orchestrator.core.config import Plan
from orchestrator.core.snapshot import RaceSnapshot
from orchestrator.core.state import PlanState, RunState
from orchestrator.sources.metrics import MetricHistory


class LiveTable:
    """A ``RaceView``: the rich live table shown while ``run`` is in the foreground."""

    def __init__(self, plan: Plan) -> None:
        from rich.live import Live

        self.plan = plan
        self.live = Live(refresh_per_second=2, transient=False)

    def start(self) -> None:
        self.live.start()

    def refresh(self, snapshot: RaceSnapshot, *, force: bool) -> None:
        self.live.update(render_table(self.plan, snapshot.state, list(snapshot.events),
                                      histories=snapshot.histories, now=snapshot.now))

    def publish(self) -> None:
        pass

    def sync_status(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        pass

    def wait(self, timeout_s: float) -> None:
        pass

    def stop(self, snapshot: RaceSnapshot) -> None:
        """Show the final state and leave the table on the screen."""
        self.refresh(snapshot, force=True)
        self.live.stop()


def render_table(
    plan: Plan,
    state: PlanState,
    events: list[str] | None = None,
    *,
    histories: Mapping[str, MetricHistory] | None = None,
    now: float | None = None,
) -> Any:
    """A rich renderable of the plan's state (used by `run` and `status`).

    With ``histories`` (and ``now``, Unix seconds) it has an "ETA to criteria" column (see
    ``orchestrator.core.projection``).
    """
    from rich.console import Group
    from rich.table import Table

    from orchestrator.views.dashboard import (
        STATUS_ICON,
        _progress,
        criterion_cell,
        eta_to_criteria,
    )

    parts: list[Any] = []
    for exp in plan.experiments:
        erec = state.experiments.get(exp.name)
        title = exp.name
        if erec is not None and erec.winner:
            title += f": {erec.winner} won at {erec.unit} {erec.winner_epoch}"
        elif erec is not None:
            title += f": {erec.status.value}"
        table = Table(title=title, title_justify="left")
        for col in ("worker", "slot", f"{exp.unit}/max"):
            table.add_column(col)
        for c in exp.criteria:
            table.add_column(c.threshold.metric if c.threshold else c.source)
        table.add_column("status")
        if histories is not None:
            table.add_column("ETA to criteria")
        for w in exp.workers:
            rec = state.runs.get(f"{exp.name}/{w.name}")
            if rec is None:
                continue
            cells = [criterion_cell(c, rec.last_metrics) for c in exp.criteria]
            status = STATUS_ICON[rec.state] + (" ⚠ stalled" if rec.stalled else "")
            if rec.error and rec.state in (RunState.failed, RunState.pending):
                status += f" ({rec.error[:60]})"
            if rec.control:
                status += " (control)"
            if rec.state == RunState.pruned and rec.stop_reason:
                status += f" ({rec.stop_reason.removeprefix('pruned: ').split(':')[0]})"
            extra = []
            if histories is not None:
                hist = histories.get(rec.key, MetricHistory())
                extra.append(eta_to_criteria(exp, w, rec, hist, time.time() if now is None
                                             else now))
            table.add_row(w.name, rec.slot or "—", _progress(rec), *cells, status, *extra)
        parts.append(table)
    if events:
        parts.append("\n".join(events[-8:]))
    return Group(*parts)
