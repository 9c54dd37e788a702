"""The "simple CNN" tokenizer shared by the early-persistence models (seed note 001).

One image (an object crop or a whole frame) -> one token vector. Used for object-observation
tokens by the race models and per frame by ConvTemporalEncoder.

Shape legend: N images, C channels (3), H x W pixels, D token width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SimpleCNNConfig:
    """width: channels of the first conv (doubled once); dim: output token width D;
    grid: side of the adaptive-pooled feature map that is flattened (keeps coarse layout)."""

    width: int = 16
    dim: int = 64
    grid: int = 4

    @classmethod
    def tiny(cls) -> SimpleCNNConfig:
        return cls(width=16, dim=64, grid=4)

    @classmethod
    def full(cls) -> SimpleCNNConfig:
        return cls(width=64, dim=256, grid=4)


class SimpleCNNTokenizer(nn.Module):
    """Three 3x3 convs (strides 1, 2, 2) with GroupNorm + GELU, adaptive pool to grid x grid,
    flatten, linear to D. GroupNorm (not BatchNorm) so a token never depends on its batch.
    """

    def __init__(self, cfg: SimpleCNNConfig = SimpleCNNConfig(), in_channels: int = 3) -> None:
        super().__init__()
        w = cfg.width

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                nn.GroupNorm(min(8, c_out), c_out),
                nn.GELU(),
            )

        self.net = nn.Sequential(
            block(in_channels, w, 1),
            block(w, 2 * w, 2),
            block(2 * w, 2 * w, 2),
            nn.AdaptiveAvgPool2d(cfg.grid),
        )
        self.proj = nn.Linear(2 * w * cfg.grid * cfg.grid, cfg.dim)
        self.dim = cfg.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [N, C, H, W] in [0, 1] -> tokens float [N, D]."""
        x = self.net(images * 2.0 - 1.0)  # [N, 2w, grid, grid]
        return self.proj(x.flatten(1))  # [N, D]
