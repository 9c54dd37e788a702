"""Comparison report for any plan: metrics of every worker, grouped over seeds, mean +- sd.

    python -m orchestrator report PLAN --group-by '^(.*)-seed\\d+$'
    python scripts/compare_runs.py PLAN

Reads each worker's metric records from the plan's results directory with the same metric
sources the controller uses (``orchestrator.sources``; jsonl by default), groups workers whose
names differ only by a seed suffix (or by ``--group-by``), and prints a markdown table: per group
the number of runs, epochs reached, and for each metric the FINAL value (last record holding it)
and the BEST value over the run (max, or min for metrics where lower is better), each as
mean +- sample sd over the group's runs. A plot of every metric's curve per group (mean line,
+-sd band over the runs reporting that epoch) is written next to the markdown.

The table reports what the workers logged; it does not recompute anything. Whether a number is
held-out is the worker's business (a worker may log val_* and test_* on held-out data).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.core.config import ExperimentConfig, Plan, load_plan
from orchestrator.core.runs import metric_source
from orchestrator.errors import ConfigError
from orchestrator.paths import ResultsPaths
from orchestrator.reporting import atomic_write_bytes
from orchestrator.sources.metrics import MetricHistory

DEFAULT_GROUP_BY = r"^(.*?)(?:[-_]seed[-_]?\d+)?$"
LOWER_IS_BETTER = re.compile(r"(loss|error|_err|_px$|_p$|_time|_s$|ece)", re.IGNORECASE)
SKIP = {"epoch", "step", "time_s", "attempt"}


@dataclass
class WorkerRun:
    """One worker's merged metric history (the latest attempt wins for a repeated epoch)."""

    worker: str
    group: str
    history: MetricHistory

    @property
    def epochs(self) -> int:
        last = self.history.last or {}
        value = last.get("epoch", last.get("step", 0))
        return int(value) if isinstance(value, (int, float)) else 0

    def final(self, metric: str) -> float | None:
        """The metric's value in the last record that holds a number for it."""
        _, ys = self.history.series(metric)
        return ys[-1] if ys else None

    def best(self, metric: str, higher_is_better: bool) -> float | None:
        _, ys = self.history.series(metric)
        ys = [y for y in ys if math.isfinite(y)]
        if not ys:
            return None
        return max(ys) if higher_is_better else min(ys)


@dataclass
class GroupSummary:
    """Runs of one group (e.g. one model over its seeds)."""

    name: str
    runs: list[WorkerRun] = field(default_factory=list)


def group_of(worker: str, pattern: re.Pattern[str]) -> str:
    """The group name of ``worker``: the pattern's first capture group (or whole match).

    A worker the pattern does not match is a group of its own.
    """
    m = pattern.search(worker)
    if m is None:
        return worker
    return (m.group(1) if m.re.groups else m.group(0)) or worker


def higher_is_better(
    metric: str, experiment: ExperimentConfig | None, minimize: set[str], maximize: set[str]
) -> bool:
    """Direction of ``metric``: flags first, then the experiment's criteria, then its name."""
    if metric in minimize:
        return False
    if metric in maximize:
        return True
    if experiment is not None:
        for c in experiment.criteria:
            if c.threshold is not None and c.threshold.metric == metric and c.threshold.op != "==":
                return c.threshold.higher_is_better
    return LOWER_IS_BETTER.search(metric) is None


def load_runs(
    plan: Plan, experiment: ExperimentConfig, pattern: re.Pattern[str]
) -> list[WorkerRun]:
    """Every worker of ``experiment`` that has written at least one metric record."""
    paths = ResultsPaths(plan.results_dir)
    runs = []
    for worker in experiment.workers:
        source = metric_source(plan, experiment, worker, paths)
        history = MetricHistory()
        history.add(source.read_new())
        if history.records:
            runs.append(WorkerRun(worker.name, group_of(worker.name, pattern), history))
    return runs


def group_runs(runs: list[WorkerRun]) -> list[GroupSummary]:
    """Groups in order of first appearance in the plan."""
    groups: dict[str, GroupSummary] = {}
    for run in runs:
        groups.setdefault(run.group, GroupSummary(run.group)).runs.append(run)
    return list(groups.values())


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample sd with n-1; None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_sd(values: list[float], digits: int = 3) -> str:
    """ "0.812 +- 0.031" (n >= 2), "0.812" (n = 1), "-" (no values); counts as "248,362"."""
    if not values:
        return "-"
    mean, sd = mean_sd(values)
    if all(float(v).is_integer() for v in values) and abs(mean) >= 1000:  # counts
        fmt = "{:,.0f}"
        return fmt.format(mean) if sd is None else f"{fmt.format(mean)} +- {fmt.format(sd)}"
    fmt = _number_format(mean, digits)
    return fmt.format(mean) if sd is None else f"{fmt.format(mean)} +- {fmt.format(sd)}"


def _number_format(x: float, digits: int) -> str:
    if x != 0 and (abs(x) >= 10 ** (digits + 2) or abs(x) < 10 ** -(digits - 1)):
        return f"{{:.{digits}g}}"
    if abs(x) >= 100:
        return "{:.0f}"
    return f"{{:.{digits}f}}"


def default_metrics(experiment: ExperimentConfig, runs: list[WorkerRun]) -> list[str]:
    """The criteria's metrics, then every other metric the runs' last records share."""
    out: list[str] = []
    for c in experiment.criteria:
        for name in sorted(c.names):
            if name not in out:
                out.append(name)
    shared: set[str] | None = None
    for run in runs:
        keys = {k for k, v in (run.history.last or {}).items() if isinstance(v, (int, float))}
        shared = keys if shared is None else shared & keys
    out += sorted((shared or set()) - SKIP - set(out))
    return out


def markdown_table(
    groups: list[GroupSummary],
    metrics: list[str],
    best_metrics: list[str],
    direction: dict[str, bool],
) -> str:
    """Markdown: one row per group; final (and best) of each metric as mean +- sd over runs."""
    head = (
        ["group", "runs", "epochs"]
        + [f"{m} (final)" for m in metrics]
        + [f"{m} (best, {'max' if direction[m] else 'min'})" for m in best_metrics]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        epochs = sorted({r.epochs for r in g.runs})
        cells = [
            g.name,
            str(len(g.runs)),
            str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}",
        ]
        for m in metrics:
            cells.append(format_mean_sd([v for r in g.runs if (v := r.final(m)) is not None]))
        for m in best_metrics:
            cells.append(
                format_mean_sd([v for r in g.runs if (v := r.best(m, direction[m])) is not None])
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(groups: list[GroupSummary], metrics: list[str], out: Path, title: str) -> Path:
    """One panel per metric: per group the mean over runs per epoch, +-sd band (n >= 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):  # spare axes stay empty
        for i, g in enumerate(groups):
            by_x: dict[int, list[float]] = {}
            for r in g.runs:
                for x, y in zip(*r.history.series(metric), strict=True):
                    if math.isfinite(y):
                        by_x.setdefault(x, []).append(y)
            if not by_x:
                continue
            xs = sorted(by_x)
            means = [statistics.fmean(by_x[x]) for x in xs]
            sds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
            colour = f"C{i % 10}"
            ax.plot(xs, means, marker="o", ms=3, color=colour, label=f"{g.name} (n={len(g.runs)})")
            if len(xs) == 1:  # a metric logged once (e.g. a final test score): an error bar
                ax.errorbar(xs, means, yerr=sds, color=colour, capsize=4, lw=1)
            ax.fill_between(
                xs,
                [m - s for m, s in zip(means, sds, strict=True)],
                [m + s for m, s in zip(means, sds, strict=True)],
                color=colour,
                alpha=0.2,
                lw=0,
            )
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the report's arguments to ``parser`` (used by scripts/compare_runs.py and the CLI)."""
    parser.add_argument("plan", nargs="?",
                        default=os.environ.get("ORCH_PLAN") or "experiments.yaml",
                        help="plan file (default: $ORCH_PLAN or experiments.yaml)")
    parser.add_argument(
        "--experiment",
        action="append",
        default=None,
        help="experiment(s) to report (default: all of the plan's)",
    )
    parser.add_argument(
        "--group-by",
        default=DEFAULT_GROUP_BY,
        help="regex over worker names; its first capture group names the group "
        "(default strips a '-seedN' suffix)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics for the table and plot (default: the "
        "criteria's metrics, then every metric all runs' last records share)",
    )
    parser.add_argument(
        "--best",
        default=None,
        help="comma-separated metrics to also report at their best epoch "
        "(default: the criteria's metrics)",
    )
    parser.add_argument(
        "--minimize", default="", help="comma-separated metrics where lower is better"
    )
    parser.add_argument(
        "--maximize", default="", help="comma-separated metrics where higher is better"
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where report_<experiment>.md/.png go (default: the experiment's results folder)",
    )
    parser.add_argument("--no-plot", action="store_true", help="table only")
    parser.add_argument("--race", default=None, metavar="RACE_ID",
                        help="report a past race (see `history`; default: the latest)")


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def run_report(args: argparse.Namespace) -> int:
    """Print the comparison table of each experiment and write its markdown and plot.

    Returns:
        0, or 2 after an ``error:`` line (bad plan, bad regex, unknown experiment, no runs).
    """
    try:
        plan = load_plan(args.plan)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        for p in e.problems[1:] if len(e.problems) > 1 else []:
            print(f"  {p}", file=sys.stderr)
        return 2
    if getattr(args, "race", None):
        from orchestrator.core.races import find_race
        from orchestrator.errors import StateError

        try:
            race = find_race(ResultsPaths(plan.results_dir), args.race)
        except StateError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        plan = plan.model_copy(update={"results_dir": race.root})  # a race keeps the layout
    try:
        pattern = re.compile(args.group_by)
    except re.error as e:
        print(f"error: --group-by {args.group_by!r} is not a valid regex: {e}", file=sys.stderr)
        return 2
    names = [e.name for e in plan.experiments]
    wanted = args.experiment or names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"error: unknown experiment(s) {unknown}; the plan has {names}", file=sys.stderr)
        return 2
    minimize, maximize = set(_split(args.minimize)), set(_split(args.maximize))
    paths = ResultsPaths(plan.results_dir)
    reported = 0
    for experiment in (e for e in plan.experiments if e.name in wanted):
        runs = load_runs(plan, experiment, pattern)
        if not runs:
            print(
                f"{experiment.name}: no metrics yet under {paths.experiment_dir(experiment.name)}",
                file=sys.stderr,
            )
            continue
        groups = group_runs(runs)
        metrics = _split(args.metrics) or default_metrics(experiment, runs)
        best = (
            _split(args.best)
            if args.best is not None
            else [m for c in experiment.criteria for m in sorted(c.names)]
        )
        best = list(dict.fromkeys(best))
        direction = {m: higher_is_better(m, experiment, minimize, maximize) for m in metrics + best}
        table = markdown_table(groups, metrics, best, direction)
        criteria = ", ".join(str(c) for c in experiment.criteria)
        text = (
            f"## {experiment.name}\n\ncriteria: {criteria}; {len(runs)} runs in "
            f"{len(groups)} groups (mean +- sd over runs)\n\n{table}"
        )
        print(text)
        out_dir = Path(args.out_dir) if args.out_dir else paths.experiment_dir(experiment.name)
        md = out_dir / f"report_{experiment.name}.md"
        atomic_write_bytes(md, text.encode())
        if not args.no_plot:
            png = plot_curves(
                groups,
                metrics,
                out_dir / f"report_{experiment.name}.png",
                f"{experiment.name}: mean +- sd over runs",
            )
            print(f"plot: {png}")
        print(f"table: {md}\n")
        reported += 1
    if reported == 0:
        print(f"error: no worker of {wanted} has metrics under {plan.results_dir}", file=sys.stderr)
        return 2
    if not args.no_plot:
        from orchestrator.views.race_report import write_race_report

        for experiment in (e for e in plan.experiments if e.name in wanted):
            print(f"race report: {write_race_report(plan, experiment.name, progress=False)}")
    return 0
