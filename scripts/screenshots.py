"""Regenerate the docs' screenshots of the dashboard and the 80-column terminal view.

    python scripts/screenshots.py            # docs/images/dashboard.png and terminal-80.png
    python scripts/screenshots.py --out /tmp/shots --keep   # also keep the HTML it rendered

The race shown is the default plan (experiments.yaml) decided at its second check, with metric
records made up for the picture (no training runs). The dashboard is the real
``render_markdown`` output with the real progress plot, rendered to HTML by markdown-it-py (GFM
tables) in a 900 px wide page styled like GitHub's markdown; the terminal view is ``watch``'s
view of that page printed by rich at 80 columns. Both are photographed by headless Chromium
(``apt-get install -y chromium``); not part of CI.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.core.config import load_plan
from orchestrator.core.state import (
    ExperimentRecord,
    ExperimentStatus,
    PlanState,
    RunRecord,
    RunState,
)
from orchestrator.remote.ssh import parse_target
from orchestrator.remote.watch import _render
from orchestrator.sources.metrics import MetricHistory
from orchestrator.views.dashboard import render_markdown
from orchestrator.views.plots import render_progress

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_765_000_000.0
PAGE_WIDTH_PX = 900

# made-up records per worker: (attention_ratio, val_accuracy, consistency, separation_p) at 5, 10
RECORDS = {
    "attention-supervised": [(1.31, 0.71, 0.66, 0.03), (1.74, 0.82, 0.78, 0.0004)],
    "pretrained-features": [(1.05, 0.77, 0.61, 0.41), (1.12, 0.80, 0.69, 0.22)],
    "contrastive-loss": [(1.12, 0.62, 0.72, 0.12), (1.21, 0.68, 0.74, 0.05)],
    "multitask-learning": [(0.98, 0.58, 0.55, 0.64), (1.02, 0.63, 0.59, 0.37)],
}
CSS = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif;
       font-size: 16px; line-height: 1.5; color: #1f2328; margin: 0; padding: 24px;
       width: %(inner)dpx; }
table { border-collapse: collapse; display: block; max-width: 100%%; overflow: auto; }
th, td { border: 1px solid #d1d9e0; padding: 6px 13px; }
th { font-weight: 600; } tr:nth-child(2n) { background: #f6f8fa; }
code { font-size: 85%%; background: #eff1f3; padding: .2em .4em; border-radius: 6px; }
pre { background: #f6f8fa; padding: 16px; font-size: 85%%; overflow: auto; }
pre code { background: none; padding: 0; }
img { max-width: 100%%; } h1, h2 { border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; }
"""


def scenario(folder: Path) -> str:
    """Write the default plan's race, decided at epoch 10, into ``folder``; the page's text."""
    plan = load_plan(ROOT / "experiments.yaml")
    exp = plan.experiments[0]
    state = PlanState(plan=str(plan.source), started_at=T0)
    state.experiments[exp.name] = ExperimentRecord(
        exp.name, started_at=T0, status=ExperimentStatus.succeeded,
        winner="attention-supervised", winner_epoch=10,
    )
    names = ("attention_ratio", "val_accuracy", "consistency", "separation_p")
    histories = {}
    for i, w in enumerate(exp.workers):
        h = MetricHistory()
        h.add(
            {"epoch": 5 * (k + 1), "time_s": T0 + 95.0 * (k + 1) + 7 * i,
             **dict(zip(names, values, strict=True))}
            for k, values in enumerate(RECORDS[w.name])
        )
        won = w.name == "attention-supervised"
        rec = RunRecord(
            exp.name, w.name, w.branch, max_epochs=exp.max_epochs, budget=exp.max_epochs,
            attempt=1, epoch=10,
            state=RunState.succeeded if won else RunState.stopped,
            stop_reason=None if won else "lost to attention-supervised",
            last_metrics=dict(h.last or {}),
        )
        state.runs[rec.key] = rec
        histories[rec.key] = h
    render_progress(plan, histories, folder / "progress.png")
    links = [
        ("Race report", f"results/{exp.name}/race_report/RACE_REPORT.md"),
        ("Success figure", f"results/{exp.name}/success_viz/SUCCESS_VISUALIZATION.png"),
        ("Success report", f"results/{exp.name}/success_viz/SUCCESS_REPORT.md"),
    ]
    events = [
        time.strftime("%H:%M:%S", time.gmtime(T0 + 190 + s)) + f" {exp.name}: {e}"
        for s, e in ((0, "attention-supervised met every criterion at epoch 10: WINNER"),
                     (1, "stopping 3 other run(s)"), (3, "decided in 3.2 s"))
    ]
    text = render_markdown(
        plan, state, histories, events, now=T0 + 200, progress_image="progress.png",
        links={exp.name: links},
    )
    (folder / "PARALLEL_PROGRESS.md").write_text(text)
    return text


def page_html(markdown: str) -> str:
    """The page as a markdown viewer shows it (GFM tables), ``PAGE_WIDTH_PX`` wide."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    css = CSS % {"inner": PAGE_WIDTH_PX - 48}
    return f"<!doctype html><meta charset=utf-8><style>{css}</style><body>{body}</body>"


def terminal_html(markdown: str) -> tuple[str, tuple[int, int]]:
    """``watch``'s view of the page at 80 columns, as rich's SVG export; (html, its size)."""
    from rich.console import Console

    console = Console(width=80, file=io.StringIO(), record=True, force_terminal=True)
    state: dict[str, object] = {
        "dashboard": markdown, "dashboard_rel": "PARALLEL_PROGRESS.md",
        "fetched_at": T0 + 201, "error": None,
        "linked": [("Race report", "results/early-persistence/race_report/RACE_REPORT.md"),
                   ("Success figure",
                    "results/early-persistence/success_viz/SUCCESS_VISUALIZATION.png")],
    }
    console.print(_render(parse_target("me@gpu-box:~/project"), Path("~/gpu-box-dash"), state))
    svg = console.export_svg(title="python -m orchestrator watch me@gpu-box:~/project --notify")
    width, height = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups()  # type: ignore[union-attr]
    page = f"<!doctype html><body style='margin:0;background:#fff'>{svg}</body>"
    return page, (int(float(width)) + 1, int(float(height)) + 1)


def shoot(chromium: str, page: Path, png: Path, width: int, height: int) -> None:
    """Photograph ``page`` with headless Chromium; saved with a 256-colour palette (small)."""
    from PIL import Image

    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={width},{height}", f"--screenshot={png}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    with Image.open(png) as img:
        small = img.convert("RGB").quantize(256)
    small.save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--keep", action="store_true", help="keep the HTML next to the PNGs")
    parser.add_argument("--page-height", type=int, default=1900, help="dashboard shot height (px)")
    args = parser.parse_args(argv)
    chromium = next(
        (c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None
    )
    if chromium is None:
        print("error: no chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        markdown = scenario(folder)
        (folder / "page.html").write_text(page_html(markdown))
        shoot(chromium, folder / "page.html", args.out / "dashboard.png",
              PAGE_WIDTH_PX, args.page_height)
        term, (width, height) = terminal_html(markdown)
        (folder / "terminal.html").write_text(term)
        shoot(chromium, folder / "terminal.html", args.out / "terminal-80.png", width, height)
        if args.keep:
            for name in ("page.html", "terminal.html", "progress.png", "PARALLEL_PROGRESS.md"):
                shutil.copy(folder / name, args.out / name)
    for name in ("dashboard.png", "terminal-80.png"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
