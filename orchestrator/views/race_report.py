"""The race report: what every decided or failed race leaves behind, for any training script.

Written automatically at every decision and failure (by a detached process, so the controller
neither waits for matplotlib nor holds its exit), and again by ``python -m orchestrator report
PLAN``. Per experiment, under ``results/<experiment>/race_report/``:

- ``RACE_REPORT.md``: the criteria; the winner's record (or the best worker and what it
  missed); a table of every worker (state, epochs or steps, last value of each criterion
  metric, exit, duration); slot-seconds used and saved (``orchestrator.core.accounting``).
- ``race_report.png``: each criterion metric per worker against epoch/step and against
  wall-clock time since the race started, with the threshold drawn.

A job's own figure (e.g. a four-panel success figure) is an addition made by its
``on_success`` hook, never a replacement.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.accounting import RunUsage, compute_savings, saved_by_cause
from orchestrator.core.config import ExperimentConfig, Plan, load_plan
from orchestrator.core.ranking import best_worker, missing_text
from orchestrator.core.runs import metric_source
from orchestrator.core.snapshot import RaceSnapshot
from orchestrator.core.state import ExperimentStatus, PlanState, RunRecord, RunState
from orchestrator.formatting import code, duration, fmt
from orchestrator.paths import ResultsPaths
from orchestrator.reporting import atomic_write_bytes
from orchestrator.sources.metrics import MetricHistory
from orchestrator.views.dashboard import report_due
from orchestrator.views.renderer import lower_priority, spawn_renderer

FIGURE = "race_report.png"


def load_histories(plan: Plan, exp: ExperimentConfig) -> dict[str, MetricHistory]:
    """Every worker's metric history of ``exp``, read from disk with its own metrics source."""
    paths = ResultsPaths(plan.results_dir)
    out = {}
    for w in exp.workers:
        source = metric_source(plan, exp, w, paths)
        history = MetricHistory()
        try:
            history.add(source.read_new())
        except OSError:
            pass
        out[f"{exp.name}/{w.name}"] = history
    return out


def _metrics(exp: ExperimentConfig) -> list[str]:
    """Criterion metrics of the experiment and its workers' overrides, in order, once each."""
    names: list[str] = []
    for criteria in [exp.criteria, *(w.criteria for w in exp.workers if w.criteria)]:
        for c in criteria or ():
            for name in ([c.threshold.metric] if c.threshold else sorted(c.names)):
                if name not in names:
                    names.append(name)
    return names


def _last_value(history: MetricHistory, metric: str, unit: str) -> tuple[float, int] | None:
    xs, ys = history.series(metric, unit)
    return (ys[-1], xs[-1]) if ys else None


def _unit(exp: ExperimentConfig) -> str:
    return exp.unit


def _usage(exp: ExperimentConfig, state: PlanState) -> list[RunUsage]:
    erec = state.experiments.get(exp.name)
    out = []
    for w in exp.workers:
        rec = state.runs.get(f"{exp.name}/{w.name}")
        done = int(rec.progress or 0) if rec is not None else 0
        won = erec is not None and erec.winner == w.name
        out.append(RunUsage(w.name, rec, done, exp.budget_for(w), won=won))
    return out


def _run_duration(rec: RunRecord | None) -> str:
    if rec is None or not rec.busy_s:
        return "—"
    return duration(rec.busy_s)


def race_report_markdown(
    plan: Plan,
    exp: ExperimentConfig,
    state: PlanState,
    histories: Mapping[str, MetricHistory],
    *,
    figure: str | None = FIGURE,
) -> str:
    """RACE_REPORT.md of one experiment (pure: the same inputs give the same text).

    Args:
        plan, exp: the plan and the experiment to report.
        state: the controller's state (run records, the decision).
        histories: metric history per run key ``experiment/worker``.
        figure: file name of the figure next to the report, or None.
    """
    erec = state.experiments.get(exp.name)
    unit = _unit(exp)
    lines = [f"# Race report: {exp.name}", ""]
    status = erec.status if erec is not None else ExperimentStatus.running
    if erec is not None and erec.status == ExperimentStatus.succeeded and erec.winner:
        lines.append(f"**{erec.winner}** met every criterion at {unit} {erec.winner_epoch}.")
    elif status == ExperimentStatus.failed:
        lines.append("**No worker met every criterion.**")
    else:
        lines.append(f"Race {status.value} (this report was written before a decision).")
    started = erec.started_at if erec is not None else None
    decided = erec.decided_at if erec is not None else None
    if started and decided:
        lines.append(f"Time to the {'decision' if erec and erec.winner else 'end'}: "
                     f"{duration(decided - started)}.")
    if state.race_id:
        lines.append(f"Race `{state.race_id}`.")
    lines += code_lines(plan, exp, state)
    lines += ["", "## Criteria", ""]
    lines += [f"- {code(c.source)}" for c in exp.criteria]
    if erec is not None:
        lines += [f"- **FLAGGED**: {flag}" for flag in erec.control_flags]
    controls = [w.name for w in exp.workers if w.control]
    if controls:
        lines.append(f"- controls (never win): {', '.join(controls)}")
    lines.append(f"- checked every {exp.check_every} {unit}{'s' if exp.check_every > 1 else ''}")
    lines.append("")
    if erec is not None and erec.winner and erec.winner_metrics:
        lines += ["## The winning record", "", "| metric | value |", "|---|---|"]
        for key, value in erec.winner_metrics.items():
            lines.append(f"| {key} | {fmt(value)} |")
        lines.append("")
    else:
        best = best_worker(exp, histories)
        if best is not None:
            name, passed, record = best
            criteria = exp.criteria_for(exp.worker(name))
            at = record.get(unit, record.get("epoch", record.get("step")))
            missing = missing_text(criteria, record)
            lines += ["## Closest worker", "",
                      f"**{name}** at {unit} {at}: {passed}/{len(criteria)} criteria"
                      + (f"; missed {', '.join(missing)}" if missing else ""), ""]
    metrics = _metrics(exp)
    lines += ["## Workers", ""]
    header = ["worker", "state", unit + "s", *metrics, "exit", "slot time"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for w in exp.workers:
        key = f"{exp.name}/{w.name}"
        rec = state.runs.get(key)
        hist = histories.get(key, MetricHistory())
        cells = []
        for m in metrics:
            last = _last_value(hist, m, unit)
            cells.append("—" if last is None else f"{fmt(last[0])} ({unit} {last[1]})")
        row = [
            w.name,
            rec.state.value if rec is not None else "—",
            f"{rec.progress if rec is not None and rec.progress is not None else '—'}"
            f"/{exp.budget_for(w)}",
            *cells,
            "—" if rec is None or rec.exit_code is None else str(rec.exit_code),
            _run_duration(rec),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    lines.append("")
    lines += _pruned_lines(exp, state, unit)
    rows = compute_savings(_usage(exp, state), unit=unit)
    used = sum(r.busy_s for r in rows)
    causes = saved_by_cause(rows)
    pruning = (f"; saved by pruning: **{causes['pruning']:,.0f}**"
               if exp.prune is not None or causes["pruning"] else "")
    lines += [
        "## Compute",
        "",
        f"Slot-seconds used: **{used:,.0f}**; saved by ending the race early (estimate): "
        f"**{causes['decision']:,.0f}**{pruning}. A slot-second is one second of one slot (a "
        "GPU, a share of one, or a CPU slot); the estimate scales each stopped run's measured "
        f"seconds per {unit} to its budget.",
        "",
        "| worker | state | slot-s used | est. slot-s to budget | saved | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        full = "—" if r.full_busy_s is None else f"{r.full_busy_s:,.0f}"
        lines.append(f"| {r.worker} | {r.state} | {r.busy_s:,.0f} | {full} | "
                     f"{r.saved_busy_s:,.0f} | {r.note} |")
    lines.append("")
    if figure:
        lines += ["## Curves", "", f"![criterion metrics per worker]({figure})", ""]
    return "\n".join(lines)


def code_lines(plan: Plan, exp: ExperimentConfig, state: PlanState) -> list[str]:
    """The report's "Code" section: the commit every worker ran (and the winner's pinned
    checkpoint and tag), with how far each branch was behind base_ref and any dirty worktree."""
    from orchestrator.core.provenance import behind_text

    erec = state.experiments.get(exp.name)
    lines = ["", "## Code", "", "| worker | branch | commit | vs base | worktree |",
             "|---|---|---|---|---|"]
    any_dirty = False
    for w in exp.workers:
        rec = state.runs.get(f"{exp.name}/{w.name}")
        if rec is None or not rec.commit:
            lines.append(f"| {w.name} | `{w.branch}` | — | — | — |")
            continue
        any_dirty |= rec.dirty
        lines.append(
            f"| {w.name} | `{w.branch}` | `{rec.commit[:8]}` | "
            f"{behind_text(rec.behind, plan.base_ref) or '—'} | "
            f"{'**DIRTY** (diff saved with the attempt)' if rec.dirty else 'clean'} |"
        )
    if any_dirty:
        lines += ["", "**Warning: code was dirty**: at least one worker ran uncommitted changes; "
                  "its commit alone does not reproduce it (see attempts/NNNN.diff)."]
    if erec is not None and erec.winner:
        lines.append("")
        if erec.winner_commit:
            lines.append(f"Winning commit: `{erec.winner_commit}`"
                         + (f"; tag `{erec.tag}`" if erec.tag else "") + ".")
        pin = erec.pin or _read_json(ResultsPaths(plan.results_dir).winner_json(exp.name))
        if pin and pin.get("checkpoint"):
            how = ("its sidecar names the winning record" if pin.get("matched_by") == "sidecar"
                   else "**matched by time**: the script writes no checkpoint sidecars, so the "
                   "newest checkpoint at the decision was taken; it may not hold the weights "
                   "of the winning record")
            lines.append(f"Pinned checkpoint: `_winner/{pin['checkpoint']}` (sha256 "
                         f"`{str(pin.get('sha256'))[:16]}`; {how}); see `_winner/winner.json`.")
        elif pin:
            lines.append(f"Pinned checkpoint: none ({pin.get('error', 'unknown')}).")
    return lines


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pruned_lines(exp: ExperimentConfig, state: PlanState, unit: str) -> list[str]:
    """``## Pruned``: each pruned worker, where, and why (its projection), if any."""
    out = []
    for w in exp.workers:
        rec = state.runs.get(f"{exp.name}/{w.name}")
        if rec is None or rec.state != RunState.pruned:
            continue
        why = (rec.stop_reason or "pruned").removeprefix("pruned: ")
        out.append(f"- **{w.name}** at {unit} {rec.progress}, after {duration(rec.busy_s)} of "
                   f"slot time: {why}")
    if not out:
        return []
    return ["## Pruned", "", *out, ""]


def render_race_figure(
    exp: ExperimentConfig,
    histories: Mapping[str, MetricHistory],
    path: Path,
    *,
    started_at: float | None = None,
    dpi: int = 100,
) -> Path | None:
    """Per criterion metric: per worker against epoch/step (left) and wall-clock (right).

    Args:
        exp: the experiment.
        histories: metric history per run key.
        path: the PNG to write (atomically).
        started_at: Unix seconds the race started (the wall-clock axis' zero); default: the
            earliest ``time_s`` among the records.

    Returns:
        ``path``, or None when no worker reported any criterion metric.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    metrics = _metrics(exp)
    times = [r["time_s"] for h in histories.values() for r in h.records
             if isinstance(r.get("time_s"), (int, float))]
    t0 = started_at if started_at is not None else (min(times) if times else 0.0)
    if not metrics or not any(h.records for h in histories.values()):
        return None
    thresholds: dict[str, Any] = {}
    for c in exp.criteria:
        if c.threshold is not None:
            thresholds.setdefault(c.threshold.metric, c.threshold)
    fig = Figure(figsize=(10.0, 2.9 * len(metrics)), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(metrics), 2, squeeze=False)
    for row, metric in enumerate(metrics):
        ax_x, ax_t = axes[row]
        timed = False
        for i, w in enumerate(exp.workers):
            hist = histories.get(f"{exp.name}/{w.name}")
            if hist is None:
                continue
            xs, ys = hist.series(metric, exp.unit)
            ts = [r["time_s"] - t0 for r in hist.records
                  if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)
                  and isinstance(r.get("time_s"), (int, float))]
            style = dict(marker="o", markersize=3, linewidth=1.3, color=f"C{i % 10}")
            if xs:
                ax_x.plot(xs, ys, label=w.name, **style)
            if ts and len(ts) == len(ys):
                ax_t.plot(ts, ys, **style)
                timed = True
        threshold = thresholds.get(metric)
        for ax in (ax_x, ax_t):
            if threshold is not None:
                ax.axhline(threshold.value, color="black", linestyle="--", linewidth=1)
            ax.grid(alpha=0.3)
            if _log_axis(metric, threshold, histories):
                ax.set_yscale("log")
        title = metric + (f" (pass {threshold.op} {threshold.value:g})" if threshold else "")
        ax_x.set_title(title, fontsize=9)
        ax_t.set_title(title + " vs wall clock", fontsize=9)
        ax_x.set_xlabel(_unit(exp))
        ax_t.set_xlabel("seconds since the race started")
        if not timed:
            ax_t.text(0.5, 0.5, "no wall-clock times in these records\n(the logger writes none)",
                      ha="center", va="center", transform=ax_t.transAxes, fontsize=8,
                      color="0.4")
        if ax_x.get_legend_handles_labels()[0]:
            ax_x.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _log_axis(metric: str, threshold: Any, histories: Mapping[str, MetricHistory]) -> bool:
    """p-values and other small positive bounds (``< 0.01``) read better on a log axis."""
    if threshold is None or threshold.higher_is_better or not 0 < threshold.value <= 0.05:
        return False
    values = [y for h in histories.values() for y in h.series(metric)[1]]
    return bool(values) and all(y > 0 and math.isfinite(y) for y in values)


def write_race_report(plan: Plan, experiment: str, *, progress: bool = True) -> Path:
    """Read the state and metrics from disk and write the experiment's race report.

    Args:
        plan: the plan.
        experiment: the experiment's name.
        progress: also redraw the dashboard's progress plot (the controller may have exited
            before its last render finished).

    Returns:
        The path of RACE_REPORT.md.

    Raises:
        KeyError: no such experiment in the plan.
        OSError: the report cannot be written.
    """
    exp = next((e for e in plan.experiments if e.name == experiment), None)
    if exp is None:
        raise KeyError(f"no experiment {experiment!r} in the plan")
    paths = ResultsPaths(plan.results_dir)
    state = PlanState.load(paths.state) if paths.state.exists() else PlanState(plan="")
    histories = load_histories(plan, exp)
    out_dir = paths.race_report_dir(exp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    erec = state.experiments.get(exp.name)
    figure = render_race_figure(
        exp, histories, out_dir / FIGURE, started_at=erec.started_at if erec else None
    )
    text = race_report_markdown(plan, exp, state, histories,
                                figure=figure.name if figure else None)
    report = paths.race_report(exp.name)
    atomic_write_bytes(report, text.encode())
    if progress:
        write_progress_plot(plan)
    return report


class RaceReportView:
    """A ``RaceView`` that writes the race report once per decision or failure.

    It is written once the decided experiment has settled: every run in a final state (the
    losers' stops done; with ``stop_losers: false``, every worker finished).

    The report renders in a detached process (``python -m orchestrator.views.race_report``)
    started when the view first sees an experiment decided: the controller's decision path and
    its exit never wait for it. Its log is ``race_report/render.log``.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.paths = ResultsPaths(plan.results_dir)
        self._done: set[tuple[str, float | None]] = set()
        self._children: list[subprocess.Popen[bytes]] = []

    def refresh(self, snapshot: RaceSnapshot, *, force: bool) -> None:
        self._children = [p for p in self._children if p.poll() is None]  # reap finished ones
        for name, erec in snapshot.state.experiments.items():
            if erec.status == ExperimentStatus.running:
                continue
            if not report_due(snapshot.state, name):
                continue  # written once the decided race has settled (final states, exits)
            if erec.winner and erec.pin is None and not snapshot.state.finished:
                continue  # and the winner's checkpoint is pinned (the report cites it)
            key = (name, erec.decided_at)
            if key in self._done:
                continue
            self._done.add(key)
            self._children.append(self._spawn(name))

    def _spawn(self, experiment: str) -> subprocess.Popen[bytes]:
        log = self.paths.race_report_dir(experiment) / "render.log"
        child = spawn_renderer(self.plan, [str(self.plan.source), experiment], log)
        # A new race waits for this marker before it moves the race's files (core.races).
        self.paths.rendering_marker(experiment, child.pid).touch()
        return child

    def wait(self, timeout_s: float) -> None:
        """Wait for the reports being rendered (tests and benchmarks)."""
        deadline = time.monotonic() + timeout_s
        for p in self._children:
            p.wait(max(0.0, deadline - time.monotonic()))

    def publish(self) -> None:
        pass

    def sync_status(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        """With a ``sync:`` target, wait (at most 60 s) for the reports being rendered, so the
        dashboard's last push carries them; without one, never wait."""
        if self.plan.sync is not None:
            self.wait(60.0)


def write_progress_plot(plan: Plan, running: Collection[str] = ()) -> Path:
    """Read every worker's metrics from disk and redraw the dashboard's progress plot
    (``progress.png`` next to the dashboard); ``running``: the run keys whose projection to
    the criteria is drawn.

    Returns:
        The plot's path.

    Raises:
        OSError: the plot cannot be written.
    """
    histories: dict[str, MetricHistory] = {}
    for exp in plan.experiments:
        histories.update(load_histories(plan, exp))
    from orchestrator.views.plots import render_progress

    path = plan.dashboard.with_name("progress.png")
    render_progress(plan, histories, path, running=running)
    return path


USAGE = ("usage: python -m orchestrator.views.race_report PLAN EXPERIMENT\n"
         "       python -m orchestrator.views.race_report --progress PLAN [RUNNING_RUN_KEY ...]")


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.views.race_report PLAN EXPERIMENT``: write one race report;
    ``--progress PLAN [RUN_KEY ...]``: redraw the dashboard's progress plot. Runs at a lower
    CPU priority (``views.renderer``)."""
    args = sys.argv[1:] if argv is None else argv
    lower_priority()
    if args[:1] == ["--progress"] and len(args) >= 2:
        print(f"progress plot: {write_progress_plot(load_plan(args[1]), args[2:])}")
        return 0
    if len(args) != 2 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    plan = load_plan(args[0])
    try:
        path = write_race_report(plan, args[1])
    finally:
        ResultsPaths(plan.results_dir).rendering_marker(args[1], os.getpid()).unlink(
            missing_ok=True)
    print(f"race report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
