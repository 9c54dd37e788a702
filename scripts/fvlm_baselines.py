"""fVLM: the model beside its controls and the text-only floors, from the workers' eval records.

    python scripts/fvlm_baselines.py runs/fvlm/fine1-seed{0,1,2}/evals/test_epoch_000030.json

Each argument is one ``evals/<split>_epoch_NNNNNN.json`` of workers/fvlm.py (one seed each) on
the captioned-shapes set. Per file it prints the model (CE of the coarse and fine passes, the
fine-vs-coarse delta with its CI and one-sided p), its controls (query controls the LM could
produce, shuffled video, and the out-of-distribution random-query and blind ones) and two
trivial floors on the same clips: the **text prior** (the best CE any text-only model can reach:
``caption_word_nats`` of the generator's own caption distribution, divided by the clip's token
count, EOS included, as the worker's CE) and the floor **with colour and shape known** (only the
directions and the object count left to guess). Then the mean +- sd over the files (seeds), and
a per-word-type table: nats per word of the text prior vs the coarse and fine passes (tokens
grouped into words at the Metaspace "▁" boundaries), so a gain can be placed on colour, shape,
direction or structure words. All CE in nats/token unless a column says nats/word.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from synthvid.captioned_shapes import WORD_TYPES, caption_word_nats

WORD_START = "▁"  # Metaspace marks a word-initial piece


def group_tokens(tokens: list[str], values: list[float], num_words: int) -> list[float]:
    """Sum per-token values into words: a word starts at a "▁" piece; the final EOS is its own.

    Args:
        tokens: the caption's token strings, EOS last (as in the worker's eval records).
        values: per-token values (e.g. CE in nats), same length.
        num_words: words of the caption (without EOS), to check the alignment.

    Returns:
        num_words + 1 sums (the last is the EOS token's value).

    Raises:
        ValueError: if the tokens do not split into ``num_words`` words plus EOS.
    """
    if len(tokens) != len(values) or len(tokens) < 2:
        raise ValueError("tokens and values must have the same length >= 2")
    sums: list[float] = []
    for tok, v in zip(tokens[:-1], values[:-1], strict=True):
        if tok.startswith(WORD_START) or not sums:
            sums.append(0.0)
        sums[-1] += v
    if len(sums) != num_words:
        raise ValueError(f"{len(sums)} word groups for {num_words} words: {tokens}")
    return sums + [values[-1]]


def floors(sample: dict) -> dict:
    """Text-prior floors of one eval sample, nats/token: {"prior", "prior_known_colour_shape"}."""
    words = caption_word_nats(sample["caption"])
    n = sample["n_tokens"]
    total = sum(w[2] for w in words)
    known = sum(w[2] for w in words if w[1] not in ("colour", "shape"))
    return {"prior": total / n, "prior_known_colour_shape": known / n}


def word_type_nats(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Mean nats per word of each word type: text prior vs the coarse and fine passes."""
    acc: dict[str, dict[str, list[float]]] = {
        t: {"prior": [], "coarse": [], "fine": []} for t in WORD_TYPES
    }
    for s in samples:
        words = caption_word_nats(s["caption"])
        per = {
            name: group_tokens(s["tokens"], s[f"tok_ce_{name}"], len(words) - 1)
            for name in ("coarse", "fine")
        }
        for i, (_, wtype, nats) in enumerate(words):
            acc[wtype]["prior"].append(nats)
            for name in ("coarse", "fine"):
                acc[wtype][name].append(per[name][i])
    return {
        t: {k: float(np.mean(v)) for k, v in d.items()} | {"n_words": len(d["prior"])}
        for t, d in acc.items()
    }


def summarize(path: Path) -> dict:
    """One eval file -> the row of the main table (CE in nats/token)."""
    ev = json.loads(path.read_text())
    samples, sm = ev["samples"], ev["summary"]
    fl = [floors(s) for s in samples]
    row = {
        "file": str(path),
        "split": ev["split"],
        "epoch": ev["epoch"],
        "n": len(samples),
        "ce_coarse": sm["ce_coarse"],
        "ce_fine": sm["ce_fine"],
        "delta_ce": sm["delta_ce"],
        "delta_ci": (sm["delta_ce_ci_low"], sm["delta_ce_ci_high"]),
        "delta_p_greater": sm.get("delta_ce_p_greater", float("nan")),
        "ce_prior": float(np.mean([f["prior"] for f in fl])),
        "ce_prior_known_colour_shape": float(np.mean([f["prior_known_colour_shape"] for f in fl])),
        "words": word_type_nats(samples),
    }
    for c in ("otherq", "revq", "meanq"):
        if f"{c}_gap" in sm:
            row[f"{c}_gap"] = sm[f"{c}_gap"]
            row[f"{c}_ci"] = (sm[f"{c}_gap_ci_low"], sm[f"{c}_gap_ci_high"])
    for c in ("shuffled", "randq", "blind"):
        row[f"ce_{c}"] = sm[f"ce_{c}"]
    return row


def fmt_ci(v: float, ci: tuple[float, float]) -> str:
    """``+0.0060 [+0.0027, +0.0100]``: a value and its CI, signed, 4 decimals."""
    return f"{v:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("evals", nargs="+", type=Path, help="evals/<split>_epoch_N.json, one per seed")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    try:
        rows = [summarize(f) for f in args.evals]
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        "| run | CE coarse | CE fine | delta CE coarse-fine [95% CI] | p (one-sided, mean > 0) "
        "| other-clip queries: CE gap [CI] | reversed queries | mean query | shuffled video "
        "(3 derangements) | random Gaussian queries (OOD) | blind, zeroed tokens (OOD) "
        "| text prior floor | floor, colour+shape known |"
    )
    print("|---" * 13 + "|")
    for r in rows:
        gaps = [
            fmt_ci(r[f"{c}_gap"], r[f"{c}_ci"]) if f"{c}_gap" in r else "-"
            for c in ("otherq", "revq", "meanq")
        ]
        print(
            f"| {r['file']} | {r['ce_coarse']:.4f} | {r['ce_fine']:.4f} | "
            f"{fmt_ci(r['delta_ce'], r['delta_ci'])} | {r['delta_p_greater']:.3g} | "
            + " | ".join(gaps)
            + f" | {r['ce_shuffled']:.4f} | {r['ce_randq']:.4f} | {r['ce_blind']:.4f} | "
            f"{r['ce_prior']:.4f} | {r['ce_prior_known_colour_shape']:.4f} |"
        )
    if len(rows) > 1:
        keys = [
            "ce_coarse",
            "ce_fine",
            "delta_ce",
            "otherq_gap",
            "revq_gap",
            "meanq_gap",
            "ce_shuffled",
            "ce_randq",
            "ce_blind",
            "ce_prior",
            "ce_prior_known_colour_shape",
        ]
        cells = []
        for k in keys:
            v = np.array([r[k] for r in rows if k in r])
            cells.append(f"{v.mean():+.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else "-")
        print(
            f"| mean ± sd over {len(rows)} runs | "
            + " | ".join(cells[:3])
            + " | - | "
            + " | ".join(cells[3:])
            + " |"
        )
    print()
    print("| word type | words | text prior (nats/word) | coarse | fine |")
    print("|---|---|---|---|---|")
    for t in WORD_TYPES:
        prior = np.mean([r["words"][t]["prior"] for r in rows])
        co = np.array([r["words"][t]["coarse"] for r in rows])
        fi = np.array([r["words"][t]["fine"] for r in rows])
        sd = lambda v: f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else ""  # noqa: E731
        print(
            f"| {t} | {rows[0]['words'][t]['n_words']} | {prior:.3f} | {co.mean():.3f}{sd(co)} | "
            f"{fi.mean():.3f}{sd(fi)} |"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
