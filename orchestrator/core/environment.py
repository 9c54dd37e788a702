"""What a worker attempt (and a plan's setup / on_success command) is given: the values of the
plan's {placeholders} and the process environment of the worker contract (DESIGN.md).

The controller and ``python -m orchestrator rerun`` both build a worker's launch from these, so a
run by hand sees exactly what the controller would have given it.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.core.config import ExperimentConfig, Plan, WorkerConfig, _fill
from orchestrator.paths import ResultsPaths, RunPaths


def placeholder_values(
    plan: Plan,
    exp: ExperimentConfig,
    worker: WorkerConfig | None = None,
    run_paths: RunPaths | None = None,
    worktree: Path | None = None,
    attempt: int = 0,
) -> dict[str, str]:
    """Values of the plan's {placeholders} for an experiment (and one of its workers)."""
    values = {
        "repo": str(plan.repo),
        "results_dir": str(plan.results_dir),
        "experiment": exp.name,
        "plan": str(plan.source),
        "viz_dir": str(ResultsPaths(plan.results_dir).success_viz_dir(exp.name)),
    }
    if worker is not None and run_paths is not None and worktree is not None:
        values.update(
            worker=worker.name,
            run_dir=str(run_paths.run_dir),
            worktree=str(worktree),
            checkpoint=str(run_paths.latest_checkpoint),
            attempt=str(attempt),
        )
    return values


def worker_env(
    exp: ExperimentConfig,
    worker: WorkerConfig,
    run_paths: RunPaths,
    worktree: Path,
    attempt: int,
    *,
    resume: bool,
    cuda_visible_devices: str,
    values: dict[str, str],
) -> dict[str, str]:
    """The complete environment of a worker attempt (the worker contract in DESIGN.md):
    this process's environment without ORCH_* leftovers, the ORCH_* variables, the GPU
    assignment, PYTHONPATH=<worktree>/src:<worktree>, and the plan's env (placeholders filled)."""
    env = base_env()
    pythonpath = [str(worktree / "src"), str(worktree)]
    if env.get("PYTHONPATH"):
        pythonpath.append(env["PYTHONPATH"])
    env.update(
        ORCH_RUN_DIR=str(run_paths.run_dir),
        ORCH_EXPERIMENT=exp.name,
        ORCH_WORKER=worker.name,
        ORCH_ATTEMPT=str(attempt),
        ORCH_RESUME="1" if resume else "0",
        CUDA_VISIBLE_DEVICES=cuda_visible_devices,
        PYTHONPATH=os.pathsep.join(pythonpath),
        PYTHONUNBUFFERED="1",
    )
    for name, value in (("ORCH_MAX_EPOCHS", exp.max_epochs_for(worker)),
                        ("ORCH_MAX_STEPS", exp.max_steps_for(worker))):
        if value is not None:
            env[name] = str(value)
    env.update({k: _fill(v, values) for k, v in worker.env.items()})
    return env


def base_env() -> dict[str, str]:
    """This process's environment without the ORCH_* variables of a worker contract (a
    controller started from inside a worker must not hand its own run's identity on);
    ORCH_FAKE_GPUS, a test setting, is kept."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("ORCH_") and key != "ORCH_FAKE_GPUS":
            del env[key]
    return env
