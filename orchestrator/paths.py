"""Every file location of a plan's results, in one place (in the spirit of submitit's JobPaths).

Layout under the plan's results directory::

    results/
      state.json                      controller state (atomic rewrite after every change)
      controller.lock                 flock held by the live controller
      events.jsonl                    append-only event log (launches, exits, decisions)
      software.json pip_freeze.txt    what this race ran with (written once per race)
      races/<race-id>/                earlier races, moved here whole when a new race starts
      reruns/<race-id>/<exp>/<worker>/  `rerun --race ID`: a worker of an earlier race run again
                                      at that race's commit (the race's own files stay as they were)
      control/stop.json               stop requests from `orchestrator stop` in another shell
      <experiment>/
        <worker>/                     the run directory (ORCH_RUN_DIR), shared by all attempts
          metrics.jsonl checkpoints/ evals/     written by the worker (orchestrator.reporting)
          stdout.log stderr.log                 appended by every attempt
          attempts/0001.exit.json               exit status written by the launch wrapper
          attempts/0001.provenance.json         commit, behind-count, argv, env, host, software
          attempts/0001.diff                    uncommitted work (only with allow_dirty: true)
        race_report/                  RACE_REPORT.md + figures, written at every decision/failure
        _winner/                      the winner's pinned checkpoint + winner.json ('_': no
                                      worker name starts with it, so it never meets a run dir)
        success_viz/                  the job's own figures and reports (its on_success hook)

Run directories live outside the worktrees: ``git worktree remove`` deletes ignored files.
No other module joins path strings for these files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.reporting import CHECKPOINT_DIR, EVALS_DIR, LATEST, METRICS_FILE

# Folders at the top of the results directory that are not experiments: no experiment may be
# named so (the plan loader refuses it).
RESERVED_NAMES = frozenset({"races", "reruns", "control", "crashes"})
# Folders of an experiment's results that are not run directories: no worker may be named so.
RESERVED_WORKER_NAMES = frozenset({"race_report", "success_viz"})


@dataclass(frozen=True)
class ResultsPaths:
    """Locations shared by the whole plan. ``root`` is the absolute results directory."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def lock(self) -> Path:
        return self.root / "controller.lock"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def control_dir(self) -> Path:
        return self.root / "control"

    @property
    def stop_request(self) -> Path:
        return self.control_dir / "stop.json"

    @property
    def software(self) -> Path:
        """Python/torch/CUDA/driver versions of the race (``core.provenance``)."""
        return self.root / "software.json"

    @property
    def pip_freeze(self) -> Path:
        return self.root / "pip_freeze.txt"

    @property
    def races_dir(self) -> Path:
        """Earlier races of the plan, one folder per race id (``core.races``)."""
        return self.root / "races"

    def archived_race(self, race_id: str) -> ResultsPaths:
        """The results layout of an earlier race, moved to ``races/<race-id>/``."""
        return ResultsPaths(self.races_dir / race_id)

    def rerun(self, race_id: str, experiment: str, worker: str) -> RunPaths:
        """The run directory of ``rerun --race RACE_ID``: a worker of an earlier race run again
        at the commit that race recorded, kept apart from the race's own files."""
        return RunPaths(self.root / "reruns" / race_id / experiment / worker)

    @property
    def crash_dir(self) -> Path:
        """Tracebacks of internal errors of the CLI (``orchestrator.cli``)."""
        return self.root / "crashes"

    def experiment_dir(self, experiment: str) -> Path:
        return self.root / experiment

    def success_viz_dir(self, experiment: str) -> Path:
        return self.root / experiment / "success_viz"

    def race_report_dir(self, experiment: str) -> Path:
        """The race report of the experiment (written at every decision and failure)."""
        return self.root / experiment / "race_report"

    def rendering_marker(self, experiment: str, pid: int) -> Path:
        """Present while race report renderer ``pid`` may still write the experiment's report
        (written by the controller at the spawn, removed by the renderer when it is done): a
        new race waits for it before moving this race's files (``core.races``)."""
        return self.race_report_dir(experiment) / f".rendering-{pid}"

    def race_report(self, experiment: str) -> Path:
        return self.race_report_dir(experiment) / "RACE_REPORT.md"

    def winner_dir(self, experiment: str) -> Path:
        """The winner's pinned checkpoint: a copy of the checkpoint that belongs to the winning
        record, and ``winner.json`` (file, sha256, the record, how it was matched).

        Named ``_winner``: worker names start with a letter or digit, so a worker called
        ``winner`` keeps its run directory."""
        return self.root / experiment / "_winner"

    def winner_json(self, experiment: str) -> Path:
        return self.winner_dir(experiment) / "winner.json"

    def run(self, experiment: str, worker: str) -> RunPaths:
        return RunPaths(self.root / experiment / worker)


@dataclass(frozen=True)
class RunPaths:
    """Locations of one worker's run directory (all attempts share it)."""

    run_dir: Path

    @property
    def metrics(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    @property
    def latest_checkpoint(self) -> Path:
        return self.checkpoints / f"{LATEST}.pt"

    @property
    def latest_checkpoint_info(self) -> Path:
        return self.checkpoints / f"{LATEST}.json"

    @property
    def evals(self) -> Path:
        return self.run_dir / EVALS_DIR

    @property
    def stdout(self) -> Path:
        return self.run_dir / "stdout.log"

    @property
    def stderr(self) -> Path:
        return self.run_dir / "stderr.log"

    @property
    def attempts_dir(self) -> Path:
        return self.run_dir / "attempts"

    def exit_status(self, attempt: int) -> Path:
        """JSON written by the launch wrapper when attempt ``attempt`` ends."""
        return self.attempts_dir / f"{attempt:04d}.exit.json"

    def provenance(self, attempt: int) -> Path:
        """Commit, behind-count, argv, env, host and software of attempt ``attempt``."""
        return self.attempts_dir / f"{attempt:04d}.provenance.json"

    def attempt_diff(self, attempt: int) -> Path:
        """The uncommitted work attempt ``attempt`` ran with (``allow_dirty: true`` only)."""
        return self.attempts_dir / f"{attempt:04d}.diff"

    def ensure(self) -> None:
        """Create the run directory and its attempts/ folder."""
        self.attempts_dir.mkdir(parents=True, exist_ok=True)
