"""The resumable epoch loop the early-persistence workers share.

One loop, so every worker of the race checkpoints, resumes and reports the same way:

- batches are a seeded permutation per epoch (``seed * 100_003 + epoch``), so a resumed attempt
  draws the same batches as the uninterrupted run;
- a stop request (SIGTERM from the controller, or ``--stop-after-steps``) mid-epoch checkpoints
  the batch position in a PARTIAL checkpoint (``epoch_000005_step_000001234_partial.pt``,
  ``Reporter.save_checkpoint(partial=True)``), never in the file of the last evaluated epoch:
  the weights that produced a record (and may have met the criteria) are never replaced by
  weights trained further. The resumed attempt skips the batches already done and follows the
  uninterrupted trajectory exactly (model, optimizer, scheduler, CPU/CUDA RNG and the running
  loss are all in the checkpoint);
- before the first step of a fresh run, ``evaluate(0)`` runs once and its per-sample records go
  to evals/epoch_000000.json (the "before" of the success figure). It is NOT logged to
  metrics.jsonl: epoch 0 is a multiple of every check interval, and an untrained model must
  never be a check point of the race;
- every epoch ends with a record (train loss, step, samples/s, CPU seconds, lr; the evaluation's
  metrics every ``eval_every`` epochs and at the last) and a checkpoint written *after* the
  record, as the worker contract asks.

The caller keeps everything model-specific: ``batch_loss(indices)`` returns the scalar loss of
one batch (forward pass included), ``evaluate(epoch)`` returns ``(metrics, per-sample records)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from orchestrator.reporting import Reporter


def warmup_cosine(
    warmup_steps: int, total_steps: int, floor: float = 0.1
) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: linear warm-up over ``warmup_steps`` optimizer steps, then
    a cosine from 1 down to ``floor`` at ``total_steps`` (held there after)."""
    warmup_steps, total_steps = max(1, warmup_steps), max(1, total_steps)

    def factor(step: int) -> float:
        cosine = 1 + math.cos(math.pi * min(1.0, step / total_steps))
        return min(1.0, (step + 1) / warmup_steps) * (floor + (1 - floor) * 0.5 * cosine)

    return factor


@dataclass
class LoopPosition:
    """Where training is: completed epochs, batches done in the current one, optimizer steps,
    and the running loss sum / sample count of the current epoch."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    run_loss: float = 0.0
    run_count: int = 0


def train_epochs(
    *,
    rep: Reporter,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    num_samples: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    evaluate: Callable[[int], tuple[dict[str, Any], Any]],
    epochs: int,
    batch_size: int,
    eval_every: int,
    seed: int,
    args: dict[str, Any],
    stop_after_steps: int | None = None,
    grad_clip: float = 1.0,
    show_progress: bool = True,
    evaluate_before: bool = True,
) -> int:
    """Train for ``epochs`` epochs (resuming from the run's latest checkpoint when the
    controller says ``ORCH_RESUME=1``); returns the exit code (0).

    Args:
        rep: the worker's Reporter (metrics, evals, checkpoints, stop requests).
        num_samples: training-set size; batches are index tensors (int64) into it.
        batch_loss: indices [B] -> scalar loss tensor of that batch (forward pass included);
            the loop does zero_grad / backward / clip_grad_norm_(grad_clip) / step / scheduler.
        evaluate: completed epoch -> (metrics for the record, per-sample records written to
            evals/epoch_NNNNNN.json).
        args: the worker's arguments, stored in every checkpoint.
        stop_after_steps: request a stop after this many optimizer steps (tests, time boxing).
        evaluate_before: evaluate the untrained model once into evals/epoch_000000.json.

    Raises:
        RuntimeError / OSError: from the model or the file system; nothing is caught here.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    pos = LoopPosition()
    if rep.resume and (ckpt := rep.latest_checkpoint()) is not None:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        pos = LoopPosition(**{k: state[k] for k in asdict(pos)})
        print(
            f"resumed from {ckpt.name}: epoch {pos.epoch}, batch {pos.batch_in_epoch}", flush=True
        )

    def checkpoint(partial: bool = False) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            **asdict(pos),
            "args": args,
        }
        rep.save_checkpoint(
            lambda p: torch.save(state, p), epoch=pos.epoch, step=pos.step, partial=partial
        )

    if pos == LoopPosition() and evaluate_before:
        _, records = evaluate(0)  # untrained: the "before"; never a metrics record (see above)
        rep.write_eval(f"epoch_{0:06d}", records)
    model.train()
    while pos.epoch < epochs:
        order = torch.randperm(
            num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + pos.epoch)
        )
        batches = list(torch.split(order, batch_size))
        t0, cpu0, seen = time.perf_counter(), time.process_time(), 0
        bar = tqdm(
            batches[pos.batch_in_epoch :],
            desc=f"epoch {pos.epoch + 1}/{epochs}",
            leave=False,
            disable=not show_progress,
            initial=pos.batch_in_epoch,
            total=len(batches),
        )
        for indices in bar:
            loss = batch_loss(indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
            pos.step, pos.batch_in_epoch = pos.step + 1, pos.batch_in_epoch + 1
            seen += len(indices)
            pos.run_loss += loss.item() * len(indices)
            pos.run_count += len(indices)
            bar.set_postfix(loss=f"{pos.run_loss / pos.run_count:.4f}")
            if stop_after_steps is not None and pos.step >= stop_after_steps:
                rep.request_stop()
            if rep.should_stop:
                break
        train_time, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if rep.should_stop and pos.batch_in_epoch < len(batches):
            checkpoint(partial=True)  # mid-epoch: the resumed attempt skips the batches done
            print(
                f"stop requested: checkpoint at epoch {pos.epoch}, batch {pos.batch_in_epoch}",
                flush=True,
            )
            return 0
        pos.epoch += 1
        record: dict[str, Any] = {
            "train_loss": pos.run_loss / max(pos.run_count, 1),
            "step": pos.step,
            "samples_per_s": seen / train_time if train_time > 0 else None,
            "train_cpu_s": train_cpu,
            "lr": scheduler.get_last_lr()[0],
        }
        pos.batch_in_epoch, pos.run_loss, pos.run_count = 0, 0.0, 0
        if pos.epoch % eval_every == 0 or pos.epoch == epochs:
            metrics, records = evaluate(pos.epoch)
            record.update(metrics)
            rep.write_eval(f"epoch_{pos.epoch:06d}", records)
            print(
                f"epoch {pos.epoch}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)),
                flush=True,
            )
        rep.log(epoch=pos.epoch, **record)
        checkpoint()
        if rep.should_stop:
            print(f"stop requested: checkpoint at epoch {pos.epoch}", flush=True)
            return 0
    return 0
