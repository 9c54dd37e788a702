"""The runs a controller tracks in its process: a run's record (the part saved in state.json)
together with what only lives in memory (its metric source and history, its process handle,
its slot, a stop in flight), and how they are built from the plan and the saved state."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from orchestrator.core.config import ExperimentConfig, Plan, WorkerConfig, _fill
from orchestrator.core.criteria import Criterion
from orchestrator.core.environment import placeholder_values
from orchestrator.core.state import PlanState, RunRecord, RunState
from orchestrator.paths import ResultsPaths, RunPaths
from orchestrator.running.gpus import Slot
from orchestrator.running.launchers import RunHandle
from orchestrator.sources.metrics import MetricHistory, MetricSource, make_source

METRIC_PROBLEM_REPORT_S = 60.0  # report growing metric-file problems at most this often a run


@dataclass
class LiveRun:
    """A run the controller is tracking in this process."""

    record: RunRecord
    experiment: ExperimentConfig
    worker: WorkerConfig
    paths: RunPaths
    source: MetricSource
    history: MetricHistory = field(default_factory=MetricHistory)
    handle: RunHandle | None = None
    slot: Slot | None = None
    stopping: Future[Any] | None = None  # a stop in flight on a worker thread
    stop_state: RunState | None = None  # state to enter once the stop completes
    problems_reported_at: float | None = None  # last event about metric-file problems
    # check points at which a criterion metric was missing while others were reported
    unreported_checks: dict[str, int] = field(default_factory=dict)
    control_passed_at: int | None = None  # a control's first check point meeting the criteria
    prune_streak: int = 0  # hopeless evaluations in a row (orchestrator.core.pruning)
    prune_at: int | None = None  # epoch or step of the last evaluation the rule saw

    @property
    def criteria(self) -> tuple[Criterion, ...]:
        return self.experiment.criteria_for(self.worker)

    @property
    def budget(self) -> int:
        """max_epochs or max_steps, in the experiment's unit."""
        return self.experiment.budget_for(self.worker)

    def read_new(self, now: float) -> tuple[list[dict[str, Any]], list[str]]:
        """New records of this run, and the events to report about its metric file.

        A metric source never crashes the controller: a failed read is counted and reported
        once per distinct error, and what the source could not use (garbage lines, non-numeric
        values, a replaced file) is counted in the record's ``metric_problems``, reported at
        most every METRIC_PROBLEM_REPORT_S seconds. ``now`` is the controller's clock.
        """
        events = []
        try:
            new = self.source.read_new()
        except Exception as e:  # a corrupt file, a permission error, a missing package
            self.source.stats.read_errors += 1
            error = f"metrics: {e}"
            if self.record.error != error:
                self.record.error = error
                events.append(f"{self.record.key}: cannot read metrics: {e}")
            new = []
        problems = self.source.stats.as_dict()
        if problems != self.record.metric_problems:
            self.record.metric_problems = problems
            last = self.problems_reported_at
            if last is None or now - last >= METRIC_PROBLEM_REPORT_S:
                self.problems_reported_at = now
                what = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items())
                events.append(f"{self.record.key}: metric file problems (counted, skipped): {what}")
        return new, events


def live_runs(plan: Plan, state: PlanState, paths: ResultsPaths) -> dict[str, LiveRun]:
    """One LiveRun per worker of the plan (key ``experiment/worker``), with the record saved
    in ``state`` (added there when missing) and a fresh metric source over its run directory.
    The source has read nothing yet: the controller replays what is on disk."""
    out = {}
    for exp, worker in plan.workers():
        key = f"{exp.name}/{worker.name}"
        rec = state.runs.get(key)
        if rec is None:
            rec = RunRecord(exp.name, worker.name, worker.branch)
            state.runs[key] = rec
        rec.max_epochs = exp.max_epochs_for(worker)
        rec.unit = exp.unit
        rec.budget = exp.budget_for(worker)
        rec.max_time_s = exp.max_time_s_for(worker)
        rec.control = worker.control
        run_paths = paths.run(exp.name, worker.name)
        out[key] = LiveRun(rec, exp, worker, run_paths, metric_source(plan, exp, worker, paths))
    return out


def metric_source(
    plan: Plan, exp: ExperimentConfig, worker: WorkerConfig, paths: ResultsPaths
) -> MetricSource:
    """The worker's ``metrics:`` source, its ``path`` placeholders (``{worktree}``,
    ``{run_dir}``, ``{repo}`` ...) filled in; relative paths are under the run directory."""
    run_paths = paths.run(exp.name, worker.name)
    path = worker.metrics.path
    if path is not None:
        values = placeholder_values(
            plan, exp, worker, run_paths, plan.worktree_path(worker, exp), attempt=0
        )
        path = _fill(path, values)
    return make_source(
        worker.metrics.source,
        run_dir=run_paths.run_dir,
        path=path,
        pattern=worker.metrics.pattern,
        rename=worker.metrics.rename,
    )
