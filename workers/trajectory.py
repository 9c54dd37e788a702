"""Trajectory model comparison worker: one video backbone, trajectory class + future position.

    python scripts/generate_persistence_dataset.py --out data/trajectory --num-samples 1000 \
        --num-frames 20 --max-persistent 1 --max-transient 2 --quiet
    python -m workers.trajectory --model i3d --data-dir data/trajectory --preset tiny \
        --epochs 6 --seed 0 --run-dir runs/trajectory/i3d-seed0

The four backbones of seed note 003, each under the same two heads (models/trajectory_heads.py):
conv_temporal (ConvTemporalEncoder, what the note called "MagVIT"), i3d, slowfast, vivit.

Task (synthvid/trajectory.py): the model sees frames 0..T_in-1 of a clip with ONE persistent
object (plus transient distractors) and predicts (a) the object's trajectory class and (b) its
centre at frame T_in-1+k, a frame that is NOT in its input. Loss = CE + pos_weight x Huber of
the normalised position. Splits are the dataset's stored, seeded, stratified, disjoint splits;
every metric is on held-out clips (val each evaluation, test once, in the last record).

Metrics per evaluation (metrics.jsonl): val_accuracy, val_macro_f1, val_recall_<class>,
val_majority_accuracy (sanity: the train majority class), position_error_px (mean Euclidean
error at the target frame, pixels of the 64-px frame), baseline_position_error_px (constant
velocity from the last two GROUND-TRUTH input centres, same clips), static_position_error_px,
mean_position_error_px (the constant predictor: the train-mean target for every clip),
position_vs_baseline_p (paired Wilcoxon signed-rank over clips), params (requires_grad),
train_time_s (cumulative), train_clips_per_s, infer_clips_per_s. The confusion matrix and
per-clip predictions go to evals/epoch_NNNNNN.json. Checkpoints every epoch and on SIGTERM
(mid-epoch included; resuming skips the batches already done, so a resumed run follows the
uninterrupted trajectory). ``--single-frame K`` is the no-motion control: the same backbone
trained and scored on input frame K repeated over the window.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from tqdm import tqdm

from models.conv_temporal_encoder import ConvTemporalConfig, ConvTemporalEncoder
from models.frame_tokenizer import SimpleCNNConfig
from models.i3d import I3D, I3DConfig
from models.slowfast import SlowFast, SlowFastConfig
from models.trajectory_heads import TrajectoryModel, count_trainable_parameters
from models.vivit import ViViT, ViViTConfig
from orchestrator.reporting import Reporter
from synthvid.trajectory import (
    CLASSES,
    TrajectoryClips,
    constant_position_baseline,
    constant_velocity_baseline,
    load_trajectory_split,
    mean_position_baseline,
    single_frame_video,
)

MODELS = ("conv_temporal", "i3d", "slowfast", "vivit")
PRESETS = {  # optimisation per preset; flags override
    "tiny": {"batch_size": 16, "lr": 2e-3, "image_size": 32, "dropout": 0.0},
    "full": {"batch_size": 32, "lr": 5e-4, "image_size": 64, "dropout": 0.1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, choices=MODELS, help="backbone to train")
    p.add_argument(
        "--data-dir", required=True, help="dataset made by scripts/generate_persistence_dataset.py"
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="output folder when ORCH_RUN_DIR is not set "
        "(default runs/trajectory/<model>-seed<seed>)",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model/optimiser size")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of init, data order, flips and dropout"
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs to train (the plan's max_epochs)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate on val every N epochs")
    p.add_argument("--input-frames", type=int, default=16, help="frames the model sees, T_in")
    p.add_argument(
        "--horizon", type=int, default=4, help="target frame = T_in - 1 + horizon (>= 1)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize frames to S x S (area); "
        "positions stay in pixels of the original frame (preset default)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="clips per batch (preset default)")
    p.add_argument(
        "--lr", type=float, default=None, help="peak AdamW learning rate (preset default)"
    )
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--pos-weight", type=float, default=2.0, help="weight of the position loss")
    p.add_argument(
        "--no-flip",
        action="store_true",
        help="disable random horizontal flips (the x target is flipped with the frames)",
    )
    p.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="control: permute the TRAIN class labels (val accuracy must fall to chance)",
    )
    p.add_argument(
        "--single-frame",
        type=int,
        default=None,
        metavar="K",
        help="control: every clip (train, val, test) becomes input frame K repeated T_in times "
        "(no motion; what one frame gives away)",
    )
    p.add_argument("--train-samples", type=int, default=None, help="use the first N train clips")
    p.add_argument("--val-samples", type=int, default=None, help="use the first N val clips")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default cores/4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def build_model(
    name: str, preset: str, num_frames: int, image_size: int, dropout: float
) -> TrajectoryModel:
    """The backbone ``name`` at ``preset`` size under the trajectory heads."""
    full = preset == "full"
    if name == "conv_temporal":
        cfg = ConvTemporalConfig.full() if full else ConvTemporalConfig(cnn=SimpleCNNConfig.tiny())
        backbone, dim = ConvTemporalEncoder(cfg), cfg.dim
    elif name == "i3d":
        cfg = I3DConfig.full() if full else I3DConfig.tiny()
        backbone, dim = I3D(cfg), cfg.dim
    elif name == "slowfast":
        cfg = SlowFastConfig.full() if full else SlowFastConfig.tiny()
        backbone, dim = SlowFast(cfg), cfg.dim
    elif name == "vivit":
        make = ViViTConfig.full if full else ViViTConfig.tiny
        cfg = make(num_frames=num_frames, image_size=image_size)
        backbone, dim = ViViT(cfg), cfg.dim
    else:
        raise ValueError(f"unknown --model {name!r}; choose from {MODELS}")
    return TrajectoryModel(
        backbone, dim, num_classes=len(CLASSES), hidden=256 if full else 128, dropout=dropout
    )


def resize_video(video: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, T, 3, H, W] -> uint8 tensor [N, T, 3, size, size] (area interpolation)."""
    x = torch.from_numpy(video)
    if video.shape[-1] == size:
        return x
    out = []
    for chunk in x.split(64):  # [n, T, 3, H, W], bounded memory
        n, t = chunk.shape[:2]
        f = F.interpolate(chunk.flatten(0, 1).float(), size=(size, size), mode="area")
        out.append(f.round().clamp(0, 255).to(torch.uint8).view(n, t, 3, size, size))
    return torch.cat(out)


def epoch_order(seed: int, epoch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (permutation [n], flip flags bool [n]) of one epoch: resumable mid-epoch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g), torch.rand(n, generator=g) < 0.5


def classification_report(labels: np.ndarray, preds: np.ndarray, k: int) -> dict:
    """Accuracy, macro-F1, per-class recall/precision/F1, confusion matrix [k, k] (rows = truth)."""
    conf = np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
    tp = np.diag(conf).astype(float)
    support, predicted = conf.sum(1), conf.sum(0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0
    )
    present = support > 0
    return {
        "accuracy": float(tp.sum() / max(1, conf.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "confusion": conf,
    }


@torch.no_grad()
def evaluate(
    model: TrajectoryModel,
    video: torch.Tensor,
    clips: TrajectoryClips,
    device: torch.device,
    batch_size: int,
    autocast: bool,
    train_mean_xy: np.ndarray,
) -> tuple[dict, dict]:
    """Score held-out clips. Returns (metrics without prefix, per-clip eval record).

    ``train_mean_xy`` float [2] pixels: the train-mean target, scored as the constant predictor
    (``mean_position_error_px``) on the same clips.
    """
    model.eval()
    logits, positions, infer_s = [], [], 0.0
    for start in range(0, len(clips), batch_size):
        x = video[start : start + batch_size].to(device).float().div_(255.0)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        infer_s += time.perf_counter() - t0
        logits.append(out["logits"].float().cpu())
        positions.append(out["position"].float().cpu())
    model.train()
    logits_t = torch.cat(logits)
    loss = F.cross_entropy(logits_t, torch.from_numpy(clips.label)).item()
    probs = logits_t.softmax(-1).numpy()
    preds = probs.argmax(1)
    size = clips.image_size
    pred_xy = torch.cat(positions).numpy() * size  # [N, 2] pixels
    cv_xy = constant_velocity_baseline(clips.centres, clips.horizon)
    static_xy = constant_position_baseline(clips.centres)
    err = np.linalg.norm(pred_xy - clips.target, axis=1)  # [N] pixels
    cv_err = np.linalg.norm(cv_xy - clips.target, axis=1)
    static_err = np.linalg.norm(static_xy - clips.target, axis=1)
    mean_xy = mean_position_baseline(np.asarray(train_mean_xy, np.float32)[None], len(clips))
    mean_err = np.linalg.norm(mean_xy - clips.target, axis=1)
    rep = classification_report(clips.label, preds, len(CLASSES))
    diff = err - cv_err
    p_value = float(stats.wilcoxon(err, cv_err).pvalue) if np.any(diff != 0) else 1.0
    metrics = {
        "loss": loss,
        "accuracy": rep["accuracy"],
        "macro_f1": rep["macro_f1"],
        **{f"recall_{c}": float(r) for c, r in zip(CLASSES, rep["recall"], strict=True)},
        "position_error_px": float(err.mean()),
        "position_error_median_px": float(np.median(err)),
        "baseline_position_error_px": float(cv_err.mean()),
        "static_position_error_px": float(static_err.mean()),
        "mean_position_error_px": float(mean_err.mean()),
        "position_vs_baseline_p": p_value,
        "position_better_than_baseline_frac": float((diff < 0).mean()),
        "infer_clips_per_s": len(clips) / max(infer_s, 1e-9),
    }
    records = {
        "classes": list(CLASSES),
        "confusion": rep["confusion"].tolist(),  # rows = true class, columns = predicted
        "per_class": {
            c: {"recall": float(r), "precision": float(p), "f1": float(f)}
            for c, r, p, f in zip(CLASSES, rep["recall"], rep["precision"], rep["f1"], strict=True)
        },
        "target_frame": clips.target_frame,
        "input_frames": clips.input_frames,
        "samples": [
            {
                "sample_id": sid,
                "label": int(y),
                "pred": int(q),
                "probs": [round(float(v), 5) for v in pr],
                "target_xy": t.tolist(),
                "pred_xy": [round(float(v), 3) for v in pxy],
                "baseline_xy": b.tolist(),
                "error_px": round(float(e), 4),
                "baseline_error_px": round(float(be), 4),
            }
            for sid, y, q, pr, t, pxy, b, e, be in zip(
                clips.sample_ids,
                clips.label,
                preds,
                probs,
                clips.target,
                pred_xy,
                cv_xy,
                err,
                cv_err,
                strict=True,
            )
        ],
    }
    return metrics, records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    batch_size = args.batch_size or preset["batch_size"]
    lr = args.lr or preset["lr"]
    image_size = args.image_size or preset["image_size"]
    if args.epochs < 1 or args.eval_every < 1 or batch_size < 1 or image_size < 16:
        print(
            "error: --epochs, --eval-every, --batch-size must be >= 1 and --image-size >= 16",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // 4))
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    autocast = device.type == "cuda"
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    try:
        load = dict(input_frames=args.input_frames, horizon=args.horizon)
        train = load_trajectory_split(args.data_dir, "train", limit=args.train_samples, **load)
        val = load_trajectory_split(args.data_dir, "val", limit=args.val_samples, **load)
        model = build_model(
            args.model, args.preset, args.input_frames, image_size, preset["dropout"]
        ).to(device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    assert not set(train.sample_ids) & set(val.sample_ids), "train/val overlap"
    rep = Reporter.from_env(
        default_run_dir=args.run_dir or f"runs/trajectory/{args.model}-seed{args.seed}"
    )
    size = train.image_size
    if args.single_frame is not None:  # control: no motion, one frame repeated
        try:
            train.video = single_frame_video(train.video, args.single_frame)
            val.video = single_frame_video(val.video, args.single_frame)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    train_mean_xy = train.target.mean(0)  # [2] pixels: the constant position predictor
    train_video, val_video = (
        resize_video(train.video, image_size),
        resize_video(val.video, image_size),
    )
    train_labels = torch.from_numpy(train.label)
    if args.shuffle_labels:  # control: labels independent of the clips
        train_labels = train_labels[
            torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        ]
    train_target = torch.from_numpy(train.target) / size  # [N, 2] normalised (x/W, y/H)
    majority = int(np.bincount(train_labels.numpy(), minlength=len(CLASSES)).argmax())

    params = count_trainable_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    n_batches = math.ceil(len(train) / batch_size)
    total_steps, warmup = args.epochs * n_batches, max(1, n_batches // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1.0 + math.cos(math.pi * min(1.0, s / max(1, total_steps))))
        ),
    )
    start_epoch, start_batch, step, train_time_s = 0, 0, 0, 0.0
    sums = {"loss": 0.0, "cls": 0.0, "pos": 0.0, "correct": 0.0, "n": 0.0}
    if rep.resume and (ckpt := rep.latest_checkpoint()) is not None:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        train_time_s, sums = state["train_time_s"], state["sums"]
        print(f"resumed from {ckpt} at epoch {start_epoch} batch {start_batch}", flush=True)

    def save(epoch: int, batch: int, metrics: dict | None = None) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "train_time_s": train_time_s,
            "sums": sums,
            "args": vars(args),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            },
        }
        rep.save_checkpoint(lambda p: torch.save(state, p), step=step, metrics=metrics)

    print(
        f"{args.model}/{args.preset}: {params:,} trainable params, "
        f"{len(train)} train / {len(val)} val "
        f"clips, input {args.input_frames}x{image_size}px, target frame {train.target_frame}, "
        f"device {device}",
        flush=True,
    )
    for epoch in range(start_epoch, args.epochs):
        perm, flips = epoch_order(args.seed, epoch, len(train))
        bar = tqdm(
            range(start_batch, n_batches),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=args.no_progress,
            leave=False,
        )
        for b in bar:
            t0 = time.perf_counter()
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x = train_video[idx].to(device).float().div_(255.0)  # [B, T, 3, S, S]
            target = train_target[idx].clone()  # [B, 2]
            if not args.no_flip:
                flip = flips[idx]
                x[flip.to(device)] = x[flip.to(device)].flip(-1)
                target[flip, 0] = (size - 1) / size - target[flip, 0]  # pixel i -> W-1-i
            y, target = train_labels[idx].to(device), target.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
            cls_loss = F.cross_entropy(out["logits"].float(), y)
            pos_loss = F.smooth_l1_loss(out["position"].float(), target, beta=0.05)
            loss = cls_loss + args.pos_weight * pos_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            n = len(idx)
            sums["loss"] += loss.item() * n
            sums["cls"] += cls_loss.item() * n
            sums["pos"] += pos_loss.item() * n
            sums["correct"] += (out["logits"].argmax(-1) == y).sum().item()
            sums["n"] += n
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time_s += time.perf_counter() - t0
            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}")
            if rep.should_stop and b + 1 < n_batches:  # SIGTERM: checkpoint mid-epoch, exit 0
                save(epoch, b + 1)
                print(f"stop requested: checkpoint at epoch {epoch} batch {b + 1}", flush=True)
                return 0
        start_batch = 0
        done = epoch + 1
        if done % args.eval_every and done != args.epochs:
            save(done, 0)
            if rep.should_stop:
                print(f"stop requested: checkpoint at epoch {done}", flush=True)
                return 0
            continue
        val_m, records = evaluate(model, val_video, val, device, 64, autocast, train_mean_xy)
        metrics = {
            f"val_{k}": v
            for k, v in val_m.items()
            if not k.startswith(("position", "baseline", "static", "mean_position", "infer"))
        }
        metrics.update(
            {
                k: v
                for k, v in val_m.items()
                if k.startswith(("position", "baseline", "static", "mean_position", "infer"))
            }
        )
        metrics["val_majority_accuracy"] = float((val.label == majority).mean())
        n_seen = max(sums["n"], 1.0)
        metrics.update(
            train_loss=sums["loss"] / n_seen,
            train_cls_loss=sums["cls"] / n_seen,
            train_pos_loss=sums["pos"] / n_seen,
            train_accuracy=sums["correct"] / n_seen,
            params=params,
            train_time_s=train_time_s,
            lr=scheduler.get_last_lr()[0],
            train_clips_per_s=(done * len(train)) / max(train_time_s, 1e-9),
        )
        sums = {k: 0.0 for k in sums}
        if done == args.epochs:  # the held-out test split, once, in the last record
            test = load_trajectory_split(args.data_dir, "test", **load)
            assert not set(test.sample_ids) & (set(train.sample_ids) | set(val.sample_ids))
            test_video = test.video
            if args.single_frame is not None:
                test_video = single_frame_video(test_video, args.single_frame)
            test_m, test_records = evaluate(
                model,
                resize_video(test_video, image_size),
                test,
                device,
                64,
                autocast,
                train_mean_xy,
            )
            metrics.update(
                {
                    f"test_{k}": v
                    for k, v in test_m.items()
                    if k
                    in (
                        "accuracy",
                        "macro_f1",
                        "position_error_px",
                        "baseline_position_error_px",
                        "mean_position_error_px",
                        "static_position_error_px",
                        "position_vs_baseline_p",
                    )
                }
            )
            metrics["test_majority_accuracy"] = float((test.label == majority).mean())
            rep.write_eval("test_final", test_records)
        rep.write_eval(f"epoch_{done:06d}", records)
        save(
            done, 0, {k: metrics[k] for k in ("val_accuracy", "val_macro_f1", "position_error_px")}
        )
        rep.log(epoch=done, optimizer_steps=step, **metrics)
        print(
            f"epoch {done}: val acc {metrics['val_accuracy']:.3f} "
            f"macro-F1 {metrics['val_macro_f1']:.3f} "
            f"pos err {metrics['position_error_px']:.2f}px (CV baseline "
            f"{metrics['baseline_position_error_px']:.2f}px) "
            f"train loss {metrics['train_loss']:.3f}",
            flush=True,
        )
        if rep.should_stop:
            print(f"stop requested: checkpoint at epoch {done}", flush=True)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
