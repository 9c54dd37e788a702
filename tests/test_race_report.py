"""The race report every decided or failed race leaves behind, for any worker script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from orchestrator.core.accounting import RunUsage, compute_savings
from orchestrator.core.config import load_plan
from orchestrator.core.state import PlanState, RunRecord, RunState
from orchestrator.paths import ResultsPaths
from orchestrator.session import build_controller
from tests.conftest import fake, marked_processes, wait_for, write_plan

FAST = 0.05


def _race(plan_path: Path) -> tuple[int, PlanState, Path]:
    controller = build_controller(load_plan(plan_path))
    code = controller.run()
    controller.wait_for_views()
    report = ResultsPaths(load_plan(plan_path).results_dir).race_report("race")
    return code, controller.state, report


def _table(report: str) -> dict[str, list[str]]:
    """The workers table: worker -> its cells."""
    section = report.split("## Workers")[1].split("\n## ")[0]
    rows = [r for r in section.strip().splitlines() if r.startswith("| ") and "---" not in r]
    cells = [[c.strip() for c in r.strip("|").split(" | ")] for r in rows]
    return {c[0]: c for c in cells[1:]}


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000  # a real, non-empty figure


def test_a_decided_race_gets_its_report_with_the_state_in_its_table(
    repo: Path, leak_check: str
) -> None:
    plan = write_plan(repo, [
        {"name": "winner", "branch": "r/winner",
         "command": fake("--epochs", 200, "--interval", FAST, "--metric", "acc=0.5+0.1*epoch")},
        {"name": "loser", "branch": "r/loser",
         "command": fake("--epochs", 200, "--interval", FAST, "--metric", "acc=0.1")},
    ])
    code, state, report_path = _race(plan)
    assert code == 0
    report = report_path.read_text()
    assert "**winner** met every criterion at epoch 4." in report
    assert "- `acc >= 0.9`" in report
    table = _table(report)
    for name in ("winner", "loser"):
        rec = state.run("race", name)
        row = table[name]
        assert row[1] == rec.state.value
        assert row[2] == f"{'—' if rec.epoch is None else rec.epoch}/50"
        assert row[4] == str(rec.exit_code)
    assert table["winner"][3].startswith("0.9") or table["winner"][3].startswith("1")
    used = re.search(r"Slot-seconds used: \*\*([\d,]+)\*\*", report)
    assert used is not None
    _png_ok(report_path.with_name("race_report.png"))
    dashboard = load_plan(plan).dashboard.read_text()
    assert "[Race report](results/race/race_report/RACE_REPORT.md)" in dashboard
    assert marked_processes(leak_check) == []


def test_a_failed_race_reports_the_closest_worker_and_what_it_missed(repo: Path) -> None:
    plan = write_plan(repo, [
        {"name": "near", "branch": "r/near",
         "command": fake("--epochs", 6, "--interval", FAST, "--metric", "acc=0.1*epoch")},
        {"name": "far", "branch": "r/far",
         "command": fake("--epochs", 6, "--interval", FAST, "--metric", "acc=0.01")},
    ], experiment={"max_epochs": 6})
    code, state, report_path = _race(plan)
    assert code == 1
    report = report_path.read_text()
    assert "**No worker met every criterion.**" in report
    assert "**near** at epoch 6: 0/1 criteria; missed acc 0.6 (need >= 0.9)" in report
    assert {row[1] for row in _table(report).values()} == {RunState.exhausted.value}
    _png_ok(report_path.with_name("race_report.png"))


def test_a_step_based_race_reports_in_steps(repo: Path) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 100, "--interval", FAST, "--step-per-epoch", 250,
                         "--metric", "acc=0.1*epoch")},
    ], experiment={"max_epochs": None, "max_steps": 25_000, "check_every": 500})
    code, state, report_path = _race(plan)
    report = report_path.read_text()
    assert code == 0 and state.experiments["race"].unit == "step"
    assert "**w** met every criterion at step 2500." in report
    assert "checked every 500 steps" in report
    assert _table(report)["w"][2].endswith("/25000")


def test_report_command_regenerates_it(repo: Path) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w",
         "command": fake("--epochs", 20, "--interval", FAST, "--metric", "acc=0.5+0.1*epoch")},
    ])
    _, _, report_path = _race(plan)
    report_path.unlink()
    out = subprocess.run([sys.executable, "-m", "orchestrator", "report", str(plan)],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    wait_for(report_path.exists)
    assert "race report:" in out.stdout


def test_compute_savings_one_definition() -> None:
    won = RunRecord("e", "a", "b", state=RunState.succeeded, busy_s=10.0, cpu_s=8.0)
    lost = RunRecord("e", "b", "b2", state=RunState.stopped, busy_s=10.0, cpu_s=9.0)
    ran = RunRecord("e", "c", "b3", state=RunState.exhausted, busy_s=50.0, cpu_s=40.0)
    never = RunRecord("e", "d", "b4", state=RunState.cancelled)
    rows = {r.worker: r for r in compute_savings([
        RunUsage("a", won, 5, 50, won=True), RunUsage("b", lost, 10, 50),
        RunUsage("c", ran, 50, 50), RunUsage("d", never, 0, 50),
    ])}
    assert rows["a"].saved_busy_s == 90.0  # 2 s/epoch x 45 epochs left
    assert rows["b"].saved_busy_s == 40.0  # 1 s/epoch x 40 left
    assert rows["c"].saved_busy_s == 0.0  # ran its course
    assert rows["d"].saved_busy_s == 50.0  # median rate of a, b, c (2, 1, 1 s/epoch) x 50
