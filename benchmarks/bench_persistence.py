"""Throughput of the early-persistence approaches, and the cost of the worker contract.

    python benchmarks/bench_persistence.py --data-dir data/persistence            # CPU table
    python benchmarks/bench_persistence.py --data-dir data/persistence --sharing  # + 4 at once

Prints, per approach: training clips/s (wall) and CPU seconds per clip (process time, which a
machine shared with other jobs does not distort as much), over --steps optimizer steps of the
tiny preset (batch 16) after --warmup steps. Then the reporting/checkpoint overhead: the same
loop with Reporter.log + Reporter.save_checkpoint once per "epoch" of --epoch-steps steps versus
without them (goal: under 5%). With --sharing (meant for a GPU box), the four approaches run
alone and then all four at once as subprocesses, and the table gives each one's clips/s both ways.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.reporting import Reporter
from synthvid.persistence import extract_tokens, load_split
from workers import early_persistence as ep

APPROACHES = ep.APPROACHES


def setup(approach: str, data_dir: str, train_samples: int, preset: str):
    args = ep.parse_args(["--approach", approach, "--data-dir", data_dir, "--preset", preset])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = extract_tokens(load_split(data_dir, "train", train_samples))
    crops = ep.resize_crops(torch.from_numpy(tok.crops), args.token_size)
    torch.manual_seed(0)
    model, inputs, _ = ep.build_model(args, crops, crops[:1], device)
    data = ep.TokenBatches(tok, inputs, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    return args, model, data, opt, device


def train_steps(
    args,
    model,
    data,
    opt,
    device,
    steps: int,
    reporter: Reporter | None = None,
    epoch_steps: int = 50,
) -> tuple[float, float, int]:
    """Run ``steps`` training steps; returns (wall s, CPU s, clips)."""
    gen = torch.Generator().manual_seed(0)
    clips_done = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        clips = torch.randint(0, len(data), (args.batch_size,), generator=gen)
        b = data.batch(clips)
        out = model(b["inputs"], b["frame"], b["centre"], b["valid"])
        loss, _ = ep.compute_loss(args, out, b, 16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clips_done += len(clips)
        if reporter is not None and (step + 1) % epoch_steps == 0:
            epoch = (step + 1) // epoch_steps
            reporter.log(epoch=epoch, train_loss=loss.item())
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng_cpu": torch.get_rng_state(),
            }
            reporter.save_checkpoint(lambda p, s=state: torch.save(s, p), epoch=epoch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, clips_done


def single(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    a, model, data, opt, device = setup(args.single, args.data_dir, args.train_samples, args.preset)
    train_steps(a, model, data, opt, device, args.warmup)
    wall, cpu, clips = train_steps(a, model, data, opt, device, args.steps)
    return {
        "approach": args.single,
        "clips_per_s": clips / wall,
        "cpu_s_per_clip": cpu / clips,
        "device": str(device),
    }


def run_sub(args, approach: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "--data-dir",
        args.data_dir,
        "--single",
        approach,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--train-samples",
        str(args.train_samples),
        "--preset",
        args.preset,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir", required=True, help="dataset folder (generate_persistence_dataset.py)"
    )
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument(
        "--epoch-steps", type=int, default=50, help="steps per 'epoch' in the overhead test"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--train-samples", type=int, default=800, help="train clips loaded")
    p.add_argument("--preset", default="tiny", choices=sorted(ep.PRESETS), help="worker preset")
    p.add_argument(
        "--overhead-approach",
        default="pretrained_features",
        choices=APPROACHES,
        help="approach of the overhead test (default: the cheapest step, the worst case)",
    )
    p.add_argument("--sharing", action="store_true", help="also run all four at once (GPU box)")
    p.add_argument("--single", choices=APPROACHES, help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        load_split(args.data_dir, "val", 1)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.single:
        print(json.dumps(single(args)))
        return 0
    print(
        f"{'approach':<22}{'clips/s':>10}{'CPU ms/clip':>13}   (alone, {args.threads} thread(s), "
        f"{args.steps} steps, preset {args.preset})"
    )
    alone = {}
    for approach in APPROACHES:
        proc = run_sub(args, approach)
        res = json.loads(proc.communicate()[0].strip().splitlines()[-1])
        alone[approach] = res
        print(
            f"{approach:<22}{res['clips_per_s']:>10.1f}"
            f"{1000 * res['cpu_s_per_clip']:>13.1f}   {res['device']}"
        )
    if args.sharing:
        procs = {a: run_sub(args, a) for a in APPROACHES}
        print(f"\n{'approach':<22}{'alone clips/s':>14}{'4 sharing':>12}")
        for a, proc in procs.items():
            res = json.loads(proc.communicate()[0].strip().splitlines()[-1])
            print(f"{a:<22}{alone[a]['clips_per_s']:>14.1f}{res['clips_per_s']:>12.1f}")
    # reporting/checkpoint overhead, in-process, same model, same steps, three repeats each way
    torch.set_num_threads(args.threads)
    a, model, data, opt, device = setup(
        args.overhead_approach, args.data_dir, args.train_samples, args.preset
    )
    train_steps(a, model, data, opt, device, args.warmup)
    steps = 2 * args.epoch_steps
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"without": [], "with": []}
        for i in range(3):
            rows["without"].append(train_steps(a, model, data, opt, device, steps))
            rep = Reporter(Path(tmp) / f"r{i}", handle_signals=False)
            rows["with"].append(
                train_steps(a, model, data, opt, device, steps, rep, args.epoch_steps)
            )
    wall = {k: min(r[0] for r in v) for k, v in rows.items()}
    cpu = {k: min(r[1] for r in v) for k, v in rows.items()}
    print(
        f"\nreporting + checkpoint once per {args.epoch_steps} steps, {args.overhead_approach} "
        f"({steps} steps, best of 3):"
    )
    print(
        f"  wall  {wall['without']:.2f} s -> {wall['with']:.2f} s  "
        f"overhead {100 * (wall['with'] / wall['without'] - 1):+.1f}%"
    )
    print(
        f"  CPU   {cpu['without']:.2f} s -> {cpu['with']:.2f} s  "
        f"overhead {100 * (cpu['with'] / cpu['without'] - 1):+.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
