"""Gated memory cross-attention: inject compressed video memory into a frozen encoder's output.

Pre-norm cross-attention (queries: the frozen encoder's tokens; keys/values: memory tokens from
the PerceiverResampler) added back through a tanh gate initialised at 0, so at initialisation
the module is the identity and the frozen image model is unchanged; Flamingo's
GatedCrossAttentionDense (Alayrac et al. 2022, Sec. 2.2; lucidrains/flamingo-pytorch
``GatedCrossAttentionBlock``), without the gated FFW.

Shape legend: B batch, N encoder tokens (H*W of the student's feature grid), L memory tokens,
D width.
"""

from __future__ import annotations

import torch
from torch import nn


class MemoryCrossAttention(nn.Module):
    """x + tanh(gate) * MHA(LN(x), LN(memory), LN(memory)).

    Args:
        dim: D, the width of both the encoder tokens and the memory.
        heads: attention heads (D must be divisible by it).
        dropout: attention dropout.

    Parameter count: 2 LayerNorms (4D) + nn.MultiheadAttention (4D^2 + 4D) + gate (1);
    D = 256 gives 264,193 (not the ~198K the original notes claimed).
    """

    def __init__(self, dim: int = 256, heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Enrich encoder tokens with memory.

        Args:
            x: [B, N, D] frozen encoder output.
            memory: [B, L, D] memory tokens.

        Returns:
            [B, N, D]; exactly ``x`` when the gate is 0.
        """
        m = self.norm_memory(memory)
        update, _ = self.attn(self.norm_x(x), m, m, need_weights=False)  # (B, N, D)
        return x + torch.tanh(self.gate) * update
