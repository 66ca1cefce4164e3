"""LITv2: Fast Vision Transformers with HiLo Attention (Pan et al., NeurIPS 2022), as timm models.

Stages 1-2 are attention-free (LN + MLP with a 3x3 depthwise conv); stage 3 uses HiLo attention with window 2 and
alpha 0.9; stage 4 is HiLo with window 1, i.e. plain multi-head self-attention. Stages are joined by deformable
token merging (DTM: a 2x2 stride-2 deformable conv + BN + GELU, offsets from a zero-initialized 2x2 conv), done
with torchvision's `deform_conv2d`. `checkpoint_filter_fn` loads the official `ziplab/LITv2` checkpoints.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_module
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
)
from torch import nn
from torchvision.ops import deform_conv2d

from ..layers.hilo import HiLoAttention
from ._classifier import PooledClassifierMixin
from ._factory import imagenet_cfg
from ._stages import StagesMixin, stage_drop_path_rates

__all__ = ["DeformableTokenMerging", "LITv2", "checkpoint_filter_fn"]


@register_notrace_module  # torch.fx: torchvision's deform_conv2d checks its inputs' shapes and dtypes
class DeformableTokenMerging(nn.Module):
    """DTM: `GELU(BN(DeformConv2x2_s2(x)))` on an NCHW map; odd sides are zero-padded to even first."""

    def __init__(self, in_dim: int, out_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_dim, out_dim, 2, stride=2, **dd)
        self.conv_offset = nn.Conv2d(in_dim, 2 * 2 * 2, 2, stride=2, **dd)  # (dy, dx) for each of the 2x2 taps
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        self.norm = nn.BatchNorm2d(out_dim, **dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        offset = self.conv_offset(x)
        # torchvision's deform_conv2d has no bfloat16 kernels: half-precision maps merge in float32, then cast back.
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        merged = deform_conv2d(x.to(dtype), offset.to(dtype), self.conv.weight.to(dtype), self.conv.bias.to(dtype),
                               stride=2)
        return self.act(self.norm(merged.to(x.dtype)))


class DWMlp(nn.Module):
    """`fc1 -> DWConv3x3 -> GELU -> fc2` on an NHWC map."""

    def __init__(self, dim: int, hidden: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(self.fc1(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(x))


class LITv2Block(nn.Module):
    """`x + DropPath(HiLo(LN x))` (when `attn` is set) and `x + DropPath(DWMlp(LN x))`, NHWC."""

    def __init__(self, dim: int, num_heads: int, window_size: int, alpha: float, mlp_ratio: float, drop_path: float,
                 has_attn: bool, backend: str,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if has_attn:
            self.norm1 = nn.LayerNorm(dim, **dd)
            self.attn = HiLoAttention(dim, num_heads, qkv_bias=True, window_size=window_size, alpha=alpha,
                                      backend=backend, **dd)
        self.has_attn = has_attn
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = DWMlp(dim, int(dim * mlp_ratio), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_attn:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LITv2Stage(nn.Module):
    """DTM from the previous stage (none in stage 1), then the blocks; NCHW in and out."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, window_size: int, alpha: float,
                 mlp_ratio: float, drop_path: list[float], backend: str,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = nn.Identity() if in_dim == dim else DeformableTokenMerging(in_dim, dim, **dd)
        self.blocks = nn.Sequential(*(
            LITv2Block(dim, num_heads, window_size, alpha, mlp_ratio, drop_path[i], window_size > 0, backend,
                       **dd)
            for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """4x4 stride-4 conv, then LayerNorm over channels; NCHW out."""

    def __init__(self, in_chans: int, dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.proj = nn.Conv2d(in_chans, dim, 4, stride=4, **dd)
        self.norm = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LITv2(StagesMixin, PooledClassifierMixin, nn.Module):
    """LITv2 backbone and classifier (NCHW input of any size; stage maps at strides 4, 8, 16, 32)."""

    trailing_downsample = False

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_sizes: tuple[int, ...] = (0, 0, 2, 1),
        alpha: float = 0.9,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self._init_classifier(in_chans, num_classes, global_pool, dims[-1])
        self.patch_embed = PatchEmbed(in_chans, embed_dim, **dd)
        rates = stage_drop_path_rates(drop_path_rate, depths)
        self.stages = nn.Sequential(*(
            LITv2Stage(dims[max(0, i - 1)], dims[i], depths[i], num_heads[i], window_sizes[i], alpha, mlp_ratio,
                       rates[i], backend, **dd)
            for i in range(len(depths))))
        self.feature_info = self._stage_feature_info(dims)
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self._init_head(drop_rate, **dd)
        self.apply(self._init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _official_rename(key: str) -> str:
    """One official LITv2 key -> this model's key (the official DTM after stage i is our stage i+1's downsample)."""
    match = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
    if match:
        rest = re.sub(r"^dconv\.conv_offset\.", "conv_offset.", match.group(2))
        rest = re.sub(r"^dconv\.", "conv.", rest)
        rest = re.sub(r"^norm_layer\.", "norm.", rest)
        return f"stages.{int(match.group(1)) + 1}.downsample.{rest}"
    key = re.sub(r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", key)
    return re.sub(r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv.", key)


def checkpoint_filter_fn(state_dict: dict, model: LITv2) -> dict[str, torch.Tensor]:
    """Converts an official LITv2 checkpoint (`{"model": state_dict}` or the bare state dict) to this model."""
    state_dict = state_dict.get("model", state_dict)
    if "patch_embed.proj.weight" in state_dict and any(k.startswith("stages.") for k in state_dict):
        return state_dict  # already in this model's layout
    return {_official_rename(key): value for key, value in state_dict.items()}


def _create_litv2(variant: str, pretrained: bool = False, **kwargs) -> LITv2:
    return build_model_with_cfg(
        LITv2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": (0, 1, 2, 3), "flatten_sequential": True}, **kwargs)


def _cfg(url: str, **kwargs) -> dict:
    return imagenet_cfg(url, license="apache-2.0", paper_ids="arXiv:2205.13213", **kwargs)


_RELEASES = "https://github.com/ziplab/LITv2/releases/download/v1.0/"
default_cfgs = generate_default_cfgs({
    "litv2_small.in1k": _cfg(_RELEASES + "litv2_s.pth"),
    "litv2_medium.in1k": _cfg(_RELEASES + "litv2_m.pth"),
    "litv2_base.in1k": _cfg(_RELEASES + "litv2_b.pth"),
    "litv2_base.in1k_384": _cfg(_RELEASES + "litv2_b_384.pth", input_size=(3, 384, 384), pool_size=(12, 12),
                                crop_pct=1.0),
})


@register_model
def litv2_small(pretrained: bool = False, **kwargs) -> LITv2:
    args = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)}
    return _create_litv2("litv2_small", pretrained, **{**args, **kwargs})


@register_model
def litv2_medium(pretrained: bool = False, **kwargs) -> LITv2:
    args = {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)}
    return _create_litv2("litv2_medium", pretrained, **{**args, **kwargs})


@register_model
def litv2_base(pretrained: bool = False, **kwargs) -> LITv2:
    args = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)}
    return _create_litv2("litv2_base", pretrained, **{**args, **kwargs})
