"""Video distillation: a frozen DETR-style student gains a memory of cached context features.

    python -m workers.video_distillation --data-dir data/segvid --run-dir runs/vd --preset tiny

Stage 1 (image): train the whole DETRStudent on single frames of the train videos (DETR set
loss), evaluate it, save it (run_dir/student_image.pt), freeze it.
Stage 2 (video): train ONLY the PerceiverResampler + MemoryCrossAttention. Each sample is a
query frame t of a train video with the cached teacher features of frames t-T..t-1 as
context; supervision is the query frame's ground-truth masks (no teacher online). Every epoch,
held-out (val) query frames are scored three ways, from the same encoder pass:

- on: forward_video(frame, its own context)
- off: gate 0, i.e. the frozen image model (forward(frame)), bit-identical
- shuffled: forward_video(frame, context of ANOTHER val video, same frame indices)

and the paired per-video gain of "on" over each control gets a bootstrap 95% CI
(scipy.stats.bootstrap) and a one-sided t-test p of its mean (the video is the statistical unit);
"shuffled" is the mean over --num-shuffles derangements of the videos.
Metrics per mode: Hungarian-matched per-frame mask IoU, instance J&F (class-agnostic: J = IoU and
F = DAVIS boundary F of Hungarian-matched instances; not the DAVIS/SA-V tracking J&F),
detection precision/recall/F1 at IoU 0.5, and frame-level presence precision/recall/F1 where
frames with no visible object are the negatives. Per-frame records go to evals/.

Worker contract (shared/DESIGN.md): ORCH_RUN_DIR / --run-dir, metrics.jsonl (epoch 0 = the
frozen image model, memory gate 0), checkpoints of the video stage hold only the two trainable
modules + optimizer + scheduler + RNG + position, ORCH_RESUME=1 resumes (stage 1 too),
SIGTERM -> checkpoint at the next step -> exit 0. After the last epoch the test split is
scored once (evals/test.json and test_* keys in the last record).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch.nn import functional as F
from tqdm import tqdm

from models.colour_rule import segment_frame
from models.detr_student import MEMORY_MODULES, DETRStudent, StudentConfig, count_parameters
from models.set_criterion import HungarianMatcher, SetCriterion, score_frame
from orchestrator.reporting import Reporter
from synthvid.segmentation import SegVideo, load_sav_video, masks_to_boxes

MODES = ("on", "off", "shuffled")


class UserError(Exception):
    """Bad input: printed as one ``error:`` line."""


# -- data ----------------------------------------------------------------------------------------


def load_split(
    data_dir: Path, features_dir: Path, ids: list[str], size: int, context_frames: int
) -> tuple[dict[str, SegVideo], dict[str, torch.Tensor]]:
    """Videos (frames resized to ``size``) and their cached features [T, 256, 18, 18] fp16."""
    videos, feats = {}, {}
    for vid in ids:
        v = load_sav_video(data_dir, vid)
        if v.frames.shape[1:3] != (size, size):
            fr = torch.from_numpy(v.frames).permute(0, 3, 1, 2).float()
            fr = F.interpolate(fr, size=(size, size), mode="bilinear", align_corners=False)
            m = F.interpolate(torch.from_numpy(v.masks).float(), size=(size, size), mode="nearest")
            v = SegVideo(
                vid,
                fr.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy(),
                m.bool().numpy(),
                v.degraded,
            )
        path = features_dir / f"{vid}.pt"
        if not path.exists():
            raise UserError(f"no cached features {path}; run scripts/cache_context_features.py")
        f = torch.load(path, map_location="cpu", weights_only=True)["features"]
        if f.dtype != torch.float16 or tuple(f.shape) != (v.num_frames, 256, 18, 18):
            raise UserError(
                f"{path}: features {tuple(f.shape)} {f.dtype}, expected "
                f"[{v.num_frames}, 256, 18, 18] float16; re-run the cache script"
            )
        if v.num_frames <= context_frames:
            raise UserError(f"{vid} has {v.num_frames} frames; need more than --context-frames")
        videos[vid], feats[vid] = v, f
    return videos, feats


def make_batch(
    videos: dict[str, SegVideo],
    feats: dict[str, torch.Tensor],
    queries: list[tuple[str, int]],
    context_frames: int,
    device: torch.device,
    context_from: list[str] | None = None,
    augment: np.random.Generator | None = None,
) -> tuple[torch.Tensor, list[dict], torch.Tensor | None]:
    """Frames [B, 3, H, W] in [0, 1], targets (non-empty masks [n, H, W], boxes [n, 4] cxcywh in
    [0, 1]) and context [B, T, 256, 18, 18] (from ``context_from[i]``'s video if given; None
    when context_frames is 0).

    ``augment`` (stage 1 only; needs context_frames 0): each frame and its masks get one of the
    8 symmetries of the square (k x 90 degree rotation, then a horizontal flip or not), drawn
    from this generator; boxes are computed from the transformed masks. A regulariser, not a
    symmetry of the data: motion and texture are isotropic, but the generator draws only
    upward triangles and background ramps running right/down, so transformed frames show
    sideways or downward triangles and other ramps the val/test frames never do."""
    if augment is not None and context_frames:
        raise ValueError("augment transforms the frame only: use it with context_frames=0")
    frames, targets, context = [], [], []
    for i, (vid, t) in enumerate(queries):
        v = videos[vid]
        frame = v.frames[t]  # (H, W, 3) uint8
        m = v.masks[t][v.masks[t].reshape(len(v.masks[t]), -1).any(-1)]  # (n, H, W) visible
        if augment is not None:
            k, flip = int(augment.integers(4)), bool(augment.integers(2))
            frame, m = np.rot90(frame, k, axes=(0, 1)), np.rot90(m, k, axes=(1, 2))
            if flip:
                frame, m = frame[:, ::-1], m[:, :, ::-1]
            frame, m = np.ascontiguousarray(frame), np.ascontiguousarray(m)
        frames.append(torch.from_numpy(frame))
        H, W = m.shape[-2:]
        boxes = torch.from_numpy(masks_to_boxes(m)) / torch.tensor([W, H, W, H])
        boxes = torch.stack(
            [
                (boxes[:, 0] + boxes[:, 2]) / 2,
                (boxes[:, 1] + boxes[:, 3]) / 2,
                boxes[:, 2] - boxes[:, 0],
                boxes[:, 3] - boxes[:, 1],
            ],
            -1,
        )
        targets.append({"masks": torch.from_numpy(m).to(device), "boxes": boxes.to(device)})
        if context_frames:
            src = context_from[i] if context_from else vid
            context.append(feats[src][t - context_frames : t])
    x = torch.stack(frames).to(device).permute(0, 3, 1, 2).float() / 255
    ctx = torch.stack(context).to(device) if context else None
    return x, targets, ctx


# -- evaluation ----------------------------------------------------------------------------------


def bootstrap_gain(
    per_video: np.ndarray, seed: int, n_resamples: int
) -> tuple[float, float, float, float]:
    """Mean of paired per-video differences, its 95% BCa bootstrap CI, one-sided p (mean > 0).

    The p-value is a one-sided one-sample t-test of the mean (the quantity claimed), not a
    two-sided median-shift test.
    """
    mean = float(per_video.mean())
    if len(per_video) < 3 or np.ptp(per_video) == 0:
        return mean, mean, mean, 1.0  # degenerate: no spread (e.g. gate 0)
    ci = stats.bootstrap(
        (per_video,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=0.95,
        method="BCa",
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    p = float(stats.ttest_1samp(per_video, 0.0, alternative="greater").pvalue)
    return mean, float(ci.low), float(ci.high), p


def colour_rule_instance_jf(videos: dict[str, SegVideo], context_frames: int) -> float:
    """Mean instance J&F of the non-learned colour rule (models/colour_rule.py, default config,
    chosen on train frames) over the query frames t >= context_frames that evaluate() scores."""
    scores = []
    for vid in sorted(videos):
        v = videos[vid]
        for t in range(context_frames, v.num_frames):
            gt = v.masks[t][v.masks[t].reshape(len(v.masks[t]), -1).any(-1)]
            scores.append(score_frame(segment_frame(v.frames[t]), gt)["jf"])
    return float(np.mean(scores))


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts (0 when undefined)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def predicted_masks(out: dict, i: int, size: tuple[int, int]) -> np.ndarray:
    """Binary masks (P, H, W) of sample ``i``'s queries with p_object > 0.5, upsampled to size."""
    present = out["pred_logits"][i].float().softmax(-1)[:, 0] > 0.5
    if not present.any():
        return np.zeros((0, *size), bool)
    logits = F.interpolate(
        out["pred_masks"][i][present][None].float(),
        size=size,
        mode="bilinear",
        align_corners=False,
    )[0]  # (P, H, W)
    return (logits > 0).cpu().numpy()


@torch.no_grad()
def evaluate_image(
    student: DETRStudent,
    videos: dict[str, SegVideo],
    context_frames: int,
    device: torch.device,
    batch_size: int,
) -> float:
    """Mean instance J&F of the image model (memory off) over the query frames t >= context_frames.

    The same frames and the same ``score_frame`` as ``evaluate``'s "off" mode, without the
    memory passes: stage 1's learning curve. Leaves the student in eval mode.
    """
    student.eval()
    queries = [(v, t) for v in sorted(videos) for t in range(context_frames, videos[v].num_frames)]
    scores = []
    for s in range(0, len(queries), batch_size):
        x, targets, _ = make_batch(videos, {}, queries[s : s + batch_size], 0, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = student(x)
        for i, tg in enumerate(targets):
            gt = tg["masks"].cpu().numpy()
            scores.append(score_frame(predicted_masks(out, i, gt.shape[-2:]), gt)["jf"])
    return float(np.mean(scores))


@torch.no_grad()
def evaluate(
    student: DETRStudent,
    videos: dict,
    feats: dict,
    context_frames: int,
    device: torch.device,
    batch_size: int,
    seed: int,
    n_resamples: int,
    prefix: str,
    num_shuffles: int = 3,
) -> tuple[dict, list[dict]]:
    """Score every query frame t >= context_frames of ``videos`` with memory on, off, shuffled.

    "shuffled" feeds the context of ANOTHER video (same frame indices), for each of
    ``num_shuffles`` cyclic derangements of the videos (distinct shifts); its per-frame scores
    (``rec["shuffled"]``) and summary metrics are means over the derangements, so no single
    pairing of videos decides the control. Scores are the class-agnostic instance J&F of
    ``score_frame`` (not the DAVIS/SA-V tracking J&F).

    Returns:
        (summary metrics with keys ``{prefix}_instance_jf_on`` ..., per-frame records).
    """
    student.eval()
    ids = sorted(videos)
    shifts = (
        np.random.default_rng(seed).permutation(np.arange(1, len(ids)))[:num_shuffles]
        if len(ids) > 1
        else np.zeros(1, int)
    )
    others = [
        {vid: ids[(i + int(sh)) % len(ids)] for i, vid in enumerate(ids)} for sh in shifts
    ]  # derangements
    queries = [(vid, t) for vid in ids for t in range(context_frames, videos[vid].num_frames)]
    shuf_modes = [f"shuffled{k}" for k in range(len(others))]
    records = []
    for s in range(0, len(queries), batch_size):
        q = queries[s : s + batch_size]
        x, targets, ctx = make_batch(videos, feats, q, context_frames, device)
        ctx_shuf = [
            make_batch(videos, feats, q, context_frames, device, [o[v] for v, _ in q])[2]
            for o in others
        ]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            tokens, maps = student.encode(x)
            outs = {"off": student.decode(tokens, maps)}
            for mode, c in (("on", ctx), *zip(shuf_modes, ctx_shuf, strict=True)):
                mem = student.perceiver_resampler(c)
                outs[mode] = student.decode(student.memory_cross_attn(tokens, mem), maps)
        for i, (vid, t) in enumerate(q):
            gt = targets[i]["masks"].cpu().numpy()
            rec = {"video": vid, "t": t, "degraded": bool(videos[vid].degraded[t]), "n_gt": len(gt)}
            for mode, out in outs.items():
                sc = score_frame(predicted_masks(out, i, gt.shape[-2:]), gt)
                rec[mode] = {k: round(v, 5) if isinstance(v, float) else v for k, v in sc.items()}
            rec["shuffled"] = {  # mean over the derangements
                k: round(float(np.mean([rec[m][k] for m in shuf_modes])), 5)
                for k in ("iou", "j", "f", "jf")
            }
            records.append(rec)

    summary: dict[str, float] = {}
    for mode in ("on", "off", *shuf_modes):
        rs = [r[mode] for r in records]
        summary[f"{prefix}_instance_jf_{mode}"] = float(np.mean([r["jf"] for r in rs]))
        summary[f"{prefix}_iou_{mode}"] = float(np.mean([r["iou"] for r in rs]))
        p, r, f1 = prf(sum(x["tp"] for x in rs), sum(x["fp"] for x in rs), sum(x["fn"] for x in rs))
        summary.update(
            {
                f"{prefix}_det_precision_{mode}": p,
                f"{prefix}_det_recall_{mode}": r,
                f"{prefix}_det_f1_{mode}": f1,
            }
        )
        gt_any = np.array([rec["n_gt"] > 0 for rec in records])
        pred_any = np.array([x["n_pred"] > 0 for x in rs])
        p, r, f1 = prf(
            int((gt_any & pred_any).sum()),
            int((~gt_any & pred_any).sum()),
            int((gt_any & ~pred_any).sum()),
        )
        summary.update(
            {
                f"{prefix}_presence_precision_{mode}": p,
                f"{prefix}_presence_recall_{mode}": r,
                f"{prefix}_presence_f1_{mode}": f1,
            }
        )
    for name in ("instance_jf", "iou", "det_precision", "det_recall", "det_f1") + tuple(
        f"presence_{x}" for x in ("precision", "recall", "f1")
    ):  # the shuffled control = mean over derangements
        vals = [summary.pop(f"{prefix}_{name}_{m}") for m in shuf_modes]
        summary[f"{prefix}_{name}_shuffled"] = float(np.mean(vals))
    summary[f"{prefix}_num_shuffles"] = len(shuf_modes)
    summary[f"{prefix}_negative_frames"] = float(np.mean([rec["n_gt"] == 0 for rec in records]))
    for control in ("off", "shuffled"):
        per_video = np.array(
            [
                np.mean([r["on"]["jf"] - r[control]["jf"] for r in records if r["video"] == vid])
                for vid in ids
            ]
        )
        mean, lo, hi, p = bootstrap_gain(per_video, seed, n_resamples)
        key = f"{prefix}_instance_jf_gain_vs_{control}"
        summary.update(
            {key: mean, f"{key}_ci_low": lo, f"{key}_ci_high": hi, f"{key}_p_greater": p}
        )
        for name, sel in (("degraded", True), ("clean", False)):
            d = [r["on"]["jf"] - r[control]["jf"] for r in records if r["degraded"] == sel]
            summary[f"{key}_{name}"] = float(np.mean(d)) if d else float("nan")
    return summary, records


# -- training ------------------------------------------------------------------------------------


def warmup_cosine(warmup: int, total: int):
    """LambdaLR factor: linear warmup over ``warmup`` steps, then cosine to 0.05 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (
            1 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total - warmup)))
        )

    return f


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"]), np.random.set_state(s["numpy"]), random.setstate(s["python"])


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir", type=Path, required=True, help="SA-V layout folder with manifest.json"
    )
    p.add_argument(
        "--features-dir", type=Path, default=None, help="cached features (default: DATA/features)"
    )
    p.add_argument(
        "--run-dir", default="runs/video_distillation", help="used when ORCH_RUN_DIR is unset"
    )
    p.add_argument(
        "--preset", choices=["tiny", "full"], default="tiny", help="student/perceiver sizes"
    )
    p.add_argument(
        "--context-frames", type=int, default=4, help="T: context frames before the query"
    )
    p.add_argument(
        "--pretrain-steps", type=int, default=1500, help="stage-1 (image) optimizer steps"
    )
    p.add_argument("--pretrain-lr", type=float, default=5e-4, help="stage-1 AdamW learning rate")
    p.add_argument(
        "--pretrain-eval-every",
        type=int,
        default=0,
        help="stage-1 learning curve: every N steps (and at the last) score the val query frames "
        "with the image model and append to run_dir/pretrain_curve.jsonl (0: off)",
    )
    p.add_argument(
        "--pretrain-augment",
        action="store_true",
        help="stage 1: each train frame gets a random symmetry of the square (rotation by k x 90 "
        "degrees, horizontal flip); off by default",
    )
    p.add_argument("--epochs", type=int, default=10, help="stage-2 (video) epochs")
    p.add_argument(
        "--steps-per-epoch", type=int, default=40, help="stage-2 optimizer steps per epoch"
    )
    p.add_argument(
        "--lr", type=float, default=5e-4, help="stage-2 AdamW learning rate (memory modules)"
    )
    p.add_argument(
        "--gate-lr-mult",
        type=float,
        default=10.0,
        help="learning-rate multiplier of the memory's tanh gate (starts at 0)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="query frames per step")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument(
        "--num-shuffles",
        type=int,
        default=3,
        help="derangements the shuffled-context control averages over",
    )
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 1) // 4), help="torch CPU threads"
    )
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rep = Reporter.from_env(default_run_dir=args.run_dir)
    features_dir = args.features_dir or args.data_dir / "features"
    manifest_path = args.data_dir / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{manifest_path} not found; run scripts/make_segmentation_videos.py")
    if min(args.context_frames, args.epochs, args.batch_size, args.num_shuffles) < 1:
        raise UserError("--context-frames, --epochs, --batch-size and --num-shuffles must be >= 1")
    if args.pretrain_eval_every < 0:
        raise UserError("--pretrain-eval-every must be >= 0 (0: no stage-1 learning curve)")
    split = json.loads(manifest_path.read_text())["split"]
    cfg = StudentConfig.tiny() if args.preset == "tiny" else StudentConfig.full()
    if args.context_frames > cfg.perceiver.max_frames:
        raise UserError(
            f"--context-frames {args.context_frames} > {cfg.perceiver.max_frames} "
            f"(the {args.preset} perceiver's temporal embedding)"
        )
    T = args.context_frames
    data = {
        s: load_split(args.data_dir, features_dir, split[s], cfg.image_size, T)
        for s in ("train", "val", "test")
    }
    train_videos, train_feats = data["train"]
    torch.manual_seed(args.seed)
    student = DETRStudent(cfg).to(device)
    criterion = SetCriterion(HungarianMatcher()).to(device)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    rule_jf: dict[str, float] = {}  # the non-learned colour rule, same frames (computed once)

    def ev(split_name: str, prefix: str) -> tuple[dict, list[dict]]:
        videos, feats = data[split_name]
        eval_batch = 2 * args.batch_size
        if split_name not in rule_jf:
            rule_jf[split_name] = colour_rule_instance_jf(videos, T)
        summary, records = evaluate(
            student,
            videos,
            feats,
            T,
            device,
            eval_batch,
            args.seed,
            args.bootstrap,
            prefix,
            args.num_shuffles,
        )
        summary[f"{prefix}_instance_jf_colour_rule"] = rule_jf[split_name]
        return summary, records

    # ---- stage 1: the image model on single frames ----
    image_path, pre_path = rep.run_dir / "student_image.pt", rep.run_dir / "pretrain_state.pt"
    if image_path.exists():
        state = torch.load(image_path, map_location=device, weights_only=True)
        state = {k: v for k, v in state.items() if k.split(".")[0] not in MEMORY_MODULES}
        missing, unexpected = student.load_state_dict(state, strict=False)
        if unexpected or any(k.split(".")[0] not in MEMORY_MODULES for k in missing):
            raise UserError(
                f"{image_path} does not fit the {args.preset} student "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        print(f"stage 1: loaded the image model from {image_path}")
    else:
        params = [
            p for n, p in student.named_parameters() if not n.startswith(("perceiver_", "memory_"))
        ]
        opt = torch.optim.AdamW(params, lr=args.pretrain_lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(100, args.pretrain_steps))
        step = 0
        if rep.resume and pre_path.exists():
            s = torch.load(pre_path, map_location=device, weights_only=False)
            student.load_state_dict(s["model"]), opt.load_state_dict(s["optimizer"])
            sched.load_state_dict(s["scheduler"]), set_rng_state(s["rng"])
            step = s["step"]
        frames_pool = [
            (v, t) for v in sorted(train_videos) for t in range(train_videos[v].num_frames)
        ]
        gen = np.random.default_rng([args.seed, 1])
        order = gen.integers(0, len(frames_pool), (args.pretrain_steps, args.batch_size))
        student.train()
        curve_path, loss_sum, loss_n = rep.run_dir / "pretrain_curve.jsonl", 0.0, 0
        bar = tqdm(range(step, args.pretrain_steps), desc="stage 1 (image)", mininterval=5)
        for step in bar:
            aug = np.random.default_rng([args.seed, 2, step]) if args.pretrain_augment else None
            x, targets, _ = make_batch(
                train_videos, train_feats, [frames_pool[i] for i in order[step]], 0, device,
                augment=aug,
            )
            with autocast():
                losses = criterion(student(x), targets)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(), sched.step()
            bar.set_postfix(loss=f"{losses['loss'].item():.3f}", refresh=False)
            loss_sum, loss_n = loss_sum + losses["loss"].item(), loss_n + 1
            every = args.pretrain_eval_every
            if every and ((step + 1) % every == 0 or step + 1 == args.pretrain_steps):
                videos = data["val"][0]
                jf = evaluate_image(student, videos, T, device, 2 * args.batch_size)
                student.train()
                if "val" not in rule_jf:
                    rule_jf["val"] = colour_rule_instance_jf(videos, T)
                rec = {
                    "step": step + 1,
                    "lr": sched.get_last_lr()[0],
                    "train_loss": loss_sum / loss_n,
                    "val_instance_jf_off": jf,
                    "val_instance_jf_colour_rule": rule_jf["val"],
                }
                with curve_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"stage 1 step {step + 1}: val instance J&F (memory off) {jf:.4f}")
                loss_sum, loss_n = 0.0, 0
            if rep.should_stop:
                save_atomic(
                    {
                        "model": student.state_dict(),
                        "optimizer": opt.state_dict(),
                        "step": step + 1,
                        "scheduler": sched.state_dict(),
                        "rng": rng_state(),
                    },
                    pre_path,
                )
                print(f"SIGTERM in stage 1: state saved at step {step + 1}; exiting")
                return 0
        save_atomic(
            {
                k: v
                for k, v in student.state_dict().items()
                if k.split(".")[0] not in MEMORY_MODULES
            },
            image_path,
        )  # the image model only; the memory modules are stage 2's
        pre_path.unlink(missing_ok=True)
    student.freeze_image_model()
    student.eval()  # frozen parts: no dropout anywhere, GroupNorm has no running statistics
    n_train, n_total = count_parameters(student, True), count_parameters(student)
    n_perceiver = count_parameters(student.perceiver_resampler)
    n_memory = count_parameters(student.memory_cross_attn)
    print(
        f"parameters: trainable {n_train:,} (perceiver {n_perceiver:,}, "
        f"memory attention {n_memory:,}), frozen {n_total - n_train:,}"
    )

    # ---- stage 2: the memory modules only ----
    memory = student.memory_modules()
    trainable = [p for p in student.parameters() if p.requires_grad]
    gate = student.memory_cross_attn.gate
    opt = torch.optim.AdamW(
        [  # the tanh gate: no decay towards 0, its own learning rate
            {"params": [p for p in trainable if p is not gate], "weight_decay": 1e-4},
            {"params": [gate], "weight_decay": 0.0, "lr": args.lr * args.gate_lr_mult},
        ],
        lr=args.lr,
    )
    total = args.epochs * args.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(50, total // 10 + 1), total))
    epoch, step_in_epoch = 1, 0
    if rep.resume and (ckpt := rep.latest_checkpoint()) is not None:
        s = torch.load(ckpt, map_location=device, weights_only=False)
        memory.load_state_dict(s["memory"]), opt.load_state_dict(s["optimizer"])
        sched.load_state_dict(s["scheduler"]), set_rng_state(s["rng"])
        epoch, step_in_epoch = s["epoch"], s["step_in_epoch"]
        print(f"resumed the video stage at epoch {epoch}, step {step_in_epoch}")
    if epoch == 1 and step_in_epoch == 0 and not any(r.get("epoch") == 0 for r in rep.history()):
        summary, records = ev("val", "val")
        rep.write_eval("epoch_000000", {"split": "val", "samples": records, "summary": summary})
        rep.log(
            epoch=0,
            memory_gate=0.0,
            trainable_params=n_train,
            frozen_params=n_total - n_train,
            **summary,
        )
    pool = [(v, t) for v in sorted(train_videos) for t in range(T, train_videos[v].num_frames)]

    def checkpoint(next_epoch: int, next_step: int, **kw) -> None:
        """Save where to continue: (epoch, step within it) of the next optimizer step."""
        state = {
            "memory": memory.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rng_state(),
            "epoch": next_epoch,
            "step_in_epoch": next_step,
        }
        rep.save_checkpoint(lambda p: torch.save(state, p), **kw)

    while epoch <= args.epochs:
        order = np.random.default_rng([args.seed, 2, epoch]).integers(
            0, len(pool), (args.steps_per_epoch, args.batch_size)
        )
        sums: dict[str, float] = {}
        t0 = time.time()
        for step in tqdm(
            range(step_in_epoch, args.steps_per_epoch), desc=f"stage 2 epoch {epoch}", mininterval=5
        ):
            x, targets, ctx = make_batch(
                train_videos, train_feats, [pool[i] for i in order[step]], T, device
            )
            with autocast():
                losses = criterion(student.forward_video(x, ctx), targets)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step(), sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            if rep.should_stop and step + 1 < args.steps_per_epoch:
                checkpoint(epoch, step + 1, step=(epoch - 1) * args.steps_per_epoch + step + 1)
                print(f"SIGTERM: checkpoint at epoch {epoch}, step {step + 1}; exiting")
                return 0
        n = max(1, args.steps_per_epoch - step_in_epoch)
        summary, records = ev("val", "val")
        rep.write_eval(
            f"epoch_{epoch:06d}", {"split": "val", "samples": records, "summary": summary}
        )
        extra: dict[str, float] = {}
        if epoch == args.epochs:
            test_summary, test_records = ev("test", "test")
            rep.write_eval(
                "test", {"split": "test", "samples": test_records, "summary": test_summary}
            )
            extra = test_summary
        gate = float(torch.tanh(student.memory_cross_attn.gate).item())
        rep.log(
            epoch=epoch,
            step=epoch * args.steps_per_epoch,
            memory_gate=gate,
            lr=sched.get_last_lr()[0],
            epoch_time_s=time.time() - t0,
            **{f"train_{k}": v / n for k, v in sums.items()},
            **summary,
            **extra,
        )
        checkpoint(
            epoch + 1, 0, epoch=epoch, metrics={"val_instance_jf_on": summary["val_instance_jf_on"]}
        )
        sm = summary
        print(
            f"epoch {epoch}: val instance J&F on {sm['val_instance_jf_on']:.4f} "
            f"off {sm['val_instance_jf_off']:.4f} shuffled {sm['val_instance_jf_shuffled']:.4f}; "
            f"gain vs off {sm['val_instance_jf_gain_vs_off']:+.4f} "
            f"[{sm['val_instance_jf_gain_vs_off_ci_low']:+.4f}, "
            f"{sm['val_instance_jf_gain_vs_off_ci_high']:+.4f}]"
        )
        epoch, step_in_epoch = epoch + 1, 0
        if rep.should_stop:
            print("SIGTERM: checkpoint written; exiting")
            return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
