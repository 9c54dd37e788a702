"""Models of the early-persistence job: shapes and equivalence properties on CPU."""

from __future__ import annotations

import pytest
import torch

from models.attention_transformer import build_attention_mask
from models.conv_temporal_encoder import ConvTemporalConfig, ConvTemporalEncoder
from models.early_persistence import ComputeGate, EarlyPersistenceClassifier, early_decision
from models.frame_tokenizer import SimpleCNNConfig, SimpleCNNTokenizer
from models.persistence_token_model import PersistenceModelConfig, PersistenceTokenModel
from models.resnet_features import FrozenResNetFeatures, ResNetTokenizer, tiny_resnet_config

torch.set_num_threads(1)


def _token_model(resnet: bool = False) -> PersistenceTokenModel:
    torch.manual_seed(0)
    if resnet:
        tok = ResNetTokenizer(FrozenResNetFeatures.from_config(tiny_resnet_config()), 64)
    else:
        tok = SimpleCNNTokenizer(SimpleCNNConfig.tiny())
    return PersistenceTokenModel(tok, PersistenceModelConfig.tiny()).eval()


def _clip(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(n, 3, 16, 16, generator=g),
        torch.randint(0, 16, (n,), generator=g),
        torch.rand(n, 2, generator=g),
    )


@pytest.mark.parametrize("resnet", [False, True])
def test_token_model_padding_and_batch_equivalence(resnet):
    model = _token_model(resnet)
    lengths = [7, 12, 4]
    clips = [_clip(n, i) for i, n in enumerate(lengths)]
    L = max(lengths)
    crops = torch.zeros(3, L, 3, 16, 16)
    frame = torch.zeros(3, L, dtype=torch.long)
    centre = torch.zeros(3, L, 2)
    valid = torch.zeros(3, L, dtype=torch.bool)
    for i, (c, f, p) in enumerate(clips):
        n = lengths[i]
        crops[i, :n], frame[i, :n], centre[i, :n], valid[i, :n] = c, f, p, True
    crops[~valid] = torch.rand(int((~valid).sum()), 3, 16, 16)  # garbage in the padding
    with torch.no_grad():
        out = model(crops, frame, centre, valid)
        assert out["logits"].shape == (3, L, 2) and out["embedding"].shape == (3, L, 64)
        assert [a.shape for a in out["attentions"]] == [(3, 4, L, L)] * 2
        for i, (c, f, p) in enumerate(clips):  # batch of 1, unpadded
            n = lengths[i]
            one = model(c[None], f[None], p[None], torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(one["logits"][0], out["logits"][i, :n], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                one["attentions"][-1][0], out["attentions"][-1][i, :, :n, :n], atol=1e-6, rtol=1e-4
            )
    att = out["attentions"][-1]
    assert torch.all(att[0, :, :7, 7:] == 0)  # padded keys get exactly nothing
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 4, L))


def test_frame_context_blocks_other_frames():
    model = _token_model()
    crops, frame, centre = _clip(10, 1)
    frame = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    out = model(
        crops[None], frame[None], centre[None], torch.ones(1, 10, dtype=torch.bool), context="frame"
    )
    other = frame[:, None] != frame[None, :]
    assert torch.all(out["attentions"][0][0][:, other] == 0)
    with pytest.raises(ValueError, match="context"):
        model(
            crops[None], frame[None], centre[None], torch.ones(1, 10, dtype=torch.bool), context="x"
        )


def test_empty_rows_never_nan():
    valid = torch.tensor([[True, False, False]])
    allowed = torch.zeros(3, 3, dtype=torch.bool)  # nothing allowed at all
    mask = build_attention_mask(valid, allowed)
    assert mask.any(-1).all()


def test_resnet_frozen_in_eval_and_offline_from_pretrained(tmp_path):
    feats = FrozenResNetFeatures.from_config(tiny_resnet_config())
    tok = ResNetTokenizer(feats, 32).train()
    assert not tok.features.backbone.training  # BatchNorm statistics cannot drift
    trainable = [n for n, p in tok.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("proj") for n in trainable)
    x = torch.rand(4, 3, 16, 16)
    tok(x).sum().backward()
    assert all(p.grad is None for p in tok.features.parameters())
    feats.backbone.save_pretrained(tmp_path / "r")  # the real loading path, offline
    again = FrozenResNetFeatures.from_pretrained(
        str(tmp_path / "r"), input_size=32, local_files_only=True
    )
    torch.testing.assert_close(again(x), feats(x))
    assert feats(x).shape == (4, 128)


def test_conv_temporal_encoder_causal_and_batch_equivalence():
    torch.manual_seed(0)
    video = torch.rand(3, 8, 3, 16, 16)
    for causal in (True, False):
        enc = ConvTemporalEncoder(ConvTemporalConfig.tiny(causal=causal)).eval()
        with torch.no_grad():
            out = enc(video)
            assert out["features"].shape == (3, 8, 64) and out["pooled"].shape == (3, 64)
            assert out["attention"].shape == (3, 4, 8, 8)
            torch.testing.assert_close(
                enc(video[1:2])["features"][0], out["features"][1], atol=1e-5, rtol=1e-4
            )
            changed = video.clone()
            changed[:, 5:] = torch.rand_like(changed[:, 5:])
            past_same = torch.allclose(
                enc(changed)["features"][:, :5], out["features"][:, :5], atol=1e-6
            )
        assert past_same == causal  # causal: frames 0..4 never see frames 5..7


def test_early_classifier_causal_outputs():
    torch.manual_seed(0)
    model = EarlyPersistenceClassifier(ConvTemporalConfig.tiny(causal=True)).eval()
    crops = torch.rand(2, 16, 3, 16, 16)
    with torch.no_grad():
        out = model(crops)
        changed = crops.clone()
        changed[:, 3:] = 0
        out2 = model(changed)
    assert out["logits"].shape == (2, 16, 2) and out["confidence"].shape == (2, 16, 1)
    torch.testing.assert_close(out["logits"][:, :3], out2["logits"][:, :3])
    with pytest.raises(ValueError, match="causal"):
        EarlyPersistenceClassifier(ConvTemporalConfig.tiny(causal=False))


def test_early_decision_and_gate_on_hand_built_outputs():
    logits = torch.zeros(3, 6, 2)
    logits[0, :, 0] = 5  # track 0: transient everywhere
    logits[1, :, 1] = 5  # track 1: persistent everywhere
    logits[2, :, 0] = 5
    conf = torch.tensor(
        [
            [0.2, 0.95, 0.99, 0.99, 0.99, 0.99],  # confident at frame 1
            [0.5, 0.5, 0.5, 0.5, 0.99, 0.99],  # confident only after the window
            [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
        ]
    )
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[2, 4:] = False  # track 2 has 4 frames
    d = early_decision(logits, conf, valid, threshold=0.9, early_window=3)
    assert d["frame"].tolist() == [1, 5, 3] and d["early"].tolist() == [True, False, False]
    assert d["decision"].tolist() == [0, 1, 0]
    gate = ComputeGate(
        threshold=0.9, early_window=3, budgets=(("persistent", 1.0), ("transient", 0.5))
    )
    assert gate.frames_to_process(logits, conf, valid).tolist() == [2, 6, 3]
