"""Train the foveated VLM (coarse + fine passes) on precomputed DINO features; held-out evals.

    # CPU demo on the synthetic captioned-shapes set (see docs/fvlm.md for the data steps)
    python -m workers.fvlm --data-dir data/captioned_shapes/feats_tiny --preset tiny \\
        --run-dir runs/fvlm-tiny --max-epochs 30
    # GPU box: SmolLM2-135M-Instruct + dinov2-small features at 256 px
    python -m workers.fvlm --data-dir data/webvid_feats --preset full --run-dir runs/fvlm \\
        --batch-size 32 --grad-accum 2 --lr 1e-4 --max-hours 2
    # score a finished run's latest checkpoint on the test split
    python -m workers.fvlm --data-dir ... --run-dir runs/fvlm-tiny --eval-only --split test

Per evaluation (every --eval-every epochs, on the val split; epoch 0 = before training) one
record goes to metrics.jsonl and the per-sample records to evals/<split>_epoch_NNNNNN.json:
CE_coarse, CE_fine (nats/token, EOS included), delta CE = CE_coarse - CE_fine per sample with a
bootstrap 95% CI (scipy.stats.bootstrap, BCa) and a one-sided t-test of its mean (> 0), d_z,
cap_ratio = mean CE_coarse / mean CE_fine; video controls: blind (visual tokens zeroed; out of
distribution) and shuffled video (each caption scored with another clip's features, averaged over
--num-shuffles derangements); query controls of the fine pass that the LM could produce: another
clip's queries, the clip's own queries time-reversed, the split's mean query (gaps CE_control -
CE_fine with CIs; query_gap_min_ci_low is the smallest CI low bound), and Gaussian random
queries (out of distribution, for reference); attention entropy versus log N and
cosine(z_coarse, z_fine); latent MSE of both passes against the copy-last-frame baseline. The
success metrics (cap_ratio, delta_ce_ci_low, query_gap_min_ci_low) are left out of the untrained
epoch-0 record. Under the orchestrator ORCH_RUN_DIR / ORCH_RESUME win over --run-dir / --resume;
SIGTERM or --max-hours -> checkpoint at the next optimizer step and exit 0 (resume with --resume
to continue the same trajectory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.foveated_vlm import (
    COARSE,
    FINE,
    SMOLLM2_NAME,
    EfficientFoveatedModel,
    FoveatedConfig,
    load_lm,
    tiny_lm,
)
from models.fvlm_tokenizer import encode_captions, load_tokenizer, train_caption_tokenizer
from orchestrator.reporting import Reporter


class FeatureSet(Dataset):
    """Precomputed clips of one split: {feats [T,N,D], latents [T,C,h,w] float32, caption, id}.

    Reads ``<data_dir>/meta.json`` (split manifest) and ``<id>.pt`` files from precompute_dino.py;
    keeps ``num_frames`` evenly spaced frames; ``preload`` loads every file once into memory.
    """

    def __init__(self, data_dir: Path, split: str, num_frames: int | None, preload: bool) -> None:
        meta = json.loads((data_dir / "meta.json").read_text())
        if split not in meta["split"]:
            raise ValueError(
                f"split {split!r} not in {data_dir}/meta.json (has {sorted(meta['split'])})"
            )
        self.data_dir, self.ids = data_dir, sorted(meta["split"][split])
        self.num_frames = num_frames
        self.cache = (
            [self._load(i) for i in tqdm(self.ids, desc=f"load {split}", leave=False)]
            if preload
            else None
        )

    def _load(self, sample_id: str) -> dict:
        rec = torch.load(self.data_dir / f"{sample_id}.pt", weights_only=True)
        T = rec["dino_features"].shape[0]
        n = self.num_frames or T
        if n > T:
            raise ValueError(f"{sample_id} has {T} frames, --num-frames asks {n}")
        idx = torch.linspace(0, T - 1, n).round().long()
        return {
            "feats": rec["dino_features"][idx],
            "latents": rec["latents"][idx],
            "caption": rec["caption"],
            "id": sample_id,
        }

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return self.cache[i] if self.cache is not None else self._load(self.ids[i])


def collate(items: list[dict]) -> dict:
    return {
        "feats": torch.stack([x["feats"] for x in items]).float(),  # (B, T, N, D)
        "latents": torch.stack([x["latents"] for x in items]).float(),  # (B, T, C, h, w)
        "captions": [x["caption"] for x in items],
        "ids": [x["id"] for x in items],
    }


def paired_delta(a: np.ndarray, b: np.ndarray, seed: int) -> dict:
    """Per-sample delta d = a - b (claimed direction: d > 0): mean, CI, one-sided test, d_z.

    Returns {"mean", "ci_low", "ci_high" (95% BCa bootstrap CI of the mean, scipy.stats.bootstrap,
    2000 resamples), "p_greater" (one-sided one-sample t-test of mean(d) > 0: the quantity
    claimed is the mean, not a median shift), "dz" (mean / sd), "frac_pos"}.
    """
    d = a - b
    out = {"mean": float(d.mean()), "frac_pos": float((d > 0).mean())}
    if len(d) < 3 or np.allclose(d, d[0]):
        m = float(d.mean())
        return {**out, "ci_low": m, "ci_high": m, "p_greater": 0.0 if m > 0 else 1.0, "dz": 0.0}
    ci = stats.bootstrap(
        (d,),
        np.mean,
        confidence_level=0.95,
        n_resamples=2000,
        method="BCa",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return {
        **out,
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "p_greater": float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue),
        "dz": float(d.mean() / d.std(ddof=1)),
    }


def derangements(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` cyclic derangements of range(n) (index i -> (i + shift) % n, distinct shifts >= 1).

    The shuffled-video control averages over several of them, so no single pairing of clips
    decides it. Returns k int arrays [n] (fewer if n - 1 < k; none if n < 2).
    """
    if n < 2:
        return []
    shifts = np.random.default_rng(seed).permutation(np.arange(1, n))[:k]
    return [(np.arange(n) + int(sh)) % n for sh in shifts]


QUERY_CONTROLS = ("otherq", "revq", "meanq")  # in-distribution controls of the fine queries


def attn_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of attention rows [B, T, H, N], averaged over frames and heads -> [B]."""
    a = attn.float()
    return -(a * a.clamp_min(1e-12).log()).sum(-1).mean((1, 2))


@torch.no_grad()
def evaluate(
    model: EfficientFoveatedModel, data: FeatureSet, tokenizer, args, device
) -> tuple[dict, list]:
    """Held-out evaluation with controls; returns (summary metrics, per-sample records).

    Per clip: CE of the coarse and fine passes and of the controls. Video controls: blind (visual
    tokens zeroed; out of distribution, an upper reference only) and shuffled (the full model on
    another clip's features, averaged over ``args.num_shuffles`` derangements). Query controls of
    the LAST fine pass, all queries the LM could produce: ``otherq`` (the queries the LM made for
    another clip, first derangement), ``revq`` (the clip's own queries in reversed frame order),
    ``meanq`` (the split's mean fine query per frame position); and ``randq`` (Gaussian queries,
    out of distribution: kept for comparison with earlier runs, never a criterion).
    """
    model.eval()
    n = len(data)
    perms = derangements(n, args.num_shuffles, args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)  # random-query control
    amp = torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )
    rows: list[dict] = []
    own_queries: list[torch.Tensor] = []  # [B, T, d] per batch: for the mean-query control
    k = args.fine_iterations
    for start in range(0, n, args.eval_batch_size):
        idx = list(range(start, min(n, start + args.eval_batch_size)))
        batch = collate([data[i] for i in idx])
        others = [collate([data[int(pm[i])] for i in idx]) for pm in perms]
        feats, latents = batch["feats"].to(device), batch["latents"].to(device)
        ids, mask = (
            t.to(device)
            for t in encode_captions(tokenizer, batch["captions"], args.max_caption_tokens)
        )
        B, T = feats.shape[:2]
        with amp:
            passes = model(feats, latents, ids, mask, fine_iterations=k).passes
            coarse, fine = passes[0], passes[-1]
            blind = model.read(torch.zeros_like(coarse.z), COARSE, latents, ids, mask)
            ce_shuf, q_other = [], None
            for other in others:  # another clip's video, own caption
                sh = model(other["feats"].to(device), latents, ids, mask, fine_iterations=k)
                ce_shuf.append(sh.passes[-1].ce.float())
                if q_other is None and k > 0:  # the LM's queries for that other clip
                    q_other = model.fine_queries(sh.passes[-2].hidden, T)
            q_own = model.fine_queries(passes[-2].hidden, T) if k > 0 else None
            ctrl = {}
            if q_own is not None:
                own_queries.append(q_own.float().cpu())
                for name, q in (("otherq", q_other), ("revq", q_own.flip(1))):
                    if q is not None:
                        z_q, a_q = model.look(feats, q)
                        ctrl[name] = model.read(z_q, FINE, latents, ids, mask, a_q).ce.float()
            q = torch.randn(B, T, model.cfg.attn_dim, generator=gen).to(device)
            z_r, a_r = model.look(feats, q)
            randq = model.read(z_r, FINE, latents, ids, mask, a_r)
        shuffled = torch.stack(ce_shuf).mean(0) if ce_shuf else torch.full((B,), float("nan"))
        copy = (latents[:, :-1] - latents[:, 1:]).pow(2).flatten(1).mean(1)  # copy-last-frame
        zc, zf = coarse.z.float(), fine.z.float()
        cos = torch.nn.functional.cosine_similarity(zc, zf, dim=-1).mean(1)  # (B,)
        ent_c, ent_f = attn_entropy(coarse.attn), attn_entropy(fine.attn)  # (B,)
        for j in range(len(idx)):
            n_tok = int(mask[j].sum())
            rows.append(
                {
                    "id": batch["ids"][j],
                    "caption": batch["captions"][j],
                    "n_tokens": n_tok,
                    "tokens": tokenizer.convert_ids_to_tokens(ids[j, :n_tok].tolist()),
                    "tok_ce_coarse": coarse.tok_ce[j, :n_tok].tolist(),
                    "tok_ce_fine": fine.tok_ce[j, :n_tok].tolist(),
                    "ce_coarse": coarse.ce[j].item(),
                    "ce_fine": fine.ce[j].item(),
                    "ce_fine_all": [p.ce[j].item() for p in passes[1:]],
                    "ce_blind": blind.ce[j].item(),
                    "ce_shuffled": shuffled[j].item(),
                    "shuffled_with": [o["ids"][j] for o in others],
                    **{f"ce_{c}": v[j].item() for c, v in ctrl.items()},
                    "ce_randq": randq.ce[j].item(),
                    "rec_coarse": coarse.rec[j].item(),
                    "rec_fine": fine.rec[j].item(),
                    "rec_copy": copy[j].item(),
                    "attn_entropy_coarse": ent_c[j].item(),
                    "attn_entropy_fine": ent_f[j].item(),
                    "cos_z": cos[j].item(),
                }
            )
    if own_queries:  # meanq: the split's mean fine query per frame position, [T, d]
        q_mean = torch.cat(own_queries).mean(0).to(device)
        for start in range(0, n, args.eval_batch_size):
            idx = list(range(start, min(n, start + args.eval_batch_size)))
            batch = collate([data[i] for i in idx])
            feats, latents = batch["feats"].to(device), batch["latents"].to(device)
            ids, mask = (
                t.to(device)
                for t in encode_captions(tokenizer, batch["captions"], args.max_caption_tokens)
            )
            with amp:
                z_m, a_m = model.look(feats, q_mean.expand(len(idx), -1, -1))
                ce_m = model.read(z_m, FINE, latents, ids, mask, a_m).ce.float()
            for j, i in enumerate(idx):
                rows[i]["ce_meanq"] = ce_m[j].item()
    model.train()
    col = lambda key: np.array([r[key] for r in rows])  # noqa: E731
    ce_c, ce_f = col("ce_coarse"), col("ce_fine")
    fine_gain = paired_delta(ce_c, ce_f, args.seed)
    randq_gap = paired_delta(col("ce_randq"), ce_f, args.seed)
    shuffle_gap = paired_delta(col("ce_shuffled"), ce_f, args.seed)
    log_n = math.log(model.cfg.num_tokens)
    summary = {
        "ce_coarse": ce_c.mean(),
        "ce_fine": ce_f.mean(),
        "cap_ratio": ce_c.mean() / ce_f.mean(),
        "delta_ce": fine_gain["mean"],
        "delta_ce_ci_low": fine_gain["ci_low"],
        "delta_ce_ci_high": fine_gain["ci_high"],
        "delta_ce_p_greater": fine_gain["p_greater"],
        "delta_ce_dz": fine_gain["dz"],
        "frac_fine_better": fine_gain["frac_pos"],
        "ce_blind": col("ce_blind").mean(),
        "ce_shuffled": col("ce_shuffled").mean(),
        "num_shuffles": len(perms),
        "ce_randq": col("ce_randq").mean(),
        "shuffled_gap": shuffle_gap["mean"],
        "shuffled_gap_ci_low": shuffle_gap["ci_low"],
        "randq_gap": randq_gap["mean"],
        "randq_gap_ci_low": randq_gap["ci_low"],
    }
    lows = []
    for c in QUERY_CONTROLS:  # CE_control - CE_fine > 0: the LM's own queries are better
        if f"ce_{c}" not in rows[0]:
            continue
        g = paired_delta(col(f"ce_{c}"), ce_f, args.seed)
        summary.update(
            {
                f"ce_{c}": col(f"ce_{c}").mean(),
                f"{c}_gap": g["mean"],
                f"{c}_gap_ci_low": g["ci_low"],
                f"{c}_gap_ci_high": g["ci_high"],
                f"{c}_gap_p_greater": g["p_greater"],
            }
        )
        lows.append(g["ci_low"])
    if lows:  # one criterion key: the fine queries beat EVERY in-distribution control
        summary["query_gap_min_ci_low"] = min(lows)
    summary.update(
        {
            "rec_coarse": col("rec_coarse").mean(),
            "rec_fine": col("rec_fine").mean(),
            "rec_copy": col("rec_copy").mean(),
            "attn_entropy_coarse": col("attn_entropy_coarse").mean(),
            "attn_entropy_fine": col("attn_entropy_fine").mean(),
            "log_n": log_n,
            "cos_z": col("cos_z").mean(),
            "n_eval": len(rows),
        }
    )
    return {k: float(v) if not isinstance(v, int) else v for k, v in summary.items()}, rows


def per_token_table(rows: list[dict]) -> dict[str, dict]:
    """Mean per-token CE of the coarse and fine passes for each token string over eval samples."""
    acc: dict[str, list[list[float]]] = {}
    for r in rows:
        for tok, c, f in zip(r["tokens"], r["tok_ce_coarse"], r["tok_ce_fine"], strict=True):
            acc.setdefault(tok, [[], []])
            acc[tok][0].append(c)
            acc[tok][1].append(f)
    return {
        tok: {"n": len(c), "ce_coarse": float(np.mean(c)), "ce_fine": float(np.mean(f))}
        for tok, (c, f) in sorted(acc.items())
    }


def lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.1 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir", required=True, help="folder of <id>.pt files + meta.json (precompute_dino.py)"
    )
    p.add_argument("--run-dir", default=None, help="run directory (ORCH_RUN_DIR wins)")
    p.add_argument(
        "--preset",
        choices=("tiny", "full"),
        default="tiny",
        help="tiny: random tiny Llama + BPE tokenizer (CPU); full: --lm from the hub",
    )
    p.add_argument("--lm", default=SMOLLM2_NAME, help="LM name/path for --preset full")
    p.add_argument("--local-files-only", action="store_true", help="never reach the model hub")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    p.add_argument("--max-epochs", type=int, default=30, help="epochs (passes over train)")
    p.add_argument("--max-hours", type=float, default=None, help="checkpoint and exit 0 after this")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warmup steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm")
    p.add_argument(
        "--fine-iterations", type=int, default=None, help="fine passes (default: preset)"
    )
    p.add_argument(
        "--pos-embed-std",
        type=float,
        default=None,
        help="init std of the model's patch position embedding (default: preset)",
    )
    p.add_argument(
        "--num-frames", type=int, default=None, help="frames used per clip (default: all)"
    )
    p.add_argument(
        "--max-caption-tokens", type=int, default=64, help="caption truncation, EOS incl."
    )
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    p.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument(
        "--num-shuffles",
        type=int,
        default=3,
        help="derangements the shuffled-video control averages over",
    )
    p.add_argument(
        "--eval-only", action="store_true", help="evaluate the latest checkpoint and exit"
    )
    p.add_argument("--split", default="val", help="split scored by --eval-only")
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint for --eval-only (default: latest)"
    )
    p.add_argument(
        "--final-test", action="store_true", help="score the test split after the last epoch"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order, controls")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument(
        "--preload",
        choices=("auto", "yes", "no"),
        default="auto",
        help="load all files into memory (auto: <= 5000 clips)",
    )
    p.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 1) // 4), help="torch CPU threads"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = Path(args.data_dir)
    if not (data_dir / "meta.json").exists():
        print(
            f"error: {data_dir}/meta.json not found; run scripts/precompute_dino.py first",
            file=sys.stderr,
        )
        return 2
    for name in (
        "max_epochs",
        "batch_size",
        "grad_accum",
        "eval_every",
        "eval_batch_size",
        "num_shuffles",
    ):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        rep = Reporter.from_env(default_run_dir=args.run_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = json.loads((data_dir / "meta.json").read_text())
    preload = args.preload == "yes" or (
        args.preload == "auto" and sum(map(len, meta["split"].values())) <= 5000
    )
    try:
        train_set = FeatureSet(data_dir, "train", args.num_frames, preload)
        val_set = FeatureSet(
            data_dir, "val" if not args.eval_only else args.split, args.num_frames, preload
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # tokenizer + model: the tiny BPE is trained on train captions once and kept in the run dir
    tok_dir = rep.run_dir / "tokenizer"
    if args.preset == "tiny":
        if (tok_dir / "tokenizer.json").exists():
            tokenizer = load_tokenizer(str(tok_dir), local_files_only=True)
        else:
            tokenizer = train_caption_tokenizer(
                train_set[i]["caption"] for i in range(len(train_set))
            )
            tokenizer.save_pretrained(tok_dir)
        lm = tiny_lm(len(tokenizer), seed=args.seed)
        cfg_fn = FoveatedConfig.tiny
    else:
        try:
            tokenizer = load_tokenizer(args.lm, local_files_only=args.local_files_only)
            lm = load_lm(args.lm, local_files_only=args.local_files_only)
        except OSError as e:  # not on the hub / not in the cache / no network
            print(f"error: cannot load LM {args.lm!r}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        cfg_fn = FoveatedConfig.full
    N, D = meta["dino_features_shape"][1:]
    C, h = meta["latents_shape"][1:3]
    overrides = dict(num_tokens=N, feature_dim=D, latent_channels=C, latent_size=h)
    if args.fine_iterations is not None:
        overrides["fine_iterations"] = args.fine_iterations
    if args.pos_embed_std is not None:
        overrides["pos_embed_std"] = args.pos_embed_std
    cfg = cfg_fn(**overrides)
    args.fine_iterations = cfg.fine_iterations
    torch.manual_seed(args.seed)
    model = EfficientFoveatedModel(cfg, lm).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.lr,
        weight_decay=args.weight_decay,
        betas=(0.9, 0.95),
    )
    steps_per_epoch = len(train_set) // (args.batch_size * args.grad_accum)
    if steps_per_epoch < 1:
        print(f"error: {len(train_set)} train clips < --batch-size x --grad-accum", file=sys.stderr)
        return 2
    total_steps = steps_per_epoch * args.max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, args.warmup_steps, total_steps)
    )

    epoch, step_in_epoch, step = 0, 0, 0  # epoch = completed epochs
    eval_pending = False  # an epoch ended on SIGTERM before its evaluation
    ckpt = Path(args.checkpoint) if args.eval_only and args.checkpoint else rep.latest_checkpoint()
    if ckpt is not None and not ckpt.exists():
        print(f"error: checkpoint {ckpt} not found", file=sys.stderr)
        return 2
    if (rep.resume or args.resume or args.eval_only) and ckpt is not None:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        random.setstate(state["rng"]["python"]), np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        eval_pending = state.get("eval_pending", False)
        print(f"resumed from {ckpt} at epoch {epoch} step {step}")
    elif args.eval_only:
        print(f"error: no checkpoint in {rep.checkpoint_dir}", file=sys.stderr)
        return 2
    print(
        f"{n_params:,} trainable parameters; {len(train_set)} train / {len(val_set)} "
        f"{'val' if not args.eval_only else args.split} clips; {steps_per_epoch} steps/epoch; "
        f"device {device}"
    )

    def save(eval_pending: bool = False) -> None:
        state = {
            "eval_pending": eval_pending,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "step": step,
            "config": vars(cfg),
            "args": vars(args),
        }
        rep.save_checkpoint(lambda path: torch.save(state, path), step=step)

    def run_eval(
        split_name: str,
        dataset: FeatureSet,
        train_stats: dict,
        before_log: Callable[[], None] = lambda: None,
    ) -> dict:
        """Evaluate, write evals/, call ``before_log`` (the checkpoint), then log the record."""
        summary, rows = evaluate(model, dataset, tokenizer, args, device)
        rep.write_eval(
            f"{split_name}_epoch_{epoch:06d}",
            {
                "split": split_name,
                "epoch": epoch,
                "step": step,
                "summary": summary,
                "per_token": per_token_table(rows),
                "samples": rows,
            },
        )
        if split_name != "val":  # test scores never feed the criteria
            summary = {f"{split_name}_{k}": v for k, v in summary.items()}
        elif epoch == 0:  # untrained: diagnostics only, no success metrics
            summary = {
                k: v
                for k, v in summary.items()
                if k not in ("cap_ratio", "delta_ce_ci_low", "query_gap_min_ci_low")
            }
        before_log()  # the checkpoint exists before the controller can act on the record
        rec = rep.log(epoch=epoch, step=step, **summary, **train_stats)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
        return rec

    if args.eval_only:
        run_eval(args.split, val_set, {})
        return 0
    if step == 0 and not rep.history():
        run_eval("val", val_set, {"params": n_params})
    if eval_pending:
        run_eval("val", val_set, {})

    amp = torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )
    t_start = time.time()
    model.train()
    while epoch < args.max_epochs:
        order = torch.randperm(
            len(train_set), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch)
        )
        micro = args.batch_size
        batches = [
            order[i * micro : (i + 1) * micro].tolist()
            for i in range(steps_per_epoch * args.grad_accum)
        ]
        loader = DataLoader(
            train_set,
            batch_sampler=batches[step_in_epoch * args.grad_accum :],
            collate_fn=collate,
            num_workers=args.num_workers,
        )
        sums = {"loss": 0.0, "ce_coarse": 0.0, "ce_fine": 0.0, "rec_coarse": 0.0, "rec_fine": 0.0}
        n_micro, t_epoch = 0, time.time()
        bar = tqdm(
            total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}", leave=False
        )
        for i, batch in enumerate(loader):
            ids, mask = (
                t.to(device)
                for t in encode_captions(tokenizer, batch["captions"], args.max_caption_tokens)
            )
            with amp:
                out = model(batch["feats"].to(device), batch["latents"].to(device), ids, mask)
            (out.loss / args.grad_accum).backward()
            sums["loss"] += out.loss.item()
            for name, p in (("coarse", out.passes[0]), ("fine", out.passes[-1])):
                sums[f"ce_{name}"] += p.ce.mean().item()
                sums[f"rec_{name}"] += p.rec.mean().item()
            n_micro += 1
            if (i + 1) % args.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, step_in_epoch = step + 1, step_in_epoch + 1
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
            out_of_time = (
                args.max_hours is not None and time.time() - t_start > args.max_hours * 3600
            )
            if (rep.should_stop or out_of_time) and step_in_epoch < steps_per_epoch:
                save()
                print(
                    f"{'SIGTERM' if rep.should_stop else '--max-hours'}: "
                    f"checkpoint at step {step}, exiting"
                )
                return 0
        bar.close()
        epoch, step_in_epoch = epoch + 1, 0
        elapsed = time.time() - t_epoch
        train_stats = {f"train_{k}": v / max(1, n_micro) for k, v in sums.items()}
        train_stats.update(
            lr=sched.get_last_lr()[0], samples_per_s=n_micro * args.batch_size / max(elapsed, 1e-9)
        )
        eval_pending = epoch % args.eval_every == 0 or epoch == args.max_epochs
        if eval_pending and not rep.should_stop:  # on SIGTERM: checkpoint first, eval on resume
            run_eval("val", val_set, train_stats, before_log=save)
        else:
            save(eval_pending)
        out_of_time = args.max_hours is not None and time.time() - t_start > args.max_hours * 3600
        if rep.should_stop or out_of_time:
            print(
                f"stopping after epoch {epoch} ({'SIGTERM' if rep.should_stop else '--max-hours'})"
            )
            return 0
    if args.final_test:
        try:
            test_set = FeatureSet(data_dir, "test", args.num_frames, preload)
        except ValueError as e:
            print(f"error: --final-test: {e}", file=sys.stderr)
            return 2
        run_eval("test", test_set, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
