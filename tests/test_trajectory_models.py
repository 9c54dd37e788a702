"""The four backbones of the trajectory comparison under the shared heads: shapes, batch
equivalence, gradients everywhere, I3D inflation, SlowFast pathways, ViViT size checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.conv_temporal_encoder import ConvTemporalConfig, ConvTemporalEncoder
from models.i3d import I3D, I3DConfig, inflate_conv2d
from models.slowfast import SlowFast, SlowFastConfig
from models.trajectory_heads import TrajectoryModel, count_trainable_parameters
from models.vivit import ViViT, ViViTConfig

torch.set_num_threads(1)
T, S = 8, 32


def _backbone(name: str) -> tuple[nn.Module, int, int]:
    """(backbone, D, expected T')."""
    if name == "conv_temporal":
        return ConvTemporalEncoder(ConvTemporalConfig.tiny()), 64, T
    if name == "i3d":
        return I3D(I3DConfig.tiny()), I3DConfig.tiny().dim, T // 2
    if name == "slowfast":
        return SlowFast(SlowFastConfig.tiny()), SlowFastConfig.tiny().dim, T
    cfg = ViViTConfig.tiny(num_frames=T, image_size=S)
    return ViViT(cfg), cfg.dim, T // cfg.tubelet_frames


NAMES = ("conv_temporal", "i3d", "slowfast", "vivit")


@pytest.mark.parametrize("name", NAMES)
def test_shapes_batch_equivalence_and_gradients(name):
    torch.manual_seed(0)
    backbone, dim, steps = _backbone(name)
    model = TrajectoryModel(backbone, dim, num_classes=4, hidden=32)
    nn.init.normal_(model.pos_head[-1].weight, std=0.1)  # zero-initialised: would block gradients
    video = torch.rand(3, T, 3, S, S)
    feats = backbone(video)
    assert feats["features"].shape == (3, steps, dim) and feats["pooled"].shape == (3, dim)
    out = model(video)
    assert out["logits"].shape == (3, 4) and out["position"].shape == (3, 2)
    assert out["logits"].dtype == torch.float32
    # every parameter gets a gradient from the two losses
    (out["logits"].logsumexp(-1).sum() + out["position"].square().sum()).backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not missing, missing
    # eval mode: a clip's output does not depend on the rest of the batch
    model.eval()
    with torch.no_grad():
        full = model(video)
        one = model(video[1:2])
    torch.testing.assert_close(one["logits"], full["logits"][1:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one["position"], full["position"][1:2], atol=1e-5, rtol=1e-4)


def test_position_head_starts_at_the_image_centre():
    model = TrajectoryModel(I3D(I3DConfig.tiny()), I3DConfig.tiny().dim)
    out = model(torch.rand(2, T, 3, S, S))
    torch.testing.assert_close(out["position"], torch.full((2, 2), 0.5))


def test_inflated_conv_on_a_boring_video_equals_the_2d_conv():
    torch.manual_seed(1)
    conv2d = nn.Conv2d(3, 5, 3, padding=1)
    conv3d = inflate_conv2d(conv2d, time_kernel=3)
    frame = torch.rand(2, 3, 12, 12)
    video = frame[:, :, None].repeat(1, 1, 6, 1, 1)  # [B, C, T, H, W], identical frames
    out = conv3d(video)  # zero padding in time changes the two border frames only
    for t in range(1, 5):
        torch.testing.assert_close(out[:, :, t], conv2d(frame), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="time_kernel"):
        inflate_conv2d(conv2d, 0)


def test_slowfast_pathways_run_at_two_frame_rates():
    cfg = SlowFastConfig.tiny()
    model = SlowFast(cfg).eval()
    out = model(torch.rand(2, T, 3, S, S))
    assert out["slow"].shape == (2, 4 * cfg.width, T // cfg.alpha)
    assert out["fast"].shape == (2, 4 * cfg.fast_width, T)
    # the lateral connection carries fast-pathway information into the slow pathway
    video = torch.rand(1, T, 3, S, S)
    changed = video.clone()
    changed[:, 1] = torch.rand(3, S, S)  # frame 1 is seen by the fast pathway only
    with torch.no_grad():
        assert not torch.allclose(model(video)["slow"], model(changed)["slow"])


def test_vivit_rejects_other_clip_sizes():
    model = ViViT(ViViTConfig.tiny(num_frames=T, image_size=S))
    with pytest.raises(ValueError, match="built for 8 frames of 32px"):
        model(torch.rand(1, T, 3, 16, 16))
    with pytest.raises(ValueError, match="tubelet_frames"):
        ViViT(ViViTConfig(num_frames=7))


def test_parameter_count_excludes_frozen_parameters():
    model = TrajectoryModel(I3D(I3DConfig.tiny()), I3DConfig.tiny().dim)
    total = count_trainable_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    head_only = count_trainable_parameters(model)
    assert head_only == sum(p.numel() for p in model.cls_head.parameters()) + sum(
        p.numel() for p in model.pos_head.parameters()
    )
    assert head_only < total


def test_full_configs_build():
    for cfg in (I3DConfig.full(), SlowFastConfig.full()):
        assert cfg.dim > 64
    vivit = ViViT(ViViTConfig.full())
    assert count_trainable_parameters(vivit) > 1_000_000
