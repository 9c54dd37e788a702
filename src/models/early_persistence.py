"""The early persistence classifier of seed note 000, made causal, plus early decisions and
compute gating.

For one object track (the crops at the track's positions, from its first frame on), a causal
ConvTemporalEncoder produces per-frame features; heads give per-frame logits [B, T, 2] and a
trained confidence [B, T, 1] (sigmoid; trained to predict whether the per-frame prediction is
right, as in "learning to defer"/SelectiveNet-style confidence heads). An early decision is taken
at the first frame inside the early window whose confidence reaches the threshold; otherwise at
the track's last frame. The note's bidirectional LSTM saw future frames and could not decide early;
here frame t never sees frames > t (tested).

Shape legend: B tracks, T frames, C channels, P crop side, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .conv_temporal_encoder import ConvTemporalConfig, ConvTemporalEncoder


class EarlyPersistenceClassifier(nn.Module):
    """crops [B, T, 3, P, P] -> logits [B, T, 2], confidence [B, T, 1], attention [B, H, T, T]."""

    def __init__(self, cfg: ConvTemporalConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else ConvTemporalConfig.tiny(causal=True)
        if not cfg.causal:
            raise ValueError(
                "the early persistence classifier needs a causal encoder (causal=True)"
            )
        self.encoder = ConvTemporalEncoder(cfg)
        self.cls_head = nn.Linear(cfg.dim, 2)
        self.conf_head = nn.Linear(cfg.dim, 1)

    def forward(
        self, crops: torch.Tensor, valid: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """crops: float [B, T, 3, P, P] in [0, 1]; valid: bool [B, T] (padding at the end).

        Returns dict: logits [B, T, 2] (class 1 = persistent), confidence [B, T, 1] in (0, 1),
        attention [B, H, T, T]. Output at frame t depends on frames <= t only.
        """
        enc = self.encoder(crops, valid)
        h = enc["features"]  # [B, T, D]
        return {
            "logits": self.cls_head(h),
            "confidence": torch.sigmoid(self.conf_head(h)),
            "attention": enc["attention"],
        }


def early_decision(
    logits: torch.Tensor,
    confidence: torch.Tensor,
    valid: torch.Tensor,
    threshold: float,
    early_window: int,
) -> dict[str, torch.Tensor]:
    """Take each track's decision at the first confident frame within the early window.

    Args:
        logits: [B, T, 2]; confidence: [B, T, 1] or [B, T]; valid: bool [B, T] (a prefix).
        threshold: confidence needed to decide early.
        early_window: frames 0..early_window-1 may decide early.

    Returns:
        dict of [B] tensors: ``decision`` (long, 1 persistent), ``frame`` (long, frame index the
        decision was taken at), ``early`` (bool, decided inside the window by confidence),
        ``confidence`` (float, confidence at that frame).
    """
    conf = confidence.reshape(valid.shape)
    t = valid.shape[1]
    in_window = torch.arange(t, device=valid.device)[None] < early_window
    confident = (conf >= threshold) & valid & in_window  # [B, T]
    last = valid.long().sum(1).clamp(min=1) - 1
    first = torch.where(confident.any(1), confident.float().argmax(1), last)  # argmax = first True
    rows = torch.arange(valid.shape[0], device=valid.device)
    return {
        "decision": logits[rows, first].argmax(-1),
        "frame": first,
        "early": confident.any(1),
        "confidence": conf[rows, first],
    }


@dataclass(frozen=True)
class ComputeGate:
    """Compute gating of note 000: stop processing a track once it is confidently transient
    inside the early window; per-class budgets cap the frames a track may use.

    Attributes:
        threshold: confidence needed to stop early.
        early_window: frames in which an early stop is allowed.
        budgets: fraction of the T frames each predicted class may use at most
            (persistent 1.0: needs its full trajectory; transient: a small budget).
    """

    threshold: float = 0.9
    early_window: int = 4
    budgets: tuple[tuple[str, float], ...] = (("persistent", 1.0), ("transient", 0.25))

    def frames_to_process(
        self, logits: torch.Tensor, confidence: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """long [B]: frames each track is processed for (>= 1), under the gate.

        A track stops after frame f (processing f+1 frames) when it is predicted transient with
        confidence >= threshold at f < early_window; a track whose running prediction is
        transient at the end of the transient budget stops there too. Others use all valid frames.
        """
        b, t = valid.shape
        conf = confidence.reshape(b, t)
        pred = logits.argmax(-1)  # [B, T]
        frames = torch.arange(t, device=valid.device)[None]
        stop = (pred == 0) & (conf >= self.threshold) & (frames < self.early_window) & valid
        budget_t = max(1, int(round(dict(self.budgets)["transient"] * t)))
        stop |= (pred == 0) & (frames == budget_t - 1) & valid
        n_valid = valid.long().sum(1)
        first_stop = torch.where(stop.any(1), stop.float().argmax(1) + 1, n_valid)
        return first_stop.clamp(min=1)
