"""workers.fvlm end to end as real subprocesses: train, evaluate, resume, SIGTERM, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """40 tiny clips (T = 4, 56 px -> N = 17, latents 4 x 7 x 7), encoded by the tiny encoders."""
    root = tmp_path_factory.mktemp("fvlm data")
    assert (
        load_script("make_captioned_videos").main(
            [
                "--out",
                str(root / "videos"),
                "--num-samples",
                "40",
                "--num-frames",
                "4",
                "--image-size",
                "56",
                "--val-fraction",
                "0.2",
                "--test-fraction",
                "0.2",
            ]
        )
        == 0
    )
    assert (
        load_script("precompute_dino").main(
            [
                "--videos",
                str(root / "videos"),
                "--out",
                str(root / "feats"),
                "--tiny",
                "--image-size",
                "56",
                "--num-frames",
                "4",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    return root / "feats"


def worker(
    data_dir: Path, run_dir: Path, *extra: str, resume: bool = False, **popen
) -> subprocess.Popen:
    env = {
        **os.environ,
        "ORCH_RUN_DIR": str(run_dir),
        "ORCH_EXPERIMENT": "fvlm",
        "ORCH_WORKER": "w",
        "ORCH_ATTEMPT": "1",
        "ORCH_RESUME": "1" if resume else "0",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
    }
    cmd = [
        sys.executable,
        "-m",
        "workers.fvlm",
        "--data-dir",
        str(data_dir),
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--warmup-steps",
        "2",
        "--eval-batch-size",
        "8",
        "--threads",
        "1",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def finish(proc: subprocess.Popen, timeout_s: float = 240) -> str:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)  # three worker processes; generous for a loaded 2-core machine
def test_train_evaluate_then_resume_continues_the_same_trajectory(data_dir, tmp_path):
    straight, chunked = tmp_path / "straight", tmp_path / "chunked run"
    finish(worker(data_dir, straight, "--max-epochs", "2", "--final-test"))
    # --max-hours 0: checkpoint after the first optimizer step (mid-epoch) and exit 0
    assert "--max-hours" in finish(
        worker(data_dir, chunked, "--max-epochs", "2", "--max-hours", "0")
    )
    assert [r["epoch"] for r in records(chunked)] == [0]
    assert json.loads((chunked / "checkpoints" / "latest.json").read_text())["step"] == 1
    finish(worker(data_dir, chunked, "--max-epochs", "2", resume=True))

    a, b = records(straight), records(chunked)
    assert [r["epoch"] for r in a] == [0, 1, 2, 2]  # epoch-0 diagnostics, 2 evals, the final test
    assert "cap_ratio" not in a[0] and "attn_entropy_coarse" in a[0]  # no success metric untrained
    val = a[2]
    for key in (
        "ce_coarse",
        "ce_fine",
        "cap_ratio",
        "delta_ce_ci_low",
        "delta_ce_p_greater",
        "ce_otherq",
        "ce_revq",
        "ce_meanq",
        "query_gap_min_ci_low",
        "ce_blind",
        "ce_shuffled",
        "ce_randq",
        "attn_entropy_fine",
        "log_n",
        "cos_z",
        "rec_copy",
        "train_loss",
    ):
        assert isinstance(val[key], float), key
    assert val["cap_ratio"] == pytest.approx(val["ce_coarse"] / val["ce_fine"])
    assert val["delta_ce_ci_low"] <= val["delta_ce"] <= val["delta_ce_ci_high"]
    assert 0 < val["attn_entropy_coarse"] <= val["log_n"] + 1e-6
    assert "test_cap_ratio" in a[3] and "cap_ratio" not in a[3]  # test scores never feed criteria
    # both runs trained their caption tokenizer in their own processes: the same one
    tok = Path("tokenizer") / "tokenizer.json"
    assert (straight / tok).read_text() == (chunked / tok).read_text()
    # resuming mid-epoch from the step-1 checkpoint reproduces the uninterrupted run exactly
    for key in ("ce_coarse", "ce_fine", "train_loss", "rec_fine"):
        assert b[-1][key] == pytest.approx(val[key], rel=1e-5), key
    assert b[-1]["step"] == val["step"]

    evals = json.loads((straight / "evals" / "val_epoch_000002.json").read_text())
    meta = json.loads((data_dir / "meta.json").read_text())
    assert sorted(s["id"] for s in evals["samples"]) == sorted(meta["split"]["val"])
    sample = evals["samples"][0]
    assert sample["id"] not in sample["shuffled_with"] and sample["n_tokens"] >= 8
    assert sample["tokens"][-1] == "</s>" and len(sample["tok_ce_fine"]) == sample["n_tokens"]
    assert sample["ce_fine"] == pytest.approx(
        sum(sample["tok_ce_fine"]) / sample["n_tokens"], rel=1e-4
    )
    assert evals["per_token"]["</s>"]["n"] == len(evals["samples"])
    assert (straight / "evals" / "test_epoch_000002.json").exists()
    ckpt = torch.load(straight / "checkpoints" / "latest.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "step"} <= set(ckpt)
    assert ckpt["epoch"] == 2


@pytest.mark.timeout(600)
def test_sigterm_checkpoints_and_exits_zero(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = worker(data_dir, run, "--max-epochs", "500")
    deadline = time.time() + 400
    while not (run / "metrics.jsonl").exists() or len(records(run)) < 2:  # epoch-1 eval written
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(
                f"worker exited or hung before its first epoch: {proc.communicate()[1][-2000:]}"
            )
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, timeout_s=30)
    assert "SIGTERM" in out
    info = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert info["step"] >= 3 and (run / "checkpoints" / "latest.pt").exists()


def test_bad_input_is_one_error_line(tmp_path):
    proc = worker(tmp_path / "missing", tmp_path / "run", "--max-epochs", "1")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2
    assert err.strip().startswith("error:") and "Traceback" not in err
