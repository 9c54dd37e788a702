"""A small DETR-style segmentation student with an optional video memory.

Image path (DETR, Carion et al. 2020; mask head as in MaskFormer, Cheng et al. 2021, and
facebookresearch/detr ``models/detr.py`` / ``models/segmentation.py``):

    frames -> conv backbone (stages of stride 2) -> 1x1 proj + 2D sine position
           -> transformer encoder -> decoder with learned object queries
           -> per query: presence logits [object, no-object], box (cx, cy, w, h in [0, 1]),
              mask embedding . per-pixel features of an FPN-style pixel decoder -> mask logits

Video path (shared/seeds/004, "late fusion"): cached teacher features of T context frames ->
PerceiverResampler -> memory tokens; MemoryCrossAttention(encoder output, memory) sits between
the frozen encoder and the frozen decoder. With the gate at 0, forward_video == forward.

Shape legend:
    B batch, 3 RGB, H W frame size, S_i backbone stage i (stride 2^(i+1)),
    h w encoder grid (H / 2^num_stages), N = h*w encoder tokens, D d_model,
    Q object queries, M mask_dim, Hm Wm mask resolution (stage ``mask_stage``),
    T context frames, C = 256 context channels, 18x18 context grid, L memory tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from models.memory_attention import MemoryCrossAttention
from models.perceiver_resampler import PerceiverConfig, PerceiverResampler

MEMORY_MODULES = ("perceiver_resampler", "memory_cross_attn")


@dataclass(frozen=True)
class StudentConfig:
    """Sizes of a DETRStudent."""

    image_size: int = 504
    channels: tuple[int, ...] = (32, 64, 128, 256, 256)  # backbone stages, strides 2..32
    mask_stage: int = 1  # masks at the resolution of this backbone stage (stride 4)
    d_model: int = 256
    heads: int = 8
    ff_dim: int = 1024
    enc_layers: int = 6
    dec_layers: int = 6
    num_queries: int = 100
    mask_dim: int = 256
    memory_heads: int = 8
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig.full)

    @classmethod
    def full(cls) -> StudentConfig:
        return cls()

    @classmethod
    def tiny(cls) -> StudentConfig:
        """64x64 frames, 8x8 encoder grid, 32x32 masks; trains on a CPU in minutes."""
        return cls(
            image_size=64,
            channels=(16, 32, 64),
            mask_stage=0,
            d_model=96,
            heads=4,
            ff_dim=192,
            enc_layers=2,
            dec_layers=2,
            num_queries=8,
            mask_dim=32,
            memory_heads=4,
            perceiver=PerceiverConfig.tiny(dim=96),
        )


def sine_position_embedding(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """DETR's 2D sine position embedding (PositionEmbeddingSine, normalize=True): [h*w, dim]."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    y = ys[:, None, None] * omega  # (h, 1, dim/4)
    x = xs[None, :, None] * omega  # (1, w, dim/4)
    pe = torch.cat(
        [
            y.sin().expand(h, w, -1),
            y.cos().expand(h, w, -1),
            x.sin().expand(h, w, -1),
            x.cos().expand(h, w, -1),
        ],
        dim=-1,
    )  # (h, w, 4*dim/4)
    return F.pad(pe, (0, dim - pe.shape[-1])).reshape(h * w, dim)


def conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 conv (stride) -> GroupNorm -> ReLU -> 3x3 conv -> GroupNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        nn.GroupNorm(8, c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        nn.GroupNorm(8, c_out),
        nn.ReLU(inplace=True),
    )


class MLP(nn.Sequential):
    """Linear layers with ReLU between them (DETR's MLP for boxes and mask embeddings)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int) -> None:
        dims = [d_in] + [d_hidden] * (num_layers - 1) + [d_out]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DETRStudent(nn.Module):
    """DETR-style instance segmenter; ``forward_video`` adds the gated context memory.

    Outputs (dict of tensors, float32 unless autocast):
        pred_logits: [B, Q, 2] logits of (object present, no object).
        pred_boxes: [B, Q, 4] boxes (cx, cy, w, h), normalised to [0, 1] by the frame size.
        pred_masks: [B, Q, Hm, Wm] mask logits (Hm = H / 2^(mask_stage+1)).
    """

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        chans = (3, *cfg.channels)
        self.backbone = nn.ModuleList(
            conv_block(chans[i], chans[i + 1], 2) for i in range(len(cfg.channels))
        )
        self.input_proj = nn.Conv2d(cfg.channels[-1], D, 1)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                D, cfg.heads, cfg.ff_dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(cfg.enc_layers)
        )
        self.encoder_norm = nn.LayerNorm(D)
        self.query_embed = nn.Parameter(torch.randn(cfg.num_queries, D) * 0.1)  # (Q, D)
        self.decoder = nn.ModuleList(
            nn.TransformerDecoderLayer(
                D, cfg.heads, cfg.ff_dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(cfg.dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(D)
        # pixel decoder (FPN-style, at width M): top-down from the encoder grid to the mask
        # stage; at each step up, nearest upsampling + a lateral 1x1 conv, then a 3x3 conv
        n_up = len(cfg.channels) - 1 - cfg.mask_stage
        M = cfg.mask_dim
        self.pixel_proj = nn.Conv2d(D, M, 1)
        self.lateral = nn.ModuleList(
            nn.Conv2d(cfg.channels[len(cfg.channels) - 2 - i], M, 1) for i in range(n_up)
        )
        self.fuse = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(M, M, 3, 1, 1, bias=False), nn.GroupNorm(8, M), nn.ReLU(inplace=True)
            )
            for _ in range(n_up)
        )
        self.mask_features = nn.Conv2d(M, M, 1)
        self.class_head = nn.Linear(D, 2)
        self.box_head = MLP(D, D, 4, 3)
        self.mask_embed = MLP(D, D, cfg.mask_dim, 3)
        self.perceiver_resampler = PerceiverResampler(cfg.perceiver)
        self.memory_cross_attn = MemoryCrossAttention(D, cfg.memory_heads)
        if cfg.perceiver.dim != D:
            raise ValueError(f"perceiver dim {cfg.perceiver.dim} must equal d_model {D}")
        self.register_buffer(
            "pixel_mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1), persistent=False
        )

    # -- the image model ---------------------------------------------------------------------

    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """frames [B, 3, H, W] in [0, 1] -> (encoder tokens [B, N, D], backbone maps S_i)."""
        x = (frames - self.pixel_mean) / self.pixel_std
        feats = []
        for stage in self.backbone:
            x = stage(x)
            feats.append(x)  # S_i: (B, c_i, H/2^(i+1), W/2^(i+1))
        x = self.input_proj(x)  # (B, D, h, w)
        B, D, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + sine_position_embedding(
            h, w, D, x.device
        )  # (B, N, D)
        for layer in self.encoder:
            tokens = layer(tokens)
        return self.encoder_norm(tokens), feats

    def decode(self, tokens: torch.Tensor, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoder tokens [B, N, D] (+ backbone maps) -> predictions (see class docstring)."""
        B, N, D = tokens.shape
        h, w = feats[-1].shape[-2:]
        q = self.query_embed.expand(B, -1, -1)  # (B, Q, D)
        for layer in self.decoder:
            q = layer(q, tokens)
        q = self.decoder_norm(q)
        pix = self.pixel_proj(tokens.transpose(1, 2).reshape(B, D, h, w))  # (B, M, h, w)
        for i, (lat, fuse) in enumerate(zip(self.lateral, self.fuse, strict=False)):
            skip = feats[len(feats) - 2 - i]  # (B, c_i, 2h, 2w) at each step up
            pix = fuse(F.interpolate(pix, size=skip.shape[-2:], mode="nearest") + lat(skip))
        pix = self.mask_features(pix)  # (B, M, Hm, Wm)
        masks = torch.einsum("bqm,bmhw->bqhw", self.mask_embed(q), pix)  # (B, Q, Hm, Wm)
        return {
            "pred_logits": self.class_head(q),
            "pred_boxes": self.box_head(q).sigmoid(),
            "pred_masks": masks,
        }

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image-only prediction: frames [B, 3, H, W] float in [0, 1] -> outputs dict."""
        tokens, feats = self.encode(frames)
        return self.decode(tokens, feats)

    # -- the video model ---------------------------------------------------------------------

    def forward_video(self, frames: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prediction for query frames given cached features of their context frames.

        Args:
            frames: [B, 3, H, W] query frames in [0, 1].
            context: [B, T, C, 18, 18] cached teacher features of the T frames before the
                query (fp16 on disk is fine; cast to the module dtype).

        Returns:
            The outputs dict of ``forward``; identical to ``forward(frames)`` when the memory
            gate is 0.
        """
        tokens, feats = self.encode(frames)
        memory = self.perceiver_resampler(context)  # (B, L, D)
        tokens = self.memory_cross_attn(tokens, memory)  # (B, N, D)
        return self.decode(tokens, feats)

    def memory_modules(self) -> nn.ModuleDict:
        """The modules the video stage trains (PerceiverResampler, MemoryCrossAttention)."""
        return nn.ModuleDict({name: getattr(self, name) for name in MEMORY_MODULES})

    def freeze_image_model(self) -> None:
        """requires_grad=False for everything except the memory modules (video stage)."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.split(".")[0] in MEMORY_MODULES)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with requires_grad if trainable_only)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
