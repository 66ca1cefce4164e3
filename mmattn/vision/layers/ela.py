"""ELA: Efficient Local Attention (Xu & Wan, arXiv 2403.01123).

Strip pooling along each spatial axis, one shared 1D convolution and one shared GroupNorm for both strips, and a
sigmoid gate per row and per column: ``y = x * sigmoid(GN(conv(mean_W x))) * sigmoid(GN(conv(mean_H x)))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import register_notrace_module
from torch import nn

__all__ = ["ELA", "ELA_VARIANTS", "ELAVariant"]


@dataclass(frozen=True)
class ELAVariant:
    """One of the paper's four versions: conv kernel size, conv channels per group, GroupNorm groups."""

    kernel_size: int
    channels_per_conv_group: int | None  # None: depthwise (one channel per group)
    norm_groups: int


ELA_VARIANTS: dict[str, ELAVariant] = {
    "T": ELAVariant(kernel_size=5, channels_per_conv_group=None, norm_groups=32),
    "B": ELAVariant(kernel_size=7, channels_per_conv_group=None, norm_groups=16),
    "S": ELAVariant(kernel_size=5, channels_per_conv_group=8, norm_groups=16),
    "L": ELAVariant(kernel_size=7, channels_per_conv_group=8, norm_groups=16),
}


@register_notrace_module  # torch.fx: forward checks the map's shape
class ELA(nn.Module):
    """Efficient Local Attention gate on an NCHW feature map (variants "T", "B", "S", "L").

    Parameters: ``k * C * (C / g) + 2C`` (conv without bias, GroupNorm affine).
    """

    def __init__(
        self,
        channels: int,
        variant: str = "S",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if variant not in ELA_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(ELA_VARIANTS)}, got {variant!r}")
        spec = ELA_VARIANTS[variant]
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if channels % spec.norm_groups:
            raise ValueError(
                f"channels must be divisible by the {spec.norm_groups} GroupNorm groups of ELA-{variant}, "
                f"got {channels}"
            )
        per_group = spec.channels_per_conv_group or 1
        if channels % per_group:
            raise ValueError(f"channels must be divisible by {per_group} for ELA-{variant}, got {channels}")
        self.variant = variant
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv1d(
            channels,
            channels,
            spec.kernel_size,
            padding=spec.kernel_size // 2,
            groups=channels // per_group,
            bias=False,
            **factory,
        )
        self.norm = nn.GroupNorm(spec.norm_groups, channels, **factory)

    def _strip_gate(self, strip: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.norm(self.conv(strip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.conv.in_channels:
            raise ValueError(f"x must be (batch, {self.conv.in_channels}, height, width), got shape {tuple(x.shape)}")
        row_gate = self._strip_gate(x.mean(dim=3))  # (B, C, H)
        column_gate = self._strip_gate(x.mean(dim=2))  # (B, C, W)
        return x * row_gate.unsqueeze(3) * column_gate.unsqueeze(2)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"
