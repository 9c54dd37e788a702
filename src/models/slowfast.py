"""SlowFast-style two-pathway video network (Feichtenhofer et al., "SlowFast Networks for Video
Recognition", ICCV 2019; reference implementation facebookresearch/SlowFast).

- Slow pathway: every ``alpha``-th frame (low frame rate), many channels C; temporal kernels of
  size 1 in the early stage (the paper's "non-degenerate temporal convolutions only in res4-5").
- Fast pathway: every frame (alpha times the frame rate), few channels beta * C; temporal
  kernels everywhere.
- Lateral connections fast -> slow after the stem and after each stage: a time-strided conv
  (kernel 5x1x1, stride alpha, 2 beta C output channels, the paper's "time-strided convolution"
  variant), concatenated onto the slow pathway's channels.
- Head: global spatial average of each pathway; per-time features on the fast time axis (slow
  features repeated alpha times), pooled = concat of both pathways' time averages.

Scaled down from the ResNet-50 SlowFast 4x16 to a few conv units per stage. Not causal.

Shape legend: B clips, T frames (fast), T_s = ceil(T / alpha) (slow), C channels, H x W pixels,
D = 4C + 4 beta C output width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .i3d import Unit3D


@dataclass(frozen=True)
class SlowFastConfig:
    """width: slow channels C of the stem; alpha: frame-rate ratio (slow sees every alpha-th
    frame); beta_inv: fast width = C / beta_inv."""

    width: int = 32
    alpha: int = 4
    beta_inv: int = 4
    dropout: float = 0.0

    @property
    def fast_width(self) -> int:
        return max(1, self.width // self.beta_inv)

    @property
    def dim(self) -> int:
        return 4 * self.width + 4 * self.fast_width

    @classmethod
    def tiny(cls) -> SlowFastConfig:
        return cls(width=16, alpha=4, beta_inv=4)

    @classmethod
    def full(cls) -> SlowFastConfig:
        return cls(width=64, alpha=4, beta_inv=8, dropout=0.1)


class Lateral(nn.Module):
    """Fast -> slow fusion, conv 5x1x1 with time stride alpha.

    [B, Cf, T, H, W] -> [B, 2 Cf, T_s, H, W].
    """

    def __init__(self, c_fast: int, alpha: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            c_fast, 2 * c_fast, (5, 1, 1), stride=(alpha, 1, 1), padding=(2, 0, 0), bias=False
        )
        self.norm = nn.BatchNorm3d(2 * c_fast)

    def forward(self, fast: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(fast)))


class SlowFast(nn.Module):
    """Two pathways with lateral connections.

    video [B, T, C, H, W] -> features [B, T, D], pooled [B, D].
    """

    def __init__(self, cfg: SlowFastConfig = SlowFastConfig(), in_channels: int = 3) -> None:
        super().__init__()
        c, f = cfg.width, cfg.fast_width
        pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.slow_stem = nn.Sequential(Unit3D(in_channels, c, (1, 5, 5), (1, 2, 2)), pool)  # H/4
        self.fast_stem = nn.Sequential(Unit3D(in_channels, f, (5, 5, 5), (1, 2, 2)), pool)
        self.lateral0 = Lateral(f, cfg.alpha)
        # stage 1: slow temporal kernel 1 (degenerate), fast temporal kernel 3; H/8
        self.slow1 = nn.Sequential(
            Unit3D(c + 2 * f, 2 * c, (1, 3, 3), (1, 2, 2)), Unit3D(2 * c, 2 * c, (1, 3, 3))
        )
        self.fast1 = nn.Sequential(
            Unit3D(f, 2 * f, (3, 3, 3), (1, 2, 2)), Unit3D(2 * f, 2 * f, (3, 3, 3))
        )
        self.lateral1 = Lateral(2 * f, cfg.alpha)
        # stage 2: temporal kernel 3 in both; H/16
        self.slow2 = nn.Sequential(
            Unit3D(2 * c + 4 * f, 4 * c, (3, 3, 3), (1, 2, 2)), Unit3D(4 * c, 4 * c, (3, 3, 3))
        )
        self.fast2 = nn.Sequential(
            Unit3D(2 * f, 4 * f, (3, 3, 3), (1, 2, 2)), Unit3D(4 * f, 4 * f, (3, 3, 3))
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.dim = cfg.dim
        self.cfg = cfg

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode clips.

        Args:
            video: float [B, T, C, H, W] in [0, 1] (H, W >= 16).

        Returns:
            dict: features float [B, T, D] (slow part repeated alpha times along time),
            pooled float [B, D], slow float [B, 4C, T_s], fast float [B, 4 beta C, T].
        """
        t, alpha = video.shape[1], self.cfg.alpha
        x = video.transpose(1, 2) * 2.0 - 1.0  # [B, C, T, H, W]
        slow = self.slow_stem(x[:, :, ::alpha])  # [B, C, T_s, H/4, W/4]
        fast = self.fast_stem(x)  # [B, Cf, T, H/4, W/4]
        slow = torch.cat([slow, self.lateral0(fast)], dim=1)  # [B, C + 2Cf, T_s, ...]
        slow, fast = self.slow1(slow), self.fast1(fast)  # H/8
        slow = torch.cat([slow, self.lateral1(fast)], dim=1)  # [B, 2C + 4Cf, T_s, ...]
        slow, fast = self.slow2(slow), self.fast2(fast)  # [B, 4C, T_s, H/16], [B, 4Cf, T, H/16]
        slow_t = slow.mean(dim=(3, 4))  # [B, 4C, T_s]
        fast_t = fast.mean(dim=(3, 4))  # [B, 4Cf, T]
        slow_up = slow_t.repeat_interleave(alpha, dim=2)[:, :, :t]  # [B, 4C, T]
        features = self.dropout(torch.cat([slow_up, fast_t], dim=1).transpose(1, 2))  # [B, T, D]
        pooled = torch.cat([slow_t.mean(2), fast_t.mean(2)], dim=1)  # [B, D]
        return {
            "features": features,
            "pooled": self.dropout(pooled),
            "slow": slow_t,
            "fast": fast_t,
        }
