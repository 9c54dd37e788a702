"""Trivial baselines of the trajectory comparison: the constant (train-mean) position predictor
and the single-frame control, as functions and through the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthvid.persistence import PersistenceConfig, generate_dataset
from synthvid.trajectory import load_trajectory_split, mean_position_baseline, single_frame_video

REPO = Path(__file__).resolve().parents[1]


def test_mean_position_baseline_is_the_train_mean_and_minimises_squared_error():
    rng = np.random.default_rng(0)
    train = rng.uniform(0, 64, size=(50, 2)).astype(np.float32)
    pred = mean_position_baseline(train, 7)
    assert pred.shape == (7, 2) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, np.broadcast_to(train.mean(0), (7, 2)), rtol=1e-6)
    # on the train targets themselves no constant has a lower mean squared error
    sse = ((train - pred[0]) ** 2).sum()
    for shift in ([1.0, 0.0], [0.0, -0.5], [0.3, 0.3]):
        assert sse < ((train - (pred[0] + np.array(shift))) ** 2).sum()
    with pytest.raises(ValueError):
        mean_position_baseline(np.zeros((0, 2)), 3)


def test_single_frame_video_repeats_one_frame_and_removes_motion():
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, size=(3, 6, 3, 8, 8), dtype=np.uint8)
    out = single_frame_video(video, 2)
    assert out.shape == video.shape and out.dtype == np.uint8
    for t in range(6):
        np.testing.assert_array_equal(out[:, t], video[:, 2])
    assert not np.array_equal(out, video)
    with pytest.raises(ValueError, match="single-frame"):
        single_frame_video(video, 6)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("traj baselines") / "data"
    cfg = PersistenceConfig(
        num_samples=60, seed=3, num_frames=12, max_persistent=1, max_transient=2, shard_size=30
    )
    generate_dataset(out, cfg, progress=False)
    return out


def test_worker_reports_the_constant_predictor_and_runs_the_single_frame_control(data, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PYTHONPATH=f"{REPO / 'src'}:{REPO}", OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    args = ["--input-frames", "8", "--horizon", "3", "--image-size", "16", "--batch-size", "8"]
    proc = subprocess.run(
        [sys.executable, "-m", "workers.trajectory", "--model", "i3d", "--data-dir", str(data)]
        + args
        + ["--epochs", "1", "--threads", "1", "--no-progress", "--single-frame", "4"]
        + ["--run-dir", str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the constant predictor's error, recomputed here from the splits
    train = load_trajectory_split(data, "train", input_frames=8, horizon=3)
    for split, key in (("val", "mean_position_error_px"), ("test", "test_mean_position_error_px")):
        clips = load_trajectory_split(data, split, input_frames=8, horizon=3)
        err = np.linalg.norm(train.target.mean(0) - clips.target, axis=1).mean()
        assert rec[key] == pytest.approx(float(err), rel=1e-5)
    assert 0.0 <= rec["test_majority_accuracy"] <= 1.0
    bad = subprocess.run(
        [sys.executable, "-m", "workers.trajectory", "--model", "i3d", "--data-dir", str(data)]
        + args
        + ["--single-frame", "8", "--run-dir", str(tmp_path / "bad")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: --single-frame")


def _fake_run(root: Path, name: str, correct: list[bool], acc_key: float) -> None:
    d = root / name
    (d / "evals").mkdir(parents=True)
    last = {
        "test_accuracy": acc_key,
        "test_macro_f1": acc_key,
        "test_position_error_px": 10.0,
        "params": 1000,
        "test_majority_accuracy": 0.25,
        "test_baseline_position_error_px": 5.0,
        "test_static_position_error_px": 10.0,
        "test_mean_position_error_px": 18.0,
    }
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n" + json.dumps(last) + "\n")
    samples = [
        {"sample_id": f"s{i}", "label": 1, "pred": 1 if c else 0} for i, c in enumerate(correct)
    ]
    (d / "evals" / "test_final.json").write_text(json.dumps({"samples": samples}))


def test_trajectory_table_pairs_seed_matched_runs_on_the_same_clips(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tt", REPO / "scripts/trajectory_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    a = [rng.random(40) < 0.8 for _ in range(2)]
    b = [rng.random(40) < 0.4 for _ in range(2)]
    for s in range(2):
        _fake_run(tmp_path, f"m-seed{s}", list(a[s]), float(a[s].mean()))
        _fake_run(tmp_path, f"m-single-seed{s}", list(b[s]), float(b[s].mean()))
    groups = mod.load_runs(tmp_path)
    assert sorted(groups) == ["m", "m-single"] and sorted(groups["m"]) == [0, 1]
    r = mod.paired_accuracy(groups["m"], groups["m-single"])
    expected = np.mean([a[s].mean() - b[s].mean() for s in range(2)])
    assert r["mean"] == pytest.approx(expected) and r["ci"][0] < r["mean"] < r["ci"][1]
    assert r["p_greater"] < 0.05
    assert mod.main([str(tmp_path), "--pair", "m:m-single"]) == 0
    out = capsys.readouterr().out
    assert "| m | 0,1 |" in out and "constant predictor (train-mean position)" in out
    assert mod.main([str(tmp_path), "--pair", "m:nope"]) == 2
