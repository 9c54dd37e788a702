"""The terminal view: a rich table of the race, live while ``run`` is in the foreground, and
the body of ``status``.

The table fits the terminal (``orchestrator.terminal.fit_table``): at 80 columns the branch,
trend and slot columns go first, worker names wrap, statuses are short (``stopped (lost)``);
``--wide`` shows every column and the full status. ``DecisionNotifierView`` pings the desktop
once per decided or failed experiment (``run --notify``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.core.config import ExperimentConfig, Plan
from orchestrator.core.snapshot import RaceSnapshot
from orchestrator.core.state import ExperimentStatus, PlanState, RunRecord, RunState
from orchestrator.sources.metrics import MetricHistory
from orchestrator.terminal import Notifier, fit_table


class LiveTable:
    """A ``RaceView``: the rich live table shown while ``run`` is in the foreground.

    Args:
        plan: the plan.
        wide: every column and the full status, however wide the terminal.
    """

    def __init__(self, plan: Plan, *, wide: bool = False) -> None:
        from rich.live import Live

        self.plan = plan
        self.wide = wide
        self.live = Live(refresh_per_second=2, transient=False)

    def start(self) -> None:
        """Start drawing (call once, before the race)."""
        self.live.start()

    def refresh(self, snapshot: RaceSnapshot, *, force: bool) -> None:
        """Redraw from ``snapshot`` (rich throttles the terminal writes itself)."""
        self.live.update(
            render_table(
                self.plan, snapshot.state, list(snapshot.events),
                histories=snapshot.histories, wide=self.wide, now=snapshot.now,
            )
        )

    def publish(self) -> None:
        """Nothing to push: the terminal is redrawn on every refresh."""

    def sync_status(self) -> dict[str, Any] | None:
        """The table knows nothing about the sync link."""
        return None

    def close(self) -> None:
        """Nothing to release (``stop`` leaves the last table on screen)."""

    def wait(self, timeout_s: float) -> None:
        """Nothing runs in the background."""

    def stop(self, snapshot: RaceSnapshot) -> None:
        """Show the final state and leave the table on the screen."""
        self.refresh(snapshot, force=True)
        self.live.stop()


class DecisionNotifierView:
    """A ``RaceView`` that raises a desktop notification when an experiment is decided or fails.

    Experiments already decided when the view first sees the state (a resumed plan) are not
    announced; each later decision is announced once.
    """

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._primed = False

    def refresh(self, snapshot: RaceSnapshot, *, force: bool) -> None:
        """Announce experiments that became decided or failed since the last snapshot."""
        for name, erec in snapshot.state.experiments.items():
            if erec.status == ExperimentStatus.succeeded:
                key = f"{name}: {erec.winner} won"
                title = f"{name}: decided"
                message = f"{erec.winner} won at {erec.unit} {erec.winner_epoch}"
            elif erec.status == ExperimentStatus.failed:
                key = f"{name}: failed"
                title = f"{name}: failed"
                message = "no worker met every criterion"
            else:
                continue
            if self._primed:
                self.notifier.announce(key, title, message)
            else:
                self.notifier.seen(key)
        self._primed = True

    def publish(self) -> None:
        """Nothing to push."""

    def sync_status(self) -> dict[str, Any] | None:
        """The notifier knows nothing about the sync link."""
        return None

    def close(self) -> None:
        """Nothing to release."""

    def wait(self, timeout_s: float) -> None:
        """Nothing runs in the background."""


def _status(rec: RunRecord) -> str:
    from orchestrator.views.dashboard import status_icon

    text = status_icon(rec) + (" ⚠ stalled" if rec.stalled else "")
    if rec.attempt > 1:
        text += f" (attempt {rec.attempt})"
    if rec.state in (RunState.stopped, RunState.running) and rec.stop_reason:
        text += f": {rec.stop_reason}"
    if rec.state == RunState.pruned and rec.stop_reason:
        text += f" ({rec.stop_reason.removeprefix('pruned: ').split(':')[0]})"
    return text


def _code(rec: RunRecord) -> str:
    """' @1a2b3c4d (3 behind, dirty)' after the branch: the commit of the last attempt."""
    if not rec.commit:
        return ""
    notes = [f"{rec.behind} behind"] if rec.behind else []
    notes += ["dirty"] if rec.dirty else []
    return f" @{rec.commit[:8]}" + (f" ({', '.join(notes)})" if notes else "")


def _trend(history: MetricHistory | None, exp: ExperimentConfig) -> str:
    if history is None:
        return ""
    first = exp.criteria[0] if exp.criteria else None
    if first is None or first.threshold is None:
        return ""
    _, ys = history.series(first.threshold.metric)
    if len(ys) < 2:
        return ""
    delta = ys[-1] - ys[-2]
    if abs(delta) < 1e-9:
        return "→"
    return "↗" if delta > 0 else "↘"


class _FittedTables:
    """Renders the tables at the console's width at draw time (a resized terminal refits)."""

    def __init__(self, build: Any) -> None:
        self.build = build

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield from self.build(options.max_width)


def render_table(
    plan: Plan,
    state: PlanState,
    events: Sequence[str] | None = None,
    *,
    histories: Mapping[str, MetricHistory] | None = None,
    wide: bool = False,
    now: float | None = None,
) -> Any:
    """A rich renderable of the plan's state (used by ``run`` and ``status``).

    It fits the console it is printed on: see ``orchestrator.terminal.fit_table``.

    Args:
        plan, state: the plan and the controller's state.
        events: recent events, oldest first (the last 8 are shown).
        histories: metric history per run key, for the trend column (optional).
        wide: every column and the full status text.
        now: Unix seconds; with ``histories``, adds the "ETA to criteria" column (see
            ``orchestrator.core.projection``).
    """
    from orchestrator.views.dashboard import _progress, criterion_cell, eta_to_criteria

    with_eta = histories is not None and now is not None

    def build(width: int) -> list[Any]:
        parts: list[Any] = []
        for exp in plan.experiments:
            erec = state.experiments.get(exp.name)
            title = exp.name
            if erec is not None and erec.winner:
                title += f": {erec.winner} won at {erec.unit} {erec.winner_epoch}"
            elif erec is not None:
                title += f": {erec.status.value}"
            headers = ["worker", "branch", "slot", f"{exp.unit}/max"]
            headers += [c.threshold.metric if c.threshold else c.source for c in exp.criteria]
            headers += ["status", "trend"] + (["ETA to criteria"] if with_eta else [])
            rows = []
            for w in exp.workers:
                rec = state.runs.get(f"{exp.name}/{w.name}")
                if rec is None:
                    continue
                cells = [criterion_cell(c, rec.last_metrics) for c in exp.criteria]
                status = _status(rec)
                if rec.control:
                    status += " (control)"
                if wide and rec.error and rec.state in (RunState.failed, RunState.pending):
                    status += f" ({rec.error})"
                hist = (histories or {}).get(f"{exp.name}/{w.name}")
                eta = []
                if with_eta and now is not None:
                    eta.append(eta_to_criteria(exp, w, rec, hist or MetricHistory(), now))
                rows.append([
                    w.name, w.branch + _code(rec), rec.slot or "—", _progress(rec), *cells,
                    status, _trend(hist, exp), *eta,
                ])
            parts.append(fit_table(headers, rows, width=width, wide=wide, title=title))
        if events:
            parts.append("\n".join(events[-8:]))
        return parts

    return _FittedTables(build)
