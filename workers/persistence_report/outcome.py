"""The data model of a decided race's success figure: per-clip eval records, workers, outcome.

Reads the plan, ``<results_dir>/state.json``, every worker's ``metrics.jsonl`` and the winner's (or
best worker's) ``evals/epoch_NNNNNN.json`` once into a :class:`RaceOutcome` (see
workers/persistence_report/report.py for the figure and report built from it).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.core.config import ExperimentConfig, Plan, WorkerConfig, load_plan
from orchestrator.core.criteria import Criterion
from orchestrator.core.ranking import best_record, missing_text
from orchestrator.core.state import ExperimentRecord, ExperimentStatus, PlanState, RunRecord
from orchestrator.errors import OrchestratorError
from orchestrator.paths import ResultsPaths, RunPaths
from orchestrator.sources.metrics import MetricHistory, make_source

_EVAL_NAME = re.compile(r"^epoch_(\d+)\.json$")


class SuccessReportError(OrchestratorError):
    """The inputs of the success figure are missing or inconsistent (one sentence + hint)."""


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
    objects_correct: float  # sum over objects of the fraction of its tokens classified right
    objects_total: int
    association: float | None = None  # own-object attention / uniform share (None: not logged)

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
                objects_correct=float(sum(float(o["correct"]) for o in objects)),
                objects_total=len(objects),
                association=None if s.get("association") is None else float(s["association"]),
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
