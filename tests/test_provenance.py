"""Provenance of every attempt: the commit it ran, how far behind base_ref, its redacted env,
dirty worktrees refused (or recorded with their diff), and the reports that show it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import fake, git, run_cli, write_plan

from orchestrator.core.config import load_plan
from orchestrator.core.provenance import redact_env, software_versions
from orchestrator.core.refnames import ref_format_problem
from orchestrator.core.state import ExperimentStatus, PlanState, RunState
from orchestrator.paths import ResultsPaths
from orchestrator.session import build_controller

FAST = 0.05


def race(plan_path: Path, **kw):
    controller = build_controller(load_plan(plan_path), **kw)
    code = controller.run()
    controller.wait_for_views()
    return code, PlanState.load(ResultsPaths(controller.plan.results_dir).state), controller


def commit_file(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", f"add {name}")
    return git(repo, "rev-parse", "HEAD").strip()


def test_each_attempt_records_its_commit_env_and_software(repo: Path, leak_check: str) -> None:
    base = git(repo, "rev-parse", "HEAD").strip()
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "env": {"API_KEY": "hunter2", "MY_TOKEN": "t0k",
                                               "DB_PASSWORD": "pw", "LR": "0.1"},
         "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
    ])
    code, state, _ = race(plan)
    assert code == 0
    rec = state.run("race", "w")
    assert rec.commit == base and rec.behind == 0 and rec.dirty is False
    [prov] = rec.attempts
    assert prov["commit"] == base and prov["branch"] == "r/w" and prov["attempt"] == 1
    assert prov["env"] == {"API_KEY": "<redacted>", "MY_TOKEN": "<redacted>",
                           "DB_PASSWORD": "<redacted>", "LR": "0.1"}
    assert prov["argv"][1].endswith("fake_worker.py") and prov["exit"] is not None
    assert prov["started_at"] <= prov["ended_at"] and prov["slot"] and prov["host"]
    assert prov["software"]["python"]
    on_disk = json.loads(ResultsPaths(repo / "results").run("race", "w")
                         .provenance(1).read_text())
    assert on_disk["commit"] == base and on_disk["exit"] == prov["exit"]
    # no secret anywhere the orchestrator writes
    for f in (repo / "results").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".md", ".txt"):
            text = f.read_text(errors="replace")
            assert "hunter2" not in text and "t0k" not in text, f
    assert "hunter2" not in Path(load_plan(plan).dashboard).read_text()
    freeze = (repo / "results" / "pip_freeze.txt").read_text()
    assert "pydantic==" in freeze.lower()
    assert json.loads((repo / "results" / "software.json").read_text())["python"]
    assert state.experiments["race"].winner_commit == base


def test_commit_between_two_races_each_report_names_its_own_sha(
    repo: Path, leak_check: str
) -> None:
    first = git(repo, "rev-parse", "HEAD").strip()
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
    ], base_ref="main")
    git(repo, "add", "plan.yaml")
    git(repo, "commit", "-q", "-m", "plan")
    first = git(repo, "rev-parse", "HEAD").strip()
    code, state, _ = race(plan)
    assert code == 0 and state.run("race", "w").commit == first
    report = ResultsPaths(repo / "results").race_report("race").read_text()
    assert first[:8] in report
    # work continues on the branch (in its worktree) and on main
    wt = repo / ".worktrees" / "race" / "w"
    second = commit_file(wt, "model.py", "x = 2\n")
    for i in range(3):
        commit_file(repo, f"main{i}.txt", "m\n")
    code, state, _ = race(plan, fresh=True)
    rec = state.run("race", "w")
    assert code == 0 and rec.commit == second and rec.behind == 3
    report = ResultsPaths(repo / "results").race_report("race").read_text()
    assert second[:8] in report and first[:8] not in report
    assert "3 commits behind main" in report
    status = run_cli("status", str(plan), "--json", cwd=repo)
    data = json.loads(status.stdout)
    assert data["runs"]["race/w"]["commit"] == second and data["runs"]["race/w"]["behind"] == 3
    text = run_cli("status", str(plan), cwd=repo).stdout
    assert second[:8] in text
    dash = Path(load_plan(plan).dashboard).read_text()
    assert second[:8] in dash and "3 behind" in dash


def test_rerun_of_an_earlier_race_runs_its_commit_and_leaves_the_race_alone(
    repo: Path, leak_check: str
) -> None:
    first = commit_file(repo, "model.py", "VERSION = 'first'\n")
    command = ('python -c "import model; print(chr(109) + chr(61), model.VERSION)" && '
               + " ".join(fake("--epochs", 3, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")))
    plan = write_plan(repo, [{"name": "w", "branch": "r/w", "shell": True, "command": command}],
                      base_ref="main")
    code, state, _ = race(plan)
    first_race = state.race_id
    assert code == 0 and state.run("race", "w").commit == first
    # the branch moves on, and a second race runs the new code
    wt = repo / ".worktrees" / "race" / "w"
    second = commit_file(wt, "model.py", "VERSION = 'second'\n")
    code, state, _ = race(plan, fresh=True)
    assert code == 0 and state.run("race", "w").commit == second
    archived = repo / "results" / "races" / first_race
    before = {p: p.stat().st_mtime_ns for p in archived.rglob("*") if p.is_file()}
    out = run_cli("rerun", str(plan), "w", "--race", first_race, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "m= first" in out.stdout and first[:8] in out.stdout, out.stdout + out.stderr
    run_dir = repo / "results" / "reruns" / first_race / "race" / "w"
    prov = json.loads((run_dir / "attempts" / "0001.provenance.json").read_text())
    assert prov["commit"] == first and prov["rerun_of"] == first_race and prov["exit"] == 0
    assert "m= first" in (run_dir / "stdout.log").read_text()
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 3
    # the earlier race's files and the live race are untouched; the branch did not move
    assert before == {p: p.stat().st_mtime_ns for p in archived.rglob("*") if p.is_file()}
    assert PlanState.load(repo / "results" / "state.json").run("race", "w").attempt == 1
    assert git(wt, "rev-parse", "HEAD").strip() == second
    # a second rerun is attempt 2 in the same folder; the live race is the default
    again = run_cli("rerun", str(plan), "w", "--race", first_race[:-1], cwd=repo)
    assert again.returncode == 0 and (run_dir / "attempts" / "0002.provenance.json").exists()
    bad = run_cli("rerun", str(plan), "w", "--race", "19990101", cwd=repo)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "no race" in bad.stderr
    # clean removes the rerun worktree with the others
    out = run_cli("clean", str(plan), cwd=repo)
    assert out.returncode == 0, out.stderr
    assert not (repo / ".worktrees" / "_reruns").exists()
    assert "_reruns" not in git(repo, "worktree", "list")


def test_a_dirty_worktree_is_refused(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake("--epochs", 3, "--interval", FAST)},
    ], base_ref="main")
    wt = repo / ".worktrees" / "race" / "w"
    git(repo, "worktree", "add", "-q", "-b", "r/w", str(wt), "main")
    (wt / "README.md").write_text("edited, not committed\n")
    code, state, _ = race(plan)
    rec = state.run("race", "w")
    assert code == 1 and rec.state == RunState.failed
    assert "uncommitted changes" in rec.error and "allow_dirty" not in rec.error
    assert not ResultsPaths(repo / "results").run("race", "w").metrics.exists()  # never ran


def test_allow_dirty_runs_and_records_the_diff(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
    ], allow_dirty=True)
    wt = repo / ".worktrees" / "race" / "w"
    git(repo, "worktree", "add", "-q", "-b", "r/w", str(wt), "main")
    (wt / "README.md").write_text("edited, not committed\n")
    (wt / "new.py").write_text("print(1)\n")
    code, state, _ = race(plan)
    rec = state.run("race", "w")
    assert code == 0 and rec.dirty is True and rec.attempts[0]["dirty"] is True
    diff = Path(rec.attempts[0]["diff"]).read_text()
    assert "+edited, not committed" in diff and "new.py" in diff
    report = ResultsPaths(repo / "results").race_report("race").read_text()
    assert "dirty" in report.lower()
    assert "dirty" in Path(load_plan(plan).dashboard).read_text()
    assert state.experiments["race"].status == ExperimentStatus.succeeded


def test_redaction_and_software_without_torch_import() -> None:
    assert redact_env({"HF_TOKEN": "x", "secret_sauce": "y", "PATH_X": "z"}) == {
        "HF_TOKEN": "<redacted>", "secret_sauce": "<redacted>", "PATH_X": "z"}
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from orchestrator.core.provenance import "
         "software_versions; software_versions(); print('torch' in sys.modules)"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "False", out.stderr
    assert software_versions()["python"]


def test_ref_names_agree_with_git(tmp_path: Path) -> None:
    names = ["ok/name", "bad~name", "a..b", "x.lock", ".hidden", "a/.b", "end.", "sp ace",
             "c:d", "q?", "st*r", "br[a", "back\\slash", "a//b", "/lead", "trail/",
             "a@{b", "-dash", "fine-1.2_3", "ok@x", "caret^"]
    for name in names:
        rc = subprocess.run(["git", "check-ref-format", "--branch", name], cwd=tmp_path,
                            capture_output=True).returncode
        assert (ref_format_problem(name) is None) == (rc == 0), name


def test_bad_branch_and_experiment_names_fail_validation(repo: Path) -> None:
    plan = write_plan(repo, [{"name": "w", "branch": "bad~name", "command": fake()}],
                      name="a..b")
    out = run_cli("validate", str(plan), cwd=repo)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'bad~name' is not a valid git branch name" in out.stderr
    assert "'a..b'" in out.stderr
    # an experiment may not be named like a folder of the results directory
    plan = write_plan(repo, [{"name": "w", "branch": "r/w", "command": fake()}], name="races")
    out = run_cli("validate", str(plan), cwd=repo)
    assert out.returncode == 2 and "'races' names a folder of the results directory" in out.stderr
    plan = write_plan(repo, [{"name": "race_report", "branch": "r/w", "command": fake()}])
    out = run_cli("validate", str(plan), cwd=repo)
    assert out.returncode == 2 and "'race_report' names a folder of the experiment" in out.stderr


def test_untracked_files_are_listed_not_refused(repo: Path, leak_check: str) -> None:
    """A script's own logs in its worktree (Lightning's lightning_logs/) are not a code change."""
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.5+0.2*epoch")},
    ])
    wt = repo / ".worktrees" / "race" / "w"
    git(repo, "worktree", "add", "-q", "-b", "r/w", str(wt), "main")
    (wt / "lightning_logs").mkdir()
    (wt / "lightning_logs" / "metrics.csv").write_text("epoch\n")
    code, state, _ = race(plan)
    rec = state.run("race", "w")
    assert code == 0 and rec.dirty is False
    assert rec.attempts[0]["untracked"] == ["lightning_logs/metrics.csv"]
