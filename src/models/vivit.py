"""ViViT-style factorised space-time transformer (Arnab et al., "ViViT: A Video Vision
Transformer", ICCV 2021, Model 2 "factorised encoder"; reference implementation
google-research/scenic projects/vivit, and lucidrains/vit-pytorch vivit.py).

1. Tubelet embedding: a Conv3d with kernel = stride = (t, p, p) cuts the clip into
   non-overlapping t x p x p tubes -> T' = T / t time steps of N = (H / p) * (W / p) tokens.
2. Spatial encoder: per time step, [CLS] + N tokens + learned spatial position embeddings,
   ``spatial_depth`` pre-norm transformer layers; the CLS output summarises the time step.
3. Temporal encoder: [CLS] + the T' per-step summaries + learned temporal position embeddings,
   ``temporal_depth`` layers; the CLS output is the clip embedding.

Not causal (the temporal encoder is bidirectional), like the paper's.

Shape legend: B clips, T frames, C channels, H x W pixels, t x p x p tubelet, T' = T / t,
N = (H / p)(W / p) patches per step, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViViTConfig:
    """Sizes; ``num_frames`` and ``image_size`` fix the position-embedding tables."""

    num_frames: int = 16
    image_size: int = 64
    tubelet_frames: int = 2
    patch_size: int = 8
    dim: int = 64
    heads: int = 4
    spatial_depth: int = 2
    temporal_depth: int = 2
    mlp_ratio: float = 2.0
    dropout: float = 0.0

    @classmethod
    def tiny(cls, num_frames: int = 16, image_size: int = 64) -> ViViTConfig:
        return cls(num_frames=num_frames, image_size=image_size, patch_size=max(4, image_size // 8))

    @classmethod
    def full(cls, num_frames: int = 16, image_size: int = 64) -> ViViTConfig:
        return cls(
            num_frames=num_frames,
            image_size=image_size,
            patch_size=8,
            dim=256,
            heads=8,
            spatial_depth=6,
            temporal_depth=4,
            mlp_ratio=4.0,
            dropout=0.1,
        )

    def validate(self) -> None:
        """Raise ValueError when the clip does not tile into tubelets or D into heads."""
        if self.num_frames % self.tubelet_frames or self.image_size % self.patch_size:
            raise ValueError(
                f"ViViT needs num_frames % tubelet_frames == 0 and image_size % patch_size == 0; "
                f"got {self.num_frames} % {self.tubelet_frames}, "
                f"{self.image_size} % {self.patch_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"ViViT dim {self.dim} is not divisible by heads {self.heads}")


def _encoder(cfg: ViViTConfig, depth: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(
            cfg.dim,
            cfg.heads,
            int(cfg.dim * cfg.mlp_ratio),
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        for _ in range(depth)
    )


class ViViT(nn.Module):
    """Factorised encoder: video [B, T, C, H, W] -> features [B, T', D], pooled [B, D]."""

    def __init__(self, cfg: ViViTConfig = ViViTConfig(), in_channels: int = 3) -> None:
        super().__init__()
        cfg.validate()
        t, p = cfg.tubelet_frames, cfg.patch_size
        self.tubelets = nn.Conv3d(in_channels, cfg.dim, (t, p, p), stride=(t, p, p))
        n_steps, n_patches = cfg.num_frames // t, (cfg.image_size // p) ** 2
        self.spatial_cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.spatial_pos = nn.Parameter(torch.randn(1, n_patches + 1, cfg.dim) * 0.02)
        self.temporal_cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.temporal_pos = nn.Parameter(torch.randn(1, n_steps + 1, cfg.dim) * 0.02)
        self.spatial = _encoder(cfg, cfg.spatial_depth)
        self.spatial_norm = nn.LayerNorm(cfg.dim)
        self.temporal = _encoder(cfg, cfg.temporal_depth)
        self.temporal_norm = nn.LayerNorm(cfg.dim)
        self.dim = cfg.dim
        self.cfg = cfg

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode clips.

        Args:
            video: float [B, T, C, H, W] in [0, 1], T == cfg.num_frames, H == W == cfg.image_size.

        Returns:
            dict: features float [B, T', D] (temporal encoder outputs per time step),
            pooled float [B, D] (temporal CLS).

        Raises:
            ValueError: clip size differs from the config's (the position tables are fixed).
        """
        b, t, _, h, w = video.shape
        if t != self.cfg.num_frames or h != self.cfg.image_size or w != self.cfg.image_size:
            raise ValueError(
                f"ViViT built for {self.cfg.num_frames} frames of "
                f"{self.cfg.image_size}px, got {t} frames of {h}x{w}"
            )
        x = self.tubelets(video.transpose(1, 2) * 2.0 - 1.0)  # [B, D, T', H/p, W/p]
        steps = x.shape[2]
        x = x.flatten(3).permute(0, 2, 3, 1).flatten(0, 1)  # [B*T', N, D]
        x = torch.cat([self.spatial_cls.expand(x.shape[0], -1, -1), x], 1) + self.spatial_pos
        for layer in self.spatial:
            x = layer(x)  # [B*T', 1+N, D]
        x = self.spatial_norm(x[:, 0]).view(b, steps, -1)  # [B, T', D] per-step CLS
        x = torch.cat([self.temporal_cls.expand(b, -1, -1), x], 1) + self.temporal_pos
        for layer in self.temporal:
            x = layer(x)  # [B, 1+T', D]
        x = self.temporal_norm(x)
        return {"features": x[:, 1:], "pooled": x[:, 0]}
