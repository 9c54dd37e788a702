"""A pre-norm transformer encoder whose layers return their real attention weights.

nn.TransformerEncoderLayer never returns attention, so the layer is written here around
nn.MultiheadAttention(need_weights=True, average_attn_weights=False), which gives the
per-head softmax weights [B, heads, L, S] actually used to mix the values.

Shape legend: B batch, L query tokens, S key tokens (S == L here), D width, H heads.
Masks are boolean with True = "may attend" (the opposite of PyTorch's convention, converted here).
"""

from __future__ import annotations

import torch
from torch import nn


def build_attention_mask(valid: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Combine padding (and an optional structural mask) into one boolean [B, L, L] mask.

    Args:
        valid: bool [B, L], True for real tokens.
        allowed: optional bool [B, L, L] or [L, L], True where query i may attend key j
            (e.g. causal, or same-frame only).

    Returns:
        bool [B, L, L], True = may attend. Padded keys are never attended; a padded query
        attends only itself, so no row is empty (an empty row would give NaN that leaks
        through 0 * NaN in the next layer).
    """
    b, n = valid.shape
    mask = valid[:, None, :].expand(b, n, n).clone()  # keys must be valid
    if allowed is not None:
        mask &= allowed if allowed.dim() == 3 else allowed[None]
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)[None]
    mask |= eye & ~valid[:, :, None]  # padded query -> itself
    mask |= eye & ~mask.any(-1, keepdim=True)  # any empty row -> itself
    return mask


class AttentionEncoderLayer(nn.Module):
    """Pre-norm encoder layer: x + MHA(LN(x)), then x + MLP(LN(x)); returns the weights."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, int(dim * mlp_ratio)),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(int(dim * mlp_ratio), dim),
        )
        self.drop = nn.Dropout(dropout)
        self.heads = heads

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float [B, L, D]; mask: bool [B, L, L] (True = may attend, from
        build_attention_mask).

        Returns (x [B, L, D], attention float [B, H, L, L]; rows sum to 1)."""
        b, n, _ = x.shape
        blocked = ~mask  # PyTorch: True = not allowed
        attn_mask = blocked[:, None].expand(b, self.heads, n, n).reshape(b * self.heads, n, n)
        h = self.norm1(x)
        out, weights = self.attn(
            h, h, h, attn_mask=attn_mask, need_weights=True, average_attn_weights=False
        )  # weights [B, H, L, L]
        x = x + self.drop(out)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, weights


class AttentionTransformer(nn.Module):
    """A stack of AttentionEncoderLayer (2 in the race) + final LayerNorm."""

    def __init__(
        self, dim: int, heads: int, depth: int = 2, mlp_ratio: float = 2.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            AttentionEncoderLayer(dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: [B, L, D], mask: bool [B, L, L] -> (x [B, L, D], per-layer attention [B, H, L, L])."""
        attentions = []
        for layer in self.layers:
            x, w = layer(x, mask)
            attentions.append(w)
        return self.norm(x), attentions
