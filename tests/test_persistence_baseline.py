"""The early-decision baseline worker, end to end as a subprocess (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthvid.persistence import (
    PersistenceConfig,
    extract_track_sequences,
    generate_dataset,
    load_split,
)

REPO = Path(__file__).resolve().parents[1]
# real subprocesses: ~5-10 s each on an idle 2-core machine, minutes when it is shared
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("epb") / "data"
    generate_dataset(out, PersistenceConfig(num_samples=60, seed=4), progress=False)
    return out


def _run(
    data_dir: Path, run_dir: Path, *extra: str, resume: bool = False
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "ORCH_RUN_DIR": str(run_dir),
        "ORCH_RESUME": "1" if resume else "0",
        "PYTHONPATH": f"{REPO / 'src'}:{REPO}",
    }
    cmd = [
        sys.executable,
        "-m",
        "workers.early_persistence_baseline",
        "--data-dir",
        str(data_dir),
        "--train-samples",
        "10",
        "--val-samples",
        "8",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--no-progress",
        "--heatmaps",
        "4",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_track_sequences_hold_the_last_seen_position(data_dir):
    seq = extract_track_sequences(load_split(data_dir, "val"))
    assert seq.valid[:, 0].all() and seq.visible[:, 0].all()  # every sequence starts at the onset
    trans = seq.label == 0
    assert (seq.visible.sum(1)[trans] == seq.duration[trans]).all()
    assert (seq.valid.sum(1) == 16 - seq.onset).all()


def test_baseline_metrics_heatmaps_and_resume(data_dir, tmp_path):
    _run(data_dir, tmp_path / "a", "--epochs", "2", "--eval-every", "1")
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    for key in (
        "val_accuracy",
        "mean_decision_frame",
        "early_stop_rate",
        "earliness",
        "ece",
        "flops_saved",
        "wall_saved",
        "full_sequence_accuracy",
        "samples_per_s",
    ):
        assert key in last, key
    assert 0.0 <= last["flops_saved"] < 1.0 and 0.0 <= last["early_stop_rate"] <= 1.0
    assert (tmp_path / "a" / "viz" / "epoch_000002.png").stat().st_size > 1000
    ev = json.loads((tmp_path / "a" / "evals" / "epoch_000002.json").read_text())
    flops = ev["prefix_flops"]
    assert len(flops) == 16 and all(
        b > a for a, b in zip(flops[:-1], flops[1:], strict=True)
    )  # measured, growing
    assert len(ev["accuracy_earliness_curve"]) >= 5 and ev["tracks"][0]["decision_frame"] >= 0
    # stop after the first step of epoch 2, resume: same records as the uninterrupted run
    n_steps = recs[0]["step"]
    out = _run(
        data_dir,
        tmp_path / "b",
        "--epochs",
        "2",
        "--eval-every",
        "1",
        "--stop-after-steps",
        str(n_steps + 1) if n_steps > 1 else "1",
    )
    assert "stop requested" in out.stdout
    _run(data_dir, tmp_path / "b", "--epochs", "2", "--eval-every", "1", resume=True)
    recs_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs_b] == [1, 2]
    for key in ("train_loss", "val_loss", "val_accuracy", "ece", "mean_decision_frame"):
        assert recs_b[-1][key] == last[key], key
