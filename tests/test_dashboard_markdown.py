"""The dashboard as a markdown viewer shows it: parsed with a GFM renderer (markdown-it-py),
every table has a constant column count and fits a 900 px page, every image and link resolves
to a file next to the page; the progress plot for few records and p-values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

from orchestrator.core.config import load_plan
from orchestrator.core.state import (
    ExperimentRecord,
    ExperimentStatus,
    PlanState,
    RunRecord,
    RunState,
)
from orchestrator.sources.metrics import MetricHistory
from orchestrator.views.dashboard import PAGE_WIDTH_PX, estimated_width_px, render_markdown
from orchestrator.views.plots import is_p_value, progress_figure, render_progress

T0 = 1_800_000_000.0
NAMES = ("attention_ratio", "val_accuracy", "consistency", "separation_p")
WORKERS = ("attention-supervised", "pretrained-features", "contrastive-loss", "multitask")


def make_plan(tmp_path: Path, prefix: str = "early-persistence/") -> object:
    data = {
        "gpus": [0, 1],
        "experiments": [{
            "name": "early-persistence",
            "criteria": ["attention_ratio >= 1.5", "val_accuracy >= 0.75", "consistency >= 0.7",
                         "separation_p < 0.01"],
            "check_every": 5,
            "max_epochs": 50,
            "workers": [
                {"name": n, "branch": f"{prefix}{n}", "command": "python -m x"} for n in WORKERS
            ],
        }],
    }
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_plan(path)


def state_of(
    plan: object, *, records: bool, epochs: tuple[int, ...] = (5,)
) -> tuple[PlanState, dict[str, MetricHistory]]:
    state = PlanState(plan="experiments.yaml", started_at=T0)
    state.experiments["early-persistence"] = ExperimentRecord("early-persistence", started_at=T0)
    histories: dict[str, MetricHistory] = {}
    for i, name in enumerate(WORKERS):
        rec = RunRecord("early-persistence", name, f"early-persistence/{name}", max_epochs=50,
                        budget=50,
                        state=RunState.running, slot=f"gpu{i % 2}", epoch=0 if records else None,
                        attempt=1)
        state.runs[rec.key] = rec
        h = MetricHistory()
        if records:
            values = (1.0 + 0.2 * i, 0.6 + 0.05 * i, 0.6 + 0.04 * i, 0.5 / 10**i)
            h.add([
                {"epoch": e, "time_s": T0 + 12 * e, **dict(zip(NAMES, values, strict=True))}
                for e in epochs
            ])
            rec.epoch, rec.last_metrics = epochs[-1], dict(h.last or {})
            rec.started_at = T0
        histories[rec.key] = h
    return state, histories


def decided(plan: object, tmp_path: Path) -> tuple[str, Path]:
    """A race decided at its first check, with its files next to the page."""
    state, histories = state_of(plan, records=True)
    erec = state.experiments["early-persistence"]
    erec.status, erec.winner, erec.winner_epoch = ExperimentStatus.succeeded, "multitask", 5
    state.runs["early-persistence/multitask"].state = RunState.succeeded
    for name in WORKERS[:3]:
        rec = state.runs[f"early-persistence/{name}"]
        rec.state, rec.stop_reason = RunState.stopped, "lost to multitask"
    page_dir = tmp_path / "site"
    report = page_dir / "results/early-persistence/race_report/RACE_REPORT.md"
    figure = page_dir / "results/early-persistence/success_viz/SUCCESS_VISUALIZATION.png"
    for p in (report, figure):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    render_progress(plan, histories, page_dir / "progress.png")  # type: ignore[arg-type]
    text = render_markdown(
        plan, state, histories, ["00:01:00 early-persistence: multitask won"],  # type: ignore[arg-type]
        now=T0 + 120, progress_image="progress.png",
        links={"early-persistence": [
            ("Race report", "results/early-persistence/race_report/RACE_REPORT.md"),
            ("Success figure", "results/early-persistence/success_viz/SUCCESS_VISUALIZATION.png"),
        ]},
    )
    (page_dir / "PARALLEL_PROGRESS.md").write_text(text)
    return text, page_dir


def gfm() -> MarkdownIt:
    return MarkdownIt("commonmark").enable("table").enable("strikethrough")


def tables(tokens: list) -> list[list[list[str]]]:
    """Every table as rows of cell texts."""
    out: list[list[list[str]]] = []
    row: list[str] | None = None
    for i, tok in enumerate(tokens):
        if tok.type == "table_open":
            out.append([])
        elif tok.type == "tr_open":
            row = []
        elif tok.type in ("th_open", "td_open") and row is not None:
            row.append(tokens[i + 1].content if tokens[i + 1].type == "inline" else "")
        elif tok.type == "tr_close" and row is not None:
            out[-1].append(row)
            row = None
    return out


def targets(tokens: list) -> list[str]:
    found = []
    for tok in tokens:
        for child in tok.children or []:
            if child.type == "image":
                found.append(str(child.attrs["src"]))
            elif child.type == "link_open":
                found.append(str(child.attrs["href"]))
    return found


@pytest.mark.parametrize("prefix", ["early-persistence/", "ep-", ""])
def test_page_parses_with_constant_columns_and_every_target_resolves(
    tmp_path: Path, prefix: str
) -> None:
    plan = make_plan(tmp_path, prefix)
    text, page_dir = decided(plan, tmp_path)
    tokens = gfm().parse(text)
    found = tables(tokens)
    assert found, "no table parsed"
    for table in found:
        assert len({len(r) for r in table}) == 1, table
        assert len(table) == 1 + len(WORKERS)
    hrefs = targets(tokens)
    assert "progress.png" in hrefs and len(hrefs) >= 3
    for href in hrefs:
        assert "://" not in href and ".." not in href
        assert (page_dir / href).is_file(), href


@pytest.mark.parametrize("racing", [True, False])
def test_workers_table_fits_a_900_px_page(tmp_path: Path, racing: bool) -> None:
    """Estimated as a viewer lays it out (``estimated_width_px``, calibrated against Chromium:
    the table of the racing case without the column drop measured 940 px estimated and ran past
    the page in the screenshot). The screenshot in docs/ is the real check."""
    plan = make_plan(tmp_path)
    if racing:  # with slots and ETAs
        state, histories = state_of(plan, records=True, epochs=(5, 10))
        text = render_markdown(plan, state, histories, [], now=T0 + 120)  # type: ignore[arg-type]
        assert "not on course: attention_" in text
    else:
        text, _ = decided(plan, tmp_path)
    (table,) = tables(gfm().parse(text))
    assert estimated_width_px(table[0], table[1:]) <= PAGE_WIDTH_PX, table[0]
    if racing:  # trend, slot, then the time to max went, in that order; 4 criteria are wide
        assert "ETA to criteria" in table[0] and "slot" not in table[0]
    assert not any("early-persistence/" in c for row in table for c in row)


def test_best_so_far_waits_for_a_criterion_metric(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    state, histories = state_of(plan, records=False)
    histories["early-persistence/contrastive-loss"].add([{"epoch": 1, "train_loss": 2.3}])
    text = render_markdown(plan, state, histories, [], now=T0 + 10)  # type: ignore[arg-type]
    assert "Best so far" not in text
    state, histories = state_of(plan, records=True)
    text = render_markdown(plan, state, histories, [], now=T0 + 10)  # type: ignore[arg-type]
    assert "Best so far" in text


def test_progress_plot_for_a_race_decided_at_its_first_check(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    _, histories = state_of(plan, records=True)
    fig = progress_figure(plan, histories)  # type: ignore[arg-type]
    axes = fig.axes
    assert len(axes) == 2 * len(NAMES)  # by epoch and by wall clock, per metric
    by_epoch = axes[0::2]
    for ax in by_epoch:
        lo, hi = ax.get_xlim()
        assert lo == 0 and hi > 5  # the x axis starts at 0, not 4.8..5.2 around one point
        for line in ax.get_lines():
            if line.get_label().startswith("_"):
                continue  # the threshold
            assert line.get_marker() == "o" and line.get_markersize() >= 6
    scales = [ax.get_yscale() for ax in axes]
    assert scales == ["linear"] * 6 + ["log", "log"]  # separation_p
    assert "wall clock" in axes[1].get_xlabel()


def test_is_p_value() -> None:
    from orchestrator.core.criteria import Threshold

    assert is_p_value(Threshold("separation_p", "<", 0.01))
    assert not is_p_value(Threshold("val_loss", "<", 0.5))
    assert not is_p_value(Threshold("val_accuracy", ">=", 0.01))
    assert not is_p_value(None)
