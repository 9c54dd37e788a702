"""Throughput of the trajectory-comparison models: train and inference clips/s, FLOPs per clip.

    python benchmarks/bench_trajectory.py                       # tiny preset, 16 x 32 px, CPU
    python benchmarks/bench_trajectory.py --preset full --image-size 64 --device cuda

Each model (the worker's build_model, heads included) runs ``--warmup`` then ``--repeats`` timed
steps on random clips; the table gives the median clips/s (train = forward + backward + AdamW
step; inference = forward under no_grad in eval mode) and the forward FLOPs per clip counted by
torch.utils.flop_counter (independent of machine load, unlike the timings: on a shared CPU the
clips/s are only comparable within one run of this script).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.trajectory_heads import count_trainable_parameters
from workers.trajectory import MODELS, PRESETS, build_model


def _train_step(model, opt, video, labels, target, autocast: bool) -> None:
    """One AdamW step on the classification + position loss."""
    with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(video)
    loss = F.cross_entropy(out["logits"].float(), labels) + F.smooth_l1_loss(
        out["position"].float(), target
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@torch.no_grad()
def _infer_step(model, video, autocast: bool) -> None:
    with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=autocast):
        model(video)


def _time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one call of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    p.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS)
    )
    p.add_argument("--frames", type=int, default=16, help="input frames T")
    p.add_argument(
        "--image-size", type=int, default=32, help="frame size S (the tiny preset trains at 32)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="clips per step")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or args.batch_size < 1 or args.repeats < 1:
        print(
            f"error: unknown model(s) {bad} (choose from {MODELS}), or batch/repeats < 1",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    print(
        f"preset {args.preset}, {args.frames} x {args.image_size} px, batch {args.batch_size}, "
        f"{args.threads} thread(s), device {device}\n"
    )
    print("| model | params | GFLOPs/clip (fwd) | train clips/s | inference clips/s |")
    print("|---|---|---|---|---|")
    for name in models:
        torch.manual_seed(0)
        try:
            model = build_model(
                name, args.preset, args.frames, args.image_size, PRESETS[args.preset]["dropout"]
            ).to(device)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        video = torch.rand(
            args.batch_size, args.frames, 3, args.image_size, args.image_size, device=device
        )
        labels = torch.randint(0, 4, (args.batch_size,), device=device)
        target = torch.rand(args.batch_size, 2, device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        train_step = partial(_train_step, model, opt, video, labels, target, autocast)
        infer_step = partial(_infer_step, model, video, autocast)
        # counted in train mode: in eval mode nn.TransformerEncoderLayer takes a fused fast path
        # whose FLOPs the counter does not see (the arithmetic is the same)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(video[:1])
        gflops = counter.get_total_flops() / 1e9
        model.eval()
        infer_s = _time(infer_step, device, args.warmup, args.repeats)
        model.train()
        train_s = _time(train_step, device, args.warmup, args.repeats)
        print(
            f"| {name} | {count_trainable_parameters(model):,} | {gflops:.3f} | "
            f"{args.batch_size / train_s:.1f} | {args.batch_size / infer_s:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
