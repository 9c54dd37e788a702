"""EfficientFoveatedModel: shapes, no latent leak, caption labels/masks, offline loading path."""

from __future__ import annotations

import pytest
import torch

from models.foveated_vlm import (
    IGNORE_INDEX,
    EfficientFoveatedModel,
    FoveatedConfig,
    build_labels,
    load_lm,
    tiny_lm,
)
from models.fvlm_tokenizer import encode_captions, load_tokenizer, train_caption_tokenizer

CAPTIONS = [
    "a red circle moves left then up",
    "a blue square moves down then right and an orange cross moves up then left",
    "a green triangle moves right then down",
]
B, T, N, D, C, HW = 3, 5, 17, 16, 4, 7


@pytest.fixture(scope="module")
def tokenizer():
    return train_caption_tokenizer(CAPTIONS * 3, vocab_size=64)


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    cfg = FoveatedConfig.tiny(
        num_tokens=N, feature_dim=D, latent_size=HW, attn_dim=32, num_heads=4, fine_iterations=2
    )
    m = EfficientFoveatedModel(cfg, tiny_lm(len(tokenizer)))
    # the FiLM head starts as copy-last-frame (zero last conv); randomise it so leaks would show
    torch.nn.init.normal_(m.film_head.dec[-1].weight, std=0.1)
    return m.eval()


def batch(tokenizer, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T, N, D, generator=g)
    latents = torch.randn(B, T, C, HW, HW, generator=g)
    ids, mask = encode_captions(tokenizer, CAPTIONS, max_tokens=32)
    return feats, latents, ids, mask


def test_shapes_and_attention_rows(model, tokenizer):
    feats, latents, ids, mask = batch(tokenizer)
    out = model(feats, latents, ids, mask)
    E, L = model.lm.config.hidden_size, ids.shape[1]
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert len(out.passes) == 3  # coarse + 2 fine
    for p in out.passes:
        assert p.z.shape == (B, T, E)
        assert p.attn.shape == (B, T, 4, N)
        torch.testing.assert_close(p.attn.sum(-1), torch.ones(B, T, 4))
        assert p.hidden.shape == (B, 1 + T + L, E)
        assert p.ce.shape == p.rec.shape == (B,)
        assert p.pred_latents.shape == (B, T - 1, C, HW, HW)
    # the fine queries differ from the static one, so the fine tokens differ from the coarse ones
    assert not torch.allclose(out.passes[0].z, out.passes[1].z)


@pytest.mark.parametrize("t", [1, 2, 4])
def test_no_leak_latent_prediction_of_frame_t_ignores_frame_t(model, tokenizer, t):
    feats, latents, ids, mask = batch(tokenizer)
    ref = model(feats, latents, ids, mask)
    feats2, latents2 = feats.clone(), latents.clone()
    feats2[:, t] += 5 * torch.randn_like(feats2[:, t])  # perturb frame t's features
    latents2[:, t] += 5 * torch.randn_like(latents2[:, t])  # ... and its latents (the target)
    out = model(feats2, latents2, ids, mask)
    for p_ref, p in zip(ref.passes, out.passes, strict=True):
        # pred_latents[:, j] predicts frame j + 1: frames 1..t must not move, frame t + 1 must
        torch.testing.assert_close(p.pred_latents[:, :t], p_ref.pred_latents[:, :t])
        if t + 1 < T:
            assert not torch.allclose(p.pred_latents[:, t], p_ref.pred_latents[:, t])


def test_labels_mask_visual_and_padding_and_keep_eos(tokenizer):
    ids, mask = encode_captions(tokenizer, CAPTIONS, max_tokens=32)
    eos = tokenizer.eos_token_id
    lengths = mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert ids[i, n - 1] == eos  # EOS is a real, labelled token
        assert mask[i, n:].sum() == 0
    labels = build_labels(ids, mask, num_frames=T)
    assert labels.shape == (B, 1 + T + ids.shape[1])
    assert (labels[:, : 1 + T] == IGNORE_INDEX).all()  # mode token + visual tokens
    for i, n in enumerate(lengths.tolist()):
        assert labels[i, 1 + T : 1 + T + n].tolist() == ids[i, :n].tolist()
        assert (labels[i, 1 + T + n :] == IGNORE_INDEX).all()  # padding
    # truncation keeps the EOS
    short_ids, short_mask = encode_captions(tokenizer, CAPTIONS, max_tokens=4)
    assert short_ids.shape[1] == 4 and (short_ids[:, 3] == eos).all()


def test_caption_ce_matches_hf_causal_lm_loss(model, tokenizer):
    """Our per-sample CE equals LlamaForCausalLM's own loss with build_labels, sample by sample."""
    feats, latents, ids, mask = batch(tokenizer)
    out = model(feats, latents, ids, mask, fine_iterations=0)
    z = out.passes[0].z
    for i in range(B):
        n = int(mask[i].sum())
        embeds = torch.cat(
            [model.mode_embed.weight[:1], z[i], model.lm.get_input_embeddings()(ids[i, :n])]
        )
        labels = build_labels(ids[i : i + 1, :n], mask[i : i + 1, :n], T)
        hf = model.lm(inputs_embeds=embeds[None], labels=labels).loss
        torch.testing.assert_close(out.passes[0].ce[i], hf, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_a_sample(model, tokenizer):
    feats, latents, ids, mask = batch(tokenizer)
    full = model(feats, latents, ids, mask)
    i = 0  # the shortest caption, padded in the batch
    n = int(mask[i].sum())
    alone = model(feats[i : i + 1], latents[i : i + 1], ids[i : i + 1, :n], mask[i : i + 1, :n])
    for p_full, p_alone in zip(full.passes, alone.passes, strict=True):
        torch.testing.assert_close(p_full.ce[i], p_alone.ce[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p_full.rec[i], p_alone.rec[0], rtol=1e-5, atol=1e-5)


def test_loss_backpropagates_into_query_path(model, tokenizer):
    feats, latents, ids, mask = batch(tokenizer)
    model.train()
    model(feats, latents, ids, mask).loss.backward()
    for name in (
        "static_query",
        "query_head.1.weight",
        "cross_attn.to_k.weight",
        "cross_attn.to_v.weight",
        "film_head.dec.3.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_lm_and_tokenizer_load_offline(tmp_path, tokenizer):
    lm = tiny_lm(len(tokenizer)).eval()
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "tok")
    lm2 = load_lm(str(tmp_path / "lm"), local_files_only=True).eval()
    tok2 = load_tokenizer(str(tmp_path / "tok"), local_files_only=True)
    assert type(lm2).__name__ == "LlamaForCausalLM" and lm2.dtype == torch.float32
    ids = torch.tensor([tok2(CAPTIONS[0])["input_ids"]])
    assert ids.tolist() == [tokenizer(CAPTIONS[0])["input_ids"]]
    with torch.no_grad():
        torch.testing.assert_close(lm2(input_ids=ids).logits, lm(input_ids=ids).logits)


_TRAIN_IN_A_PROCESS = """
import sys
from models.fvlm_tokenizer import train_caption_tokenizer
captions = [line for line in sys.stdin.read().splitlines() if line]
print(train_caption_tokenizer(captions).backend_tokenizer.to_str())
"""


def test_training_the_tokenizer_is_deterministic_across_processes():
    """Two processes (two workers of a race, or a run and its resumed attempt) must get the same
    vocabulary and merges: hash-map order differs between processes, so this runs in two."""
    import random
    import subprocess
    import sys
    from pathlib import Path

    rng = random.Random(0)
    words = "red green blue cyan circle square star ring moves bounces left right up down".split()
    captions = [
        f"a {' '.join(rng.choice(words) for _ in range(rng.randint(3, 9)))}." for _ in range(60)
    ]
    src = str(Path(__file__).resolve().parents[1] / "src")
    outs = [
        subprocess.run(
            [sys.executable, "-c", _TRAIN_IN_A_PROCESS],
            input="\n".join(captions), capture_output=True, text=True, check=True,
            env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
        ).stdout
        for _ in range(2)
    ]
    assert outs[0] and outs[0] == outs[1]
    tok = train_caption_tokenizer(captions)
    for c in captions[:10]:
        ids = tok(c, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == c  # lossless round trip
