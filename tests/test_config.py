"""The plan parser: valid plans, and one clear error per problem for bad ones."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli

from orchestrator.core.config import expand, load_plan
from orchestrator.errors import ConfigError

GOOD = """\
repo: .
gpus: none
poll_interval_s: 0.5
experiments:
  - name: race
    criteria: ["acc >= 0.9", "loss < 1.0"]
    check_every: 5
    max_epochs: 50
    on_success: python scripts/hook.py --run-dir {run_dir}
    workers:
      - name: a
        branch: race/a
        command: python -m workers.x --lr 0.1
        env: {OMP_NUM_THREADS: 1}
      - name: b
        branch: race/b
        command: [python, train.py]
        priority: -1
        max_epochs: 20
        criteria: ["acc >= 0.8"]
        metrics: {source: regex, pattern: 'epoch (?P<epoch>\\d+) acc (?P<acc>\\S+)'}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_plan_is_parsed_into_frozen_absolute_objects(tmp_path: Path) -> None:
    plan = load_plan(write(tmp_path, GOOD))
    assert plan.repo == tmp_path.resolve()
    assert plan.results_dir == (tmp_path / "results").resolve()
    exp = plan.experiments[0]
    assert [c.source for c in exp.criteria] == ["acc >= 0.9", "loss < 1.0"]
    a, b = exp.workers
    assert a.env == {"OMP_NUM_THREADS": "1"}
    assert exp.max_epochs_for(a) == 50 and exp.max_epochs_for(b) == 20
    assert [c.source for c in exp.criteria_for(b)] == ["acc >= 0.8"]
    assert b.metrics.source == "regex"
    with pytest.raises(Exception):
        plan.poll_interval_s = 3  # type: ignore[misc]


def test_expand_fills_placeholders_and_uses_this_interpreter(tmp_path: Path) -> None:
    import sys

    argv = expand("python run.py --out {run_dir}", {"run_dir": "/r/a b"})
    assert argv == [sys.executable, "run.py", "--out", "/r/a b"]
    sh = expand("echo {run_dir} && true", {"run_dir": "/r/a b"}, shell=True)
    assert sh == ["/bin/sh", "-c", "echo '/r/a b' && true"]


BAD_PLANS = [
    # (name, yaml, expected line, expected text)
    ("unknown top-level key", "pol_interval_s: 1\n" + GOOD, 1, "unknown key 'pol_interval_s'"),
    ("unknown key lists valid ones", GOOD.replace("    check_every: 5", "    check_evry: 5"),
     7, "valid keys: check_every"),
    ("bad type", GOOD.replace("poll_interval_s: 0.5", "poll_interval_s: fast"), 3,
     "valid number"),
    ("negative poll", GOOD.replace("poll_interval_s: 0.5", "poll_interval_s: -1"), 3,
     "greater than 0"),
    ("gpus bad value", GOOD.replace("gpus: none", "gpus: all"), 2, "gpus"),
    ("duplicate worker", GOOD.replace("name: b", "name: a"), 15, "duplicate worker name 'a'"),
    ("duplicate branch", GOOD.replace("branch: race/b", "branch: race/a"), 16,
     "branch 'race/a' is also used"),
    ("escaping name ../x", GOOD.replace("name: a\n", "name: ../x\n"), 11, "not a valid name"),
    ("absolute name /x", GOOD.replace("name: a\n", "name: /x\n"), 11, "not a valid name"),
    ("attribute in criterion", GOOD.replace("acc >= 0.9", "acc.real >= 0.9"), 6,
     "attribute access"),
    ("call in criterion", GOOD.replace("acc >= 0.9", "__import__('os') == 1"), 6,
     "not allowed"),
    ("syntax error in criterion", GOOD.replace("acc >= 0.9", "acc >>= 0.9"), 6,
     "not a valid expression"),
    ("criterion not a comparison", GOOD.replace("acc >= 0.9", "acc"), 6, "must be a comparison"),
    ("missing command", GOOD.replace("        command: python -m workers.x --lr 0.1\n", ""),
     11, "command: required field is missing"),
    ("unknown placeholder", GOOD.replace("{run_dir}", "{rundir}"), 9, "unknown placeholder"),
    ("no experiments", "repo: .\nexperiments: []\n", 2, "at least 1 item"),
    ("max_epochs zero", GOOD.replace("max_epochs: 50", "max_epochs: 0"), 8, "greater than or equal"),
    ("regex without groups", GOOD.replace("(?P<epoch>\\d+)", "\\d+").replace("(?P<acc>\\S+)", "x"),
     21, "named groups"),
    ("not yaml", "experiments: [\n  - name: x\n", 2, "not valid YAML"),
    ("duplicate yaml key", GOOD.replace("gpus: none", "gpus: none\ngpus: auto"), 3,
     "duplicate key 'gpus'"),
    ("top level not a mapping", "- 1\n- 2\n", None, "must be a mapping"),
    ("bad branch name", GOOD.replace("branch: race/a", "branch: ../race"), 12,
     "not a valid git branch"),
]


@pytest.mark.parametrize("name,text,line,expected", BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_bad_plan_gives_a_clear_error_with_its_line(
    tmp_path: Path, name: str, text: str, line: int | None, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_plan(path)
    problems = info.value.problems or [str(info.value)]
    match = [p for p in problems if expected in p]
    assert match, f"{expected!r} not in {problems}"
    if line is not None:
        assert f"plan.yaml:{line}:" in match[0], match[0]


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("poll_interval_s: 0.5", "poll_interval_s: x").replace(
        "name: b", "name: ../b"
    ).replace("acc >= 0.9", "acc.real > 1")
    with pytest.raises(ConfigError) as info:
        load_plan(write(tmp_path, text))
    assert len(info.value.problems) == 3
    lines = [int(p.split(":")[1]) for p in info.value.problems]
    assert lines == sorted(lines)


def test_cli_validate_prints_the_plan(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    # validate also checks what a run would meet (issue #15): the repo must be a git repo
    for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                                  "--allow-empty", "-m", "init"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True)
    out = run_cli("validate", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "worker b (priority -1) on branch race/b" in out.stdout
    assert "criterion  acc >= 0.9" in out.stdout
    assert "plan is valid" in out.stdout


def test_cli_bad_plan_is_one_error_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("check_every: 5", "check_evry: 5"))
    out = run_cli("validate", str(path), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ")
    assert "Traceback" not in out.stderr
    assert out.stderr.count("error:") == 1


def test_cli_missing_plan_file(tmp_path: Path) -> None:
    out = run_cli("run", "nope.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert "plan file 'nope.yaml' not found" in out.stderr
    assert "Traceback" not in out.stderr
