"""The four-panel success (or failure) figure and report of a decided early-persistence race.

    python scripts/generate_success_visualizations.py --plan experiments.yaml \
        --experiment early-persistence --run-dir results/early-persistence/contrastive

Run by the controller as the experiment's ``on_success`` hook when a race is decided; when the
race FAILED the controller passes the best worker's run directory instead, so success versus
failure is decided here from the state file (``ExperimentRecord.status``), never assumed.

Inputs (all files, see shared/DESIGN.md): the plan, ``<results_dir>/state.json``, every worker's
``metrics.jsonl`` and the winner's (or best worker's) per-clip records ``evals/epoch_NNNNNN.json``
written by workers/early_persistence.py. Outputs in ``<results_dir>/<experiment>/success_viz``:

- ``SUCCESS_VISUALIZATION.png`` (or ``FAILURE_VISUALIZATION.png``): 2x2 panels at 150 dpi under a
  banner; each panel also alone (``attention_ratio_progression.png``,
  ``before_after_comparison.png``, ``distribution_separation.png``, ``sample_level_grid.png``).
- ``SUCCESS_REPORT.md`` (or ``FAILURE_REPORT.md``): plan, criteria, winner and epoch, every metric
  with its 95% CI, the other workers' final metrics, race duration, compute saved (an estimate),
  relative links to the figures, the checkpoint and the eval records.

Statistics follow shared/ML_NOTES.md (Job A); the clip (video) is the unit everywhere:

- per-clip ratio r = mean attention received per persistent token / per transient token; clips
  without transients are excluded and counted; a clip passes when r > 1.3 (the consistency
  threshold), so the grid's pass rate is the ``consistency`` metric.
- attention shown as a_j x L (L = valid tokens of the clip): 1.0 is the uniform share 1/L, so
  clips with different token counts share one scale. Ratios and the paired test do not depend on
  it (the test uses the raw per-clip means, exactly as the worker logs ``separation_p``).
- separation: paired Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided) and the paired
  effect size d_z = mean(log r) / sd(log r).
- CIs recomputed here are percentile bootstraps over clips (scipy.stats.bootstrap, 2000
  resamples, fixed seed): val_accuracy as a clip-cluster bootstrap of correct / objects,
  consistency as a Wilson interval (scipy.stats.binomtest), d_z over clips. The attention-ratio
  CI is the worker's own (same method). Bar CIs in panel 2 are Student-t intervals of clip means.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from scipy import stats

from .config import ExperimentConfig, Plan, WorkerConfig, load_plan
from .criteria import Criterion
from .dashboard import best_record, fmt, missing_text
from .errors import OrchestratorError
from .metrics import MetricHistory, make_source
from .paths import ResultsPaths, RunPaths
from .reporting import atomic_write_bytes
from .state import ExperimentRecord, ExperimentStatus, PlanState, RunRecord, RunState

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RATIO_PASS = 1.3  # a clip passes when r > 1.3 (ML_NOTES: consistency threshold)
GRID_SAMPLES = 20  # clips drawn in panel 4 (all clips are counted)
DPI = 150
N_RESAMPLES = 2000
PANEL_FILES = {
    "ratio": "attention_ratio_progression.png",
    "before_after": "before_after_comparison.png",
    "separation": "distribution_separation.png",
    "samples": "sample_level_grid.png",
}
PERSISTENT_COLOUR, TRANSIENT_COLOUR = "#1f77b4", "#ff7f0e"
PASS_COLOUR, FAIL_COLOUR, EXCLUDED_COLOUR = "#b7e4c7", "#f4b6b6", "#dddddd"
_EVAL_NAME = re.compile(r"^epoch_(\d+)\.json$")


class SuccessReportError(OrchestratorError):
    """The inputs of the success figure are missing or inconsistent (one sentence + hint)."""


# -- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipRecord:
    """One validation clip of one evaluation (a sample of evals/epoch_NNNNNN.json).

    ``persistent``/``transient`` are the mean attention received per persistent/transient token
    (raw a_j, a share of 1); ``transient`` is None for clips without transients (excluded).
    """

    sample_id: str
    persistent: float
    transient: float | None
    num_tokens: int  # L, valid tokens of the clip
    objects_correct: int
    objects_total: int

    @property
    def ratio(self) -> float | None:
        return self.persistent / self.transient if self.transient else None

    @property
    def accuracy(self) -> float:
        return self.objects_correct / self.objects_total if self.objects_total else math.nan


@dataclass(frozen=True)
class Evaluation:
    """Per-clip records of one held-out evaluation."""

    epoch: int
    path: Path
    clips: tuple[ClipRecord, ...]
    summary: dict[str, Any]

    @property
    def paired(self) -> list[ClipRecord]:
        """Clips with both persistent and transient tokens (the ratio's sample)."""
        return [c for c in self.clips if c.transient is not None and c.transient > 0]

    def normalised(self) -> tuple[np.ndarray, np.ndarray]:
        """(persistent, transient) float64 [n_paired]: attention x L (1.0 = uniform share)."""
        p = np.array([c.persistent * c.num_tokens for c in self.paired], dtype=np.float64)
        t = np.array([(c.transient or 0.0) * c.num_tokens for c in self.paired], dtype=np.float64)
        return p, t

    def log_ratios(self) -> np.ndarray:
        """float64 [n_paired]: log r per clip."""
        return np.array([math.log(c.persistent / c.transient) for c in self.paired if c.transient])


def read_evaluation(path: Path) -> Evaluation:
    """Parse one evals/epoch_NNNNNN.json of workers/early_persistence.py.

    Raises:
        SuccessReportError: unreadable file or a sample without the fields the figure needs.
    """
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SuccessReportError(f"cannot read eval records {path}: {e}") from None
    samples = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(samples, list) or not samples:
        raise SuccessReportError(f"{path} has no 'samples' list of per-clip records")
    clips = []
    for i, s in enumerate(samples):
        try:
            objects = s["objects"]
            clips.append(ClipRecord(
                sample_id=str(s["sample_id"]),
                persistent=float(s["persistent_attention"]),
                transient=None if s["transient_attention"] is None
                else float(s["transient_attention"]),
                num_tokens=int(sum(int(o["num_tokens"]) for o in objects)),
                objects_correct=int(sum(bool(o["correct"]) for o in objects)),
                objects_total=len(objects),
            ))
        except (KeyError, TypeError, ValueError) as e:
            raise SuccessReportError(
                f"{path}: sample {i} lacks {e} (needs sample_id, persistent_attention, "
                "transient_attention and objects[].num_tokens/correct)") from None
    m = _EVAL_NAME.match(path.name)
    raw_epoch = data.get("epoch")
    epoch = int(raw_epoch) if raw_epoch is not None else int(m.group(1)) if m else -1
    return Evaluation(epoch, path, tuple(clips), dict(data.get("summary") or {}))


def eval_files(run: RunPaths) -> dict[int, Path]:
    """{epoch: path} of the run's evals/epoch_NNNNNN.json files."""
    if not run.evals.is_dir():
        return {}
    out = {}
    for p in run.evals.iterdir():
        if m := _EVAL_NAME.match(p.name):
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


@dataclass
class WorkerResult:
    """One worker of the race: its config, state record and merged metric history."""

    config: WorkerConfig
    record: RunRecord | None
    history: MetricHistory
    max_epochs: int
    criteria: tuple[Criterion, ...]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def epochs_done(self) -> int:
        if self.record is not None and self.record.epoch is not None:
            return int(self.record.epoch)
        last = self.history.last
        return int(last.get("epoch", 0)) if last else 0

    def last_with(self, metric: str) -> dict[str, Any] | None:
        """The last record holding a number for ``metric`` (the final evaluation)."""
        for r in reversed(self.history.records):
            if isinstance(r.get(metric), (int, float)):
                return r
        return None


@dataclass
class RaceOutcome:
    """Everything the figure and the report show, read from files once."""

    plan: Plan
    experiment: ExperimentConfig
    status: ExperimentRecord
    succeeded: bool
    focus: WorkerResult  # the winner, or the best worker of a failed race
    focus_metrics: dict[str, Any]  # its winning (or best) evaluation record
    missed: list[str]  # criteria the focus record misses ("attention_ratio 1.28 (need >= 1.5)")
    workers: list[WorkerResult]
    run: RunPaths
    first: Evaluation
    decisive: Evaluation  # the evaluation at the winning (or best) epoch
    unsettled: list[str]  # workers still stopping when the state was read

    @property
    def epoch(self) -> int:
        return int(self.focus_metrics.get("epoch", self.decisive.epoch))

    @property
    def kind(self) -> str:
        return "SUCCESS" if self.succeeded else "FAILURE"

    @property
    def viz_dir(self) -> Path:
        return ResultsPaths(self.plan.results_dir).success_viz_dir(self.experiment.name)

    def ratio_criterion(self) -> Criterion | None:
        for c in self.focus.criteria:
            if c.threshold is not None and c.threshold.metric == "attention_ratio":
                return c
        return None


def _worker_from_run_dir(plan: Plan, exp: ExperimentConfig, run_dir: Path) -> str:
    paths = ResultsPaths(plan.results_dir)
    run_dir = run_dir.resolve()
    for w in exp.workers:
        if paths.run(exp.name, w.name).run_dir.resolve() == run_dir:
            return w.name
    names = [w.name for w in exp.workers]
    raise SuccessReportError(
        f"{run_dir} is not a run directory of experiment {exp.name!r} "
        f"(expected {paths.experiment_dir(exp.name)}/<worker> for a worker in {names})",
        hint="pass --worker NAME instead of --run-dir")


def load_outcome(
    plan_path: str | os.PathLike[str],
    experiment: str,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    worker: str | None = None,
    wait_s: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
) -> RaceOutcome:
    """Read the plan, state and run files of a decided race.

    Args:
        plan_path: the plan file.
        experiment: the experiment (race) name.
        run_dir: the winner's (or, for a failed race, the best worker's) run directory, as the
            controller's ``{run_dir}`` placeholder gives it; optional.
        worker: the same worker by name; optional. Without either, the winner (or best) is used.
        wait_s: wait up to this many seconds for the state to show the race decided and every
            run settled (the hook starts while the losers are still being stopped).
        sleep: injected for tests.

    Raises:
        ConfigError: bad plan. StateError: no state file.
        SuccessReportError: unknown experiment/worker, undecided race, a run dir that is not
            the winner's, no metrics or no eval records.
    """
    plan = load_plan(Path(plan_path))
    names = [e.name for e in plan.experiments]
    if experiment not in names:
        raise SuccessReportError(
            f"plan {plan.source} has no experiment {experiment!r}; it has {names}")
    exp = next(e for e in plan.experiments if e.name == experiment)
    if run_dir is not None:
        from_dir = _worker_from_run_dir(plan, exp, Path(run_dir))
        if worker is not None and worker != from_dir:
            raise SuccessReportError(f"--worker {worker!r} disagrees with --run-dir {run_dir} "
                                     f"(the run directory of {from_dir!r})")
        worker = from_dir
    if worker is not None and worker not in [w.name for w in exp.workers]:
        raise SuccessReportError(f"experiment {experiment!r} has no worker {worker!r}; it has "
                                 f"{[w.name for w in exp.workers]}")
    paths = ResultsPaths(plan.results_dir)
    deadline = time.monotonic() + wait_s
    while True:
        state = PlanState.load(paths.state)
        erec = state.experiments.get(experiment)
        runs = {w.name: state.runs.get(f"{experiment}/{w.name}") for w in exp.workers}
        decided = erec is not None and erec.status != ExperimentStatus.running
        unsettled = [n for n, r in runs.items() if r is not None and not r.state.terminal]
        if (decided and not unsettled) or time.monotonic() >= deadline:
            break
        sleep(0.5)
    if erec is None or not decided:
        raise SuccessReportError(
            f"experiment {experiment!r} is not decided yet (no winner, not failed)",
            hint="run this after the race ends, or pass --wait-s to wait for it")
    workers = []
    for w in exp.workers:
        run = paths.run(exp.name, w.name)
        src = make_source(w.metrics.source, run_dir=run.run_dir, path=w.metrics.path,
                          pattern=w.metrics.pattern)
        hist = MetricHistory()
        hist.add(src.read_new())
        workers.append(
            WorkerResult(w, runs[w.name], hist, exp.max_epochs_for(w), exp.criteria_for(w)))
    by_name = {w.name: w for w in workers}
    succeeded = erec.status == ExperimentStatus.succeeded
    if succeeded:
        assert erec.winner is not None
        if worker is not None and worker != erec.winner:
            raise SuccessReportError(f"the race was won by {erec.winner!r}, not {worker!r}",
                                     hint="pass the winner's run directory (or no --run-dir)")
        focus = by_name[erec.winner]
        record = next((r for r in focus.history.records if r.get("epoch") == erec.winner_epoch),
                      dict(erec.winner_metrics))
    else:
        if worker is None:
            scored = [(b[0], b[1], w.name) for w in workers
                      if w.history.records and (b := best_record(exp, w.criteria, w.history))]
            if not scored:
                raise SuccessReportError(f"no worker of {experiment!r} wrote any metrics")
            worker = max(scored)[2]
        focus = by_name[worker]
        best = best_record(exp, focus.criteria, focus.history) if focus.history.records else None
        if best is None:
            raise SuccessReportError(
                f"worker {worker!r} wrote no metrics ({paths.run(exp.name, worker).metrics})")
        record = best[2]
    run = paths.run(exp.name, focus.name)
    evals = eval_files(run)
    if not evals:
        raise SuccessReportError(
            f"no per-clip eval records in {run.evals}",
            hint="the figure needs evals/epoch_NNNNNN.json (Reporter.write_eval) from the worker")
    epoch = int(record.get("epoch", max(evals)))
    at_or_before = [e for e in evals if e <= epoch]
    decisive = read_evaluation(evals[at_or_before[-1] if at_or_before else min(evals)])
    first = read_evaluation(evals[min(evals)])
    missed = [] if succeeded else missing_text(focus.criteria, record)
    return RaceOutcome(plan, exp, erec, succeeded, focus, dict(record), missed, workers, run,
                       first, decisive, unsettled)


# -- statistics -------------------------------------------------------------------------------


def _bootstrap_ci(data: Sequence[np.ndarray], statistic: Callable[..., Any],
                  paired: bool = False) -> tuple[float, float] | None:
    """Percentile bootstrap 95% CI over clips, or None (fewer than 5 clips, no spread, or a
    statistic that is not finite on some resamples, e.g. d_z of a resample without spread)."""
    if len(data[0]) < 5 or all(np.ptp(d) == 0 for d in data):
        return None
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-finite resamples: checked below
        res = stats.bootstrap(tuple(data), statistic, n_resamples=N_RESAMPLES, method="percentile",
                              paired=paired, vectorized=True, rng=np.random.default_rng(0))
    if not np.all(np.isfinite(res.bootstrap_distribution)):
        return None
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


@dataclass(frozen=True)
class Separation:
    """Paired comparison of per-clip persistent vs transient attention at one evaluation."""

    n: int  # clips with transients
    n_excluded: int  # clips without transients
    p_value: float | None  # two-sided Wilcoxon signed-rank
    statistic: float | None
    d_z: float | None  # mean(log r) / sd(log r)
    d_z_ci: tuple[float, float] | None
    frac_above_1: float | None
    geo_mean_ratio: float | None


def separation(ev: Evaluation) -> Separation:
    """Wilcoxon signed-rank test and d_z from the per-clip records (the worker's definitions)."""
    pairs = ev.paired
    n = len(pairs)
    log_r = ev.log_ratios()
    p = np.array([c.persistent for c in pairs])
    t = np.array([c.transient or 0.0 for c in pairs])
    p_value = stat = d_z = None
    d_z_ci = None
    if n >= 2 and np.any(p != t):
        res = stats.wilcoxon(p, t)
        p_value, stat = float(res.pvalue), float(res.statistic)
    elif n >= 2:
        p_value = 1.0
    if n >= 3 and np.ptp(log_r) > 0:
        d_z = float(log_r.mean() / log_r.std(ddof=1))
        d_z_ci = _bootstrap_ci([log_r], lambda x, axis: x.mean(axis) / x.std(axis=axis, ddof=1))
    return Separation(
        n=n, n_excluded=len(ev.clips) - n, p_value=p_value, statistic=stat, d_z=d_z, d_z_ci=d_z_ci,
        frac_above_1=float(np.mean(log_r > 0)) if n else None,
        geo_mean_ratio=float(np.exp(log_r.mean())) if n else None,
    )


def metric_cis(ev: Evaluation) -> dict[str, tuple[float, float] | None]:
    """95% CIs recomputed from the per-clip records: val_accuracy, consistency, effect_size_dz."""
    correct = np.array([c.objects_correct for c in ev.clips], dtype=np.float64)
    total = np.array([c.objects_total for c in ev.clips], dtype=np.float64)
    acc = _bootstrap_ci([correct, total], lambda c, n, axis: c.sum(axis) / n.sum(axis), paired=True)
    n = len(ev.paired)
    k = int(np.sum(ev.log_ratios() > math.log(RATIO_PASS)))
    cons = None
    if n:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        cons = (float(ci.low), float(ci.high))
    return {"val_accuracy": acc, "consistency": cons, "effect_size_dz": separation(ev).d_z_ci}


def mean_t_ci(x: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): Student-t 95% interval of the mean (low = high = mean for n < 2)."""
    m = float(np.mean(x)) if len(x) else math.nan
    if len(x) < 2 or np.ptp(x) == 0:
        return m, m, m
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=m, scale=stats.sem(x))
    return m, float(lo), float(hi)


@dataclass(frozen=True)
class ComputeRow:
    """Slot time one worker used, and the estimate of running it to max_epochs."""

    worker: str
    state: str
    epochs_done: int
    max_epochs: int
    busy_s: float  # wall seconds holding a slot (GPU-seconds on a GPU slot)
    cpu_s: float
    full_busy_s: float | None  # estimate: busy_s / epochs_done x max_epochs
    full_cpu_s: float | None
    note: str

    @property
    def saved_busy_s(self) -> float:
        return max(0.0, (self.full_busy_s or self.busy_s) - self.busy_s)

    @property
    def saved_cpu_s(self) -> float:
        return max(0.0, (self.full_cpu_s or self.cpu_s) - self.cpu_s)


def compute_savings(outcome: RaceOutcome) -> list[ComputeRow]:
    """Per worker: slot-seconds used, and an estimate of the slot-seconds to reach max_epochs.

    Only runs the race ended early (stopped, cancelled, and the winner stopped at its win) save
    anything; exhausted and failed runs ran their course. The estimate scales the run's measured
    seconds per epoch (start-up and evaluations included) to max_epochs; a cancelled run, which
    never started, takes the median seconds per epoch of the others.
    """
    rates = [(w.record.busy_s / w.epochs_done, w.record.cpu_s / w.epochs_done)
             for w in outcome.workers if w.record is not None and w.epochs_done > 0]
    median_busy = float(np.median([r[0] for r in rates])) if rates else None
    median_cpu = float(np.median([r[1] for r in rates])) if rates else None
    rows = []
    for w in outcome.workers:
        rec = w.record
        state = rec.state.value if rec is not None else "never started"
        busy, cpu = (rec.busy_s, rec.cpu_s) if rec is not None else (0.0, 0.0)
        done = w.epochs_done if rec is not None else 0
        won = rec is not None and rec.state == RunState.succeeded and outcome.succeeded
        early_states = (RunState.stopped, RunState.cancelled)
        ended_early = won or (rec is not None and rec.state in early_states)
        full_busy = full_cpu = None
        note = "ran its course" if rec is not None and rec.state.terminal else "still stopping"
        if ended_early and done > 0:
            full_busy = busy / done * w.max_epochs
            full_cpu = cpu / done * w.max_epochs
            note = f"{done} of {w.max_epochs} epochs; {busy / done:,.1f} s/epoch measured"
        elif ended_early and median_busy is not None and median_cpu is not None:
            full_busy = busy + median_busy * (w.max_epochs - done)
            full_cpu = cpu + median_cpu * (w.max_epochs - done)
            note = "never trained: median s/epoch of the others"
        if won:
            note = "winner, stopped at its win; " + note
        rows.append(
            ComputeRow(w.name, state, done, w.max_epochs, busy, cpu, full_busy, full_cpu, note))
    return rows


# -- figure -----------------------------------------------------------------------------------


@dataclass
class FigureSet:
    """The combined 2x2 figure and each panel alone, keyed like PANEL_FILES."""

    combined: Figure
    panels: dict[str, Figure]


def caution(metrics: dict[str, Any]) -> str | None:
    """A warning when val_accuracy does not beat the majority-class baseline (ML_NOTES)."""
    acc, majority = metrics.get("val_accuracy"), metrics.get("majority_accuracy")
    if isinstance(acc, (int, float)) and isinstance(majority, (int, float)) and acc <= majority:
        return (f"caution: val accuracy {fmt(acc)} does not beat the majority-class baseline "
                f"{fmt(majority)}")
    return None


def banner_text(outcome: RaceOutcome) -> str:
    """Two or three lines: what was achieved (or which criteria the best worker missed)."""
    m = outcome.focus_metrics
    warn = caution(m)
    tail = f"\n{warn}" if warn and outcome.succeeded else ""
    if outcome.succeeded:
        crit = len(outcome.focus.criteria)
        ci = ""
        lo, hi = m.get("attention_ratio_ci_low"), m.get("attention_ratio_ci_high")
        if lo is not None and hi is not None:
            ci = f" [95% CI {fmt(lo)}-{fmt(hi)}]"
        return (f"SUCCESS: {outcome.focus.name} met all {crit} criteria at epoch {outcome.epoch} "
                f"(of max {outcome.focus.max_epochs})"
                + ("; race stopped early\n" if outcome.epoch < outcome.focus.max_epochs else "\n")
                + f"attention ratio {fmt(m.get('attention_ratio'))}x{ci}, val accuracy "
                f"{fmt(m.get('val_accuracy'))}, consistency {fmt(m.get('consistency'))}, "
                f"separation p {fmt(m.get('separation_p'))}{tail}")
    return (f"FAILURE: no worker met the criteria (max {outcome.experiment.max_epochs} epochs). "
            f"Best: {outcome.focus.name} at epoch {outcome.epoch}\n"
            f"missed: {'; '.join(outcome.missed) or 'none (see report)'}")


def _draw_ratio(ax: Axes, o: RaceOutcome) -> None:
    """Panel 1: attention ratio (geometric mean over val clips, 95% CI band) vs epoch."""
    crit = o.ratio_criterion()
    ys_all: list[float] = [1.0]
    for i, w in enumerate(o.workers):
        xs, ys = w.history.series("attention_ratio")
        if not xs:  # stopped before its first evaluation: named, not drawn
            ax.plot([], [], color=f"C{i % 10}", label=f"{w.name} (no evaluation)")
            continue
        focus = w is o.focus
        colour = f"C{i % 10}"
        ax.plot(xs, ys, marker="o", ms=4 if focus else 3, lw=2.4 if focus else 1.3, color=colour,
                label=w.name + ((" (winner)" if o.succeeded else " (best)") if focus else ""),
                zorder=3 if focus else 2)
        lo = dict(zip(*w.history.series("attention_ratio_ci_low"), strict=True))
        hi = dict(zip(*w.history.series("attention_ratio_ci_high"), strict=True))
        band = [x for x in xs if x in lo and x in hi]
        if band:
            ax.fill_between(band, [lo[x] for x in band], [hi[x] for x in band], color=colour,
                            alpha=0.15, lw=0)
            ys_all += [hi[x] for x in band] + [lo[x] for x in band]
        ys_all += ys
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="uniform attention (r = 1)")
    if crit is not None and crit.threshold is not None and crit.threshold.value > 0:
        thr = crit.threshold
        ys_all.append(thr.value)
        ax.axhline(thr.value, color="black", ls="--", lw=1.2, label=f"threshold: {crit.source}")
    # log scale: ratios are multiplicative (a supervised ratio can reach 100s while others sit
    # at 1.0); limits from the positive values only
    from matplotlib.ticker import FuncFormatter

    positive = [v for v in ys_all if v > 0]
    y_lo, y_hi = min(positive) / 1.15, max(positive) * 1.15
    ax.set_yscale("log")
    ax.set_ylim(y_lo, y_hi)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if y_hi / y_lo < 30:  # less than ~1.5 decades: label the minor ticks too
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    if crit is not None and crit.threshold is not None and crit.threshold.value > 0:
        thr = crit.threshold
        zone = (thr.value, y_hi) if thr.higher_is_better else (y_lo, thr.value)
        ax.axhspan(*zone, color="green", alpha=0.08, lw=0)
        up = thr.higher_is_better
        ax.text(0.01, 0.97 if up else 0.03, "success zone", transform=ax.transAxes,
                color="darkgreen", fontsize=8, va="top" if up else "bottom")
    y = o.focus_metrics.get("attention_ratio")
    if isinstance(y, (int, float)):
        marker = "*" if o.succeeded else "X"
        what = "won" if o.succeeded else "best"
        ax.axvline(o.epoch, color="darkgreen" if o.succeeded else "darkred", ls="-.", lw=1,
                   alpha=0.6)
        ax.plot([o.epoch], [y], marker=marker, ms=16 if o.succeeded else 11, color="gold" if
                o.succeeded else "darkred", mec="black", zorder=5, ls="none",
                label=f"{o.focus.name} {what} at epoch {o.epoch} (r = {fmt(y)})")
    last_x = max((x for w in o.workers for x in w.history.series("attention_ratio")[0]), default=0)
    ax.set_xlim(0, max(last_x, *(w.max_epochs for w in o.workers)) + 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("attention ratio r (geo. mean over clips, log scale)")
    ax.set_title("1. Attention ratio vs epoch, every worker (band: 95% CI)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="best")


def _draw_before_after(ax: Axes, o: RaceOutcome) -> None:
    """Panel 2: mean persistent vs transient attention (x uniform) at first and decisive eval.

    When the decisive evaluation is the first one there is no "before": one group is drawn and
    the panel says so (the dotted line, uniform attention, is the untrained-like reference).
    """
    which = "winning" if o.succeeded else "best"
    evals = [(f"{which} evaluation", o.decisive)]
    if o.first.epoch != o.decisive.epoch:
        evals.insert(0, ("first evaluation", o.first))
    rng = np.random.default_rng(0)
    width = 0.36
    top = 1.0
    for g, (_, ev) in enumerate(evals):
        p, t = ev.normalised()
        for k, (vals, colour, kind) in enumerate(((p, PERSISTENT_COLOUR, "persistent"),
                                                  (t, TRANSIENT_COLOUR, "transient"))):
            m, lo, hi = mean_t_ci(vals)
            x = g + (k - 0.5) * width
            ax.bar([x], [m], width * 0.9, color=colour, alpha=0.85, label=kind if g == 0 else None,
                   yerr=[[m - lo], [hi - m]], capsize=4, error_kw={"lw": 1.2})
            ax.scatter(x + rng.uniform(-0.1, 0.1, len(vals)), vals, s=6, color="black",
                       alpha=0.35, zorder=3, lw=0)
            top = max(top, hi, float(vals.max()) if len(vals) else 0.0)
    for g, (_, ev) in enumerate(evals):
        sep = separation(ev)
        ax.text(g, top * 1.02, f"geo-mean of clip ratios r = {fmt(sep.geo_mean_ratio)}x\n"
                f"n = {sep.n} clips", ha="center", va="bottom", fontsize=8)
    right = len(evals) - 0.4
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.text(right - 0.3, 1.0, " uniform", va="bottom", fontsize=7, color="grey")
    ax.set_xticks(range(len(evals)), [f"{label}\n(epoch {ev.epoch})" for label, ev in evals])
    if len(evals) == 1:
        ax.text(0.5, 0.75, f"no evaluation before epoch {o.decisive.epoch}:\nnothing to compare "
                "with (the worker's first\nevaluation decided the race)", transform=ax.transAxes,
                ha="center", va="center", fontsize=8, color="0.3")
    ax.set_xlim(-0.6, right)
    ax.set_ylim(0, top * 1.25)
    ax.set_ylabel("attention per token / uniform share\n(bar: mean over clips, 95% CI; dot: clip)")
    ax.set_title("2. Before/after: attention per object type", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, axis="y")


def _draw_separation(ax: Axes, o: RaceOutcome) -> None:
    """Panel 3: per-clip persistent vs transient attention, paired lines, Wilcoxon p and d_z."""
    from matplotlib.collections import LineCollection

    ev = o.decisive
    p, t = ev.normalised()
    sep = separation(ev)
    if len(p) >= 2:
        parts = ax.violinplot([t, p], positions=[0, 1], widths=0.7, showmeans=False,
                              showmedians=True, showextrema=False)
        bodies: list[Any] = list(cast(Any, parts["bodies"]))
        for body, colour in zip(bodies, (TRANSIENT_COLOUR, PERSISTENT_COLOUR), strict=True):
            body.set_facecolor(colour)
            body.set_alpha(0.35)
        parts["cmedians"].set_color("black")
    segs = [((0.0, ti), (1.0, pi)) for pi, ti in zip(p, t, strict=True)]
    colours = ["#2a9d8f" if pi > ti else "#c0392b" for pi, ti in zip(p, t, strict=True)]
    lines = LineCollection(segs, colors=colours, lw=0.8, alpha=0.6, gid="paired-clips")
    ax.add_collection(lines)
    ax.scatter(np.zeros(len(t)), t, s=10, color=TRANSIENT_COLOUR, zorder=3)
    ax.scatter(np.ones(len(p)), p, s=10, color=PERSISTENT_COLOUR, zorder=3)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xticks([0, 1], ["transient objects", "persistent objects"])
    ax.set_xlim(-0.6, 1.6)
    lo = float(min(p.min(initial=1.0), t.min(initial=1.0)))
    hi = float(max(p.max(initial=1.0), t.max(initial=1.0)))
    span = max(hi - lo, 0.1)
    ax.set_ylim(max(0.0, lo - 0.1 * span), hi + 0.45 * span)  # room for the text box
    ax.set_ylabel("attention per token / uniform share (1 = uniform)")
    dz = "n/a" if sep.d_z is None else fmt(sep.d_z)
    if sep.d_z_ci is not None:
        dz += f" [95% CI {fmt(sep.d_z_ci[0])}, {fmt(sep.d_z_ci[1])}]"
    text = (f"paired Wilcoxon signed-rank, n = {sep.n} clips"
            + (f" ({sep.n_excluded} without transients excluded)" if sep.n_excluded else "")
            + f"\np = {fmt(sep.p_value)}   effect size d_z = {dz}"
            + f"\nclips with persistent > transient: {sep.frac_above_1:.0%} (green lines)"
            + "\nviolins: distribution over clips, black bar: median"
            if sep.n else
            "no clip has transient objects: no paired test")
    ax.text(0.5, 0.98, text, transform=ax.transAxes, ha="center", va="top", fontsize=7.5,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.6"})
    ax.set_title(f"3. Distribution separation at epoch {ev.epoch} (one line per clip)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")


def _draw_samples(ax: Axes, o: RaceOutcome) -> None:
    """Panel 4: the first 20 val clips (by sample id) as tiles; the footer counts all clips."""
    from matplotlib.patches import Rectangle

    ev = o.decisive
    clips = sorted(ev.clips, key=lambda c: c.sample_id)
    shown = clips[:GRID_SAMPLES]
    cols = 5
    rows = max(1, math.ceil(len(shown) / cols))
    for i, c in enumerate(shown):
        x, y = i % cols, rows - 1 - i // cols
        r = c.ratio
        if r is None:
            colour, status = EXCLUDED_COLOUR, "no transient"
        else:
            colour, status = (PASS_COLOUR, "PASS") if r > RATIO_PASS else (FAIL_COLOUR, "FAIL")
        ax.add_patch(Rectangle((x + 0.04, y + 0.04), 0.92, 0.92, fc=colour, ec="0.5", lw=0.6,
                               gid=f"sample:{c.sample_id}"))
        ax.text(x + 0.5, y + 0.76, c.sample_id, ha="center", va="center", fontsize=6.5,
                weight="bold")
        ax.text(x + 0.5, y + 0.52, f"acc {c.accuracy:.0%}  r {'-' if r is None else fmt(r)}x",
                ha="center", va="center", fontsize=6.5)
        ax.text(x + 0.5, y + 0.26, status, ha="center", va="center", fontsize=7,
                color="darkgreen" if status == "PASS" else "darkred" if status == "FAIL" else "0.3")
    n_pair = len(ev.paired)
    n_pass = sum(1 for c in ev.paired if (c.ratio or 0) > RATIO_PASS)
    acc = sum(c.objects_correct for c in ev.clips) / max(1, sum(c.objects_total for c in ev.clips))
    sep = separation(ev)
    footer = f"all {len(ev.clips)} val clips: " + (
        f"{n_pass}/{n_pair} pass r > {RATIO_PASS} ({n_pass / n_pair:.0%})" if n_pair
        else "none has transients")
    footer += (f"; {len(ev.clips) - n_pair} excluded (no transient)\nobject accuracy {acc:.1%}, "
               f"geo-mean r {fmt(sep.geo_mean_ratio)}x; tiles: first {len(shown)} clips by id\n"
               f"acc: share of the clip's objects classified correctly; PASS: r > {RATIO_PASS}")
    ax.text(cols / 2, -0.12, footer, ha="center", va="top", fontsize=7.5)
    ax.set_xlim(0, cols)
    ax.set_ylim(-1.2, rows)
    ax.set_aspect("auto")
    ax.axis("off")
    ax.set_title(f"4. Sample-level grid at epoch {ev.epoch}: {len(shown)} of {len(ev.clips)} "
                 f"val clips shown", fontsize=10)


_DRAW = {"ratio": _draw_ratio, "before_after": _draw_before_after, "separation": _draw_separation,
         "samples": _draw_samples}


def build_figures(outcome: RaceOutcome) -> FigureSet:
    """The 2x2 figure under its banner, and each panel alone (matplotlib Figure objects, Agg)."""
    from matplotlib.figure import Figure

    colour = "#d8f3dc" if outcome.succeeded else "#ffd6d6"
    edge = "darkgreen" if outcome.succeeded else "darkred"
    head = f"{outcome.experiment.name}: " + banner_text(outcome)
    combined = Figure(figsize=(14, 11), layout="constrained")
    combined.suptitle(head, fontsize=11.5, weight="bold", color=edge,
                      bbox={"boxstyle": "round", "fc": colour, "ec": edge})
    axes = combined.subplots(2, 2).ravel()
    for ax, draw in zip(axes, _DRAW.values(), strict=True):
        draw(ax, outcome)
    panels = {}
    for key, draw in _DRAW.items():
        fig = Figure(figsize=(7, 5.5), layout="constrained")
        fig.suptitle(f"{outcome.experiment.name} / {outcome.focus.name}: {outcome.kind}",
                     fontsize=9, color=edge)
        draw(fig.subplots(), outcome)
        panels[key] = fig
    return FigureSet(combined, panels)


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


# -- report -----------------------------------------------------------------------------------


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _utc(t: float | None) -> str:
    if t is None:
        return "unknown"
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci is not None else "—"


def checkpoint_for(outcome: RaceOutcome) -> tuple[Path | None, str]:
    """The checkpoint of the winning (or best) epoch if kept, else the latest; and a note."""
    import json

    ckpts = outcome.run.checkpoints
    step = outcome.focus_metrics.get("step")
    for path in sorted(ckpts.glob("epoch_*.pt")) + [outcome.run.latest_checkpoint]:
        side = path.with_suffix(".json")
        if not path.exists() or not side.exists():
            continue
        try:
            info = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if info.get("epoch") == outcome.epoch and (step is None or info.get("step") == step):
            return path, (f"weights of the evaluated model (epoch {outcome.epoch}, "
                          f"step {info.get('step')})")
    latest = outcome.run.latest_checkpoint
    if latest.exists():
        try:
            info = json.loads(outcome.run.latest_checkpoint_info.read_text())
        except (OSError, ValueError):
            info = {}
        return latest, (f"latest checkpoint (epoch {info.get('epoch')}, step {info.get('step')}); "
                        f"the one of the evaluated step {step} was not kept, so these weights are "
                        "not exactly the evaluated model")
    return None, "no checkpoint was written"


def render_report(outcome: RaceOutcome, files: dict[str, Path], *, now: float) -> str:
    """SUCCESS_REPORT.md / FAILURE_REPORT.md text; a pure function of its inputs and ``now``.

    Args:
        files: "figure" and the PANEL_FILES keys -> paths of the written PNGs.
        now: Unix time printed as the generation time (injected so the text is reproducible).
    """
    o, exp, m = outcome, outcome.experiment, outcome.focus_metrics
    base = files["figure"].parent
    plan_name = _rel(o.plan.source, o.plan.repo) if o.plan.source else "?"
    lines: list[str] = []
    if o.succeeded:
        lines.append(
            f"# SUCCESS: {exp.name}: {o.focus.name} met every criterion at epoch {o.epoch}")
    else:
        lines.append(f"# FAILURE: {exp.name}: no worker met the criteria")
    lines += ["", f"Generated {_utc(now)} by scripts/generate_success_visualizations.py from the "
              f"plan `{plan_name}`, the state file and the workers' metrics and per-clip records.",
              "", f"![{o.kind.lower()} figure]({_rel(files['figure'], base)})", "",
              "> " + banner_text(o).replace("\n", "\n>\n> "), ""]
    if o.unsettled:
        lines += [f"Note: {', '.join(o.unsettled)} had not finished stopping when this was written;"
                  " "
                  "their compute numbers include the time up to then.", ""]
    lines += ["## Plan", "", f"- plan file: `{plan_name}`; experiment `{exp.name}`, "
              f"{len(exp.workers)} workers, max {exp.max_epochs} epochs, criteria checked at "
              f"epochs that are multiples of {exp.check_every}",
              f"- workers: {', '.join(f'`{w.name}` ({w.config.branch})' for w in o.workers)}", ""]
    who = "Winner" if o.succeeded else "Best worker"
    lines += [f"## Criteria ({'all met' if o.succeeded else 'missed: ' + '; '.join(o.missed)})", "",
              f"| criterion | {o.focus.name} at epoch {o.epoch} | pass |", "|---|---|---|"]
    for c in o.focus.criteria:
        vals = ", ".join(f"{n} = {fmt(m.get(n))}" for n in sorted(c.names))
        lines.append(f"| `{c.source}` | {vals} | {'yes' if c.evaluate(m) else 'NO'} |")
    ckpt, ckpt_note = checkpoint_for(o)
    lines += ["", f"## {who}: `{o.focus.name}` at epoch {o.epoch} of {o.focus.max_epochs}", "",
              f"- branch `{o.focus.config.branch}`; run directory `{_rel(o.run.run_dir, base)}`",
              "- checkpoint: " + (f"[{_rel(ckpt, base)}]({_rel(ckpt, base)}) ({ckpt_note})"
                                  if ckpt else ckpt_note),
              f"- per-clip records: [{_rel(o.decisive.path, base)}]({_rel(o.decisive.path, base)})"
              f" (epoch {o.decisive.epoch}); metrics: [{_rel(o.run.metrics, base)}]"
              f"({_rel(o.run.metrics, base)})", ""]
    sep = separation(o.decisive)
    cis = metric_cis(o.decisive)
    lines += ["## Every metric of that evaluation (held-out val split)", "",
              "| metric | value | 95% CI | CI method |", "|---|---|---|---|"]
    skip = {"epoch", "step", "time_s", "attempt", "attention_ratio_ci_low",
            "attention_ratio_ci_high"}
    for key in sorted(k for k in m if k not in skip):
        ci, how = None, ""
        if key == "attention_ratio" and m.get("attention_ratio_ci_low") is not None:
            ci, how = (m["attention_ratio_ci_low"], m["attention_ratio_ci_high"]), \
                "worker's percentile bootstrap over clips (log r)"
        elif key == "val_accuracy":
            ci, how = cis["val_accuracy"], "clip-cluster bootstrap of correct/objects"
        elif key == "consistency":
            ci, how = cis["consistency"], f"Wilson, {sep.n} clips"
        elif key == "effect_size_dz":
            ci, how = cis["effect_size_dz"], "bootstrap over clips"
        elif key == "separation_p":
            how = f"p-value (Wilcoxon signed-rank, n = {sep.n} clips); no CI"
        lines.append(f"| {key} | {fmt(m[key])} | {_ci(ci)} | {how or '—'} |")
    lines += ["", f"Recomputed from the per-clip records: Wilcoxon p = {fmt(sep.p_value)} "
              f"(statistic {fmt(sep.statistic)}), d_z = {fmt(sep.d_z)}, geometric-mean ratio "
              f"{fmt(sep.geo_mean_ratio)}, {sep.n_excluded} clips excluded (no transients).", ""]
    metrics = list(dict.fromkeys(n for c in exp.criteria for n in sorted(c.names)))
    lines += ["## Other workers (their final evaluation)", "",
              "| worker | state | epochs | " + " | ".join(metrics) + " | stop reason |",
              "|---|---|---|" + "---|" * len(metrics) + "---|"]
    for w in o.workers:
        if w is o.focus:
            continue
        last = next((r for r in (w.last_with(n) for n in metrics) if r is not None), None) or {}
        state = w.record.state.value if w.record else "never started"
        reason = (w.record.stop_reason if w.record else None) or "—"
        lines.append(f"| {w.name} | {state} | {w.epochs_done}/{w.max_epochs} | "
                     + " | ".join(fmt(last.get(n)) for n in metrics) + f" | {reason} |")
    rows = compute_savings(o)
    started, decided = o.status.started_at, o.status.decided_at
    used = sum(r.busy_s for r in rows)
    full = sum(r.full_busy_s if r.full_busy_s is not None else r.busy_s for r in rows)
    saved, saved_cpu = sum(r.saved_busy_s for r in rows), sum(r.saved_cpu_s for r in rows)
    lines += ["", "## Race duration and compute", "",
              f"- started {_utc(started)}, decided {_utc(decided)}: "
              f"{_duration(decided - started if started and decided else None)}",
              f"- slot-seconds used (wall time holding a slot; GPU-seconds on GPU slots): "
              f"{_secs(used)} s; estimated to run every worker to max_epochs: {_secs(full)} s",
              f"- **estimated compute saved by stopping early: {_secs(saved)} slot-seconds"
              + (f" ({saved / full:.0%})" if full > 0 else "")
              + f", {_secs(saved_cpu)} CPU-seconds**",
              "", "| worker | state | epochs | slot-s used | slot-s to max_epochs (est.) "
              "| saved (est.) | CPU-s used | CPU-s saved (est.) | basis |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.worker} | {r.state} | {r.epochs_done}/{r.max_epochs} | "
                     f"{_secs(r.busy_s)} | "
                     f"{_secs(r.full_busy_s)} | {_secs(r.saved_busy_s)} | {_secs(r.cpu_s)} | "
                     f"{_secs(r.saved_cpu_s)} | {r.note} |")
    lines += ["", "These savings are an ESTIMATE: each stopped run's measured seconds per epoch so "
              "far (start-up and evaluations included) times the epochs it did not run; runs that "
              "ended on their own save nothing.", "", "## Files", ""]
    lines.append(f"- [the 2x2 figure]({_rel(files['figure'], base)})")
    for key, title in (("ratio", "1. attention ratio vs epoch"),
                       ("before_after", "2. before/after per object type"),
                       ("separation", "3. distribution separation"),
                       ("samples", "4. sample-level grid")):
        lines.append(f"- [{title}]({_rel(files[key], base)})")
    if ckpt is not None:
        lines.append(f"- [{who.lower()}'s checkpoint]({_rel(ckpt, base)})")
    return "\n".join(lines) + "\n"


def write_outputs(outcome: RaceOutcome, out_dir: Path | None = None, *,
                  now: float | None = None) -> dict[str, Path]:
    """Render the figures and the report into ``out_dir`` (default: the experiment's success_viz).

    Files of the other kind (FAILURE_* after a success, and vice versa) are removed so the
    dashboard never links a stale verdict.

    Returns:
        {"figure", "report", and the PANEL_FILES keys: path}.
    """
    out = Path(out_dir) if out_dir is not None else outcome.viz_dir
    out.mkdir(parents=True, exist_ok=True)
    figs = build_figures(outcome)
    files = {"figure": _save(figs.combined, out / f"{outcome.kind}_VISUALIZATION.png")}
    for key, fig in figs.panels.items():
        files[key] = _save(fig, out / PANEL_FILES[key])
    report = render_report(outcome, files, now=time.time() if now is None else now)
    files["report"] = out / f"{outcome.kind}_REPORT.md"
    atomic_write_bytes(files["report"], report.encode())
    other = "FAILURE" if outcome.succeeded else "SUCCESS"
    for name in (f"{other}_VISUALIZATION.png", f"{other}_REPORT.md"):
        (out / name).unlink(missing_ok=True)
    return files
