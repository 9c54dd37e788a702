"""PARALLEL_PROGRESS.md: the markdown dashboard the researcher watches from a laptop.

``render_markdown`` is a pure function of the plan, the state and the metric histories (golden
tested). ``Dashboard`` rewrites the file atomically at most every ``dashboard_interval_s``,
regenerates the progress plot next to it (throttled), and hands changed files to the syncer.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core.config import ExperimentConfig, Plan, WorkerConfig
from orchestrator.core.criteria import Criterion
from orchestrator.core.ranking import best_worker, missing_text
from orchestrator.core.snapshot import RaceSnapshot
from orchestrator.core.state import ExperimentStatus, PlanState, RunRecord, RunState
from orchestrator.errors import WriteErrors
from orchestrator.formatting import code, duration, fmt_against
from orchestrator.paths import ResultsPaths
from orchestrator.reporting import atomic_write_bytes
from orchestrator.sources.metrics import MetricHistory
from orchestrator.views.renderer import spawn_renderer

if TYPE_CHECKING:
    from orchestrator.remote.sync import Syncer

STATUS_ICON = {
    RunState.pending: "⏳ pending",
    RunState.preparing: "🔧 preparing",
    RunState.running: "🏃 running",
    RunState.succeeded: "🏆 succeeded",
    RunState.stopped: "⏹ stopped",
    RunState.exhausted: "⌛ exhausted",
    RunState.failed: "💥 failed",
    RunState.cancelled: "🚫 cancelled",
    RunState.pruned: "✂ pruned",
}


def status_icon(rec: RunRecord) -> str:
    """The run's state with its icon; a running run whose stop has begun (it is checkpointing
    and exiting: ``stop_reason`` set) reads ``⏹ stopping``."""
    if rec.state == RunState.running and rec.stop_reason:
        return "⏹ stopping"
    return STATUS_ICON[rec.state]


def criterion_cell(c: Criterion, metrics: Mapping[str, Any]) -> str:
    """``0.81 ✓`` / ``0.62 ✗`` / ``—`` for one criterion on one record."""
    names = sorted(c.names)
    if c.threshold is not None:
        value = metrics.get(c.threshold.metric)
        if value is None:
            return "—"
        return f"{fmt_against(value, c.threshold)} {'✓' if c.evaluate(metrics) else '✗'}"
    if not all(metrics.get(n) is not None for n in names):
        return "—"
    return "✓" if c.evaluate(metrics) else "✗"


def history_cell(c: Criterion, history: MetricHistory, unit: str) -> str:
    """A criterion's cell for a run: its metric's last known value, with the epoch/step it came
    from when the newest record lacks it (``0.81 ✓ (epoch 5)``), ✓/✗ against the criterion."""
    last = history.last or {}
    if c.threshold is None:
        return criterion_cell(c, last)
    found = history.last_value(c.threshold.metric)
    if found is None:
        return "—"
    value, record = found
    cell = criterion_cell(c, {c.threshold.metric: value})
    if record is not history.last:
        cell += f" ({unit} {record.get(unit, record.get('step', record.get('epoch')))})"
    return cell


def _trend(history: MetricHistory, metric: str | None, higher_is_better: bool) -> str:
    if metric is None:
        return ""
    _, ys = history.series(metric)
    if len(ys) < 2:
        return ""
    delta = ys[-1] - ys[-2]
    if abs(delta) < 1e-9:
        return "→"
    better = (delta > 0) == higher_is_better
    return ("↗" if delta > 0 else "↘") + ("" if better else " (worse)")


def _eta(rec: RunRecord, history: MetricHistory, now: float) -> str:
    """Time to the budget from the measured rate (``~14m to max``), for a running run."""
    unit = rec.unit
    if rec.state != RunState.running or rec.progress is None or rec.budget is None:
        return ""
    times = [(r[unit], r["time_s"]) for r in history.records if unit in r and "time_s" in r]
    if len(times) < 2:
        return ""
    (e0, t0), (e1, t1) = times[0], times[-1]
    if e1 <= e0:
        return ""
    per_unit = (t1 - t0) / (e1 - e0)
    remaining = max(0, rec.budget - e1) * per_unit
    if rec.max_time_s is not None and rec.started_at is not None:
        remaining = min(remaining, max(0.0, rec.started_at + rec.max_time_s - now))
    return f"~{duration(remaining)} to max"


def eta_to_criteria(
    exp: ExperimentConfig, worker: WorkerConfig, rec: RunRecord, history: MetricHistory,
    now: float,
) -> str:
    """When a running worker meets all its criteria by projection (``~14m (epoch 23)``), or
    why not (``not on course: val_accuracy``); see ``orchestrator.core.projection``."""
    if rec.state != RunState.running or rec.budget is None:
        return ""
    records = history.records
    criteria = exp.criteria_for(worker)
    window = exp.prune.window if exp.prune else None
    key = (exp.name, worker.name, tuple(c.source for c in criteria), exp.unit, exp.check_every,
           window, rec.budget, len(records),
           records[0].get("time_s") if records else None,
           records[-1].get("time_s") if records else None)
    projection = _PROJECTIONS.get(key)
    if projection is None:
        # numpy is imported here, once a running worker has records: not at start-up
        from orchestrator.core.projection import WINDOW, project_worker

        projection = project_worker(
            criteria, records, unit=exp.unit, check_every=exp.check_every,
            budget=rec.budget, window=window or WINDOW,
        )
        if len(_PROJECTIONS) >= 4096:
            _PROJECTIONS.clear()
        _PROJECTIONS[key] = projection
    return projection.at(now).text()


# Memo of eta_to_criteria's projections (a pure function of the key): a dashboard refresh
# projects only the workers with new records. Keyed on the worker, its criteria and budget, and
# its history's length and first and last record times.
_PROJECTIONS: dict[tuple[Any, ...], Any] = {}


def _progress(rec: RunRecord) -> str:
    """``step 2,000 / 6,000`` or ``5/50`` (epochs)."""
    done = "—" if rec.progress is None else f"{rec.progress:,}"
    total = "—" if rec.budget is None else f"{rec.budget:,}"
    return f"{done}/{total}" if rec.unit == "epoch" else f"step {done} / {total}"


def render_markdown(
    plan: Plan,
    state: PlanState,
    histories: Mapping[str, MetricHistory],
    events: Sequence[str],
    *,
    now: float,
    progress_image: str | None = None,
    sync_line: str | None = None,
    links: Mapping[str, Sequence[tuple[str, str]]] | None = None,
) -> str:
    """The dashboard as markdown (pure: the same inputs give the same text).

    Args:
        plan, state: the plan and the controller's state.
        histories: metric history per run key ("experiment/worker").
        events: recent events, oldest first.
        now: Unix seconds used for "last update" and ETAs.
        progress_image: file name of the progress plot next to the dashboard, if any.
        sync_line: one line about the SFTP sync, if enabled.
        links: per experiment, (label, relative path) of reports and figures that exist.
    """
    out: list[str] = []
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    elapsed = duration(now - state.started_at)
    status = "finished" if state.finished else "running"
    out.append("# Parallel progress")
    out.append("")
    plan_name = Path(state.plan).name
    out.append(f"Last update: **{stamp}** · {status} for {elapsed} · plan `{plan_name}`")
    if sync_line:
        out.append(f"Sync: {sync_line}")
    out.append("")
    for exp in plan.experiments:
        erec = state.experiments.get(exp.name)
        if erec is None:
            continue
        out.append(f"## {exp.name}: {_exp_status(erec)}")
        out.append("")
        crit = " AND ".join(code(c.source) for c in exp.criteria)
        unit = exp.unit
        budget = exp.max_epochs if unit == "epoch" else exp.max_steps
        limits = f"max {budget:,} {unit}s" + (
            f" or {duration(exp.max_time_s)} an attempt" if exp.max_time_s else ""
        )
        out.append(
            f"Criteria: {crit} · checked every {exp.check_every} {unit}"
            f"{'s' if exp.check_every > 1 else ''} · {limits}"
        )
        controls = [w.name for w in exp.workers if w.control]
        if controls:
            out.append("")
            out.append(f"Controls (can never win; they must fail the criteria): "
                       f"{', '.join(controls)}")
        for flag in erec.control_flags:
            out.append("")
            out.append(f"⚠ **FLAGGED**: {flag}")
        out.append("")
        metric_cols = [c for c in exp.criteria]
        branch_head, branch_cell, branch_note = _branches(exp)
        header = ["worker", *branch_head, "slot", _breakable(f"{unit}/max")]
        header += [
            _breakable(c.threshold.metric) if c.threshold else c.source for c in metric_cols
        ]
        header += ["status", "trend", "ETA to criteria", "ETA"]
        rows: list[list[str]] = []
        for w in exp.workers:
            key = f"{exp.name}/{w.name}"
            rec = state.runs.get(key)
            if rec is None:
                continue
            hist = histories.get(key, MetricHistory())
            first = exp.criteria_for(w)[0]
            trend = _trend(
                hist,
                first.threshold.metric if first.threshold else None,
                first.threshold.higher_is_better if first.threshold else True,
            )
            status_cell = status_icon(rec)
            if rec.control:
                status_cell += " (control)"
            for name in rec.unreported:
                status_cell += f" ⚠ never reports `{name}`"
            if rec.stalled:
                status_cell += " ⚠ stalled"
            if rec.attempt > 1:
                status_cell += f" (attempt {rec.attempt})"
            if rec.state in (RunState.stopped, RunState.running) and rec.stop_reason:
                status_cell += f": {rec.stop_reason}"
            if rec.state == RunState.pruned and rec.stop_reason:
                status_cell += f" ({rec.stop_reason.removeprefix('pruned: ').split(';')[0]})"
            row = [w.name, *branch_cell(w.branch), rec.slot or "—", _progress(rec)]
            row += [history_cell(c, hist, unit) for c in metric_cols]
            row += [status_cell, trend, _breakable(eta_to_criteria(exp, w, rec, hist, now)),
                    _eta(rec, hist, now)]
            rows.append(row)
        out.extend(_table(header, rows))
        out.append("")
        if branch_note:
            out.extend([branch_note, ""])
        if code_line := _code_line(exp, state, plan.base_ref):
            out.extend([code_line, ""])
        out.extend(_best_lines(exp, state, histories))
        errors = [
            (w.name, state.runs[f"{exp.name}/{w.name}"].error)
            for w in exp.workers
            if f"{exp.name}/{w.name}" in state.runs and state.runs[f"{exp.name}/{w.name}"].error
        ]
        for name, err in errors:
            out.append(f"- ⚠ **{name}**: `{_cell(err or '')}`")
        if errors:
            out.append("")
        for label, rel in (links or {}).get(exp.name, ()):
            out.append(f"- [{label}]({rel})")
        if (links or {}).get(exp.name):
            out.append("")
    if progress_image:
        out.append("## Progress")
        out.append("")
        out.append(f"![progress]({progress_image})")
        out.append("")
    out.append("## Recent events")
    out.append("")
    out.append("```")
    out.extend(events[-15:] or ["(none yet)"])
    out.append("```")
    out.append("")
    return "\n".join(out)


def _code_line(exp: ExperimentConfig, state: PlanState, base_ref: str) -> str | None:
    """'Code: a `1a2b3c4d` · b `5e6f7a8b` (3 behind main, dirty)': the commit each worker's
    last attempt ran (issue #15); None before any started."""
    cells = []
    for w in exp.workers:
        rec = state.runs.get(f"{exp.name}/{w.name}")
        if rec is None or not rec.commit:
            continue
        notes = [f"{rec.behind} behind {base_ref}"] if rec.behind else []
        notes += ["**dirty**"] if rec.dirty else []
        cells.append(f"{w.name} `{rec.commit[:8]}`" + (f" ({', '.join(notes)})" if notes else ""))
    return "Code: " + " · ".join(cells) if cells else None


def _exp_status(erec: Any) -> str:
    if erec.status == ExperimentStatus.succeeded:
        return f"🏆 **{erec.winner}** won at {erec.unit} {erec.winner_epoch}"
    if erec.status == ExperimentStatus.failed and erec.control_flags:
        return f"❌ failed: a control met the criteria ({erec.winner or 'no'} winner flagged)"
    if erec.status == ExperimentStatus.failed:
        return "❌ failed: no worker met every criterion"
    if erec.awaiting_controls:
        return (f"🏁 **{erec.winner}** met the criteria at {erec.unit} {erec.winner_epoch}; "
                f"waiting for controls {', '.join(erec.awaiting_controls)}")
    return "racing"


def _best_lines(
    exp: ExperimentConfig, state: PlanState, histories: Mapping[str, MetricHistory]
) -> list[str]:
    best = best_worker(exp, histories)
    metrics = {n for c in exp.criteria for n in c.names}
    if best is None or not any(best[2].get(m) is not None for m in metrics):
        return []  # no evidence yet: no worker has reported a criterion metric
    name, passed, rec = best
    criteria = exp.criteria_for(exp.worker(name))
    missing = missing_text(criteria, rec)
    at = rec.get(exp.unit, rec.get("epoch", rec.get("step")))
    text = f"Best so far: **{name}** at {exp.unit} {at}: {passed}/{len(criteria)} criteria"
    text += f"; missing {', '.join(missing)}" if missing else " (all met)"
    return [text, ""]


def _branches(
    exp: ExperimentConfig,
) -> tuple[list[str], Callable[[str], list[str]], str | None]:
    """How the workers table shows branches, short enough for a 900 px page.

    Returns:
        (branch header: [] or one column, the cells of a branch, a note under the table).
        Branches named ``PREFIX<worker name>`` (the usual case) get no column, only the note
        ``Branches: `PREFIX<worker>```; otherwise a common ``.../`` prefix is cut from the
        column and named in its header.
    """
    names = [(w.name, w.branch) for w in exp.workers]
    prefixes = {b[: len(b) - len(n)] for n, b in names if b.endswith(n)}
    if len(prefixes) == 1 and all(b.endswith(n) for n, b in names):
        (prefix,) = prefixes
        return [], lambda b: [], f"Branches: `{prefix}<worker>`"
    common = os.path.commonprefix([b for _, b in names])
    common = common[: common.rfind("/") + 1]
    if common and len(names) > 1:
        return [f"branch (`{common}…`)"], lambda b: [f"`{b[len(common):]}`"], None
    return ["branch"], lambda b: [f"`{b}`"], None


OPTIONAL_COLUMNS = ("slot", "trend", "ETA", "ETA to criteria")  # left out when empty in every row
# Left out, in this order, while the table is estimated wider than a 900 px page (the progress
# plot shows the trend; `status` and the live table show slots; the time to the budget goes
# before the time to the criteria).
PAGE_DROP_ORDER = ("trend", "slot", "ETA")
PAGE_WIDTH_PX = 900 - 2 * 24  # GitHub's page margins


def estimated_width_px(header: Sequence[str], rows: Sequence[Sequence[str]]) -> float:
    """How wide a markdown viewer draws the table: ~8.5 px a character of a column's longest
    unbreakable piece (cells wrap at spaces, after hyphens and at ``<wbr>``) plus 26 px of
    padding a cell (GitHub: 16 px font, 6 px 13 px padding)."""

    def piece(cell: str) -> int:
        return max(len(p) for p in re.split(r"\s+|(?<=-)|<wbr>", cell.replace("`", "")))

    columns = zip(header, *rows, strict=True)
    return sum(max(piece(c) for c in col) * 8.5 + 26 for col in columns)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The markdown table, without the optional columns that are empty in every row (a decided
    race has no ETA, a finished one no slot), and without the trend, then the slot, while it
    would be wider than a 900 px page."""
    keep = [
        i for i, h in enumerate(header)
        if h not in OPTIONAL_COLUMNS or any(r[i] not in ("", "—") for r in rows)
    ]

    def width(cols: list[int]) -> float:
        return estimated_width_px([header[i] for i in cols], [[r[i] for i in cols] for r in rows])

    for name in PAGE_DROP_ORDER:
        if width(keep) <= PAGE_WIDTH_PX:
            break
        keep = [i for i in keep if header[i] != name]
    lines = ["| " + " | ".join(header[i] for i in keep) + " |"]
    lines.append("|" + "|".join("---" for _ in keep) + "|")
    lines += ["| " + " | ".join(_cell(r[i]) for i in keep) + " |" for r in rows]
    return lines


def _breakable(name: str) -> str:
    """A metric name as a table header a viewer may wrap after ``_``, ``/`` or ``.`` (``<wbr>``):
    long metric names are what makes a criteria table wider than the page."""
    return re.sub(r"(?<=[_/.])(?=.)", "<wbr>", name)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class Dashboard:
    """A ``RaceView``: writes the dashboard and the progress plot, throttled, and feeds the syncer.

    Args:
        plan: the plan (its ``dashboard`` path, ``dashboard_interval_s``, ``sync``).
        paths: the plan's results locations (for the links to figures and reports).
        syncer: pushes changed files (a null syncer when the plan has no ``sync:``).
        clock: time source in seconds (tests may fake it).
    """

    def __init__(
        self,
        plan: Plan,
        paths: ResultsPaths,
        syncer: Syncer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.plan = plan
        self.paths = paths
        self.path = plan.dashboard
        self.progress_path = self.path.with_name("progress.png")
        self.clock = clock
        self._last_write: float | None = None
        self._last_plot: float | None = None
        self._records_seen_at: float | None = None
        self._plot_signature: tuple[Any, ...] | None = None
        self.write_errors = WriteErrors(clock)
        # Plots render in a detached, lower-priority process (views.renderer): matplotlib never
        # holds the controller's GIL, so a render never delays a decision, and the exit never
        # waits for one. Once the race has finished no new plot starts (the race report's
        # renderer draws the last one).
        self._plotter: subprocess.Popen[bytes] | None = None
        self.syncer = syncer
        self.syncer.start()

    def refresh(self, snapshot: RaceSnapshot, *, force: bool) -> None:
        """Rewrite the dashboard if ``dashboard_interval_s`` has passed (or ``force``)."""
        now = self.clock()
        if (
            not force
            and self._last_write is not None
            and now - self._last_write < self.plan.dashboard_interval_s
        ):
            return
        image = (
            self.progress_path.name if self._final_plot_due(snapshot.state) else None
        ) if snapshot.state.finished else self._maybe_plot(
            snapshot.histories, now,
            running={k for k, r in snapshot.state.runs.items() if r.state == RunState.running},
        )
        status = self.syncer.status()
        sync_line = None
        if self.plan.sync is not None:
            ok = (
                time.strftime("%H:%M:%S", time.localtime(status.last_success_s))
                if status.last_success_s
                else "never"
            )
            sync_line = f"last push {ok}" + (f" · error: {status.error}" if status.error else "")
        text = render_markdown(
            self.plan,
            snapshot.state,
            snapshot.histories,
            list(snapshot.events),
            now=snapshot.now,
            progress_image=image,
            sync_line=sync_line,
            links=self._links(snapshot.state),
        )
        try:
            atomic_write_bytes(self.path, text.encode(), durable=False)  # redrawn in seconds
        except OSError as e:
            self.write_errors.report("dashboard", e)
            return
        self._last_write = now
        self.syncer.notify_changed()

    def sync_status(self) -> dict[str, Any] | None:
        if self.plan.sync is None:
            return None
        status = self.syncer.status()
        return {"last_success_s": status.last_success_s, "error": status.error}

    def _maybe_plot(
        self, histories: Mapping[str, MetricHistory], now: float,
        running: frozenset[str] | set[str] = frozenset(),
    ) -> str | None:
        signature = tuple((k, len(h.records)) for k, h in sorted(histories.items()))
        have = self.progress_path.exists()
        # ~0.9 CPU-s a render (4 panels): once every 30 s keeps it near 3% of a core.
        throttle = max(30.0, 4 * self.plan.dashboard_interval_s)
        # Never forced: a render started at the decision would hold the exit. The race report's
        # renderer draws the final plot once the race is decided.
        recent = self._last_plot is not None and now - self._last_plot < throttle
        if signature == self._plot_signature or recent:
            return self.progress_path.name if have else None
        if not any(h.records for h in histories.values()):
            return None
        # The first plot waits two refresh intervals after the first records: a race decided
        # within seconds never starts one (its renderer draws the final plot), so no plot
        # process competes for the CPU with a quick decision.
        if self._records_seen_at is None:
            self._records_seen_at = now
        if now - self._records_seen_at < 2 * self.plan.dashboard_interval_s:
            return self.progress_path.name if have else None
        if self.plot_in_flight():
            return self.progress_path.name if have else None
        try:
            self._plotter = spawn_renderer(
                self.plan, ["--progress", str(self.plan.source), *sorted(running)],
                self.progress_path.with_name("progress.log"),
            )
        except OSError as e:
            self.write_errors.report("progress plot", e)
        self._plot_signature = signature
        self._last_plot = now
        return self.progress_path.name if have else None

    def _final_plot_due(self, state: PlanState) -> bool:
        """The finished race's page links the progress plot: it exists, is being drawn, or a
        race report renderer (which draws the last plot) is due."""
        return self.progress_path.exists() or self.plot_in_flight() or any(
            report_due(state, e.name) for e in self.plan.experiments)

    def plot_in_flight(self) -> bool:
        """A progress plot is being drawn. A finished one is reaped here, and the syncer told
        (the new plot goes out with the next push)."""
        if self._plotter is None:
            return False
        if self._plotter.poll() is None:
            return True
        self._plotter = None
        self.syncer.notify_changed()
        return False

    def wait(self, timeout_s: float) -> None:
        """Block until the progress plot in flight (if any) is written (tests, benchmarks)."""
        if self._plotter is not None:
            try:
                self._plotter.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return
            self.plot_in_flight()

    def _links(self, state: PlanState | None = None) -> dict[str, list[tuple[str, str]]]:
        return dashboard_links(self.plan, self.paths, state)

    def publish(self) -> None:
        self.syncer.push_now()

    def close(self) -> None:
        """Flush the sync (bounded) and stop its thread. With a ``sync:`` target, a plot in
        flight is waited for first (at most 60 s) so the last push carries it; without one,
        nothing waits: the plot process finishes on its own."""
        if self.plan.sync is not None:
            self.wait(60.0)
        self.syncer.close()


def dashboard_links(
    plan: Plan, paths: ResultsPaths, state: PlanState | None = None
) -> dict[str, list[tuple[str, str]]]:
    """Per experiment, (label, path relative to the dashboard) of the race report and the
    job's figures and reports that exist now. The race report is linked as soon as it is due
    (the race decided and settled): its renderer writes it within seconds, and the controller
    may write its last dashboard (and exit) before that."""
    out: dict[str, list[tuple[str, str]]] = {}
    base = plan.dashboard.parent
    for exp in plan.experiments:
        items = []
        report = paths.race_report(exp.name)
        if report.exists() or (state is not None and report_due(state, exp.name)):
            items.append(("Race report", _relative(report, base)))
        viz = paths.success_viz_dir(exp.name)
        for name, label in (
            ("SUCCESS_VISUALIZATION.png", "Success figure"),
            ("SUCCESS_REPORT.md", "Success report"),
            ("FAILURE_VISUALIZATION.png", "Failure figure"),
            ("FAILURE_REPORT.md", "Failure report"),
        ):
            p = viz / name
            if p.exists():
                items.append((label, _relative(p, base)))
        if items:
            out[exp.name] = items
    return out


def report_due(state: PlanState, experiment: str) -> bool:
    """The experiment is decided (or failed) and every run of it has reached a final state:
    the race report is written now (``views.race_report.RaceReportView``)."""
    erec = state.experiments.get(experiment)
    if erec is None or erec.status == ExperimentStatus.running:
        return False
    return all(r.state.terminal for r in state.runs.values() if r.experiment == experiment)


def _relative(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(path, base).replace(os.sep, "/")
