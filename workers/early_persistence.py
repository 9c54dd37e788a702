"""Early-persistence race worker: one of the four approaches of seed note 001, measured honestly.

    python -m workers.early_persistence --approach attention_supervised \
        --data-dir data/persistence \
        --preset tiny --epochs 50 --eval-every 5 --run-dir runs/ep/attention

Every approach trains the same PersistenceTokenModel (object-observation tokens -> 2-layer
transformer with real attention -> per-token persistent/transient logits); only the named
difference varies:

- attention_supervised: CE + 0.2 x attention loss, the loss being -log r of the LAST layer's
  attention (r = mean attention received by persistent tokens / by transient tokens, per clip;
  clipped once r >= 10). It optimises the race's attention metric directly, so its attention win
  must be read together with its accuracy (ML_NOTES: never judged on its own loss alone).
- pretrained_features: frozen ResNet-18 (transformers ResNetModel, microsoft/resnet-18 with
  --preset full; a tiny RANDOMLY initialised ResNetConfig with --preset tiny, i.e. NOT
  pretrained: records say so in ``backbone``) + a trained projection. The
  frozen features are computed once per token at start-up (the backbone is deterministic in
  eval()), and the projection trains.
- contrastive: CE + 0.1 x contrastive loss (Hadsell et al. 2006) on L2-normalised final
  embeddings, Euclidean distance between unit vectors, margin 0.5, over all token pairs of a clip.
- multitask: CE + 0.3 x Huber loss of the predicted duration (frames the token's object is
  visible, divided by T).

CE is per token, weighted so that every ground-truth track counts once (tracks are the unit of
val_accuracy). Evaluation is on the held-out val split only, once before training
(evals/epoch_000000.json, never a metrics record) and every ``--eval-every`` epochs; every token
is scored on its own, each track weighted once (no pooling over a track's true extent); the
attention metrics use the last layer (workers/persistence_metrics.py). ``score_checkpoint``
rescores a saved checkpoint on any split (the winner on test, once, from the on_success hook).
Metrics go to metrics.jsonl, per-clip records to
evals/epoch_NNNNNN.json, checkpoints every epoch and on SIGTERM (mid-epoch: a ``_partial``
checkpoint that never replaces the evaluated epoch's; resuming skips the batches already done, so
a resumed run follows the uninterrupted trajectory exactly).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from models.frame_tokenizer import SimpleCNNConfig, SimpleCNNTokenizer
from models.persistence_token_model import PersistenceModelConfig, PersistenceTokenModel
from orchestrator.reporting import Reporter
from synthvid.persistence import ObjectTokens, extract_tokens, load_split
from workers.persistence_metrics import (
    attention_received,
    classification_metrics,
    confusion_bootstrap_ci,
    mean_bootstrap_ci,
    own_track_association,
    per_clip_confusion,
    summarize_attention,
    track_predictions,
    track_weights_np,
)
from workers.training_loop import train_epochs, warmup_cosine

APPROACHES = ("attention_supervised", "pretrained_features", "contrastive", "multitask")
PRESETS = {  # model size and optimisation per preset; flags override
    "tiny": {
        "dim": 64,
        "heads": 4,
        "cnn_width": 16,
        "dropout": 0.0,
        "batch_size": 16,
        "lr": 2e-3,
        "token_size": 8,
        "resnet": "tiny",
        "resnet_input": 32,
    },
    "full": {
        "dim": 256,
        "heads": 8,
        "cnn_width": 64,
        "dropout": 0.1,
        "batch_size": 16,
        "lr": 3e-4,
        "token_size": 16,
        "resnet": "microsoft/resnet-18",
        "resnet_input": 64,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--approach", required=True, choices=APPROACHES, help="which approach to train")
    p.add_argument(
        "--data-dir", required=True, help="dataset made by scripts/generate_persistence_dataset.py"
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="output folder when ORCH_RUN_DIR is not set "
        "(default runs/early_persistence/<approach>)",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model/optimiser size")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and dropout")
    p.add_argument("--epochs", type=int, default=50, help="epochs to train (the plan's max_epochs)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="evaluate on val every N epochs (the untrained model is evaluated once too, into "
        "evals/epoch_000000.json; the race checks its criteria every check_every epochs)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="clips per batch (preset default)")
    p.add_argument(
        "--lr", type=float, default=None, help="peak AdamW learning rate (preset default)"
    )
    p.add_argument("--train-samples", type=int, default=None, help="use the first N train clips")
    p.add_argument("--val-samples", type=int, default=None, help="use the first N val clips")
    p.add_argument(
        "--token-size",
        type=int,
        default=None,
        help="side the 16x16 object crops are area-resized to before the tokenizer (tiny: 8)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default cores/4)")
    p.add_argument("--attn-weight", type=float, default=0.2, help="attention loss weight")
    p.add_argument("--contrastive-weight", type=float, default=0.1, help="contrastive loss weight")
    p.add_argument(
        "--margin", type=float, default=0.5, help="contrastive margin (unit-vector distance)"
    )
    p.add_argument("--duration-weight", type=float, default=0.3, help="duration regression weight")
    p.add_argument(
        "--resnet", default=None, help="pretrained_features: HF model id/path, or 'tiny'"
    )
    p.add_argument(
        "--context",
        default="clip",
        choices=("clip", "frame"),
        help="sanity baseline: 'frame' lets a token attend only to its own frame",
    )
    p.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="sanity baseline: permute train track labels (val accuracy must be chance)",
    )
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
    if args.epochs < 1 or args.eval_every < 1 or args.batch_size < 1:
        p.error("--epochs, --eval-every and --batch-size must be >= 1")
    return args


# -- data --------------------------------------------------------------------------------------


def shuffle_track_labels(tok: ObjectTokens, seed: int) -> None:
    """Permute labels (and durations) across the split's tracks, in place: input and label become
    independent, so a model can only learn the class prior."""
    clip = np.repeat(np.arange(len(tok)), np.diff(tok.offsets))
    keys = clip * 10_000 + tok.track
    uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    perm = np.random.default_rng([seed, 99]).permutation(len(uniq))
    tok.label = tok.label[first][perm][inv]
    tok.duration = tok.duration[first][perm][inv]


def resize_crops(crops: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [K, 3, P, P] -> uint8 [K, 3, size, size] by area averaging (identity if P == size)."""
    if crops.shape[-1] == size:
        return crops
    out = [
        F.interpolate(c.float(), size=(size, size), mode="area") for c in torch.split(crops, 8192)
    ]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


class TokenBatches:
    """Padded batches of clips from ObjectTokens, as torch tensors on ``device``.

    ``inputs`` are the uint8 crops [K, 3, P, P] or, for cached frozen features, float [K, C].
    """

    def __init__(self, tok: ObjectTokens, inputs: torch.Tensor, device: torch.device) -> None:
        self.tok, self.inputs, self.device = tok, inputs, device
        self.offsets = torch.from_numpy(tok.offsets)
        self.frame = torch.from_numpy(tok.frame)
        self.centre = torch.from_numpy(tok.centre)
        self.label = torch.from_numpy(tok.label)
        self.duration = torch.from_numpy(tok.duration)
        self.track = torch.from_numpy(tok.track)

    def __len__(self) -> int:
        return len(self.tok)

    def batch(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        """clips: long [B] clip indices -> dict of [B, L, ...] tensors, ``valid`` bool [B, L]."""
        start, length = self.offsets[clips], self.offsets[clips + 1] - self.offsets[clips]
        ar = torch.arange(int(length.max()))
        valid = ar[None] < length[:, None]  # [B, L]
        idx = torch.where(
            valid, start[:, None] + ar[None], torch.zeros_like(valid, dtype=torch.long)
        )
        x = self.inputs[idx]  # [B, L, 3, P, P] uint8 or [B, L, C]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        out = {
            "inputs": x,
            "frame": self.frame[idx],
            "centre": self.centre[idx],
            "label": self.label[idx],
            "duration": self.duration[idx],
            "track": self.track[idx],
            "valid": valid,
        }
        return {k: v.to(self.device) for k, v in out.items()}


def track_weights(track: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L] weights: 1 / (tokens of the token's track), 0 on padding (each track counts once)."""
    same = (track[:, :, None] == track[:, None, :]) & valid[:, None, :] & valid[:, :, None]
    return valid.float() / same.sum(-1).clamp(min=1).float()


# -- losses ------------------------------------------------------------------------------------


def classification_loss(logits, label, w):
    """Class-balanced, per-track-weighted token CE: the mean over persistent tracks and the mean
    over transient tracks, averaged (each class weighs 1/2). Without the class balance the model
    sat on the 70% transient prior for many epochs (measured: balanced accuracy 0.50 at epoch 6)."""
    ce = F.cross_entropy(logits.flatten(0, 1), label.flatten(), reduction="none").view_as(w)
    per_class = []
    for c in (0, 1):
        wc = w * (label == c)
        if wc.sum() > 0:
            per_class.append((ce * wc).sum() / wc.sum())
    return torch.stack(per_class).mean()


def attention_ratio_loss(attn, label, valid, max_ratio: float = 10.0):
    """Mean over clips with transients of max(-log r, -log max_ratio).

    attn: the last layer's [B, H, L, L]; label, valid: [B, L]."""
    a = attention_received(attn, valid)  # [B, L]
    pers, trans = (label == 1) & valid, (label == 0) & valid
    has_t = trans.any(1) & pers.any(1)
    p = (a * pers).sum(1) / pers.sum(1).clamp(min=1)
    t = (a * trans).sum(1) / trans.sum(1).clamp(min=1)
    log_r = torch.log(p[has_t] + 1e-12) - torch.log(t[has_t] + 1e-12)
    return (-log_r).clamp(min=-math.log(max_ratio)).mean() if has_t.any() else attn.sum() * 0


def contrastive_loss(emb, label, valid, margin: float):
    """Hadsell-style contrastive loss over all token pairs of each clip, on unit vectors:
    same class d^2, different class max(0, margin - d)^2, d = Euclidean distance (in [0, 2])."""
    z = F.normalize(emb, dim=-1)
    d = torch.sqrt(((z[:, :, None] - z[:, None]) ** 2).sum(-1) + 1e-9)  # [B, L, L], smooth at 0
    same = label[:, :, None] == label[:, None, :]
    pair = (
        valid[:, :, None]
        & valid[:, None, :]
        & ~torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    )
    loss = torch.where(same, d**2, F.relu(margin - d) ** 2)
    return (loss * pair).sum() / pair.sum().clamp(min=1)


def compute_loss(args, out, b, num_frames: int):
    """(total loss, classification loss) of one batch for the worker's approach."""
    w = track_weights(b["track"], b["valid"])
    ce = classification_loss(out["logits"], b["label"], w)
    total = ce
    if args.approach == "attention_supervised":
        total = total + args.attn_weight * attention_ratio_loss(
            out["attentions"][-1], b["label"], b["valid"]
        )
    elif args.approach == "contrastive":
        total = total + args.contrastive_weight * contrastive_loss(
            out["embedding"], b["label"], b["valid"], args.margin
        )
    elif args.approach == "multitask":
        hub = F.huber_loss(out["duration"], b["duration"] / num_frames, reduction="none")
        total = total + args.duration_weight * (hub * w).sum() / w.sum()
    return total, ce


# -- model -------------------------------------------------------------------------------------


def build_model(args, crops_train, crops_val, device):
    """The shared model, and the per-token inputs (crops, or cached frozen ResNet features)."""
    cfg = PersistenceModelConfig(dim=args.dim, heads=args.heads, dropout=args.dropout)
    if args.approach != "pretrained_features":
        tok = SimpleCNNTokenizer(SimpleCNNConfig(width=args.cnn_width, dim=args.dim))
        return PersistenceTokenModel(tok, cfg).to(device), crops_train, crops_val
    # imported here: transformers costs seconds of CPU to import, and only this approach needs it
    from models.resnet_features import FrozenResNetFeatures, ResNetTokenizer, tiny_resnet_config

    if args.resnet == "tiny":
        feats = FrozenResNetFeatures.from_config(tiny_resnet_config(), input_size=args.resnet_input)
    else:
        feats = FrozenResNetFeatures.from_pretrained(args.resnet, input_size=args.resnet_input)
    feats = feats.to(device)
    cached = []
    for crops in (crops_train, crops_val):  # frozen + eval(): features are a fixed function
        chunks = [feats(c.to(device).float() / 255.0).cpu() for c in torch.split(crops, 2048)]
        cached.append(torch.cat(chunks))
    proj = ResNetTokenizer(feats, args.dim).proj  # only the projection is part of the model
    proj.dim = args.dim
    return PersistenceTokenModel(proj, cfg).to(device), cached[0], cached[1]


# -- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, data: TokenBatches, args, num_frames: int, epoch: int, split: str = "val"):
    """Held-out metrics and per-clip records. Returns (metrics dict, records dict).

    Every token is classified on its own (p > 0.5); each ground-truth track weighs 1, its tokens
    1/n each (workers/persistence_metrics.py), so the score never pools a track's tokens over its
    true extent. The attention metrics use the last layer.
    """
    model.eval()
    probs, received, assoc, losses, n_batches = [], [], [], 0.0, 0
    order = torch.arange(len(data))
    for clips in torch.split(order, 64):
        b = data.batch(clips)
        out = model(b["inputs"], b["frame"], b["centre"], b["valid"], context=args.context)
        losses += float(
            classification_loss(out["logits"], b["label"], track_weights(b["track"], b["valid"]))
        )
        n_batches += 1
        p = out["logits"].float().softmax(-1)[..., 1]
        last = out["attentions"][-1].float()
        a = attention_received(last, b["valid"])
        assoc.append(own_track_association(last, b["track"], b["valid"]).cpu().numpy())
        for i in range(len(clips)):
            v = b["valid"][i]
            probs.append(p[i][v].cpu().numpy())
            received.append(a[i][v].cpu().numpy())
    model.train()
    tok = data.tok
    clip = np.repeat(np.arange(len(tok)), np.diff(tok.offsets))
    prob = np.concatenate(probs)
    att = np.concatenate(received)
    association = np.concatenate(assoc)  # [N] per clip, NaN without a multi-token object
    pred = (prob > 0.5).astype(np.int64)
    weight = track_weights_np(clip, tok.track)
    cls = classification_metrics(tok.label, pred, weight)
    cis = confusion_bootstrap_ci(
        per_clip_confusion(tok.label, pred, weight, clip, len(tok)), seed=epoch
    )
    t_prob, t_label, t_clip, t_id = track_predictions(prob, clip, tok.track, tok.label)
    t_acc = track_predictions((pred == tok.label).astype(np.float64), clip, tok.track, tok.label)[0]
    samples, pers, trans = [], [], []
    for i, sid in enumerate(tok.sample_ids):
        sl = slice(tok.offsets[i], tok.offsets[i + 1])
        lab, a_i, trk = tok.label[sl], att[sl], tok.track[sl]
        p_mean = float(a_i[lab == 1].mean())
        t_mean = float(a_i[lab == 0].mean()) if (lab == 0).any() else None
        if t_mean is not None:
            pers.append(p_mean)
            trans.append(t_mean)
        m = t_clip == i
        objects = [
            {
                "track": int(k),
                "kind": "persistent" if lb == 1 else "transient",
                "num_tokens": int((trk == k).sum()),
                "attention": float(a_i[trk == k].mean()),
                "prob_persistent": float(pr),  # mean over its tokens: display only, not scored
                "correct": float(ok),  # fraction of its tokens classified right (its score)
            }
            for k, pr, ok, lb in zip(t_id[m], t_prob[m], t_acc[m], t_label[m], strict=True)
        ]
        samples.append(
            {
                "sample_id": sid,
                "objects": objects,
                "persistent_attention": p_mean,
                "transient_attention": t_mean,
                "ratio": p_mean / t_mean if t_mean else None,
                "association": None if np.isnan(association[i]) else float(association[i]),
                "object_accuracy": float(np.mean([o["correct"] for o in objects])),
            }
        )
    att_stats = summarize_attention(np.array(pers), np.array(trans), seed=epoch)
    assoc_ci = mean_bootstrap_ci(association, seed=epoch)
    metrics = {
        "val_loss": losses / max(n_batches, 1),
        "val_accuracy": cls["accuracy"],
        "val_accuracy_ci_low": cis["accuracy"][0],
        "val_accuracy_ci_high": cis["accuracy"][1],
        "balanced_accuracy": cls["balanced_accuracy"],
        "balanced_accuracy_ci_low": cis["balanced_accuracy"][0],
        "balanced_accuracy_ci_high": cis["balanced_accuracy"][1],
        "macro_f1": cls["macro_f1"],
        "majority_accuracy": float(max(t_label.mean(), 1 - t_label.mean())),
        **att_stats,
        "association": float(np.nanmean(association)) if np.isfinite(association).any() else None,
        "association_ci_low": assoc_ci[0],
        "association_ci_high": assoc_ci[1],
        "n_val_clips": len(tok),
        "n_excluded_no_transient": len(tok) - len(pers),
    }
    records = {
        "epoch": epoch,
        "approach": args.approach,
        "backbone": backbone_description(args),
        "split": split,
        "layer": "last",
        "scoring": "per token (p > 0.5), each ground-truth track weighted 1 (tokens 1/n)",
        "confusion": cls["confusion"],
        "summary": metrics,
        "samples": samples,
    }
    return metrics, records


def backbone_description(args) -> str:
    """What turns a crop into a token, and where its weights come from (records, reports)."""
    if args.approach != "pretrained_features":
        return f"SimpleCNNTokenizer (width {args.cnn_width}), trained from scratch"
    if args.resnet == "tiny":
        return (
            "frozen ResNet (tiny config, widths 16-128), RANDOM initialisation "
            f"(torch seed {args.seed}), NOT pretrained; only the projection trains"
        )
    return f"frozen ResNet from {args.resnet} (transformers from_pretrained); projection trains"


# -- scoring a saved checkpoint (the winner's, on the test split) --------------------------------


def score_checkpoint(checkpoint, data_dir, split: str = "test", limit: int | None = None):
    """Score a checkpoint of this worker on a split, exactly as the worker scores val.

    The model is rebuilt from the arguments stored in the checkpoint, in the order ``main`` uses
    (so the frozen random backbone of ``pretrained_features --resnet tiny``, which is not in the
    checkpoint, is the same), then the checkpoint's weights are loaded.

    Args:
        checkpoint: path of a checkpoint written by this worker (``torch.save`` of a dict with
            ``model``, ``args``, ``epoch``).
        data_dir: dataset folder (the checkpoint's own ``data_dir`` may be another machine's).
        split: "train", "val" or "test".
        limit: score only the split's first ``limit`` clips (tests).

    Returns:
        (metrics, records) as ``evaluate`` returns them; records carry ``checkpoint_epoch``.

    Raises:
        ValueError: missing dataset or unknown split; OSError / RuntimeError from torch.load.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    args = argparse.Namespace(**state["args"])
    data = load_split(data_dir, split, limit)
    tok = extract_tokens(data)
    torch.manual_seed(args.seed)
    crops = resize_crops(torch.from_numpy(tok.crops), args.token_size)
    model, _, inputs = build_model(args, crops[:1], crops, torch.device("cpu"))
    model.load_state_dict(state["model"])
    metrics, records = evaluate(
        model,
        TokenBatches(tok, inputs, torch.device("cpu")),
        args,
        data.video.shape[1],
        int(state["epoch"]),
        split,
    )
    records["checkpoint_epoch"] = int(state["epoch"])
    return metrics, records


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // 4))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        rep = Reporter.from_env(
            default_run_dir=args.run_dir or f"runs/early_persistence/{args.approach}"
        )
        train_split = load_split(args.data_dir, "train", args.train_samples)
        val_split = load_split(args.data_dir, "val", args.val_samples)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    num_frames = train_split.video.shape[1]
    train_tok, val_tok = extract_tokens(train_split), extract_tokens(val_split)
    if args.shuffle_labels:
        shuffle_track_labels(train_tok, args.seed)
    torch.manual_seed(args.seed)
    crops = [resize_crops(torch.from_numpy(t.crops), args.token_size) for t in (train_tok, val_tok)]
    model, train_in, val_in = build_model(args, crops[0], crops[1], device)
    train, val = TokenBatches(train_tok, train_in, device), TokenBatches(val_tok, val_in, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps, warmup = args.epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total_steps))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    print(
        f"{args.approach}: {sum(p.numel() for p in params):,} trainable params, "
        f"{len(train)} train / "
        f"{len(val)} val clips, {steps_per_epoch} steps/epoch, device {device}; "
        f"tokenizer: {backbone_description(args)}",
        flush=True,
    )

    def batch_loss(clips: torch.Tensor) -> torch.Tensor:
        b = train.batch(clips)
        with autocast:
            out = model(b["inputs"], b["frame"], b["centre"], b["valid"], context=args.context)
            loss, _ = compute_loss(args, out, b, num_frames)
        return loss

    return train_epochs(
        rep=rep,
        model=model,
        optimizer=opt,
        scheduler=sched,
        num_samples=len(train),
        batch_loss=batch_loss,
        evaluate=lambda epoch: evaluate(model, val, args, num_frames, epoch),
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        seed=args.seed,
        args=vars(args),
        stop_after_steps=args.stop_after_steps,
        show_progress=not args.no_progress,
    )


if __name__ == "__main__":
    sys.exit(main())
