"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023), as timm models.

Stages 1-3 use Bi-Level Routing Attention (BRA) over 7x7 regions with top-k 1, 4, 16 (each query sees 64 tokens at
224); stage 4 is global attention with 8 heads. Blocks: 3x3 depthwise positional conv, then pre-norm attention and
MLP (LayerNorm eps 1e-6). `checkpoint_filter_fn` loads the official `rayleizhu/BiFormer` checkpoints.
"""

from __future__ import annotations

import re

import torch
from timm.layers import DropPath, Mlp
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
)
from torch import nn

from ..layers.bra import BiLevelRoutingAttention, GlobalAttentionLePE
from ._classifier import PooledClassifierMixin
from ._factory import imagenet_cfg
from ._stages import StagesMixin, stage_drop_path_rates

__all__ = ["BiFormer", "checkpoint_filter_fn"]


class BiFormerBlock(nn.Module):
    """`x + DWConv3x3(x)`, then `x + DropPath(attn(LN x))` and `x + DropPath(MLP(LN x))`; NCHW in and out."""

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, mlp_ratio: float, drop_path: float,
                 backend: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win=n_win, topk=topk, backend=backend, **dd)
        else:  # the released models mark global attention with topk=-2
            self.attn = GlobalAttentionLePE(dim, num_heads=8, backend=backend, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class BiFormerStage(nn.Module):
    """A downsampler (3x3 stride-2 conv + BN; none in stage 1, which follows the stem) and the blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, n_win: int, topk: int, mlp_ratio: float,
                 drop_path: list[float], backend: str, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = nn.Identity() if in_dim == dim else nn.Sequential(
            nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, **dd), nn.BatchNorm2d(dim, **dd))
        self.blocks = nn.Sequential(*(
            BiFormerBlock(dim, num_heads, n_win, topk, mlp_ratio, drop_path[i], backend, **dd)
            for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class BiFormer(StagesMixin, PooledClassifierMixin, nn.Module):
    """BiFormer backbone and classifier (NCHW input of any size; stage maps at strides 4, 8, 16, 32)."""

    trailing_downsample = False
    stem_pattern = r"^stem"

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (2, 2, 8, 2),
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        num_heads: tuple[int, ...] = (2, 4, 8, 8),
        topks: tuple[int, ...] = (1, 4, 16, -2),
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self._init_classifier(in_chans, num_classes, global_pool, embed_dims[-1])
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(embed_dims[0] // 2, **dd), nn.GELU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(embed_dims[0], **dd),
        )
        rates = stage_drop_path_rates(drop_path_rate, depths)
        self.stages = nn.Sequential(*(
            BiFormerStage(embed_dims[max(0, i - 1)], embed_dims[i], depths[i], num_heads[i], n_win, topks[i],
                          mlp_ratio, rates[i], backend, **dd)
            for i in range(len(depths))))
        self.feature_info = self._stage_feature_info(embed_dims)
        self.norm = nn.BatchNorm2d(self.num_features, **dd)
        self._init_head(drop_rate, **dd)
        self.apply(self._init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


_OFFICIAL_RENAMES = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.attn\.qkv\.qkv\.", ".attn.qkv."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
)


def checkpoint_filter_fn(state_dict: dict, model: BiFormer) -> dict[str, torch.Tensor]:
    """Converts an official BiFormer checkpoint (`{"model": state_dict}` or the bare state dict) to this model."""
    state_dict = state_dict.get("model", state_dict)
    if "stem.0.weight" in state_dict:  # already in this model's layout
        return state_dict
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OFFICIAL_RENAMES:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_model_with_cfg(
        BiFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": (0, 1, 2, 3), "flatten_sequential": True}, **kwargs)


def _cfg(url: str) -> dict:
    return imagenet_cfg(url, first_conv="stem.0", license="mit", paper_ids="arXiv:2303.08810")


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvCh{}/root/content"
default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(_ONEDRIVE.format("HEOoGkgwgQzEDlM")),
    "biformer_small.in1k": _cfg(_ONEDRIVE.format("HDyM-x9KWRBZ832")),
    "biformer_base.in1k": _cfg(_ONEDRIVE.format("HI_XPhoadjaNxtO")),
})


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    args = {"depths": (2, 2, 8, 2), "embed_dims": (64, 128, 256, 512), "num_heads": (2, 4, 8, 8)}
    return _create_biformer("biformer_tiny", pretrained, **{**args, **kwargs})


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    args = {"depths": (4, 4, 18, 4), "embed_dims": (64, 128, 256, 512), "num_heads": (2, 4, 8, 8)}
    return _create_biformer("biformer_small", pretrained, **{**args, **kwargs})


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    args = {"depths": (4, 4, 18, 4), "embed_dims": (96, 192, 384, 768), "num_heads": (3, 6, 12, 8)}
    return _create_biformer("biformer_base", pretrained, **{**args, **kwargs})
