"""End-to-end runs of the early-persistence race worker as real subprocesses (tiny sizes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthvid.persistence import PersistenceConfig, generate_dataset

REPO = Path(__file__).resolve().parents[1]
# real subprocesses: ~5-10 s each on an idle 2-core machine, minutes when it is shared
pytestmark = pytest.mark.timeout(1800)
REQUIRED = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "macro_f1",
    "attention_ratio",
    "attention_ratio_ci_low",
    "attention_ratio_ci_high",
    "consistency",
    "separation_p",
    "effect_size_dz",
    "samples_per_s",
    "val_accuracy_ci_low",
    "balanced_accuracy_ci_low",
    "consistency_ci_low",
    "association",
    "association_ci_low",
)
COMPARED = (
    "train_loss",
    "val_loss",
    "val_accuracy",
    "attention_ratio",
    "consistency",
    "separation_p",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep") / "data"
    generate_dataset(out, PersistenceConfig(num_samples=80, seed=2), progress=False)
    return out


def _cmd(data_dir: Path, approach: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "workers.early_persistence",
        "--approach",
        approach,
        "--data-dir",
        str(data_dir),
        "--train-samples",
        "16",
        "--val-samples",
        "12",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]


def _run(cmd: list[str], run_dir: Path, resume: bool = False) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "ORCH_RUN_DIR": str(run_dir),
        "ORCH_RESUME": "1" if resume else "0",
        "PYTHONPATH": f"{REPO / 'src'}:{REPO}",
    }
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Each approach's uninterrupted run (3 epochs, evaluated after each), made once and shared by the
# tests that read it: most of a run's cost is the process start (torch, scipy), not training.
UNINTERRUPTED = ("--epochs", "3", "--eval-every", "1")


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """``uninterrupted(approach)`` -> the run folder of that approach's uninterrupted run,
    trained on first use. Tests only read it."""
    done: dict[str, Path] = {}

    def get(approach: str) -> Path:
        if approach not in done:
            run_dir = tmp_path_factory.mktemp(f"uninterrupted-{approach}")
            _run(_cmd(data_dir, approach, *UNINTERRUPTED), run_dir)
            done[approach] = run_dir
        return done[approach]

    return get


@pytest.mark.parametrize(
    "approach", ["attention_supervised", "pretrained_features", "contrastive", "multitask"]
)
def test_each_approach_writes_valid_metrics_checkpoints_and_evals(uninterrupted, approach):
    run_dir = uninterrupted(approach)
    recs = _records(run_dir)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    last = recs[-1]
    for key in REQUIRED:
        assert key in last, key
    assert 0.0 <= last["val_accuracy"] <= 1.0 and 0.0 <= last["consistency"] <= 1.0
    assert (
        last["attention_ratio_ci_low"] <= last["attention_ratio"] <= last["attention_ratio_ci_high"]
    )
    assert 0.0 < last["separation_p"] <= 1.0
    assert (run_dir / "checkpoints" / "latest.pt").exists()
    before = json.loads((run_dir / "evals" / "epoch_000000.json").read_text())
    assert before["epoch"] == 0 and len(before["samples"]) == last["n_val_clips"]
    assert ("RANDOM" in before["backbone"]) == (approach == "pretrained_features")
    ev = json.loads((run_dir / "evals" / "epoch_000003.json").read_text())
    assert len(ev["samples"]) == last["n_val_clips"] >= 5
    s = ev["samples"][0]
    assert {
        "sample_id",
        "objects",
        "persistent_attention",
        "transient_attention",
        "ratio",
        "object_accuracy",
    } <= set(s)
    assert {o["kind"] for smp in ev["samples"] for o in smp["objects"]} == {
        "persistent",
        "transient",
    }


def test_resume_reproduces_the_uninterrupted_trajectory(data_dir, uninterrupted, tmp_path):
    base = _cmd(data_dir, "contrastive", *UNINTERRUPTED)
    # stop mid-epoch 2 (2 steps per epoch), as SIGTERM would, then resume as the orchestrator does
    out = _run(base + ["--stop-after-steps", "3"], tmp_path / "b")
    assert "stop requested" in out.stdout
    assert [r["epoch"] for r in _records(tmp_path / "b")] == [1]
    _run(base, tmp_path / "b", resume=True)
    a, b = _records(uninterrupted("contrastive")), _records(tmp_path / "b")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in COMPARED:
            assert ra[key] == rb[key], (ra["epoch"], key, ra[key], rb[key])


def test_sigterm_checkpoints_and_exits_zero(data_dir, tmp_path):
    env = {**os.environ, "ORCH_RUN_DIR": str(tmp_path), "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    cmd = _cmd(data_dir, "multitask", "--epochs", "500", "--eval-every", "1000")
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not metrics.exists() and time.monotonic() < deadline:  # training is under way
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stop requested" in out
    info = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert info["epoch"] >= 1 and info["epoch"] < 500


def test_bad_input_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.early_persistence",
            "--approach",
            "contrastive",
            "--data-dir",
            str(tmp_path / "missing"),
            "--run-dir",
            str(tmp_path / "r"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().startswith("error:") and "generate_persistence_dataset" in proc.stderr
    )


def test_a_scored_checkpoint_reproduces_the_logged_evaluation(data_dir, uninterrupted):
    """score_checkpoint (the winner's test-split scoring) rebuilds the model from the checkpoint,
    frozen random backbone included: on the worker's own val clips it gives the logged record."""
    from workers.early_persistence import score_checkpoint

    run_dir = uninterrupted("pretrained_features")
    logged = _records(run_dir)[-1]
    metrics, records = score_checkpoint(
        run_dir / "checkpoints" / "epoch_000003.pt", data_dir, "val", limit=12
    )
    assert records["checkpoint_epoch"] == 3 and records["split"] == "val"
    for key in ("val_accuracy", "balanced_accuracy", "attention_ratio", "association"):
        assert metrics[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
    test_metrics, test_records = score_checkpoint(
        run_dir / "checkpoints" / "epoch_000003.pt", data_dir, "test"
    )
    assert test_records["split"] == "test" and test_metrics["n_val_clips"] >= 5
