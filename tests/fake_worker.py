"""A small but real worker for the orchestrator's tests and benchmarks (stdlib only).

It follows the worker contract with orchestrator.reporting: one metrics record per epoch,
a checkpoint per epoch (JSON), resume from the latest checkpoint when ORCH_RESUME=1, and a
clean exit 0 on SIGTERM. Faults on request: crash at an epoch, ignore SIGTERM, fork children,
start a setsid'd helper that escapes the process group, hang (stall) at an epoch.

    python tests/fake_worker.py --epochs 20 --interval 0.1 --metric acc=0.5+0.05*epoch
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.reporting import Reporter  # noqa: E402

SLEEPER = "import time\nwhile True: time.sleep(0.05)\n"


def parse_metric(text: str) -> tuple[str, float, float]:
    """'acc=0.5+0.05*epoch' -> ('acc', 0.5, 0.05); 'acc=0.1*epoch' -> ('acc', 0, 0.1);
    'loss=2' -> ('loss', 2.0, 0.0)."""
    name, _, expr = text.partition("=")
    expr = expr.replace(" ", "")
    if not expr.endswith("*epoch"):
        return name, float(expr), 0.0
    body = expr[: -len("*epoch")]
    for i in range(len(body) - 1, 0, -1):
        if body[i] in "+-" and body[i - 1] not in "eE":
            return name, float(body[:i]), float(body[i:])
    return name, 0.0, float(body)


def stop_checkpoint(rep: Reporter, epoch: int, seconds: float) -> None:
    """A slow stop checkpoint: ``seconds`` of work, then ``stop.ckpt`` in the run directory."""
    print(f"SIGTERM: writing a stop checkpoint ({seconds}s)", flush=True)
    time.sleep(seconds)
    (rep.run_dir / "stop.ckpt").write_text(json.dumps({"epoch": epoch}))
    print("stop checkpoint written", flush=True)


def curve(start: float, slope: float, epoch: int, args: argparse.Namespace) -> float:
    """The metric at ``epoch``: linear, or bent by --saturate / --knee, plus --noise."""
    import math
    import random

    if args.saturate:
        value = start + slope * args.saturate * (1 - math.exp(-epoch / args.saturate))
    elif args.knee:
        knee, factor = (float(v) for v in args.knee.split(":"))
        value = start + slope * min(epoch, knee) + slope * factor * max(0.0, epoch - knee)
    else:
        value = start + slope * epoch
    if args.noise:
        value += random.Random(args.seed * 100_003 + epoch).gauss(0.0, args.noise)
    return value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.1, help="seconds per epoch")
    p.add_argument("--metric", action="append", default=[], help="NAME=START+SLOPE*epoch")
    p.add_argument("--crash-at", type=int, help="exit 3 when reaching this epoch")
    p.add_argument("--crash-attempts", type=int, default=1, help="crash only on attempts <= this")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--children", type=int, default=0, help="fork sleeping children")
    p.add_argument("--setsid-child", action="store_true", help="start a helper that calls setsid")
    p.add_argument("--hang-at", type=int, help="stop reporting (but keep running) at this epoch")
    p.add_argument("--exit-code", type=int, default=0, help="exit code after the last epoch")
    p.add_argument("--checkpoint-s", type=float, default=0.0,
                   help="on SIGTERM, take this long to write a stop checkpoint, then exit 0")
    p.add_argument("--start-after", help="wait until this file exists before the first epoch")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="numbered checkpoints kept besides latest (0: all)")
    p.add_argument("--random-checkpoints", action="store_true",
                   help="add random bytes to each checkpoint, so no two are identical")
    p.add_argument("--checkpoint-archive", default=None,
                   help="also copy every checkpoint saved into this folder (what was saved)")
    p.add_argument("--partial-on-stop", action="store_true",
                   help="on SIGTERM mid-epoch, save a partial (epoch+step) stop checkpoint")
    p.add_argument("--saturate", type=float, default=None, metavar="TAU",
                   help="curves bend over: START + SLOPE*TAU*(1-exp(-epoch/TAU))")
    p.add_argument("--knee", default=None, metavar="EPOCH:FACTOR",
                   help="the slope is FACTOR times steeper after EPOCH (a late bloomer)")
    p.add_argument("--noise", type=float, default=0.0, help="gaussian noise sd on every metric")
    p.add_argument("--seed", type=int, default=0, help="noise seed (per epoch: resumes agree)")
    p.add_argument("--step-per-epoch", type=int, default=0,
                   help="also log step = epoch x this (a step-based script)")
    args = p.parse_args()

    rep = Reporter.from_env(default_run_dir=args.run_dir, handle_signals=not args.ignore_sigterm,
                            keep_checkpoints=args.keep_checkpoints)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    metrics = [parse_metric(m) for m in args.metric]
    children = [
        subprocess.Popen([sys.executable, "-c", SLEEPER]) for _ in range(args.children)
    ]
    if args.setsid_child:
        subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)

    while args.start_after and not Path(args.start_after).exists() and not rep.should_stop:
        time.sleep(0.01)
    start = 1
    if rep.resume and (ckpt := rep.latest_checkpoint(".ckpt")) is not None:
        start = json.loads(ckpt.read_text())["epoch"] + 1
        print(f"resumed at epoch {start}", flush=True)
    for epoch in range(start, args.epochs + 1):
        deadline = time.monotonic() + args.interval
        while time.monotonic() < deadline and not rep.should_stop:
            time.sleep(min(0.01, args.interval))
        if rep.should_stop:
            if args.checkpoint_s:
                stop_checkpoint(rep, epoch - 1, args.checkpoint_s)
            if args.partial_on_stop:
                save(rep, args, epoch, partial=True)
            break
        if args.crash_at == epoch and rep.attempt <= args.crash_attempts:
            print(f"simulated crash at epoch {epoch}", file=sys.stderr, flush=True)
            os._exit(3)
        if args.hang_at is not None and epoch >= args.hang_at:
            while not rep.should_stop:
                time.sleep(0.01)
            break
        values = {name: round(curve(a, b, epoch, args), 6) for name, a, b in metrics}
        values["gpu"] = int(os.environ.get("CUDA_VISIBLE_DEVICES") or -1)
        values["resumed"] = int(rep.resume)
        if args.step_per_epoch:
            values["step"] = epoch * args.step_per_epoch
        rep.log(epoch=epoch, **values)
        if args.random_checkpoints or args.checkpoint_archive:
            save(rep, args, epoch)
        else:
            rep.save_checkpoint(
                lambda path, e=epoch: path.write_text(json.dumps({"epoch": e})),
                epoch=epoch,
                suffix=".ckpt",
            )
        print(f"epoch {epoch} {values}", flush=True)
    for c in children:
        c.terminate()
    return args.exit_code


def save(rep: Reporter, args: argparse.Namespace, epoch: int, *, partial: bool = False) -> None:
    """A checkpoint with --random-checkpoints / --checkpoint-archive / --partial-on-stop."""
    content = {"epoch": epoch - 1 if partial else epoch, "partial": partial}
    if args.random_checkpoints:
        content["payload"] = os.urandom(16).hex()
    data = json.dumps(content).encode()
    path = rep.save_checkpoint(
        lambda p: p.write_bytes(data), epoch=epoch, suffix=".ckpt", partial=partial,
        step=epoch * 1000 + 1 if partial else None,
    )
    if args.checkpoint_archive:
        archive = Path(args.checkpoint_archive)
        archive.mkdir(parents=True, exist_ok=True)
        (archive / path.name).write_bytes(data)


if __name__ == "__main__":
    sys.exit(main())
