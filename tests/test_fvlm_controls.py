"""fVLM controls and floors: derangements, the one-sided paired statistics, the in-distribution
query controls of the evaluation, and the analytic text prior of the captioned-shapes set."""

from __future__ import annotations

import itertools
import math
from argparse import Namespace

import numpy as np
import pytest
import torch

from models.foveated_vlm import EfficientFoveatedModel, FoveatedConfig, tiny_lm
from models.fvlm_tokenizer import train_caption_tokenizer
from synthvid.captioned_shapes import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    caption_word_nats,
    generate_clip,
)
from workers.fvlm import derangements, evaluate, paired_delta


def test_derangements_have_no_fixed_points_and_differ():
    perms = derangements(7, 3, seed=0)
    assert len(perms) == 3
    for p in perms:
        assert sorted(p.tolist()) == list(range(7)) and not np.any(p == np.arange(7))
    assert len({tuple(p) for p in perms}) == 3
    assert len(derangements(3, 5, seed=0)) == 2 and derangements(1, 3, seed=0) == []


def test_paired_delta_is_one_sided_on_the_mean():
    rng = np.random.default_rng(0)
    b = rng.normal(size=200)
    up = paired_delta(b + 0.3 + rng.normal(scale=0.5, size=200), b, seed=0)
    down = paired_delta(b - 0.3 + rng.normal(scale=0.5, size=200), b, seed=0)
    assert up["p_greater"] < 1e-6 and down["p_greater"] > 1 - 1e-6  # the direction matters
    assert up["ci_low"] < up["mean"] < up["ci_high"] and up["ci_low"] > 0
    assert down["ci_high"] < 0


def _setup(num_clips: int = 6, T: int = 4, N: int = 10, h: int = 4):
    torch.manual_seed(0)
    captions = [generate_clip(0, i, num_frames=4, image_size=48).caption for i in range(num_clips)]
    tok = train_caption_tokenizer(captions)
    cfg = FoveatedConfig.tiny(num_tokens=N, latent_size=h)
    model = EfficientFoveatedModel(cfg, tiny_lm(len(tok), seed=0))
    data = [
        {
            "feats": torch.randn(T, N, cfg.feature_dim),
            "latents": torch.randn(T, 4, h, h) * 0.05,
            "caption": c,
            "id": f"clip_{i}",
        }
        for i, c in enumerate(captions)
    ]
    args = Namespace(
        seed=0, num_shuffles=2, eval_batch_size=4, max_caption_tokens=64, fine_iterations=1
    )
    return model, data, tok, args


def test_query_controls_are_real_and_collapse_when_queries_ignore_the_lm():
    model, data, tok, args = _setup()
    summary, rows = evaluate(model, data, tok, args, torch.device("cpu"))
    assert summary["num_shuffles"] == 2
    for r in rows:
        assert r["id"] not in r["shuffled_with"] and len(set(r["shuffled_with"])) == 2
    for c in ("otherq", "revq", "meanq"):  # each control changes the captions' CE somewhere
        assert max(abs(r[f"ce_{c}"] - r["ce_fine"]) for r in rows) > 1e-5, c
    assert summary["query_gap_min_ci_low"] == min(
        summary[f"{c}_gap_ci_low"] for c in ("otherq", "revq", "meanq")
    )
    # queries that no longer depend on the LM state (same query for every frame and clip):
    # another clip's, reversed and mean queries are then the clip's own, so the gaps vanish
    with torch.no_grad():
        model.query_head[1].weight.zero_()
    summary, rows = evaluate(model, data, tok, args, torch.device("cpu"))
    for r in rows:
        for c in ("otherq", "revq", "meanq"):
            assert r[f"ce_{c}"] == pytest.approx(r["ce_fine"], abs=1e-5), c
    assert abs(summary["otherq_gap"]) < 1e-5


def test_text_prior_is_a_normalised_distribution_over_all_captions():
    def captions(n_obj: int):
        singles = [
            (col, s, d1, d2)
            for col, s, (d1, d2) in itertools.product(
                COLORS, SHAPES, itertools.permutations(DIRECTIONS, 2)
            )
        ]
        for objs in itertools.product(singles, repeat=n_obj):
            if len({o[0] for o in objs}) < n_obj:
                continue  # colours are drawn without replacement
            yield " and ".join(
                f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s} moves {d1} then {d2}"
                for c, s, d1, d2 in objs
            )

    total = sum(
        math.exp(-sum(w[2] for w in caption_word_nats(c))) for n in (1, 2) for c in captions(n)
    )
    assert total == pytest.approx(1.0, rel=1e-9)
    one = next(iter(captions(1)))
    assert sum(w[2] for w in caption_word_nats(one, max_objects=1)) == pytest.approx(
        math.log(6 * 4 * 4 * 3)
    )


def test_text_prior_matches_generated_captions_and_rejects_others():
    for i in range(20):
        cap = generate_clip(3, i, num_frames=4, image_size=48).caption
        words = caption_word_nats(cap)
        assert [w[0] for w in words[:-1]] == cap.split(" ") and words[-1][0] == "</s>"
        assert {w[1] for w in words} <= {"colour", "shape", "direction", "structure"}
    for bad in ("a red circle moves left then left", "an red circle moves left then up", "hello"):
        with pytest.raises(ValueError):
            caption_word_nats(bad)
