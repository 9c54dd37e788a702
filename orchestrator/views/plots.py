"""The live progress plot (progress.png next to the dashboard).

One row per criterion metric of each experiment, one line per worker, in two views: against
epoch (or step) and against wall-clock time since the experiment's first record. The threshold
is a dashed line with the passing side shaded. Points are drawn as markers (large ones while a
run has few records, so a race decided at its first check still shows its points), the x axis
starts at 0, and p-values (a criterion ``metric < small number``, e.g. ``separation_p < 0.01``)
are drawn on a log axis. For running workers, the projection of each ``metric OP number``
criterion (``orchestrator.core.projection``) is drawn dashed in the worker's colour from its
last evaluation to the check point where it crosses the threshold (or to the budget), with its
band shaded. Rendered with matplotlib's Agg backend, written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.config import ExperimentConfig, Plan, WorkerConfig
from orchestrator.core.criteria import Threshold
from orchestrator.core.projection import WINDOW, project_criterion
from orchestrator.reporting import atomic_write_bytes
from orchestrator.sources.metrics import MetricHistory

P_VALUE_MAX = 0.05  # a "< x" threshold at or below this is p-value-like: log axis (as race_report)


def is_p_value(threshold: Threshold | None) -> bool:
    """True for criteria such as ``separation_p < 0.01``: drawn on a log axis."""
    return (
        threshold is not None
        and threshold.op in ("<", "<=")
        and 0 < threshold.value <= P_VALUE_MAX
    )


def _panels(plan: Plan) -> list[tuple[ExperimentConfig, str, Threshold | None]]:
    panels = []
    for exp in plan.experiments:
        seen = set()
        for c in exp.criteria:
            metric = c.threshold.metric if c.threshold else sorted(c.names)[0]
            if metric not in seen:
                seen.add(metric)
                panels.append((exp, metric, c.threshold))
    return panels


def _series(
    history: MetricHistory, metric: str, t0: float | None
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x by epoch/step, y) and (x by wall-clock seconds since t0, y) of one metric."""
    xs, ys = history.series(metric)
    ts, tys = [], []
    if t0 is not None:
        for r in history.records:
            v, t = r.get(metric), r.get("time_s")
            if isinstance(v, (int, float)) and isinstance(t, (int, float)):
                ts.append(float(t) - t0)
                tys.append(float(v))
    return [float(x) for x in xs], ys, ts, tys


def _positive(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
    return [x for x, _ in kept], [y for _, y in kept]


def _x_unit(exp: ExperimentConfig, histories: Mapping[str, MetricHistory]) -> str:
    for w in exp.workers:
        for r in histories.get(f"{exp.name}/{w.name}", MetricHistory()).records:
            return "epoch" if "epoch" in r else "step"
    return "epoch"


def _draw_threshold(ax: Any, threshold: Threshold | None) -> None:
    if threshold is None:
        return
    ax.axhline(threshold.value, color="black", linestyle="--", linewidth=1)
    lo, hi = ax.get_ylim()
    if threshold.higher_is_better:
        ax.axhspan(threshold.value, max(hi, threshold.value), color="green", alpha=0.08)
    elif threshold.op in ("<", "<="):
        ax.axhspan(min(lo, threshold.value), threshold.value, color="green", alpha=0.08)
    if lo < hi:
        ax.set_ylim(lo, hi)


def render_progress(
    plan: Plan,
    histories: Mapping[str, MetricHistory],
    path: Path,
    *,
    dpi: int = 90,
    running: Collection[str] = (),
) -> None:
    """Draw every experiment's criterion metrics per worker and write ``path`` (PNG).

    Args:
        plan: the plan (experiments, criteria, workers).
        histories: metric history per run key ("experiment/worker").
        path: output PNG; replaced atomically (nothing is written for a plan without criteria).
        dpi: dots per inch (the figure is 11 inches wide: ~1000 px at 90 dpi).
        running: run keys whose projection to the criteria is drawn (the running workers).
    """
    fig = progress_figure(plan, histories, dpi=dpi, running=running)
    if fig is None:
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def progress_figure(
    plan: Plan,
    histories: Mapping[str, MetricHistory],
    *,
    dpi: int = 90,
    running: Collection[str] = (),
) -> Any:
    """The progress plot as a matplotlib ``Figure`` (rows: metrics; columns: by epoch or step,
    by wall clock), or None when the plan has no criterion to plot. The projections of the
    ``running`` run keys are drawn on the epoch/step axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    panels = _panels(plan)
    if not panels:
        return None
    fig = Figure(figsize=(11.0, 2.9 * len(panels)), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (ax, ax_t), (exp, metric, threshold) in zip(axes, panels, strict=True):
        keys = [f"{exp.name}/{w.name}" for w in exp.workers]
        times = [
            r["time_s"] for k in keys for r in histories.get(k, MetricHistory()).records
            if isinstance(r.get("time_s"), (int, float))
        ]
        t0 = min(times) if times else None
        span_s = (max(times) - t0) if times and t0 is not None else 0.0
        scale, t_unit = (60.0, "min") if span_s >= 120 else (1.0, "s")
        log = is_p_value(threshold)
        max_x = max_t = 0.0
        for w, key in zip(exp.workers, keys, strict=True):
            hist = histories.get(key)
            if hist is None:
                continue
            xs, ys, ts, tys = _series(hist, metric, t0)
            if log:  # a p-value of 0 has no place on a log axis: drop it
                xs, ys = _positive(xs, ys)
                ts, tys = _positive(ts, tys)
            size = 7 if len(xs) <= 3 else 4
            style: dict[str, Any] = dict(marker="o", markersize=size, linewidth=1.5, label=w.name)
            if xs:
                line = ax.plot(xs, ys, **style)[0]
                max_x = max(max_x, *xs)
                curve = _projection(exp, w, hist, metric) if key in running else ()
                if curve:
                    px, centre, low, high = (list(v) for v in zip(*curve, strict=True))
                    ax.plot(px, centre, linestyle="--", linewidth=1.2, color=line.get_color())
                    ax.fill_between(px, low, high, color=line.get_color(), alpha=0.12,
                                    linewidth=0)
                    max_x = max(max_x, *px)
                if ts:
                    ax_t.plot([t / scale for t in ts], tys, color=line.get_color(), **style)
                    max_t = max(max_t, *(t / scale for t in ts))
        for a, right in ((ax, max_x), (ax_t, max_t)):
            if log:
                a.set_yscale("log")
            _draw_threshold(a, threshold)
            limit = right * 1.1 if right > 0 else 1.0
            a.set_xlim(-0.02 * limit if a is ax_t else 0, limit)
            a.grid(alpha=0.3)
        title = f"{exp.name}: {metric}"
        if threshold is not None:
            title += f" (pass {threshold.op} {threshold.value:g})"
        ax.set_title(title + (", log scale" if log else ""), fontsize=10)
        ax_t.set_title(f"{metric} vs wall clock", fontsize=10)
        ax.set_xlabel(_x_unit(exp, histories))
        ax_t.set_xlabel(f"wall clock since the first record ({t_unit})")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    return fig


def _projection(
    exp: ExperimentConfig, worker: WorkerConfig, history: MetricHistory, metric: str
) -> tuple[tuple[float, float, float, float], ...]:
    """(x, centre, lower, upper) of the first projectable criterion on ``metric``, or ()."""
    for c in exp.criteria_for(worker):
        if c.threshold is None or c.threshold.metric != metric:
            continue
        part = project_criterion(
            c, history.records, unit=exp.unit, check_every=exp.check_every,
            budget=exp.budget_for(worker), window=exp.prune.window if exp.prune else WINDOW,
        )
        return part.curve
    return ()
