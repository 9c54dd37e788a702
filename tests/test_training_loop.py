"""The shared epoch loop's schedule (the loop itself is exercised end to end, resume included,
by tests/test_persistence_worker.py and tests/test_persistence_baseline.py)."""

from __future__ import annotations

import itertools
import math

import pytest

from workers.training_loop import warmup_cosine


def test_warmup_cosine_ramps_up_then_decays_to_the_floor():
    f = warmup_cosine(warmup_steps=4, total_steps=20, floor=0.1)

    def cosine(s: int) -> float:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 20))

    assert [f(s) for s in range(4)] == pytest.approx([(s + 1) / 4 * cosine(s) for s in range(4)])
    assert f(10) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)  # held at the floor
    values = [f(s) for s in range(3, 21)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone after the warm-up


def test_warmup_cosine_survives_empty_schedules():
    f = warmup_cosine(warmup_steps=0, total_steps=0)  # no division by zero
    assert f(0) == pytest.approx(1.0) and f(1) == pytest.approx(0.1)


def _toy_loop(run_dir, *, resume: bool = False, stop_after_steps: int | None = None):
    """A linear model on 12 fixed samples, batch 4 (3 steps per epoch), through train_epochs."""
    import torch

    from orchestrator.reporting import Reporter
    from workers.training_loop import train_epochs

    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rep = Reporter(run_dir, resume=resume, handle_signals=False, keep_checkpoints=0)
    evaluated: list[int] = []

    def evaluate(epoch: int):
        evaluated.append(epoch)
        with torch.no_grad():
            return {"val_loss": float(((model(x) - y) ** 2).mean())}, {"epoch": epoch}

    train_epochs(
        rep=rep,
        model=model,
        optimizer=opt,
        scheduler=sched,
        num_samples=12,
        batch_loss=lambda idx: ((model(x[idx]) - y[idx]) ** 2).mean(),
        evaluate=evaluate,
        epochs=3,
        batch_size=4,
        eval_every=1,
        seed=0,
        args={},
        stop_after_steps=stop_after_steps,
        show_progress=False,
    )
    return evaluated


def test_a_mid_epoch_stop_never_replaces_the_evaluated_epochs_checkpoint(tmp_path):
    import json

    evaluated = _toy_loop(tmp_path, stop_after_steps=4)  # epoch 1 done (3 steps), stop in epoch 2
    assert evaluated == [0, 1]  # the untrained model once, then epoch 1
    ckpt = tmp_path / "checkpoints"
    epoch1 = (ckpt / "epoch_000001.pt").read_bytes()
    partial = ckpt / "epoch_000001_step_000000004_partial.pt"
    assert partial.exists() and json.loads((ckpt / "latest.json").read_text())["partial"] is True
    assert epoch1 != partial.read_bytes()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]  # epoch 0 is an eval file, never a record
    assert (tmp_path / "evals" / "epoch_000000.json").exists()
    evaluated = _toy_loop(tmp_path, resume=True)  # resumes from the partial checkpoint
    assert evaluated == [2, 3]  # no second "before" evaluation on resume
    assert (ckpt / "epoch_000001.pt").read_bytes() == epoch1  # the evaluated weights, untouched
