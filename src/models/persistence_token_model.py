"""The shared model of the early-persistence race: object-observation tokens -> 2-layer
transformer -> per-token persistent/transient logits (+ the auxiliary heads some approaches use).

A token is one object observation: the crop at the object's box in one frame, through the
shared tokenizer (SimpleCNNTokenizer, or the frozen ResNetTokenizer of the pretrained-features
approach), plus a learned frame-time embedding and an MLP embedding of the box centre. The model is
NOT given track identity: it must find an object's other observations itself (by appearance and
position), which is exactly what its attention is measured on.

Shape legend: B clips, L tokens per clip (padded), P crop side, D width, H heads, T frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention_transformer import AttentionTransformer, build_attention_mask


@dataclass(frozen=True)
class PersistenceModelConfig:
    """dim D, heads H, depth (2 in the race), num_frames T, dropout."""

    dim: int = 64
    heads: int = 4
    depth: int = 2
    num_frames: int = 16
    dropout: float = 0.0

    @classmethod
    def tiny(cls) -> PersistenceModelConfig:
        return cls(dim=64, heads=4)

    @classmethod
    def full(cls) -> PersistenceModelConfig:
        return cls(dim=256, heads=8, dropout=0.1)


class PersistenceTokenModel(nn.Module):
    """tokenizer + time/position embeddings + AttentionTransformer + heads.

    Heads: ``logits`` (CE, every approach), ``duration`` (multitask approach), and the final
    embedding (contrastive approach). All approaches build the same module, so only the loss
    (or the tokenizer, for pretrained features) differs between them.
    """

    def __init__(
        self, tokenizer: nn.Module, cfg: PersistenceModelConfig = PersistenceModelConfig()
    ) -> None:
        super().__init__()
        d = cfg.dim
        self.tokenizer = tokenizer
        self.in_proj = nn.Identity() if tokenizer.dim == d else nn.Linear(tokenizer.dim, d)
        self.time_emb = nn.Embedding(cfg.num_frames, d)
        self.pos_emb = nn.Sequential(nn.Linear(2, d), nn.GELU(), nn.Linear(d, d))
        self.transformer = AttentionTransformer(d, cfg.heads, cfg.depth, dropout=cfg.dropout)
        self.cls_head = nn.Linear(d, 2)
        self.duration_head = nn.Linear(d, 1)
        self.cfg = cfg

    def forward(
        self,
        crops: torch.Tensor,
        frame: torch.Tensor,
        centre: torch.Tensor,
        valid: torch.Tensor,
        context: str = "clip",
    ) -> dict[str, torch.Tensor | list]:
        """Classify every token of a padded batch of clips.

        Args:
            crops: float [B, L, 3, P, P] in [0, 1] (padding: anything).
            frame: long [B, L] frame index in 0..T-1.
            centre: float [B, L, 2] box centre (x, y) / image size.
            valid: bool [B, L], True for real tokens.
            context: "clip" (attend to every token of the clip) or "frame" (only tokens of the
                same frame: the no-temporal-context sanity baseline).

        Returns:
            dict with logits [B, L, 2], duration [B, L] (raw regression output), embedding
            [B, L, D] (final hidden states) and attentions: per-layer list of [B, H, L, L]
            (padded keys get exactly 0; see build_attention_mask).

        Raises:
            ValueError: unknown context.
        """
        b, n = valid.shape
        tok = crops.new_zeros(b, n, self.tokenizer.dim)
        tok[valid] = self.tokenizer(crops[valid])  # only real tokens: [K, 3, P, P] -> [K, D_tok]
        x = (
            self.in_proj(tok)
            + self.time_emb(frame.clamp(0, self.cfg.num_frames - 1))
            + self.pos_emb(centre)
        )
        if context == "clip":
            allowed = None
        elif context == "frame":
            allowed = frame[:, :, None] == frame[:, None, :]  # [B, L, L]
        else:
            raise ValueError(f"context must be 'clip' or 'frame', got {context!r}")
        mask = build_attention_mask(valid, allowed)
        h, attentions = self.transformer(x, mask)  # [B, L, D]
        return {
            "logits": self.cls_head(h),  # [B, L, 2]
            "duration": self.duration_head(h).squeeze(-1),  # [B, L]
            "embedding": h,
            "attentions": attentions,
        }
