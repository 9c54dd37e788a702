"""A training script that knows nothing of the orchestrator, logging the way common tools do.

It trains a tiny linear model by gradient descent on a fixed synthetic regression task (numpy),
and logs with the real libraries: stdout lines (``step N train loss: X test loss: Y``),
TensorBoard scalars with slashed tags through ``torch.utils.tensorboard.SummaryWriter``
(``Loss/train``, ``Loss/test``), and Lightning's ``CSVLogger`` (a ``version_N`` folder per run; a
train row and a validation row at the same step). Its loss curve is shaped by ``--target`` (the
test loss it approaches), so tests can decide who wins without waiting for real learning. torch
and Lightning are imported only by the loggers that need them: a stdout-only run takes a
fraction of a second (about 0.3 s for 300 steps), which keeps the suite's many races short.

    python third_party_trainer.py --steps 400 --eval-every 100 --logdir runs --csv-dir logs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps to run")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--target", type=float, default=2.0, help="test loss the curve approaches")
    p.add_argument("--start", type=float, default=4.0, help="test loss at step 0")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step")
    p.add_argument("--logdir", default=None, help="TensorBoard log folder (SummaryWriter)")
    p.add_argument("--flush-secs", type=int, default=None, help="SummaryWriter flush_secs")
    p.add_argument("--csv-dir", default=None, help="Lightning CSVLogger root (version_N inside)")
    p.add_argument("--crash-once", default=None,
                   help="marker file: crash at the first evaluation unless it exists (then "
                        "create it), so a retried attempt succeeds")
    p.add_argument("--config", default=None, help="a JSON object, echoed to stdout")
    args = p.parse_args()

    import numpy as np

    if args.config is not None:
        print("config:", json.dumps(json.loads(args.config), sort_keys=True), flush=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8))
    y = x @ rng.standard_normal(8)
    w = np.zeros(8)

    writer = None
    if args.logdir:
        from torch.utils.tensorboard import SummaryWriter

        kw = {} if args.flush_secs is None else {"flush_secs": args.flush_secs}
        writer = SummaryWriter(args.logdir, **kw)
    csv_logger = None
    if args.csv_dir:
        from lightning.fabric.loggers import CSVLogger

        csv_logger = CSVLogger(args.csv_dir, name="", flush_logs_every_n_steps=1)

    for step in range(1, args.steps + 1):
        w -= 0.01 * 2 * x.T @ (x @ w - y) / len(y)  # a gradient step on the mean squared error
        if args.sleep:
            time.sleep(args.sleep)
        if step % args.eval_every:
            continue
        # the curve the test asks for: start -> target, exponentially in the step
        test_loss = args.target + (args.start - args.target) * math.exp(-step / 100)
        train_loss = test_loss - 0.3
        acc = 1.0 - test_loss / 10
        if args.crash_once and not Path(args.crash_once).exists():
            Path(args.crash_once).write_text("crashed once\n")
            print(f"step {step}: simulated crash", file=sys.stderr, flush=True)
            if csv_logger is not None:
                csv_logger.log_metrics({"train_loss": train_loss, "epoch": 0}, step=step)
                csv_logger.save()
            os._exit(3)
        print(f"step {step} train loss: {train_loss:.4f} test loss: {test_loss:.4f}", flush=True)
        if writer is not None:
            writer.add_scalar("Loss/train", train_loss, step)
            writer.add_scalar("Loss/test", test_loss, step)
        if csv_logger is not None:  # Lightning's layout: a train row, then a val row, one step
            csv_logger.log_metrics({"train_loss": train_loss, "epoch": 0}, step=step)
            csv_logger.log_metrics({"val_acc": acc, "val_loss": test_loss, "epoch": 0}, step=step)
            csv_logger.save()
    if writer is not None:
        writer.close()
    if csv_logger is not None:
        csv_logger.finalize("success")
    return 0


if __name__ == "__main__":
    sys.exit(main())
