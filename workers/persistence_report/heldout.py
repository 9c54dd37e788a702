"""The winner on the untouched test split, scored once after the race is decided.

The race selects its winner on val, so val numbers of the winner are optimistic. The on_success
hook scores the winner's checkpoint once on the test split and SUCCESS_REPORT.md shows test
beside val. Which checkpoint: the controller's pin (``<results>/<experiment>/_winner/winner.json``,
the copy of the checkpoint that belongs to the winning record, with its sha256); when no pin
exists (an orchestrator without it), the run's own checkpoint of the winning epoch, and the report
says so. The score is cached in ``success_viz/test_split.json`` keyed by the checkpoint's sha256,
so re-running the hook never scores test again for the same weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.paths import ResultsPaths
from orchestrator.reporting import atomic_write_json
from workers.persistence_report.outcome import RaceOutcome

HELDOUT_FILE = "test_split.json"
COMPARED = (  # metric, its CI keys (or None)
    ("val_accuracy", "val_accuracy_ci"),
    ("balanced_accuracy", "balanced_accuracy_ci"),
    ("macro_f1", None),
    ("attention_ratio", "attention_ratio_ci"),
    ("consistency", "consistency_ci"),
    ("separation_p", None),
    ("association", "association_ci"),
)


@dataclass(frozen=True)
class HeldOutScore:
    """The winner's metrics on test (``metrics``: the worker's evaluate() keys) and provenance."""

    metrics: dict[str, Any]
    checkpoint: Path
    sha256: str
    source: str  # how the checkpoint was found (the pin, or the fallback and why)
    epoch: int
    n_clips: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def winner_checkpoint(outcome: RaceOutcome) -> tuple[Path | None, str]:
    """(checkpoint path, where it came from) of a decided race's winner; (None, why) if none."""
    pin = ResultsPaths(outcome.plan.results_dir).winner_dir(outcome.experiment.name)
    info_path = pin / "winner.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        path = pin / info["checkpoint"]
        if path.exists() and _sha256(path) == info.get("sha256"):
            how = info.get("matched_by", "?")
            return path, f"the controller's pinned winner checkpoint (matched by {how})"
        return None, f"{info_path} names a checkpoint that is missing or fails its sha256"
    from workers.persistence_report.report import checkpoint_for

    path, note = checkpoint_for(outcome)
    if path is None:
        return None, note
    return path, f"NO PIN (_winner/winner.json absent): fell back to the run's {note}"


def score_winner_on_test(outcome: RaceOutcome, data_dir: str | Path | None = None) -> HeldOutScore:
    """Score the winner's checkpoint on test once (cached by sha256 in success_viz/).

    Args:
        data_dir: the dataset; default the ``data_dir`` stored in the checkpoint's arguments.

    Raises:
        ValueError: the race has no winner or no usable checkpoint, or the dataset is missing.
    """
    if not outcome.succeeded:
        raise ValueError("the race has no winner: the test split is not scored")
    path, source = winner_checkpoint(outcome)
    if path is None:
        raise ValueError(f"no winner checkpoint to score on test: {source}")
    sha = _sha256(path)
    cache = outcome.viz_dir / HELDOUT_FILE
    if cache.exists():
        old = json.loads(cache.read_text())
        if old.get("sha256") == sha:
            return HeldOutScore(
                old["metrics"], path, sha, old["source"], old["epoch"], old["n_clips"]
            )
    import torch

    from workers.early_persistence import score_checkpoint

    if data_dir is None:
        data_dir = torch.load(path, map_location="cpu", weights_only=False)["args"]["data_dir"]
    metrics, records = score_checkpoint(path, data_dir, "test")
    score = HeldOutScore(
        metrics, path, sha, source, int(records["checkpoint_epoch"]), int(metrics["n_val_clips"])
    )
    outcome.viz_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        cache,
        {
            "checkpoint": str(path),
            "sha256": sha,
            "source": source,
            "epoch": score.epoch,
            "n_clips": score.n_clips,
            "metrics": metrics,
            "samples": records["samples"],
        },
    )
    return score


def _cell(m: dict[str, Any], key: str, ci: str | None) -> str:
    from orchestrator.formatting import fmt

    v = m.get(key)
    text = fmt(v)
    if ci and m.get(f"{ci}_low") is not None:
        text += f" [{fmt(m[f'{ci}_low'])}, {fmt(m[f'{ci}_high'])}]"
    return text


def render_test_section(
    val: dict[str, Any], test: HeldOutScore | None, note: str | None
) -> list[str]:
    """Markdown lines: val (selection split) beside test (scored once), with 95% CIs."""
    lines = ["## Val (selection) and test (scored once, after the decision)", ""]
    if test is None:
        return lines + [f"The test split was not scored: {note}", ""]
    lines += [
        "The winner was SELECTED on val (the race's criteria are checked on val), so its val "
        "numbers are optimistic. Test is the untouched split, scored once by the on_success "
        f"hook from {test.source} (epoch {test.epoch}, sha256 {test.sha256[:12]}), "
        f"{test.n_clips} clips. Brackets: 95% CIs (clip bootstrap; Wilson for consistency).",
        "",
        "| metric | val (selected on) | test |",
        "|---|---|---|",
    ]
    for key, ci in COMPARED:
        lines.append(f"| {key} | {_cell(val, key, ci)} | {_cell(test.metrics, key, ci)} |")
    return lines + [""]
