"""The terminal table of ``run``/``status`` rendered with rich at 80 and 120 columns (golden)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.core.config import load_plan
from orchestrator.core.state import ExperimentRecord, PlanState, RunRecord, RunState
from orchestrator.sources.metrics import MetricHistory
from orchestrator.terminal import fit_table, short_status, wrap_name
from orchestrator.views.live import render_table

GOLDEN = Path(__file__).parent / "golden"
T0 = 1_800_000_000.0
WORKERS = ["attention-supervised", "contrastive-persistence", "multitask", "pretrained-dino"]


def scenario(tmp_path: Path) -> tuple:
    plan_data = {
        "gpus": [0, 1],
        "experiments": [{
            "name": "early-persistence",
            "criteria": ["attention_ratio >= 1.5", "val_accuracy >= 0.75", "separation_p < 0.01"],
            "check_every": 5,
            "max_epochs": 50,
            "workers": [
                {"name": n, "branch": f"early-persistence/{n}", "command": "python -m x"}
                for n in WORKERS
            ],
        }],
    }
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(plan_data, sort_keys=False))
    plan = load_plan(path)
    state = PlanState(plan=str(plan.source), started_at=T0)
    state.experiments["early-persistence"] = ExperimentRecord("early-persistence", started_at=T0)
    names = ("attention_ratio", "val_accuracy", "separation_p")
    metrics = {
        "attention-supervised": dict(zip(names, (1.28, 0.78, 0.004), strict=True)),
        "contrastive-persistence": dict(zip(names, (0.98, 0.66, 0.3), strict=True)),
        "multitask": dict(zip(names, (1.02, 0.55, 0.8), strict=True)),
    }
    runs = {
        "attention-supervised": dict(state=RunState.running, slot="gpu0", epoch=10, attempt=1),
        "contrastive-persistence": dict(state=RunState.running, slot="gpu1", epoch=10, attempt=2,
                                        stalled=True),
        "multitask": dict(state=RunState.stopped, slot=None, epoch=3, attempt=1,
                          stop_reason="lost to attention-supervised"),
        "pretrained-dino": dict(state=RunState.failed, slot=None, epoch=None, attempt=3,
                                error="RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"),
    }
    for name, fields in runs.items():
        rec = RunRecord("early-persistence", name, f"early-persistence/{name}", max_epochs=50,
                        budget=50, last_metrics=metrics.get(name, {}), **fields)
        state.runs[rec.key] = rec
    h = MetricHistory()
    h.add([{"epoch": 5, "attention_ratio": 1.1}, {"epoch": 10, "attention_ratio": 1.28}])
    return plan, state, {"early-persistence/attention-supervised": h}


def render(width: int, tmp_path: Path, *, wide: bool = False) -> str:
    from rich.console import Console

    plan, state, histories = scenario(tmp_path)
    console = Console(width=width, file=io.StringIO(), color_system=None, record=True)
    console.print(render_table(plan, state, ["10:00:00 early-persistence: racing"],
                               histories=histories, wide=wide))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


@pytest.mark.parametrize(("width", "wide"), [(80, False), (120, False), (80, True)])
def test_table_matches_golden(width: int, wide: bool, tmp_path: Path) -> None:
    text = render(width, tmp_path, wide=wide)
    golden = GOLDEN / f"live_table_{width}{'_wide' if wide else ''}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize("width", [80, 120])
def test_table_fits_and_keeps_names_and_values_whole(width: int, tmp_path: Path) -> None:
    text = render(width, tmp_path)
    assert max(len(line) for line in text.splitlines()) <= width
    firsts = [line.split(" ", 1)[0] for line in text.splitlines()]
    joined = re.sub(r"([-_/])\n", r"\1", "\n".join(firsts))  # names wrapped after a hyphen
    for value in ("1.28 ✗", "0.78 ✓", "0.004 ✓", "0.98 ✗", "stopped (lost)", "failed (try 3)"):
        assert value in text, value
    # worker names: whole on a line or wrapped at a hyphen, never cut
    for name in WORKERS:
        assert name in joined, name


def test_narrow_table_drops_branch_then_trend_then_slot(tmp_path: Path) -> None:
    at_120, at_80 = render(120, tmp_path), render(80, tmp_path)
    assert "branch" not in at_120.splitlines()[1] or "early-persistence/" in at_120
    assert "branch" not in at_80 and "trend" not in at_80 and "slot" not in at_80
    wide = render(80, tmp_path, wide=True)
    for word in ("branch", "trend", "slot", "CUDA out of memory", "lost to attention-supervised"):
        assert word in wide.replace("\n", ""), word


def test_fit_table_drop_order() -> None:
    from rich.console import Console

    headers = ["worker", "branch", "slot", "trend", "epoch/max", "status"]
    row = ["w", "b" * 30, "gpu0", "↗", "1/5", "running"]

    def shown(width: int) -> str:
        console = Console(width=200, file=io.StringIO(), color_system=None, record=True)
        console.print(fit_table(headers, [row], width=width))
        return console.export_text().splitlines()[0]

    assert "branch" in shown(200)
    assert "branch" not in shown(39) and "trend" in shown(39) and "slot" in shown(39)
    assert "trend" not in shown(32) and "slot" in shown(32)
    assert "slot" not in shown(26) and "status" in shown(26)


def test_short_status_and_wrap_name() -> None:
    assert short_status("⏹ stopped: lost to attention-supervised") == "stopped (lost)"
    assert short_status("🏃 running ⚠ stalled (attempt 2)") == "running, stalled (try 2)"
    assert short_status("💥 failed (attempt 3)") == "failed (try 3)"
    assert short_status("⏳ pending") == "pending"
    assert wrap_name("attention-supervised", 12) == "attention-\nsupervised"
    assert wrap_name("abcdefghij", 4) == "abcd\nefgh\nij"


def fake_notify_send(folder: Path, record: Path) -> dict[str, str]:
    """A `notify-send` first on PATH that appends its arguments to ``record``; the env to use."""
    import sys

    folder.mkdir()
    script = folder / "notify-send"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"with open({str(record)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_run_notify_pings_once_at_the_decision(
    repo: Path, tmp_path: Path, leak_check: str
) -> None:
    import json

    from conftest import fake, run_cli, write_plan

    plan = write_plan(repo, [
        {"name": "a", "branch": "r/a",
         "command": fake("--epochs", 20, "--interval", 0.05, "--metric", "acc=0.3*epoch")},
        {"name": "b", "branch": "r/b",
         "command": fake("--epochs", 200, "--interval", 0.05, "--metric", "acc=0")},
    ], experiment={"max_epochs": 200})
    record = tmp_path / "notified.jsonl"
    env = fake_notify_send(tmp_path / "bin", record)
    done = run_cli("run", str(plan), "--plain", "--notify", cwd=repo, env=env)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [["race: decided", "a won at epoch 3"]]


def test_notifier_once_per_key_bell_fallback_and_osascript() -> None:
    from orchestrator.terminal import Notifier, notify_argv

    bell = io.StringIO()
    n = Notifier(None, bell=bell)
    assert n.announce("x: won", "x: decided", "a won") is True
    assert n.announce("x: won", "x: decided", "a won") is False
    assert bell.getvalue() == "\ax: decided: a won\n"
    missing = Notifier(["/nonexistent/notify-send"], bell=bell)  # a failing command: the bell
    assert missing.announce("y", "y: failed", "none met") and "y: failed" in bell.getvalue()
    argv = notify_argv(["osascript"], 'say "hi"', "a\\b")
    assert argv == ["osascript", "-e", 'display notification "a\\\\b" with title "say \\"hi\\""']


def test_decision_notifier_view_announces_each_decision_once(tmp_path: Path) -> None:
    from orchestrator.core.snapshot import RaceSnapshot
    from orchestrator.core.state import ExperimentStatus
    from orchestrator.terminal import Notifier
    from orchestrator.views.live import DecisionNotifierView

    plan, state, histories = scenario(tmp_path)
    calls: list[list[str]] = []
    view = DecisionNotifierView(Notifier(["notify-send"], run=calls.append))

    def tick() -> None:
        view.refresh(RaceSnapshot(plan, state, histories, [], T0), force=False)

    tick()  # racing: nothing
    erec = state.experiments["early-persistence"]
    erec.status = ExperimentStatus.failed
    tick()
    tick()
    assert calls == [["notify-send", "early-persistence: failed", "no worker met every criterion"]]
    resumed = DecisionNotifierView(Notifier(["notify-send"], run=calls.append))
    resumed.refresh(RaceSnapshot(plan, state, histories, [], T0), force=False)
    assert len(calls) == 1  # decided before this view first looked: not announced
