"""I3D-style inflated 3D CNN (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017).

I3D takes a 2D image network (Inception-v1) and *inflates* every N x N kernel to t x N x N, so
the network convolves over time as well as space; a 2D ImageNet kernel can bootstrap the 3D one
by repeating it t times and dividing by t (``inflate_conv2d``: a static video then gives the 2D
network's activations). This is a scaled-down version of the same layout: stem 3D conv, spatial
max-pools, inflated Inception ("Mixed") blocks with four branches (1x1x1; 1x1x1 -> 3x3x3;
1x1x1 -> 3x3x3; 3x3x3 max-pool -> 1x1x1), a space-time max-pool, global spatial pooling.
Reference implementation: deepmind/kinetics-i3d (i3d.py), piergiaj/pytorch-i3d.

Not causal: 3x3x3 kernels see one frame into the future at every layer.

Shape legend: B clips, T frames, C channels, H x W pixels, T' = T / 2 output time steps, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class I3DConfig:
    """width: stem channels w (the Mixed blocks output 4w and 8w = D); dropout before pooling."""

    width: int = 16
    dropout: float = 0.0

    @property
    def dim(self) -> int:
        return 8 * self.width

    @classmethod
    def tiny(cls) -> I3DConfig:
        return cls(width=8)

    @classmethod
    def full(cls) -> I3DConfig:
        return cls(width=32, dropout=0.1)


def inflate_conv2d(conv2d: nn.Conv2d, time_kernel: int, time_stride: int = 1) -> nn.Conv3d:
    """Inflate a 2D conv to 3D: weight [O, I, k, k] -> [O, I, t, k, k], repeated over t and / t.

    The result applied to a video of identical frames equals the 2D conv of one frame (away from
    the temporal borders), the "boring video" fixed point of the I3D paper (Sec. 2.4).

    Raises:
        ValueError: time_kernel < 1, or a conv with groups/dilation other than 1.
    """
    if time_kernel < 1:
        raise ValueError(f"time_kernel must be >= 1, got {time_kernel}")
    if conv2d.groups != 1 or conv2d.dilation != (1, 1):
        raise ValueError("only plain convs (groups=1, dilation=1) can be inflated")
    kh, kw = conv2d.kernel_size
    conv3d = nn.Conv3d(
        conv2d.in_channels,
        conv2d.out_channels,
        (time_kernel, kh, kw),
        stride=(time_stride, *conv2d.stride),
        padding=(time_kernel // 2, *conv2d.padding),
        bias=conv2d.bias is not None,
    )
    with torch.no_grad():
        w = conv2d.weight[:, :, None].repeat(1, 1, time_kernel, 1, 1) / time_kernel
        conv3d.weight.copy_(w)
        if conv2d.bias is not None:
            conv3d.bias.copy_(conv2d.bias)
    return conv3d


class Unit3D(nn.Sequential):
    """Conv3d (no bias) -> BatchNorm3d -> ReLU, 'same' padding.

    [B, C, T, H, W] -> [B, O, T/s, H/s, W/s] for stride s.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        padding = tuple(k // 2 for k in kernel)
        super().__init__(
            nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm3d(c_out, eps=1e-3),
            nn.ReLU(inplace=True),
        )


class InceptionBlock3D(nn.Module):
    """I3D "Mixed" block: four branches concatenated on channels.

    [B, C, T, H, W] -> [B, out[0] + out[2] + out[4] + out[5], T, H, W].

    out = (b0, b1_reduce, b1, b2_reduce, b2, b3) channels as in Inception-v1 / kinetics-i3d.
    """

    def __init__(self, c_in: int, out: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(c_in, out[0])
        self.b1 = nn.Sequential(Unit3D(c_in, out[1]), Unit3D(out[1], out[2], (3, 3, 3)))
        self.b2 = nn.Sequential(Unit3D(c_in, out[3]), Unit3D(out[3], out[4], (3, 3, 3)))
        self.b3 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), Unit3D(c_in, out[5]))
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1)


class I3D(nn.Module):
    """Inflated 3D CNN: video [B, T, C, H, W] -> features [B, T', D], pooled [B, D].

    T' = ceil(T / 2); D = 8 x width.
    """

    def __init__(self, cfg: I3DConfig = I3DConfig(), in_channels: int = 3) -> None:
        super().__init__()
        w = cfg.width
        self.stem = nn.Sequential(
            Unit3D(in_channels, w, (3, 5, 5), (1, 2, 2)),  # [B, w, T, H/2, W/2]
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # H/4
            Unit3D(w, w),
            Unit3D(w, 2 * w, (3, 3, 3)),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # H/8
        )
        mixed_a = InceptionBlock3D(2 * w, (w, w, 2 * w, w // 2, w // 2, w // 2))  # 4w channels
        assert mixed_a.out_channels == 4 * w
        mixed_b = InceptionBlock3D(4 * w, (2 * w, 2 * w, 4 * w, w, w, w))  # 8w channels
        assert mixed_b.out_channels == 8 * w
        self.mixed = nn.Sequential(
            mixed_a,
            nn.MaxPool3d(3, stride=2, padding=1),  # T' = ceil(T/2), H/16
            mixed_b,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.dim = cfg.dim
        self.cfg = cfg

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode clips.

        Args:
            video: float [B, T, C, H, W] in [0, 1] (H, W >= 16).

        Returns:
            dict: features float [B, T', D] (spatially averaged), pooled float [B, D].
        """
        x = video.transpose(1, 2) * 2.0 - 1.0  # [B, C, T, H, W] in [-1, 1]
        x = self.mixed(self.stem(x))  # [B, D, T', H', W']
        features = self.dropout(x.mean(dim=(3, 4)).transpose(1, 2))  # [B, T', D]
        return {"features": features, "pooled": features.mean(1)}
