"""Perceiver Resampler: compress cached context-frame features to a few memory tokens.

Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning",
Sec. 2.1 and Fig. 5); reference implementation: lucidrains/flamingo-pytorch
(``PerceiverResampler``, ``PerceiverAttention``). As in Flamingo, the learned latents attend to
the concatenation [context tokens; latents] (latents are concatenated into the keys and values).
Unlike Flamingo, which adds only a temporal embedding, context tokens here get a learned
SPATIAL embedding (position in the 18x18 grid) plus a learned TEMPORAL embedding (which context
frame), so the memory knows where and when a feature was seen.

Shape legend:
    B  batch              T  context frames          C  context feature channels (256)
    h, w  feature grid (18, 18), P = h * w tokens per frame (324)
    L  latents (64)       D  model width (256 full; the tiny config uses less)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PerceiverConfig:
    """Sizes of a PerceiverResampler."""

    context_dim: int = 256  # C: channels of the cached features
    dim: int = 256  # D: latent width (= the student's d_model)
    grid: int = 18  # h = w of the cached feature grid
    max_frames: int = 8  # T the temporal embedding covers
    num_latents: int = 64
    depth: int = 2
    heads: int = 8
    dim_head: int = 32
    ff_mult: int = 4

    @classmethod
    def full(cls) -> PerceiverConfig:
        return cls()

    @classmethod
    def tiny(cls, dim: int = 64) -> PerceiverConfig:
        return cls(dim=dim, max_frames=4, num_latents=64, depth=1, heads=4, dim_head=16, ff_mult=2)


class FeedForward(nn.Sequential):
    """Pre-norm MLP: LayerNorm -> Linear(D, mult*D) -> GELU -> Linear(mult*D, D) (no residual)."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )


class PerceiverAttention(nn.Module):
    """Latents attend to [context; latents] (Flamingo's PerceiverAttention, no residual)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, inner = heads, heads * dim_head
        self.norm_context = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context [B, N, D], latents [B, L, D] -> update [B, L, D]."""
        context, latents = self.norm_context(context), self.norm_latents(latents)
        B, L, _ = latents.shape
        q = self.to_q(latents)  # (B, L, H*dh)
        k, v = self.to_kv(torch.cat([context, latents], dim=1)).chunk(2, dim=-1)  # (B, N+L, H*dh)
        split = lambda x: x.view(B, x.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))  # (B,H,L,dh)
        return self.to_out(out.transpose(1, 2).reshape(B, L, -1))


class PerceiverResampler(nn.Module):
    """Compress [B, T, C, h, w] context features to [B, L, D] memory tokens.

    Args:
        cfg: sizes; ``context_dim != dim`` adds a Linear input projection (the tiny config).
    """

    def __init__(self, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj_in = (
            nn.Linear(cfg.context_dim, cfg.dim) if cfg.context_dim != cfg.dim else nn.Identity()
        )
        self.spatial_pos = nn.Parameter(torch.randn(cfg.grid * cfg.grid, cfg.dim) * 0.02)  # (P, D)
        self.temporal_pos = nn.Parameter(torch.randn(cfg.max_frames, cfg.dim) * 0.02)  # (Tmax, D)
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.dim) * 0.02)  # (L, D)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(cfg.dim, cfg.heads, cfg.dim_head),
                    FeedForward(cfg.dim, cfg.ff_mult),
                ]
            )
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Resample context features into memory tokens.

        Args:
            context: [B, T, C, h, w] features of the T context frames (any float dtype;
                computed in the module's dtype), T <= cfg.max_frames, h = w = cfg.grid.

        Returns:
            [B, L, D] memory tokens, in the module's dtype.

        Raises:
            ValueError: if the shape does not match the config.
        """
        B, T, C, h, w = context.shape
        cfg = self.cfg
        if C != cfg.context_dim or h != cfg.grid or w != cfg.grid or T > cfg.max_frames:
            raise ValueError(
                f"context {tuple(context.shape)} does not fit [B, T<={cfg.max_frames}, "
                f"{cfg.context_dim}, {cfg.grid}, {cfg.grid}]"
            )
        x = context.to(self.latents.dtype).flatten(3).transpose(2, 3)  # (B, T, P, C)
        x = self.proj_in(x) + self.spatial_pos + self.temporal_pos[:T, None]  # (B, T, P, D)
        x = x.reshape(B, T * h * w, -1)  # (B, T*P, D)
        latents = self.latents.expand(B, -1, -1)  # (B, L, D)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm(latents)
