"""End-to-end runs of workers/trajectory.py as real subprocesses on a small generated dataset:
every model trains and reports, bad input is one error line, SIGTERM checkpoints and exits 0,
and a resumed run continues the uninterrupted trajectory."""

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
TINY = [
    "--input-frames",
    "8",
    "--horizon",
    "3",
    "--image-size",
    "16",
    "--train-samples",
    "24",
    "--val-samples",
    "16",
    "--batch-size",
    "8",
    "--threads",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trajectory worker") / "data"  # a path with a space
    cfg = PersistenceConfig(
        num_samples=80, seed=2, num_frames=12, max_persistent=1, max_transient=2, shard_size=40
    )
    generate_dataset(out, cfg, progress=False)
    return out


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PYTHONPATH=f"{REPO / 'src'}:{REPO}", OMP_NUM_THREADS="1", **extra)
    return env


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workers.trajectory", *args],
        cwd=REPO,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("model", ["conv_temporal", "i3d", "slowfast", "vivit"])
def test_each_model_trains_and_reports(model, data, tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(
        [
            "--model",
            model,
            "--data-dir",
            str(data),
            "--epochs",
            "1",
            "--run-dir",
            str(run_dir),
            *TINY,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = _records(run_dir)
    assert rec["epoch"] == 1
    for key in (
        "val_accuracy",
        "val_macro_f1",
        "val_recall_linear",
        "val_recall_helical",
        "position_error_px",
        "baseline_position_error_px",
        "static_position_error_px",
        "params",
        "train_time_s",
        "infer_clips_per_s",
        "test_accuracy",
        "test_macro_f1",
    ):
        assert isinstance(rec[key], (int, float)), key
    assert 0.0 <= rec["val_accuracy"] <= 1.0 and rec["params"] > 1000
    assert rec["baseline_position_error_px"] > 0
    ev = json.loads((run_dir / "evals" / "epoch_000001.json").read_text())
    conf = ev["confusion"]
    assert len(conf) == 4 and sum(map(sum, conf)) == len(ev["samples"])
    assert sum(conf[i][i] for i in range(4)) / len(ev["samples"]) == pytest.approx(
        rec["val_accuracy"]
    )
    assert ev["target_frame"] == 10 and ev["input_frames"] == 8
    test = json.loads((run_dir / "evals" / "test_final.json").read_text())
    assert not {s["sample_id"] for s in test["samples"]} & {s["sample_id"] for s in ev["samples"]}
    assert (run_dir / "checkpoints" / "latest.pt").exists()


def test_bad_input_is_one_error_line(data, tmp_path):
    proc = _run(
        [
            "--model",
            "i3d",
            "--data-dir",
            str(tmp_path / "nothing"),
            "--run-dir",
            str(tmp_path / "r"),
        ]
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: no dataset at")
    assert "Traceback" not in proc.stderr
    proc = _run(
        [
            "--model",
            "i3d",
            "--data-dir",
            str(data),
            "--horizon",
            "9",
            "--run-dir",
            str(tmp_path / "r"),
        ]
    )
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_checkpoints_and_resume_follows_the_same_trajectory(data, tmp_path):
    args = [
        "--model",
        "i3d",
        "--data-dir",
        str(data),
        "--epochs",
        "2",
        "--input-frames",
        "8",
        "--horizon",
        "3",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--val-samples",
        "8",
        "--threads",
        "1",
        "--no-progress",
    ]
    straight = tmp_path / "straight"
    assert _run([*args, "--run-dir", str(straight)]).returncode == 0
    ref = _records(straight)[-1]

    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.trajectory", *args],
        cwd=REPO,
        env=_env(ORCH_RUN_DIR=str(run_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    while not _records(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # during epoch 2 (or just after epoch 1: the same outcome)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "stop requested" in out and [r["epoch"] for r in _records(run_dir)] == [1]
    info = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert info["step"] > 0

    resumed = _run(args, ORCH_RUN_DIR=str(run_dir), ORCH_RESUME="1", ORCH_ATTEMPT="2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    last = _records(run_dir)[-1]
    assert last["epoch"] == 2 and last["attempt"] == 2
    for key in ("val_loss", "position_error_px", "train_loss", "optimizer_steps"):
        assert last[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
