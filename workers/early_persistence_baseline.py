"""Baseline of the early-persistence job: seed note 000's four components, made real.

    python -m workers.early_persistence_baseline --data-dir data/persistence --preset tiny \
        --epochs 10 --eval-every 2 --run-dir runs/ep/baseline

1. Early persistence classifier: per ground-truth track, the crops from its onset on (see
   synthvid.persistence.TrackSequences) -> causal ConvTemporalEncoder -> per-frame logits
   [B, T, 2] + trained confidence [B, T, 1] (BCE target: "the frame's prediction is right").
   Early decision = first frame in the early window with confidence >= threshold, else the last
   frame. Frame t never sees frames > t, so a decision at t is really available at t.
2. Attention heatmaps: the encoder's causal attention [T, T] (mean over heads) for a few val
   tracks, the frames where the tracked object is visible marked (red for transients), saved to
   viz/epoch_NNNNNN.png in the run directory.
3. Compute gating: ComputeGate stops a track once it is confidently transient inside the early
   window, and caps transients at a per-class frame budget.
4. Efficiency metrics, measured: accuracy of the decision actually taken, mean decision frame,
   early-stop rate, earliness, ECE of the confidence, the accuracy-earliness curve over thresholds
   (evals/), and compute saved by gating in FLOPs (torch.utils.flop_counter, counted on the
   model run on the first f frames) and in wall time (the model timed on the gated prefixes vs
   the full sequences).

Everything is evaluated on the held-out val split.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.conv_temporal_encoder import ConvTemporalConfig
from models.early_persistence import ComputeGate, EarlyPersistenceClassifier, early_decision
from models.frame_tokenizer import SimpleCNNConfig
from orchestrator.reporting import Reporter
from synthvid.persistence import TrackSequences, extract_track_sequences, load_split
from workers.persistence_metrics import classification_metrics, expected_calibration_error
from workers.training_loop import train_epochs, warmup_cosine

PRESETS = {
    "tiny": {"dim": 64, "heads": 4, "cnn_width": 16, "batch_size": 64, "lr": 2e-3, "token_size": 8},
    "full": {
        "dim": 256,
        "heads": 8,
        "cnn_width": 64,
        "batch_size": 64,
        "lr": 3e-4,
        "token_size": 16,
    },
}
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir", required=True, help="dataset made by scripts/generate_persistence_dataset.py"
    )
    p.add_argument(
        "--run-dir",
        default="runs/early_persistence/baseline",
        help="output folder when ORCH_RUN_DIR is not set",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model/optimiser size")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order")
    p.add_argument("--epochs", type=int, default=10, help="epochs to train")
    p.add_argument("--eval-every", type=int, default=2, help="evaluate on val every N epochs")
    p.add_argument("--batch-size", type=int, default=None, help="tracks per batch (preset default)")
    p.add_argument(
        "--lr", type=float, default=None, help="peak AdamW learning rate (preset default)"
    )
    p.add_argument(
        "--token-size", type=int, default=None, help="crop side fed to the CNN (tiny: 8)"
    )
    p.add_argument("--train-samples", type=int, default=None, help="use the first N train clips")
    p.add_argument("--val-samples", type=int, default=None, help="use the first N val clips")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence for an early decision")
    p.add_argument(
        "--early-window", type=int, default=4, help="frames in which early decisions may happen"
    )
    p.add_argument(
        "--transient-budget",
        type=float,
        default=0.25,
        help="fraction of T frames a track predicted transient may use",
    )
    p.add_argument(
        "--heatmaps", type=int, default=8, help="val tracks drawn per evaluation (0: none)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default cores/4)")
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="act as if SIGTERM arrived after N optimizer steps (tests of resume)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not 0.0 < args.threshold < 1.0 or args.early_window < 1 or args.epochs < 1:
        p.error("--threshold must be in (0, 1); --early-window and --epochs >= 1")
    return args


def to_tensors(seq: TrackSequences, token_size: int) -> dict[str, torch.Tensor]:
    """TrackSequences -> tensors; crops area-resized to token_size (uint8 kept to save memory)."""
    crops = torch.from_numpy(seq.crops)  # [M, T, 3, P, P]
    if crops.shape[-1] != token_size:
        m, t = crops.shape[:2]
        parts = [
            F.interpolate(c.flatten(0, 1).float(), size=(token_size, token_size), mode="area")
            for c in torch.split(crops, 512)
        ]
        crops = (
            torch.cat([p.view(-1, t, 3, token_size, token_size) for p in parts])
            .round()
            .to(torch.uint8)
        )
    return {
        "crops": crops,
        "valid": torch.from_numpy(seq.valid),
        "label": torch.from_numpy(seq.label),
    }


def losses(out, label, valid):
    """(total, ce): class-balanced per-frame CE over valid frames + BCE of the confidence on
    whether each frame's prediction is right (target detached)."""
    logits, conf = out["logits"], out["confidence"].squeeze(-1)  # [B, T, 2], [B, T]
    lab = label[:, None].expand_as(valid)
    ce = F.cross_entropy(logits.flatten(0, 1), lab.flatten(), reduction="none").view_as(valid)
    per_class = [
        (ce * (valid & (lab == c))).sum() / (valid & (lab == c)).sum()
        for c in (0, 1)
        if (valid & (lab == c)).any()
    ]
    ce_loss = torch.stack(per_class).mean()
    right = (logits.argmax(-1) == lab).float().detach()
    bce = F.binary_cross_entropy(conf.clamp(1e-6, 1 - 1e-6), right, reduction="none")
    return ce_loss + (bce * valid).sum() / valid.sum(), ce_loss


@torch.no_grad()
def prefix_costs(model, t_count: int, token_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs and wall seconds of running the model on one track's first f frames, f = 1..T."""
    flops, wall = [], []
    for f in range(1, t_count + 1):
        x = torch.rand(1, f, 3, token_size, token_size, device=device)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
        flops.append(counter.get_total_flops())
        t0 = time.perf_counter()
        for _ in range(5):
            model(x)
        wall.append((time.perf_counter() - t0) / 5)
    return np.array(flops, dtype=np.float64), np.array(wall)


@torch.no_grad()
def evaluate(model, val, seq: TrackSequences, args, epoch: int, device, viz_dir):
    """Early-decision, gating and calibration metrics on val. Returns (metrics, records)."""
    model.eval()
    outs = {"logits": [], "confidence": [], "attention": []}
    ce_sum, n = 0.0, 0
    for idx in torch.split(torch.arange(len(val["label"])), 256):
        x = val["crops"][idx].to(device).float() / 255.0
        v, lab = val["valid"][idx].to(device), val["label"][idx].to(device)
        out = model(x, v)
        ce_sum += float(losses(out, lab, v)[1]) * len(idx)
        n += len(idx)
        for k in outs:
            outs[k].append(out[k].float().cpu())
    logits, conf, attn = (torch.cat(outs[k]) for k in ("logits", "confidence", "attention"))
    valid, label = val["valid"], val["label"].numpy()
    t_count = valid.shape[1]
    dec = early_decision(logits, conf, valid, args.threshold, args.early_window)
    decision, frame = dec["decision"].numpy(), dec["frame"].numpy()
    n_valid = valid.sum(1).numpy()
    last = logits[torch.arange(len(label)), valid.sum(1) - 1].argmax(-1).numpy()
    cls = classification_metrics(label, decision)
    curve = []
    for th in THRESHOLDS:
        d = early_decision(logits, conf, valid, th, args.early_window)
        curve.append(
            {
                "threshold": th,
                "accuracy": float((d["decision"].numpy() == label).mean()),
                "mean_decision_frame": float(d["frame"].float().mean()),
                "early_stop_rate": float(d["early"].float().mean()),
            }
        )
    gate = ComputeGate(
        args.threshold,
        args.early_window,
        (("persistent", 1.0), ("transient", args.transient_budget)),
    )
    processed = gate.frames_to_process(logits, conf, valid).numpy()
    flops, wall = prefix_costs(model, t_count, args.token_size, device)
    full_flops, gated_flops = flops[n_valid - 1].sum(), flops[processed - 1].sum()
    full_wall, gated_wall = wall[n_valid - 1].sum(), wall[processed - 1].sum()
    gated_pred = (
        logits[torch.arange(len(label)), torch.from_numpy(processed - 1)].argmax(-1).numpy()
    )
    metrics = {
        "val_loss": ce_sum / n,
        "val_accuracy": cls["accuracy"],  # of the decision actually taken, at its frame
        "macro_f1": cls["macro_f1"],
        "balanced_accuracy": cls["balanced_accuracy"],
        "full_sequence_accuracy": float((last == label).mean()),
        "gated_accuracy": float((gated_pred == label).mean()),
        "mean_decision_frame": float(frame.mean()),
        "early_stop_rate": float(dec["early"].float().mean()),
        "earliness": float(np.mean((frame + 1) / n_valid)),  # fraction of the track seen
        "ece": expected_calibration_error(dec["confidence"].numpy(), decision == label),
        "flops_saved": float(1.0 - gated_flops / full_flops),
        "wall_saved": float(1.0 - gated_wall / full_wall),
        "transient_frames_processed": float(processed[label == 0].mean()),
        "persistent_frames_processed": float(processed[label == 1].mean()),
        "n_val_tracks": len(label),
    }
    tracks = [
        {
            "sample_id": seq.sample_ids[seq.clip[i]],
            "track": int(seq.track[i]),
            "kind": "persistent" if label[i] else "transient",
            "decision": int(decision[i]),
            "decision_frame": int(frame[i]),
            "early": bool(dec["early"][i]),
            "confidence": float(dec["confidence"][i]),
            "frames_processed": int(processed[i]),
            "valid_frames": int(n_valid[i]),
        }
        for i in range(len(label))
    ]
    records = {
        "epoch": epoch,
        "split": "val",
        "threshold": args.threshold,
        "early_window": args.early_window,
        "confusion": cls["confusion"],
        "accuracy_earliness_curve": curve,
        "prefix_flops": flops.tolist(),
        "summary": metrics,
        "tracks": tracks,
    }
    if args.heatmaps and viz_dir is not None:
        draw_heatmaps(attn, seq, label, args.heatmaps, viz_dir / f"epoch_{epoch:06d}.png")
    model.train()
    return metrics, records


def draw_heatmaps(attn, seq: TrackSequences, label, count: int, path) -> None:
    """Mean-over-heads causal attention [T, T] of ``count`` val tracks (half transient); the
    steps where the object is visible are marked along both axes (red: transient track)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = list(np.flatnonzero(label == 0)[: count // 2]) + list(
        np.flatnonzero(label == 1)[: count - count // 2]
    )
    fig, axes = plt.subplots(1, len(pick), figsize=(2.4 * len(pick), 2.8), squeeze=False)
    for ax, i in zip(axes[0], pick, strict=True):
        a = attn[i].mean(0).numpy()  # [T, T]
        ax.imshow(a, cmap="viridis", vmin=0, vmax=max(a.max(), 1e-6))
        colour = "red" if label[i] == 0 else "white"
        for s in np.flatnonzero(seq.visible[i]):
            ax.axvspan(s - 0.5, s + 0.5, ymin=0, ymax=0.04, color=colour)
            ax.axhspan(s - 0.5, s + 0.5, xmin=0, xmax=0.04, color=colour)
        ax.set_title(
            f"{'transient' if label[i] == 0 else 'persistent'} {seq.sample_ids[seq.clip[i]]}"
            f"#{seq.track[i]}",
            fontsize=6,
        )
        ax.set_xlabel("key step", fontsize=6)
        ax.set_ylabel("query step", fontsize=6)
        ax.tick_params(labelsize=5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // 4))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        rep = Reporter.from_env(default_run_dir=args.run_dir)
        train_seq = extract_track_sequences(load_split(args.data_dir, "train", args.train_samples))
        val_seq = extract_track_sequences(load_split(args.data_dir, "val", args.val_samples))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, val = to_tensors(train_seq, args.token_size), to_tensors(val_seq, args.token_size)
    torch.manual_seed(args.seed)
    cnn = SimpleCNNConfig(width=args.cnn_width, dim=args.dim)
    model = EarlyPersistenceClassifier(
        ConvTemporalConfig(cnn=cnn, dim=args.dim, heads=args.heads, causal=True)
    ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    m_train = len(train["label"])
    steps_per_epoch = math.ceil(m_train / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps_per_epoch, total))
    print(
        f"baseline: {sum(p.numel() for p in params):,} trainable params, {m_train} train / "
        f"{len(val['label'])} val tracks, device {device}",
        flush=True,
    )

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        x = train["crops"][idx].to(device).float() / 255.0
        v, lab = train["valid"][idx].to(device), train["label"][idx].to(device)
        return losses(model(x, v), lab, v)[0]

    return train_epochs(
        rep=rep,
        model=model,
        optimizer=opt,
        scheduler=sched,
        num_samples=m_train,
        batch_loss=batch_loss,
        evaluate=lambda epoch: evaluate(
            model, val, val_seq, args, epoch, device, rep.run_dir / "viz"
        ),
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        seed=args.seed,
        args=vars(args),
        stop_after_steps=args.stop_after_steps,
        show_progress=not args.no_progress,
        evaluate_before=False,
    )


if __name__ == "__main__":
    sys.exit(main())
