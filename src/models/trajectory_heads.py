"""Heads of the trajectory comparison: trajectory class + FUTURE position, on any video backbone.

Any backbone with the shared API works: ``backbone(video [B, T, C, H, W]) -> {"features":
[B, T', D], "pooled": [B, D], ...}`` (ConvTemporalEncoder, I3D, SlowFast, ViViT).

- Classification head: LayerNorm -> Linear on ``pooled`` -> logits [B, K] over trajectory
  classes (linear, parabolic, circular, helical).
- Position head: an MLP on [pooled, features of the last time step] -> the object's centre at
  frame T_in - 1 + k, which is NOT in the input (seed note 003 "predicted" a position its model
  could see). Output in normalised image coordinates (x / W, y / H); 0.5 is the image centre,
  the head is initialised to predict it. The last time step is given because the mean-pooled
  feature alone has no notion of "where the object is now".

Shape legend: B clips, T' backbone time steps, D backbone width, K classes.
"""

from __future__ import annotations

import torch
from torch import nn


class TrajectoryModel(nn.Module):
    """backbone + classification head + future-position head.

    Args:
        backbone: module mapping video [B, T, C, H, W] to a dict with features [B, T', D] and
            pooled [B, D].
        feature_dim: D.
        num_classes: K.
        hidden: width of the position MLP.
        dropout: before both heads.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int = 4,
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.drop = nn.Dropout(dropout)
        self.cls_head = nn.Sequential(
            nn.LayerNorm(feature_dim), nn.Linear(feature_dim, num_classes)
        )
        self.pos_head = nn.Sequential(
            nn.LayerNorm(2 * feature_dim),
            nn.Linear(2 * feature_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, 2),
        )
        nn.init.zeros_(self.pos_head[-1].weight)
        nn.init.zeros_(self.pos_head[-1].bias)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Classify and extrapolate.

        Args:
            video: float [B, T, C, H, W] in [0, 1] (the input window only).

        Returns:
            dict: logits float [B, K]; position float [B, 2] = (x / W, y / H) at the target
            frame; pooled float [B, D].
        """
        out = self.backbone(video)
        pooled, last = out["pooled"], out["features"][:, -1]  # [B, D], [B, D]
        logits = self.cls_head(self.drop(pooled))  # [B, K]
        position = 0.5 + self.pos_head(self.drop(torch.cat([pooled, last], dim=-1)))  # [B, 2]
        return {"logits": logits, "position": position, "pooled": pooled}


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that require grad, counted from the model itself."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
