"""Unmodified training scripts as workers: metric names, units and files as real loggers write
them (TensorBoard's SummaryWriter, Lightning's CSVLogger, stdout), step and time budgets,
merged records, bounded criteria, literal braces.

The script (tests/third_party_trainer.py) imports nothing of the orchestrator.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from orchestrator.core.config import load_plan
from orchestrator.core.criteria import Criterion
from orchestrator.core.state import ExperimentStatus, PlanState, RunState
from orchestrator.errors import CriteriaError
from orchestrator.session import build_controller
from tests.conftest import git, marked_processes, write_plan

TRAINER = str(Path(__file__).resolve().parent / "third_party_trainer.py")

pytest.importorskip("tensorboard")


def trainer(*args: object) -> list[str]:
    return ["python", TRAINER, *map(str, args)]


def race(plan_path: Path) -> tuple[int, PlanState, str]:
    controller = build_controller(load_plan(plan_path))
    code = controller.run()
    controller.wait_for_views()
    dashboard = load_plan(plan_path).dashboard.read_text()
    return code, controller.state, dashboard


def test_tensorboard_tag_with_a_step_budget_decides_the_race(repo: Path, leak_check: str) -> None:
    tb = {"source": "tensorboard", "path": "{worktree}/runs"}
    plan = write_plan(repo, [
        {"name": "fast", "branch": "r/fast", "metrics": tb,
         "command": trainer("--steps", 2000, "--eval-every", 100, "--target", 2.0,
                            "--logdir", "{worktree}/runs", "--flush-secs", 1, "--sleep", 0.002)},
        {"name": "slow", "branch": "r/slow", "metrics": tb,
         "command": trainer("--steps", 2000, "--eval-every", 100, "--target", 3.0,
                            "--logdir", "{worktree}/runs", "--flush-secs", 1, "--sleep", 0.002)},
    ], criteria=["`Loss/test` < 2.4"], experiment={"max_steps": 2000, "max_epochs": None,
                                                    "check_every": 100})
    code, state, dashboard = race(plan)
    exp = state.experiments["race"]
    assert code == 0 and exp.winner == "fast" and exp.unit == "step"
    assert exp.winner_epoch % 100 == 0 and exp.winner_metrics["Loss/test"] < 2.4
    assert state.run("race", "slow").state == RunState.stopped
    assert f"**fast** won at step {exp.winner_epoch}" in dashboard
    header = next(line for line in dashboard.splitlines() if line.startswith("| worker"))
    assert "Loss/<wbr>test" in header and "step/" in header and "/ 2,000" in dashboard
    assert marked_processes(leak_check) == []


def test_default_flush_records_arrive_at_close_and_still_decide(repo: Path) -> None:
    tb = {"source": "tensorboard", "path": "{worktree}/runs"}
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "metrics": tb,
         "command": trainer("--steps", 300, "--target", 2.0, "--logdir", "{worktree}/runs")},
    ], criteria=["`Loss/test` < 2.4"], experiment={"max_steps": 300, "max_epochs": None})
    code, state, _ = race(plan)
    assert code == 0 and state.experiments["race"].winner == "w"  # read after its exit


@pytest.mark.parametrize("budget", ["max_steps", "max_time_s"])
def test_step_and_time_budgets_end_a_worker_as_exhausted(repo: Path, budget: str) -> None:
    exp = {"max_steps": 400, "max_epochs": None, "check_every": 100}
    steps, sleep = 400, 0.0
    if budget == "max_time_s":
        exp = {"max_steps": 10**6, "max_epochs": None, "max_time_s": 3}
        steps, sleep = 10**6, 0.01
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "metrics": {"source": "regex", "pattern":
         r"step (?P<step>\d+) train loss: (?P<train_loss>\S+) test loss: (?P<test_loss>\S+)"},
         "command": trainer("--steps", steps, "--eval-every", 100, "--target", 3.0,
                            "--sleep", sleep)},
    ], criteria=["test_loss < 2.4"], experiment=exp, grace_s=10)
    code, state, _ = race(plan)
    run = state.run("race", "w")
    assert code == 1 and run.state == RunState.exhausted
    assert run.stop_reason == budget, run.stop_reason
    if budget == "max_steps":
        assert run.step == 400


def test_lightning_train_and_val_rows_of_one_step_merge(repo: Path) -> None:
    csv = {"source": "csv", "path": "{worktree}/logs/version_*/metrics.csv"}
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "metrics": csv,
         "command": trainer("--steps", 600, "--target", 2.0, "--csv-dir", "{worktree}/logs")},
    ], criteria=["train_loss < 2.0 and val_acc >= 0.77"],
        experiment={"max_steps": 600, "max_epochs": None, "check_every": 100})
    code, state, _ = race(plan)
    exp = state.experiments["race"]
    assert code == 0 and exp.winner == "w"
    assert {"train_loss", "val_acc", "val_loss"} <= set(exp.winner_metrics)  # one merged record


def test_retried_attempt_is_followed_into_its_new_version_folder(repo: Path) -> None:
    # a stale version_0 of an earlier race, whose values would pass at once if read
    wt = repo / ".worktrees" / "race" / "w"
    stale = repo / "stale"
    (stale / "logs" / "version_0").mkdir(parents=True)
    (stale / "logs" / "version_0" / "metrics.csv").write_text(
        "epoch,step,train_loss,val_acc,val_loss\n0,100,0.1,0.99,0.1\n")
    old = time.time() - 3600
    os.utime(stale / "logs" / "version_0" / "metrics.csv", (old, old))
    git(repo, "add", "stale")
    git(repo, "commit", "-q", "-m", "a stale Lightning log from an earlier race")
    marker = repo / "crashed.marker"
    csv = {"source": "csv", "path": "{worktree}/stale/logs/version_*/metrics.csv"}
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "metrics": csv,
         "command": trainer("--steps", 600, "--target", 2.0, "--crash-once", marker,
                            "--csv-dir", "{worktree}/stale/logs")},
    ], criteria=["train_loss < 2.0 and val_acc >= 0.77"],
        experiment={"max_steps": 600, "max_epochs": None, "check_every": 100})
    code, state, _ = race(plan)
    run = state.run("race", "w")
    assert code == 0 and run.attempt == 2 and state.experiments["race"].winner == "w"
    assert state.experiments["race"].winner_metrics["val_acc"] < 0.99  # not the stale row
    versions = sorted(p.name for p in (wt / "stale" / "logs").iterdir())
    assert versions == ["version_0", "version_1", "version_2"]  # the crash wrote version_1


def test_json_argument_with_literal_braces_reaches_the_script(repo: Path) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "metrics": {"source": "regex", "pattern":
         r"step (?P<step>\d+) train loss: (?P<train_loss>\S+) test loss: (?P<test_loss>\S+)"},
         "command": 'python ' + TRAINER + ' --steps 100 --target 2.0 '
                    '--config \'{{"lr": 0.1, "layers": [{{"width": {attempt}}}]}}\''},
    ], criteria=["test_loss < 5"], experiment={"max_steps": 100, "max_epochs": None})
    code, state, _ = race(plan)
    out = (repo / "results" / "race" / "w" / "stdout.log").read_text()
    assert code == 0
    assert 'config: {"layers": [{"width": 1}], "lr": 0.1}' in out


@pytest.mark.parametrize(
    "text",
    [
        "loss < 10**10**10",  # nested power of constants
        "loss < 2**2**2**2**2",
        "loss < 1e400",  # a literal beyond a float
        "loss < 9" + "9" * 400,  # a huge integer literal
        "loss < (10**300) * (10**300)",
        " and ".join(["loss < 1"] * 60),  # a long chain (over the length limit)
    ],
)
def test_runaway_criteria_are_refused_at_load(text: str) -> None:
    with pytest.raises(CriteriaError):
        Criterion.parse(text)


@pytest.mark.parametrize(
    ("text", "metrics"),
    [
        ("step ** step > 1", {"step": 10**6}),
        ("step ** step ** step > 1", {"step": 10**4}),
        ("loss * 10**300 * 10**300 > 1", {"loss": 10**300}),
        ("(step + 1) ** (step + 1) < 0", {"step": 2**62}),
        ("loss ** 2 >= 4", {"loss": 10**5000}),  # an integer beyond a float: missing
    ],
)
def test_criteria_on_integer_metrics_stay_bounded(text: str, metrics: dict) -> None:
    # Values are floats at evaluation: no operation builds a huge integer; overflow is False.
    assert Criterion.parse(text).evaluate(metrics) in (True, False)


def test_backquoted_names_and_threshold_extraction() -> None:
    c = Criterion.parse("`Loss/test` < 2.4")
    assert c.names == {"Loss/test"} and c.threshold is not None
    assert (c.threshold.metric, c.threshold.op, c.threshold.value) == ("Loss/test", "<", 2.4)
    assert c.evaluate({"Loss/test": 2.3}) and not c.evaluate({"Loss": 9, "test": 1})
    both = Criterion.parse("`val/acc` >= 0.9 and `val_acc.top1` > 0.5")
    assert both.names == {"val/acc", "val_acc.top1"}
    # unquoted, a slash divides: the flag for never-reported names catches that (below)
    assert Criterion.parse("Loss/test < 2.4").names == {"Loss", "test"}


def test_a_criterion_metric_never_reported_is_flagged(repo: Path) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "metrics": {"source": "regex", "pattern":
         r"step (?P<step>\d+) train loss: (?P<train_loss>\S+) test loss: (?P<test_loss>\S+)"},
         "command": trainer("--steps", 300, "--target", 2.0)},
    ], criteria=["test_los < 2.4"], experiment={"max_steps": 300, "max_epochs": None})
    code, state, dashboard = race(plan)
    assert code == 1 and state.run("race", "w").unreported == ["test_los"]
    events = (repo / "results" / "events.jsonl").read_text()
    assert events.count("`test_los` never reported by w; it reports: test_loss, train_loss") == 1
    assert "never reports `test_los`" in dashboard


def test_a_control_that_meets_the_criteria_fails_the_experiment(repo: Path) -> None:
    regex = {"source": "regex", "pattern":
             r"step (?P<step>\d+) train loss: (?P<train_loss>\S+) test loss: (?P<test_loss>\S+)"}
    plan = write_plan(repo, [
        {"name": "real", "branch": "r/real", "metrics": regex,
         "command": trainer("--steps", 1000, "--target", 2.0, "--sleep", 0.001)},
        {"name": "control", "branch": "r/control", "metrics": regex, "control": True,
         "command": trainer("--steps", 1000, "--target", 2.0, "--sleep", 0.004)},
    ], criteria=["test_loss < 2.4"], experiment={"max_steps": 1000, "max_epochs": None,
                                                  "check_every": 100})
    code, state, dashboard = race(plan)
    exp = state.experiments["race"]
    assert code == 1 and exp.status == ExperimentStatus.failed
    assert exp.winner == "real" and exp.control_flags
    assert "criteria met by control control" in exp.control_flags[0]
    assert state.run("race", "control").state == RunState.stopped  # evaluated, then stopped
    assert (state.run("race", "control").step or 0) >= exp.winner_epoch
    assert "FLAGGED" in dashboard


def test_a_control_that_fails_the_criteria_leaves_the_win(repo: Path) -> None:
    regex = {"source": "regex", "pattern":
             r"step (?P<step>\d+) train loss: (?P<train_loss>\S+) test loss: (?P<test_loss>\S+)"}
    plan = write_plan(repo, [
        {"name": "real", "branch": "r/real", "metrics": regex,
         "command": trainer("--steps", 1000, "--target", 2.0)},
        {"name": "control", "branch": "r/control", "metrics": regex, "control": True,
         "command": trainer("--steps", 1000, "--target", 3.5, "--sleep", 0.002)},
    ], criteria=["test_loss < 2.4"], experiment={"max_steps": 1000, "max_epochs": None,
                                                  "check_every": 100})
    code, state, _ = race(plan)
    exp = state.experiments["race"]
    assert code == 0 and exp.status == ExperimentStatus.succeeded and exp.winner == "real"
    assert not exp.control_flags and not exp.awaiting_controls


def test_readme_plans_for_unmodified_scripts_validate_as_written(tmp_path: Path) -> None:
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Racing a script that knows nothing of the orchestrator")[1]
    section = section.split("\n## ")[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    for i, block in enumerate(blocks):
        experiment = {"name": f"e{i}", **yaml.safe_load(block)}
        path = tmp_path / f"plan{i}.yaml"
        path.write_text(yaml.safe_dump({"experiments": [experiment]}))
        plan = load_plan(path)  # raises ConfigError on any problem
        assert plan.experiments[0].workers[0].metrics.source in ("regex", "tensorboard", "csv")
    example = load_plan(Path(__file__).resolve().parents[1] / "examples" / "third_party.yaml")
    assert [e.unit for e in example.experiments] == ["step", "step", "step"]


def test_an_untrained_evaluation_at_epoch_0_is_never_a_check_point(repo: Path) -> None:
    script = (
        "import json, os, pathlib; p = pathlib.Path(os.environ['ORCH_RUN_DIR'], 'metrics.jsonl');"
        "f = p.open('a');"
        "[f.write(json.dumps(dict(epoch=e, acc=1.0 if e == 0 else 0.1)) + '\\n')"
        " for e in (0, 1, 2)]"
    )
    plan = write_plan(repo, [{"name": "w", "branch": "r/w", "command": ["python", "-c", script]}],
                      experiment={"max_epochs": 2})
    code, state, _ = race(plan)
    assert code == 1 and state.experiments["race"].winner is None
    assert state.run("race", "w").state == RunState.exhausted


def test_rerun_records_a_tensorboard_sourced_worker(repo: Path) -> None:
    from tests.conftest import run_cli

    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "metrics": {"source": "tensorboard",
                                                   "path": "{worktree}/runs"},
         "command": trainer("--steps", 300, "--target", 2.0, "--logdir", "{worktree}/runs")},
    ], criteria=["`Loss/test` < 2.4"], experiment={"max_steps": 300, "max_epochs": None})
    out = run_cli("rerun", str(plan), "w", cwd=repo, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "step 300 train loss" in out.stdout  # the log reached the terminal
    last = out.stdout.strip().splitlines()[-1]
    assert "metrics (tensorboard)" in last and "3 records" in last and "HELD" in last, last
    log = (repo / "results" / "race" / "w" / "stdout.log").read_text()
    assert "step 300 train loss" in log  # and the run's log
