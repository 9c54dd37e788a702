"""Throughput of the video distillation job's pieces; prints a table (never a timed test).

    python benchmarks/bench_distill.py --preset tiny --batch-size 16 --repeats 5

Rows: parameter counts (from the models), then median wall time per call of the image-stage
training step, the video-stage training step (only the memory modules train), the
PerceiverResampler alone for several context lengths T, and the three-way evaluation forward
(one encoder pass, decoder run for on / off / shuffled). bf16 autocast on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from models.detr_student import DETRStudent, StudentConfig, count_parameters
from models.set_criterion import HungarianMatcher, SetCriterion


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds per call after one warm-up call."""
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


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context-frames", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 4))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = StudentConfig.tiny() if args.preset == "tiny" else StudentConfig.full()
    torch.manual_seed(0)
    student = DETRStudent(cfg).to(device)
    crit = SetCriterion(HungarianMatcher()).to(device)
    B, S, T = args.batch_size, cfg.image_size, args.context_frames
    x = torch.rand(B, 3, S, S, device=device)
    ctx = torch.randn(B, T, 256, 18, 18, device=device).half()
    m = torch.zeros(2, S, S, dtype=torch.bool, device=device)
    m[0, S // 8 : S // 3, S // 8 : S // 2] = True
    m[1, S // 2 :, S // 2 :] = True
    boxes = torch.tensor([[0.23, 0.21, 0.37, 0.21], [0.75, 0.75, 0.5, 0.5]], device=device)
    targets = [{"masks": m, "boxes": boxes}] * B
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")  # noqa: E731

    def image_step() -> None:
        with autocast():
            loss = crit(student(x), targets)["loss"]
        loss.backward()
        student.zero_grad(set_to_none=True)

    n_all = count_parameters(student)
    rows = [
        ("parameters: student total", f"{n_all:,}"),
        ("parameters: PerceiverResampler", f"{count_parameters(student.perceiver_resampler):,}"),
        ("parameters: MemoryCrossAttention", f"{count_parameters(student.memory_cross_attn):,}"),
    ]
    rows.append(
        (
            f"image step (fwd+loss+bwd), B={B}",
            f"{timed(image_step, args.repeats, device) * 1e3:.1f} ms",
        )
    )
    student.freeze_image_model()
    with torch.no_grad():
        student.memory_cross_attn.gate.fill_(0.1)

    def video_step() -> None:
        with autocast():
            loss = crit(student.forward_video(x, ctx), targets)["loss"]
        loss.backward()
        student.zero_grad(set_to_none=True)

    rows.append(
        (
            f"video step (memory modules train), B={B}, T={T}",
            f"{timed(video_step, args.repeats, device) * 1e3:.1f} ms",
        )
    )
    for t in sorted({1, 2, T, cfg.perceiver.max_frames}):
        c = torch.randn(B, t, 256, 18, 18, device=device).half()
        with torch.no_grad(), autocast():
            ms = timed(lambda c=c: student.perceiver_resampler(c), args.repeats, device) * 1e3
        rows.append((f"PerceiverResampler, B={B}, T={t} ({t * 324} tokens)", f"{ms:.1f} ms"))

    @torch.no_grad()
    def eval_forward() -> None:
        with autocast():
            tokens, maps = student.encode(x)
            student.decode(tokens, maps)
            for c in (ctx, ctx.roll(1, 0)):
                student.decode(
                    student.memory_cross_attn(tokens, student.perceiver_resampler(c)), maps
                )

    rows.append(
        (
            f"eval forward on/off/shuffled, B={B}",
            f"{timed(eval_forward, args.repeats, device) * 1e3:.1f} ms",
        )
    )
    width = max(len(r[0]) for r in rows)
    print(f"device {device}, preset {args.preset}, threads {args.threads}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>14}")


if __name__ == "__main__":
    main()
