"""ConvTemporalEncoder: per-frame CNN -> temporal 1-D convs -> self-attention over frames.

This is the encoder that seed note 003 called "MagVIT". It is NOT MAGVIT (a VQ video
tokenizer, Yu et al. 2023); it is a plain CNN + temporal conv + attention stack, named for what
it is. The early-persistence baseline uses it with ``causal=True`` (left-padded temporal convs and
a causal attention mask, so frame t never sees frames > t); the trajectory-comparison job reuses it
through the same [B, T, C, H, W] -> features API.

Shape legend: B clips, T frames, C channels, H x W pixels, D width, heads Hd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention_transformer import AttentionEncoderLayer, build_attention_mask
from .frame_tokenizer import SimpleCNNConfig, SimpleCNNTokenizer


@dataclass(frozen=True)
class ConvTemporalConfig:
    """cnn: the per-frame CNN; dim D; heads; temporal_kernel k; temporal_layers; causal."""

    cnn: SimpleCNNConfig = SimpleCNNConfig.tiny()
    dim: int = 64
    heads: int = 4
    temporal_kernel: int = 3
    temporal_layers: int = 2
    causal: bool = False

    @classmethod
    def tiny(cls, causal: bool = False) -> ConvTemporalConfig:
        return cls(causal=causal)

    @classmethod
    def full(cls, causal: bool = False) -> ConvTemporalConfig:
        return cls(cnn=SimpleCNNConfig.full(), dim=256, heads=8, causal=causal)


class ConvTemporalEncoder(nn.Module):
    """video [B, T, C, H, W] -> per-frame features [B, T, D], pooled [B, D], attention."""

    def __init__(
        self, cfg: ConvTemporalConfig = ConvTemporalConfig(), in_channels: int = 3
    ) -> None:
        super().__init__()
        self.frame_cnn = SimpleCNNTokenizer(cfg.cnn, in_channels)
        self.in_proj = nn.Linear(cfg.cnn.dim, cfg.dim)
        self.temporal = nn.ModuleList(
            nn.Conv1d(cfg.dim, cfg.dim, cfg.temporal_kernel) for _ in range(cfg.temporal_layers)
        )
        self.attn = AttentionEncoderLayer(cfg.dim, cfg.heads)
        self.norm = nn.LayerNorm(cfg.dim)
        self.cfg = cfg

    def forward(
        self, video: torch.Tensor, valid: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode clips.

        Args:
            video: float [B, T, C, H, W] in [0, 1].
            valid: optional bool [B, T]; False frames are masked as attention keys (and excluded
                from ``pooled``). With causal=True, padding must be at the end.

        Returns:
            dict: features [B, T, D], pooled [B, D] (mean over valid frames),
            attention [B, heads, T, T].
        """
        b, t = video.shape[:2]
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=video.device)
        x = self.frame_cnn(video.flatten(0, 1)).view(b, t, -1)  # [B*T, C, H, W] -> [B, T, D_cnn]
        x = self.in_proj(x) * valid[..., None]  # [B, T, D]
        k = self.cfg.temporal_kernel
        pad = (k - 1, 0) if self.cfg.causal else ((k - 1) // 2, k // 2)
        for conv in self.temporal:
            y = conv(F.pad(x.transpose(1, 2), pad))  # [B, D, T]
            x = x + F.gelu(y).transpose(1, 2)  # residual, [B, T, D]
        allowed = None
        if self.cfg.causal:
            allowed = torch.ones(t, t, dtype=torch.bool, device=video.device).tril()
        x, attention = self.attn(x, build_attention_mask(valid, allowed))
        x = self.norm(x)
        w = valid[..., None].to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
        return {"features": x, "pooled": pooled, "attention": attention}
