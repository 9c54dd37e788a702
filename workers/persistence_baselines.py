"""Trivial baselines of the early-persistence race, scored exactly as the workers are scored.

    python -m workers.persistence_baselines --data-dir data/persistence --out baselines.json

Every baseline classifies each observation (token) on its own and is scored per token with each
ground-truth track weighted 1 (workers/persistence_metrics.py), on val and on test, with clip
bootstrap 95% CIs. None of them looks at a track's true extent:

- ``majority``: every token "transient" (the majority class of tracks).
- ``frame_position_prior``: class-balanced logistic regression on the token's frame index
  (one-hot) and position (8x8 grid one-hot), trained on the train split. No image content.
- ``crowding``: the same on frame, position, and how many tokens share the token's frame and its
  clip (one-hot bins). No image content, no association.
- ``colour_matching``: untrained and hand-made ASSOCIATION: count the tokens of the clip whose
  centre pixel has nearly the same colour (max RGB difference <= 12/255, the token itself
  included); "persistent" when there are at least T/2 of them. It solves the task the race is
  about by hand, so it is the ceiling a hand rule reaches, not a bar a model must clear.

The guard criteria of experiments.yaml sit above the first three (docs/early_persistence.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from synthvid.persistence import ObjectTokens, extract_tokens, load_split
from workers.persistence_metrics import (
    classification_metrics,
    confusion_bootstrap_ci,
    per_clip_confusion,
    track_weights_np,
)

COLOUR_TOLERANCE = 12  # uint8 levels, max over RGB


def _clip_index(tok: ObjectTokens) -> np.ndarray:
    """int [K]: the clip of every token."""
    return np.repeat(np.arange(len(tok)), np.diff(tok.offsets))


def _one_hot(codes: np.ndarray, n: int) -> np.ndarray:
    return np.eye(n)[np.clip(codes, 0, n - 1)]


def prior_features(tok: ObjectTokens, crowding: bool) -> np.ndarray:
    """float [K, F]: frame one-hot (T), 8x8 position grid one-hot (64), and with ``crowding``
    one-hot counts of tokens in the token's frame (1..12+) and clip (bins of 4 up to 60+)."""
    num_frames = int(tok.frame.max()) + 1
    cell = np.clip((tok.centre * 8).astype(int), 0, 7)
    feats = [_one_hot(tok.frame, num_frames), _one_hot(cell[:, 0] * 8 + cell[:, 1], 64)]
    if crowding:
        clip = _clip_index(tok)
        _, inv, cnt = np.unique(clip * 1000 + tok.frame, return_inverse=True, return_counts=True)
        per_clip = np.diff(tok.offsets)[clip]
        feats += [_one_hot(cnt[inv] - 1, 12), _one_hot(per_clip // 4, 16)]
    return np.concatenate(feats, axis=1)


def fit_balanced_logreg(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Weights float [F + 1] of a class-balanced L2 logistic regression (L-BFGS); last = bias."""
    x = np.c_[x, np.ones(len(x))]
    w_cls = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))

    def loss_grad(w):
        z = x @ w
        p = 1 / (1 + np.exp(-z))
        loss = np.mean(w_cls * (np.logaddexp(0, z) - y * z)) + l2 * w @ w
        return loss, x.T @ (w_cls * (p - y)) / len(y) + 2 * l2 * w

    return minimize(loss_grad, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x


def colour_matching(tok: ObjectTokens, num_frames: int) -> np.ndarray:
    """int [K] predictions: 1 when >= num_frames / 2 tokens of the clip share the colour."""
    half = tok.crops.shape[-1] // 2
    rgb = tok.crops[:, :, half, half].astype(np.int16)  # [K, 3] centre pixel
    pred = np.zeros(len(tok.label), dtype=np.int64)
    for i in range(len(tok)):
        c = rgb[tok.offsets[i] : tok.offsets[i + 1]]
        close = np.abs(c[:, None] - c[None]).max(-1) <= COLOUR_TOLERANCE  # [L, L]
        pred[tok.offsets[i] : tok.offsets[i + 1]] = close.sum(1) >= num_frames / 2
    return pred


def score(tok: ObjectTokens, pred: np.ndarray) -> dict[str, float | None]:
    """val_accuracy / balanced_accuracy / macro_f1 with clip-bootstrap CIs (race scoring)."""
    clip = _clip_index(tok)
    w = track_weights_np(clip, tok.track)
    m = classification_metrics(tok.label, pred, w)
    ci = confusion_bootstrap_ci(per_clip_confusion(tok.label, pred, w, clip, len(tok)))
    return {
        "val_accuracy": m["accuracy"],
        "val_accuracy_ci_low": ci["accuracy"][0],
        "val_accuracy_ci_high": ci["accuracy"][1],
        "balanced_accuracy": m["balanced_accuracy"],
        "balanced_accuracy_ci_low": ci["balanced_accuracy"][0],
        "balanced_accuracy_ci_high": ci["balanced_accuracy"][1],
        "macro_f1": m["macro_f1"],
    }


def trivial_baselines(data_dir: str | Path) -> dict[str, dict[str, dict[str, float | None]]]:
    """{baseline: {split: metrics}} for val and test (priors trained on train)."""
    toks = {s: extract_tokens(load_split(data_dir, s)) for s in ("train", "val", "test")}
    num_frames = int(toks["train"].frame.max()) + 1
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for split in ("val", "test"):
        tok = toks[split]
        out.setdefault("majority", {})[split] = score(tok, np.zeros_like(tok.label))
        out.setdefault("colour_matching", {})[split] = score(tok, colour_matching(tok, num_frames))
    for name, crowding in (("frame_position_prior", False), ("crowding", True)):
        w = fit_balanced_logreg(prior_features(toks["train"], crowding), toks["train"].label)
        for split in ("val", "test"):
            x = prior_features(toks[split], crowding)
            pred = (np.c_[x, np.ones(len(x))] @ w > 0).astype(np.int64)
            out.setdefault(name, {})[split] = score(toks[split], pred)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", required=True, help="dataset of generate_persistence_dataset.py")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout only)")
    args = p.parse_args(argv)
    try:
        result = trivial_baselines(args.data_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    for name, by_split in result.items():
        cells = [
            f"{s}: acc {m['val_accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f} "
            f"[{m['balanced_accuracy_ci_low']:.3f}, {m['balanced_accuracy_ci_high']:.3f}]"
            for s, m in by_split.items()
        ]
        print(f"{name}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
