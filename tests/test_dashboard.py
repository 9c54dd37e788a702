"""The dashboard rendered to text: a golden file, plus the progress plot and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from orchestrator.core.config import load_plan
from orchestrator.core.state import (
    ExperimentRecord,
    ExperimentStatus,
    PlanState,
    RunRecord,
    RunState,
)
from orchestrator.sources.metrics import MetricHistory
from orchestrator.views.dashboard import render_markdown

GOLDEN = Path(__file__).parent / "golden" / "dashboard.md"
T0 = 1_800_000_000.0  # fixed clock


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def plan_file(tmp_path: Path) -> Path:
    plan = {
        "gpus": [0, 1],
        "experiments": [
            {
                "name": "early-persistence",
                "criteria": ["attention_ratio >= 1.5", "val_accuracy >= 0.75", "separation_p < 0.01"],
                "check_every": 5,
                "max_epochs": 50,
                "workers": [
                    {"name": "attention-supervised", "branch": "ep/attention-supervised", "command": "python -m x"},
                    {"name": "contrastive", "branch": "ep/contrastive", "command": "python -m x"},
                    {"name": "multitask", "branch": "ep/multitask", "command": "python -m x"},
                    {"name": "pretrained", "branch": "ep/pretrained", "command": "python -m x"},
                ],
            },
            {
                # a step-based script judged on its own TensorBoard tags (carried-forward values)
                "name": "char-lm",
                "criteria": ["`Loss/test` < 2.4", "`val/acc` >= 0.75"],
                "check_every": 500,
                "max_steps": 6000,
                "workers": [
                    {"name": "gru", "branch": "lm/gru", "command": "python train.py"},
                    {"name": "shuffled", "branch": "lm/shuffled", "command": "python train.py",
                     "control": True},
                ],
            },
        ],
    }
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def history(rows: list[tuple[int, float, float, float]]) -> MetricHistory:
    h = MetricHistory()
    h.add(
        {"epoch": e, "time_s": T0 + 60 * e, "attention_ratio": r, "val_accuracy": a, "separation_p": p}
        for e, r, a, p in rows
    )
    return h


def steps(rows: list[tuple[int, float, float | None, float | None]]) -> MetricHistory:
    """Records as TensorBoard tags arrive: train loss every logging step, test values only at
    evaluation steps (their cells carry the last known value forward)."""
    h = MetricHistory()
    for step, train, test, acc in rows:
        h.add([{"step": step, "time_s": T0 + step / 10, "Loss/train": train}])
        if test is not None:
            h.add([{"step": step, "Loss/test": test, "val/acc": acc}])  # merged into that step
    return h


def scenario(tmp_path: Path):
    plan = load_plan(plan_file(tmp_path))
    state = PlanState(plan=str(plan.source), started_at=T0)
    state.experiments["early-persistence"] = ExperimentRecord("early-persistence", started_at=T0)
    runs = {
        "attention-supervised": dict(state=RunState.running, slot="gpu0", epoch=10, attempt=1),
        "contrastive": dict(state=RunState.running, slot="gpu1", epoch=10, attempt=2),
        "multitask": dict(state=RunState.failed, slot=None, epoch=3, attempt=3,
                          error="RuntimeError: CUDA out of memory"),
        "pretrained": dict(state=RunState.pending, slot=None, epoch=None, attempt=0),
    }
    for name, fields in runs.items():
        rec = RunRecord("early-persistence", name, f"ep/{name}", max_epochs=50, budget=50,
                        **fields)
        state.runs[rec.key] = rec
    state.experiments["char-lm"] = ExperimentRecord("char-lm", started_at=T0)
    for name, control in (("gru", False), ("shuffled", True)):
        rec = RunRecord("char-lm", name, f"lm/{name}", state=RunState.running, attempt=1,
                        slot="cpu0", unit="step", step=2000, budget=6000, control=control,
                        started_at=T0)
        state.runs[rec.key] = rec
    state.runs["early-persistence/contrastive"].stalled = True
    histories = {
        "early-persistence/attention-supervised": history(
            [(5, 1.1, 0.70, 0.2), (10, 1.28, 0.78, 0.004)]
        ),
        "early-persistence/contrastive": history([(5, 1.0, 0.6, 0.5), (10, 0.98, 0.66, 0.3)]),
        "early-persistence/multitask": history([(1, 1.0, 0.5, 0.9), (3, 1.02, 0.55, 0.8)]),
        "char-lm/gru": steps([(1000, 2.6, 2.7, 0.70), (1500, 2.3, 2.5, 0.7496), (2000, 2.1, None,
                                                                                  None)]),
        "char-lm/shuffled": steps([(1000, 4.1, 4.2, 0.25), (2000, 4.0, 4.1, 0.26)]),
    }
    events = ["00:01:00 early-persistence/multitask: FAILED (exit 1) after 3 attempts"]
    return plan, state, histories, events


def test_dashboard_matches_golden_file(tmp_path: Path) -> None:
    plan, state, histories, events = scenario(tmp_path)
    text = render_markdown(
        plan, state, histories, events, now=T0 + 600, progress_image="progress.png",
        sync_line="last push 08:09:50",
    )
    if os.environ.get("UPDATE_GOLDEN"):  # never compares the file with itself
        old = GOLDEN.read_text() if GOLDEN.exists() else None
        if old == text:
            pytest.skip(f"UPDATE_GOLDEN: {GOLDEN.name} already matches")
        GOLDEN.write_text(text)
        pytest.fail(f"UPDATE_GOLDEN: rewrote {GOLDEN}; review the diff, rerun without it")
    assert text == GOLDEN.read_text()


def test_decided_race_shows_the_winner(tmp_path: Path) -> None:
    plan, state, histories, events = scenario(tmp_path)
    erec = state.experiments["early-persistence"]
    erec.status, erec.winner, erec.winner_epoch = ExperimentStatus.succeeded, "attention-supervised", 10
    text = render_markdown(plan, state, histories, events, now=T0 + 600)
    assert "🏆 **attention-supervised** won at epoch 10" in text
    assert "![progress]" not in text


def test_progress_plot_has_one_panel_per_criterion_metric(tmp_path: Path) -> None:
    from PIL import Image

    from orchestrator.views.plots import progress_figure, render_progress

    plan, _, histories, _ = scenario(tmp_path)
    out = tmp_path / "progress.png"
    render_progress(plan, histories, out)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (990, 1305)  # 5 rows of 2 panels at 90 dpi
    fig = progress_figure(plan, histories)
    ep = ["attention-supervised", "contrastive", "multitask"]  # pretrained has no history
    expected = [  # a row per criterion metric: title, a curve per worker, the threshold
        ("early-persistence: attention_ratio (pass >= 1.5)", ep, 1.5),
        ("early-persistence: val_accuracy (pass >= 0.75)", ep, 0.75),
        ("early-persistence: separation_p (pass < 0.01), log scale", ep, 0.01),
        ("char-lm: Loss/test (pass < 2.4)", ["gru", "shuffled"], 2.4),
        ("char-lm: val/acc (pass >= 0.75)", ["gru", "shuffled"], 0.75),
    ]
    assert len(fig.axes) == 2 * len(expected)
    rows = zip(fig.axes[0::2], fig.axes[1::2], expected, strict=True)
    for by_unit, by_clock, (title, workers, threshold) in rows:
        assert by_unit.get_title() == title
        assert by_clock.get_title() == title.split(": ")[1].split(" (")[0] + " vs wall clock"
        for ax in (by_unit, by_clock):
            curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
            dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
            assert sorted(c.get_label() for c in curves) == workers, title
            assert [list(d.get_ydata()) for d in dashed] == [[threshold, threshold]], title
