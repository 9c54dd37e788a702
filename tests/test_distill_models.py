"""PerceiverResampler, MemoryCrossAttention, DETR student: shapes, counts, ablations, freezing."""

from __future__ import annotations

import pytest
import torch

from models.detr_student import MEMORY_MODULES, DETRStudent, StudentConfig, count_parameters
from models.memory_attention import MemoryCrossAttention
from models.perceiver_resampler import PerceiverConfig, PerceiverResampler
from models.set_criterion import HungarianMatcher, SetCriterion

torch.set_num_threads(1)


def tiny_student(seed: int = 0) -> DETRStudent:
    torch.manual_seed(seed)
    return DETRStudent(StudentConfig.tiny()).eval()


def inputs(B: int = 2, T: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 64, 64, generator=g), torch.randn(B, T, 256, 18, 18, generator=g).half()


def test_perceiver_shapes_full_config():
    p = PerceiverResampler(PerceiverConfig.full())
    out = p(torch.randn(1, 8, 256, 18, 18))  # [B, T*324 tokens of 256] -> [B, 64, 256]
    assert out.shape == (1, 64, 256)
    with pytest.raises(ValueError, match="does not fit"):
        p(torch.randn(1, 9, 256, 18, 18))


def test_parameter_counts_match_hand_formulas():
    D = 256
    # MemoryCrossAttention: 2 LayerNorms + MultiheadAttention (in/out projections with bias) + gate
    assert (
        count_parameters(MemoryCrossAttention(D, 8)) == 4 * D + (4 * D * D + 4 * D) + 1 == 264_193
    )
    c = PerceiverConfig.full()
    inner = c.heads * c.dim_head
    per_layer = (
        4 * D
        + D * inner
        + D * 2 * inner
        + inner * D  # norms, to_q, to_kv, to_out
        + 2 * D
        + 2 * D * D * c.ff_mult
    )  # FeedForward: LayerNorm + 2 bias-free Linears
    expected = (c.grid**2 + c.max_frames + c.num_latents) * D + c.depth * per_layer + 2 * D
    assert count_parameters(PerceiverResampler(c)) == expected == 1_677_824
    # the tiny student: the two memory modules are the only trainable ones after freezing
    s = tiny_student()
    s.freeze_image_model()
    assert count_parameters(s, trainable_only=True) == (
        count_parameters(s.perceiver_resampler) + count_parameters(s.memory_cross_attn)
    )


def test_student_output_shapes_and_batch_equivalence():
    s = tiny_student()
    x, ctx = inputs(B=3)
    out = s(x)
    assert out["pred_logits"].shape == (3, 8, 2)
    assert (
        out["pred_boxes"].shape == (3, 8, 4)
        and (out["pred_boxes"] >= 0).all()
        and (out["pred_boxes"] <= 1).all()
    )
    assert out["pred_masks"].shape == (3, 8, 32, 32)
    with torch.no_grad():
        s.memory_cross_attn.gate.fill_(0.7)
        full = s.forward_video(x, ctx)
        one = s.forward_video(x[1:2], ctx[1:2])
    for k in full:
        assert torch.allclose(full[k][1:2], one[k], atol=1e-5), k


def test_gate_zero_is_exactly_the_image_model_and_shuffled_context_changes_output():
    s = tiny_student()
    x, ctx = inputs(seed=1)
    _, other = inputs(seed=2)
    with torch.no_grad():
        image = s(x)
        gated = s.forward_video(x, ctx)  # gate initialised at 0
        for k in image:
            assert torch.equal(image[k], gated[k]), k
        s.memory_cross_attn.gate.fill_(0.5)
        on = s.forward_video(x, ctx)
        shuffled = s.forward_video(x, other)
        reordered = s.forward_video(x, ctx.flip(1))  # same frames, other time order
    assert not torch.allclose(on["pred_masks"], image["pred_masks"])
    assert not torch.allclose(on["pred_masks"], shuffled["pred_masks"])
    # the temporal position embedding makes the memory order-aware
    assert not torch.allclose(on["pred_masks"], reordered["pred_masks"])


def test_perceiver_is_position_aware():
    p = PerceiverResampler(PerceiverConfig.tiny()).eval()
    ctx = torch.randn(1, 2, 256, 18, 18)
    flipped = ctx.flip(-1)  # the same features at mirrored positions
    with torch.no_grad():
        assert not torch.allclose(p(ctx), p(flipped), atol=1e-4)


def one_batch() -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    x, ctx = inputs(seed=3)
    m = torch.zeros(1, 64, 64, dtype=torch.bool)
    m[0, 10:30, 12:28] = True
    t = {"masks": m, "boxes": torch.tensor([[20 / 64, 20 / 64, 16 / 64, 20 / 64]])}
    return x, ctx, [t, {"masks": m[:0], "boxes": torch.zeros(0, 4)}]


def test_freeze_exactly_memory_modules_get_gradients():
    s = tiny_student()
    s.freeze_image_model()
    trainable = {n for n, p in s.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in MEMORY_MODULES for n in trainable)
    assert {n.split(".")[0] for n in trainable} == set(MEMORY_MODULES)
    x, ctx, targets = one_batch()
    crit = SetCriterion(HungarianMatcher())
    with torch.no_grad():
        s.memory_cross_attn.gate.fill_(0.3)  # at 0, only the gate itself gets a gradient
    crit(s.forward_video(x, ctx), targets)["loss"].backward()
    for n, p in s.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


def test_gate_zero_start_gradient_reaches_the_gate():
    """Flamingo's tanh gate at 0: the first gradient moves the gate, nothing upstream yet."""
    s = tiny_student()
    s.freeze_image_model()
    x, ctx, targets = one_batch()
    SetCriterion(HungarianMatcher())(s.forward_video(x, ctx), targets)["loss"].backward()
    assert s.memory_cross_attn.gate.grad.abs().item() > 0
    assert all(
        p.grad is None or p.grad.abs().sum() == 0 for p in s.perceiver_resampler.parameters()
    )


def test_image_stage_gradient_flow():
    s = tiny_student().train()
    x, _, targets = one_batch()
    SetCriterion(HungarianMatcher())(s(x), targets)["loss"].backward()
    for n, p in s.named_parameters():
        if n.split(".")[0] in MEMORY_MODULES:
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert s.backbone[0][0].weight.grad.abs().sum() > 0
    assert s.query_embed.grad.abs().sum() > 0


def test_full_config_builds_with_documented_sizes():
    s = DETRStudent(StudentConfig.full())
    assert count_parameters(s.perceiver_resampler) == 1_677_824
    assert count_parameters(s.memory_cross_attn) == 264_193
    assert s.cfg.perceiver.dim == s.cfg.d_model == 256
