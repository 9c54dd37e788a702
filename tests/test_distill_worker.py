"""End-to-end runs of workers.video_distillation as subprocesses under the worker contract."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from synthvid.segmentation import VideoSpec, generate_video, split_manifest, write_sav_video

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--pretrain-steps",
    "8",
    "--epochs",
    "2",
    "--steps-per-epoch",
    "12",
    "--batch-size",
    "2",
    "--context-frames",
    "2",
    "--bootstrap",
    "200",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """6 tiny videos of 6 frames in the SA-V layout, a manifest, and cached features."""
    root = tmp_path_factory.mktemp("segvid")
    spec = VideoSpec(num_frames=6, max_objects=2)
    ids = [f"syn_{i:06d}" for i in range(6)]
    for i, vid in enumerate(ids):
        write_sav_video(root, generate_video(np.random.default_rng([5, i]), spec, vid))
    split = split_manifest(ids, seed=0, val_frac=0.34, test_frac=0.17)
    (root / "manifest.json").write_text(json.dumps({"params": {}, "split": split}))
    spec_ = importlib.util.spec_from_file_location(
        "cache_ctx", ROOT / "scripts/cache_context_features.py"
    )
    cache = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(cache)
    assert (
        cache.main(["--data-dir", str(root), "--out", str(root / "features"), "--threads", "1"])
        == 0
    )
    return root


def start(data_dir: Path, run_dir: Path, resume: bool = False) -> subprocess.Popen:
    env = {
        **os.environ,
        "ORCH_RUN_DIR": str(run_dir),
        "ORCH_RESUME": "1" if resume else "0",
        "ORCH_EXPERIMENT": "vd",
        "ORCH_WORKER": "w",
        "ORCH_ATTEMPT": "1",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "workers.video_distillation", "--data-dir", str(data_dir), *ARGS],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "full run"
    finish(start(data_dir, run_dir))
    return run_dir


def test_metrics_evals_and_checkpoints(full_run):
    recs = records(full_run)
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    first, last = recs[0], recs[-1]
    # epoch 0: gate 0, the memory is off by construction, so every mode scores the same
    assert (
        first["val_instance_jf_on"]
        == first["val_instance_jf_off"]
        == first["val_instance_jf_shuffled"]
    )
    assert (
        first["val_instance_jf_gain_vs_off"] == 0
        and first["val_instance_jf_gain_vs_off_ci_low"] == 0
    )
    for mode in ("on", "off", "shuffled"):
        for key in (
            "instance_jf",
            "iou",
            "det_f1",
            "presence_f1",
            "presence_precision",
            "presence_recall",
        ):
            assert 0 <= last[f"val_{key}_{mode}"] <= 1, (key, mode)
    for key in ("val_instance_jf_gain_vs_off", "val_instance_jf_gain_vs_shuffled"):
        assert last[f"{key}_ci_low"] <= last[key] <= last[f"{key}_ci_high"]
    assert (
        last["memory_gate"] != 0
        and "test_instance_jf_on" in last
        and "test_instance_jf_on" not in recs[1]
    )
    assert last["train_loss"] > 0 and all(
        np.isfinite(last[k]) for k in last if k.startswith("train_")
    )
    # the non-learned colour rule, scored on the same val frames in every record
    assert 0 < first["val_instance_jf_colour_rule"] == last["val_instance_jf_colour_rule"] <= 1
    assert "test_instance_jf_colour_rule" in last
    # the frozen image model is untouched by the video stage
    assert last["val_instance_jf_off"] == first["val_instance_jf_off"]
    ev = json.loads((full_run / "evals" / "epoch_000002.json").read_text())
    assert {"video", "t", "degraded", "n_gt", "on", "off", "shuffled"} <= set(ev["samples"][0])
    # the shuffled control is the mean over the derangements (3 by default, at most n - 1)
    n_val = len({r["video"] for r in ev["samples"]})
    k = min(3, n_val - 1)
    assert last["val_num_shuffles"] == k
    for rec in ev["samples"][:5]:
        assert rec["shuffled"]["jf"] == pytest.approx(
            np.mean([rec[f"shuffled{i}"]["jf"] for i in range(k)]), abs=1e-4
        )
    assert (full_run / "evals" / "test.json").exists()
    # video-stage checkpoints: only the two trainable modules (+ optimizer, scheduler, rng)
    ckpt = torch.load(full_run / "checkpoints" / "latest.pt", weights_only=False)
    assert set(ckpt) == {"memory", "optimizer", "scheduler", "rng", "epoch", "step_in_epoch"}
    assert {k.split(".")[0] for k in ckpt["memory"]} == {"perceiver_resampler", "memory_cross_attn"}
    image = torch.load(
        full_run / "student_image.pt", weights_only=True
    )  # the frozen image model only
    assert image and not any(
        k.startswith(("perceiver_resampler.", "memory_cross_attn.")) for k in image
    )


def test_resume_from_an_epoch_checkpoint_continues_the_same_trajectory(
    full_run, data_dir, tmp_path
):
    run_dir = tmp_path / "resumed"
    shutil.copytree(full_run, run_dir)
    ck = run_dir / "checkpoints"
    shutil.copy(ck / "epoch_000001.pt", ck / "latest.pt")
    shutil.copy(ck / "epoch_000001.json", ck / "latest.json")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    out = finish(start(data_dir, run_dir, resume=True))
    assert "resumed the video stage at epoch 2" in out
    a, b = records(full_run)[-1], records(run_dir)[-1]
    for key in (
        "val_instance_jf_on",
        "val_instance_jf_shuffled",
        "train_loss",
        "memory_gate",
        "test_instance_jf_on",
    ):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


def test_sigterm_checkpoints_exits_0_and_resume_matches(full_run, data_dir, tmp_path):
    run_dir = tmp_path / "stopped"
    proc = start(data_dir, run_dir)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and records(run_dir):  # stage 2 has begun
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "SIGTERM" in out
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) != (3, 0), "the run finished before SIGTERM"
    finish(start(data_dir, run_dir, resume=True))
    a, b = records(full_run)[-1], records(run_dir)[-1]
    assert b["epoch"] == 2
    for key in (
        "val_instance_jf_on",
        "val_instance_jf_shuffled",
        "memory_gate",
        "test_instance_jf_on",
    ):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


def test_bad_input_is_one_error_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.video_distillation",
            "--data-dir",
            str(tmp_path),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_evaluate_when_no_query_is_present(data_dir):
    """A student that predicts "no object" everywhere: recall 0, negatives scored as correct."""
    from models.detr_student import DETRStudent, StudentConfig
    from workers.video_distillation import evaluate, load_split

    split = json.loads((data_dir / "manifest.json").read_text())["split"]
    videos, feats = load_split(data_dir, data_dir / "features", split["val"], 64, 2)
    torch.manual_seed(0)
    student = DETRStudent(StudentConfig.tiny())
    with torch.no_grad():
        student.class_head.bias.copy_(torch.tensor([-20.0, 20.0]))
    summary, recs = evaluate(student, videos, feats, 2, torch.device("cpu"), 4, 0, 100, "val")
    assert len(recs) == sum(v.num_frames - 2 for v in videos.values())
    assert summary["val_det_recall_on"] == 0 and summary["val_presence_precision_off"] == 0
    negatives = [r for r in recs if r["n_gt"] == 0]
    assert all(r["on"]["jf"] == 1.0 for r in negatives)
    assert summary["val_instance_jf_on"] == pytest.approx(len(negatives) / len(recs))


def test_pretrain_curve_leaves_training_unchanged(full_run, data_dir, tmp_path):
    """--pretrain-eval-every logs stage 1's val curve without changing what stage 1 learns; its
    last point is the epoch-0 record's memory-off score (same frames, same scoring; evaluate
    rounds each frame's score to 5 decimals)."""
    run_dir = tmp_path / "curve"
    env = {**os.environ, "ORCH_RUN_DIR": str(run_dir), "ORCH_RESUME": "0"}
    args = [*ARGS, "--pretrain-eval-every", "3", "--epochs", "1", "--steps-per-epoch", "1"]
    r = subprocess.run(
        [sys.executable, "-m", "workers.video_distillation", "--data-dir", str(data_dir), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    curve = [json.loads(x) for x in (run_dir / "pretrain_curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [3, 6, 8]
    assert all(0 <= c["val_instance_jf_off"] <= 1 for c in curve)
    assert curve[-1]["val_instance_jf_off"] == pytest.approx(
        records(full_run)[0]["val_instance_jf_off"],
        abs=1e-5,  # evals round per frame
    )
    a = torch.load(full_run / "student_image.pt", weights_only=True)
    b = torch.load(run_dir / "student_image.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_score_image_script_matches_the_worker(full_run, data_dir, capsys):
    """scripts/distill_score_image.py scores the run's image model as the worker's epoch 0."""
    spec = importlib.util.spec_from_file_location(
        "score_image", ROOT / "scripts/distill_score_image.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--data-dir", str(data_dir), "--run-dir", str(full_run), "--context-frames", "2"]
    assert script.main(args) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(scores) == {"train", "val", "test"}
    assert scores["val"] == pytest.approx(records(full_run)[0]["val_instance_jf_off"], abs=1e-5)
    assert script.main(["--data-dir", str(data_dir), "--run-dir", str(data_dir)]) == 2


def test_seeds_script_summarises_runs(full_run, tmp_path, capsys):
    """scripts/distill_seeds.py: the same run twice gives its own numbers, sd 0."""
    spec = importlib.util.spec_from_file_location("seeds", ROOT / "scripts/distill_seeds.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(full_run), str(full_run)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    last = records(full_run)[-1]
    for split in ("val", "test"):
        gain = summary[f"{split}_gain_vs_off"]
        assert gain["mean"] == pytest.approx(last[f"{split}_instance_jf_gain_vs_off"])
        assert gain["sd"] == 0 and gain["lo"] == gain["hi"] == pytest.approx(gain["mean"])
    assert script.main([str(tmp_path)]) == 2


def test_augmented_batch_moves_frame_masks_and_boxes_together():
    """--pretrain-augment: each sample gets one of the 8 symmetries of the square, the same one
    for its frame and its masks (an object's pixels stay its pixels), boxes are those of the
    moved masks, the draw is reproducible from the generator, and all 8 occur."""
    from workers.video_distillation import make_batch
    from synthvid.segmentation import SegVideo

    rng = np.random.default_rng(0)
    S = 12
    masks = np.zeros((1, 2, S, S), bool)
    masks[0, 0, 1:4, 2:9] = True  # off-centre, not square: every symmetry moves it
    masks[0, 1, 6:11, 8:10] = True
    frame = rng.integers(0, 256, (1, S, S, 3), dtype=np.uint8)
    videos = {"v": SegVideo("v", frame, masks, np.zeros(1, bool))}
    device = torch.device("cpu")
    plain_x, plain_t, _ = make_batch(videos, {}, [("v", 0)], 0, device)
    seen = set()
    for seed in range(40):
        x, t, _ = make_batch(videos, {}, [("v", 0)] * 3, 0, device,
                             augment=np.random.default_rng(seed))
        x2, t2, _ = make_batch(videos, {}, [("v", 0)] * 3, 0, device,
                               augment=np.random.default_rng(seed))
        assert torch.equal(x, x2) and all(torch.equal(a["masks"], b["masks"])
                                          for a, b in zip(t, t2))
        for i in range(3):
            img, m = x[i], t[i]["masks"]
            # the frame's transform, found by search among the 8, is the masks' transform too
            found = [(k, f) for k in range(4) for f in (False, True)
                     if torch.equal(_d4(plain_x[0], k, f, dims=(1, 2)), img)]
            assert len(found) == 1
            k, f = found[0]
            assert torch.equal(_d4(plain_t[0]["masks"], k, f, dims=(1, 2)), m)
            ys, xs = torch.nonzero(m[0], as_tuple=True)
            cx, cy = (xs.min() + xs.max() + 1) / 2 / S, (ys.min() + ys.max() + 1) / 2 / S
            assert torch.allclose(t[i]["boxes"][0, :2], torch.stack([cx, cy]).float())
            seen.add((k, f))
    assert len(seen) == 8
    with pytest.raises(ValueError, match="context_frames=0"):
        make_batch(videos, {}, [("v", 0)], 1, device, augment=np.random.default_rng(0))


def _d4(x: torch.Tensor, k: int, flip: bool, dims: tuple[int, int]) -> torch.Tensor:
    """Rotate by k x 90 degrees in ``dims`` (numpy's rot90 sense), then flip the second dim."""
    y = torch.rot90(x, k, dims)
    return torch.flip(y, (dims[1],)) if flip else y
