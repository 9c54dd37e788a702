"""The live progress plot (progress.png next to the dashboard).

One panel per criterion metric of each experiment, one line per worker, the threshold as a
dashed line with the passing side shaded. For running workers, the projection of each
``metric OP number`` criterion (``orchestrator.core.projection``) is drawn dashed in the
worker's colour from its last evaluation to the check point where it crosses the threshold (or
to the budget), with its band shaded. Rendered with matplotlib's Agg backend, written
atomically.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping
from pathlib import Path

from orchestrator.core.config import ExperimentConfig, Plan, WorkerConfig
from orchestrator.core.projection import WINDOW, project_criterion
from orchestrator.reporting import atomic_write_bytes
from orchestrator.sources.metrics import MetricHistory


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
        path: output PNG; replaced atomically.
        running: run keys whose projection to the criteria is drawn (the running workers).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    panels = []
    for exp in plan.experiments:
        seen = set()
        for c in exp.criteria:
            metric = c.threshold.metric if c.threshold else sorted(c.names)[0]
            if metric not in seen:
                seen.add(metric)
                panels.append((exp, metric, c.threshold))
    if not panels:
        return
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.0 * cols, 3.2 * rows), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    projected: list[tuple[str, tuple[tuple[float, float, float, float], ...]]] = []
    for ax, (exp, metric, threshold) in zip(axes, panels, strict=False):
        for w in exp.workers:
            hist = histories.get(f"{exp.name}/{w.name}")
            if hist is None:
                continue
            xs, ys = hist.series(metric, exp.unit)
            if xs:
                line = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=w.name)
                key = f"{exp.name}/{w.name}"
                if key in running:
                    projected.append((line[0].get_color(), _projection(exp, w, hist, metric)))
        data_lo, data_hi = ax.get_ylim()
        for color, curve in projected:
            if curve:
                px, centre, low, high = (list(v) for v in zip(*curve, strict=True))
                ax.plot(px, centre, linestyle="--", linewidth=1.2, color=color)
                ax.fill_between(px, low, high, color=color, alpha=0.12, linewidth=0)
                data_lo, data_hi = min(data_lo, *centre), max(data_hi, *centre)
        projected.clear()
        ax.set_ylim(data_lo, data_hi) if data_lo < data_hi else None
        if threshold is not None:
            ax.axhline(threshold.value, color="black", linestyle="--", linewidth=1)
            lo, hi = ax.get_ylim()
            if threshold.higher_is_better:
                ax.axhspan(threshold.value, max(hi, threshold.value), color="green", alpha=0.08)
            else:
                ax.axhspan(min(lo, threshold.value), threshold.value, color="green", alpha=0.08)
            ax.set_ylim(lo, hi) if lo < hi else None
        title = f"{exp.name}: {metric}"
        if threshold is not None:
            title += f" (pass {threshold.op} {threshold.value:g})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(exp.unit)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


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
