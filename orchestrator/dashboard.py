"""PARALLEL_PROGRESS.md: the markdown dashboard the researcher watches from a laptop.

``render_markdown`` is a pure function of the plan, the state and the metric histories (golden
tested). ``Dashboard`` rewrites the file atomically at most every ``dashboard_interval_s``,
regenerates the progress plot next to it (throttled), and hands changed files to the syncer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ExperimentConfig, Plan
from .criteria import Criterion
from .metrics import MetricHistory
from .paths import ResultsPaths
from .reporting import atomic_write_bytes
from .state import ExperimentStatus, PlanState, RunRecord, RunState

if TYPE_CHECKING:
    from .controller import Controller

STATUS_ICON = {
    RunState.pending: "⏳ pending",
    RunState.preparing: "🔧 preparing",
    RunState.running: "🏃 running",
    RunState.succeeded: "🏆 succeeded",
    RunState.stopped: "⏹ stopped",
    RunState.exhausted: "⌛ exhausted",
    RunState.failed: "💥 failed",
    RunState.cancelled: "🚫 cancelled",
}


def fmt(value: Any) -> str:
    """Compact number formatting for tables: 3 significant digits, scientific when tiny."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def criterion_cell(c: Criterion, metrics: Mapping[str, Any]) -> str:
    """``0.81 ✓`` / ``0.62 ✗`` / ``—`` for one criterion on one record."""
    names = sorted(c.names)
    if c.threshold is not None:
        value = metrics.get(c.threshold.metric)
        if value is None:
            return "—"
        return f"{fmt(value)} {'✓' if c.evaluate(metrics) else '✗'}"
    if not all(metrics.get(n) is not None for n in names):
        return "—"
    return "✓" if c.evaluate(metrics) else "✗"


def missing_text(criteria: Sequence[Criterion], metrics: Mapping[str, Any]) -> list[str]:
    """What a record still misses, e.g. ``attention_ratio 1.28 (need >= 1.5)``."""
    out = []
    for c in criteria:
        if c.evaluate(metrics):
            continue
        if c.threshold is not None:
            value = metrics.get(c.threshold.metric)
            out.append(
                f"{c.threshold.metric} {fmt(value)} "
                f"(need {c.threshold.op} {fmt(c.threshold.value)})"
            )
        else:
            out.append(f"`{c.source}`")
    return out


def _checked_records(exp: ExperimentConfig, history: MetricHistory) -> list[dict[str, Any]]:
    every = exp.check_every
    return [
        r for r in history.records
        if every <= 1 or (r.get("epoch", r.get("step", 1)) or 0) % every == 0
    ]


def best_record(
    exp: ExperimentConfig, worker_criteria: Sequence[Criterion], history: MetricHistory
) -> tuple[int, float, dict[str, Any]] | None:
    """The record (at a checked epoch) passing most criteria, closest to the rest.

    Returns (criteria passed, closeness score, record) or None without records.
    """
    best = None
    for r in _checked_records(exp, history) or history.records[-1:]:
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
    if rec.state != RunState.running or rec.epoch is None or rec.max_epochs is None:
        return ""
    times = [(r["epoch"], r["time_s"]) for r in history.records if "epoch" in r and "time_s" in r]
    if len(times) < 2:
        return ""
    (e0, t0), (e1, t1) = times[0], times[-1]
    if e1 <= e0:
        return ""
    per_epoch = (t1 - t0) / (e1 - e0)
    remaining = max(0, rec.max_epochs - e1) * per_epoch
    return f"~{_duration(remaining)} to max"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


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
    elapsed = _duration(now - state.started_at)
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
        crit = " AND ".join(f"`{c.source}`" for c in exp.criteria)
        out.append(
            f"Criteria: {crit} · checked every {exp.check_every} epoch"
            f"{'s' if exp.check_every > 1 else ''} · max {exp.max_epochs} epochs"
        )
        out.append("")
        metric_cols = [c for c in exp.criteria]
        header = ["worker", "branch", "slot", "epoch/max"]
        header += [c.threshold.metric if c.threshold else c.source for c in metric_cols]
        header += ["status", "trend", "ETA"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        for w in exp.workers:
            key = f"{exp.name}/{w.name}"
            rec = state.runs.get(key)
            if rec is None:
                continue
            hist = histories.get(key, MetricHistory())
            last = hist.last or {}
            first = exp.criteria_for(w)[0]
            trend = _trend(
                hist,
                first.threshold.metric if first.threshold else None,
                first.threshold.higher_is_better if first.threshold else True,
            )
            epoch = "—" if rec.epoch is None else str(rec.epoch)
            status_cell = STATUS_ICON[rec.state]
            if rec.stalled:
                status_cell += " ⚠ stalled"
            if rec.attempt > 1:
                status_cell += f" (attempt {rec.attempt})"
            if rec.state == RunState.stopped and rec.stop_reason:
                status_cell += f": {rec.stop_reason}"
            row = [w.name, f"`{w.branch}`", rec.slot or "—", f"{epoch}/{rec.max_epochs}"]
            row += [criterion_cell(c, last) for c in metric_cols]
            row += [status_cell, trend, _eta(rec, hist, now)]
            out.append("| " + " | ".join(_cell(x) for x in row) + " |")
        out.append("")
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


def _exp_status(erec: Any) -> str:
    if erec.status == ExperimentStatus.succeeded:
        return f"🏆 **{erec.winner}** won at epoch {erec.winner_epoch}"
    if erec.status == ExperimentStatus.failed:
        return "❌ failed: no worker met every criterion"
    return "racing"


def _best_lines(
    exp: ExperimentConfig, state: PlanState, histories: Mapping[str, MetricHistory]
) -> list[str]:
    found = []
    for w in exp.workers:
        hist = histories.get(f"{exp.name}/{w.name}")
        if hist is None or not hist.records:
            continue
        best = best_record(exp, exp.criteria_for(w), hist)
        if best is not None:
            found.append((best[0], best[1], w, best[2]))
    if not found:
        return []
    passed, _, w, rec = max(found, key=lambda t: (t[0], t[1]))
    criteria = exp.criteria_for(w)
    missing = missing_text(criteria, rec)
    at = rec.get("epoch", rec.get("step"))
    text = f"Best so far: **{w.name}** at epoch {at}: {passed}/{len(criteria)} criteria"
    text += f"; missing {', '.join(missing)}" if missing else " (all met)"
    return [text, ""]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class Dashboard:
    """Writes the dashboard and the progress plot, throttled, and feeds the syncer."""

    def __init__(self, plan: Plan, paths: ResultsPaths) -> None:
        from .sync import make_syncer

        self.plan = plan
        self.paths = paths
        self.path = plan.dashboard
        self.progress_path = self.path.with_name("progress.png")
        self._last_write = 0.0
        self._last_plot = 0.0
        self._plot_signature: tuple[Any, ...] | None = None
        self._errors: dict[str, float] = {}
        self.write_errors = 0
        # Plots render on their own thread: a slow matplotlib never delays a decision.
        from concurrent.futures import ThreadPoolExecutor

        self._plotter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plot")
        self._plot_future: Any = None
        self.syncer = make_syncer(plan.sync, local_root=plan.plan_dir)
        self.syncer.start()

    def best_worker(
        self, exp: ExperimentConfig, histories: Mapping[str, MetricHistory]
    ) -> str | None:
        found = []
        for w in exp.workers:
            hist = histories.get(f"{exp.name}/{w.name}")
            if hist and hist.records:
                b = best_record(exp, exp.criteria_for(w), hist)
                if b is not None:
                    found.append((b[0], b[1], w.name))
        return max(found)[2] if found else None

    def best_run(self, exp: ExperimentConfig, histories: Mapping[str, MetricHistory]) -> str:
        lines = _best_lines(exp, PlanState(plan=""), histories)
        return lines[0].replace("Best so far: ", "").replace("**", "") if lines else ""

    def maybe_refresh(self, controller: Controller, *, force: bool) -> None:
        now = time.time()
        if not force and now - self._last_write < self.plan.dashboard_interval_s:
            return
        histories = {k: r.history for k, r in controller.runs.items()}
        image = self._maybe_plot(histories, now, force)
        status = self.syncer.status()
        sync_line = None
        if self.plan.sync is not None:
            ok = (
                time.strftime("%H:%M:%S", time.localtime(status.last_success_s))
                if status.last_success_s
                else "never"
            )
            sync_line = f"last push {ok}" + (f" · error: {status.error}" if status.error else "")
            controller.state.sync = {"last_success_s": status.last_success_s, "error": status.error}
        text = render_markdown(
            self.plan,
            controller.state,
            histories,
            list(controller.events),
            now=now,
            progress_image=image,
            sync_line=sync_line,
            links=self._links(),
        )
        try:
            atomic_write_bytes(self.path, text.encode())
        except OSError as e:
            self.report_write_error("dashboard", e)
            return
        self._last_write = now
        self.syncer.notify_changed()

    def _maybe_plot(
        self, histories: Mapping[str, MetricHistory], now: float, force: bool
    ) -> str | None:
        signature = tuple((k, len(h.records)) for k, h in sorted(histories.items()))
        have = self.progress_path.exists()
        # ~0.9 CPU-s a render (4 panels): once every 30 s keeps it near 3% of a core.
        throttle = max(30.0, 4 * self.plan.dashboard_interval_s)
        if signature == self._plot_signature or (not force and now - self._last_plot < throttle):
            return self.progress_path.name if have else None
        if not any(h.records for h in histories.values()):
            return None
        if self._plot_future is not None and not self._plot_future.done():
            return self.progress_path.name if have else None
        snapshot = {k: MetricHistory(list(h.records)) for k, h in histories.items()}
        self._plot_future = self._plotter.submit(self._render_plot, snapshot)
        self._plot_signature = signature
        self._last_plot = now
        return self.progress_path.name if have else None

    def _render_plot(self, histories: Mapping[str, MetricHistory]) -> None:
        from .plots import render_progress

        try:
            render_progress(self.plan, histories, self.progress_path)
        except OSError as e:
            self.report_write_error("progress plot", e)
        self.syncer.notify_changed()

    def _links(self) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        base = self.path.parent
        for exp in self.plan.experiments:
            viz = self.paths.success_viz_dir(exp.name)
            items = []
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

    def report_write_error(self, what: str, error: OSError) -> None:
        """Count a failed write; print at most once a minute per kind (disk full, ...)."""
        self.write_errors += 1
        now = time.time()
        if now - self._errors.get(what, 0.0) > 60:
            self._errors[what] = now
            import sys

            print(f"warning: cannot write {what}: {error.strerror or error}", file=sys.stderr)

    def push_now(self) -> None:
        self.syncer.push_now()

    def close(self) -> None:
        """Finish the last plot, flush the sync (bounded), stop the threads."""
        self._plotter.shutdown(wait=True)
        self.syncer.close()


def _relative(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(path, base).replace(os.sep, "/")
