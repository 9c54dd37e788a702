"""Frozen ResNet features (Hugging Face transformers ResNetModel) + a trained projection.

On a GPU box: ``FrozenResNetFeatures.from_pretrained("microsoft/resnet-18")`` (the real
from_pretrained path). Tests and the CPU demo build the same class from ``tiny_resnet_config()``
with random weights (no model hub at run time). The backbone stays in eval() whatever the
parent module's mode, so its BatchNorm statistics never drift, and has requires_grad=False;
only ``ResNetTokenizer.proj`` trains.

Shape legend: N images, h x w input pixels, S backbone input side, C backbone channels
(512 for resnet-18), D token width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetConfig, ResNetModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiny_resnet_config() -> ResNetConfig:
    """A 4-stage basic-block ResNet with widths 16..128 (~0.2M params), random weights."""
    return ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic"
    )


class FrozenResNetFeatures(nn.Module):
    """images [N, 3, h, w] in [0, 1] -> pooled features [N, C], no gradient.

    Images are resized (bilinear) to ``input_size`` and normalised with ImageNet statistics, as
    the pretrained checkpoints expect.
    """

    def __init__(self, backbone: ResNetModel, input_size: int = 64) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.backbone.requires_grad_(False)
        self.input_size = input_size
        self.out_dim = backbone.config.hidden_sizes[-1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, input_size: int = 64, **kwargs
    ) -> FrozenResNetFeatures:
        """Load e.g. ``microsoft/resnet-18`` (kwargs go to ResNetModel.from_pretrained)."""
        return cls(ResNetModel.from_pretrained(name_or_path, **kwargs), input_size)

    @classmethod
    def from_config(cls, config: ResNetConfig, input_size: int = 32) -> FrozenResNetFeatures:
        """Random weights from a config (tests, the CPU demo)."""
        return cls(ResNetModel(config), input_size)

    def train(self, mode: bool = True) -> FrozenResNetFeatures:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm uses its stored statistics
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [N, 3, h, w] in [0, 1] -> float [N, C]."""
        x = F.interpolate(
            images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
        )  # [N, 3, S, S]
        x = (x - self.mean) / self.std
        return self.backbone(pixel_values=x).pooler_output.flatten(1)  # [N, C, 1, 1] -> [N, C]


class ResNetTokenizer(nn.Module):
    """FrozenResNetFeatures + trained Linear(C, D) + LayerNorm: a drop-in SimpleCNNTokenizer."""

    def __init__(self, features: FrozenResNetFeatures, dim: int) -> None:
        super().__init__()
        self.features = features
        self.proj = nn.Sequential(nn.Linear(features.out_dim, dim), nn.LayerNorm(dim))
        self.dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [N, 3, h, w] in [0, 1] -> tokens float [N, D]."""
        return self.proj(self.features(images))
