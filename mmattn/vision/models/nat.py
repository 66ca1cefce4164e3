"""NAT and DiNAT (Neighborhood Attention Transformer, CVPR 2023; Dilated NAT): hierarchical NA backbones.

Official code: SHI-Labs/Neighborhood-Attention-Transformer, classification/nat.py and dinat.py. A conv tokenizer
(two 3x3 s2 convs, no norm between, then LN), four levels of pre-norm NA blocks (optional layer scale), a
3x3 s2 conv downsampler + LN *inside* each of the first three levels, final LN, mean pool, linear head. DiNAT is
NAT with a dilation per block (every other block dilated to cover the whole map at 224). Module names are the
official ones, so the official (raw) state dicts load as they are.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from torch import nn

from mmattn.kernels.backends import backend_choices, check_backend

from ..layers.neighborhood import NeighborhoodAttention
from ._classifier import PooledClassifierMixin
from ._factory import build_getter_model, imagenet_cfg
from ._stages import StagesMixin, stage_drop_path_rates

__all__ = ["NAT", "checkpoint_filter_fn"]


class ConvTokenizer(nn.Module):
    """Two overlapping 3x3 stride-2 convs (no norm/activation between) and a LayerNorm; NCHW in, NHWC out."""

    def __init__(
        self, in_chans: int, embed_dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1, **dd),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1, **dd),
        )
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """3x3 stride-2 conv (no bias) doubling the channels, then LayerNorm; NHWC in and out."""

    def __init__(self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm = nn.LayerNorm(2 * dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATBlock(nn.Module):
    """``x += DropPath(g1 * NA(LN x)); x += DropPath(g2 * MLP(LN x))``; g1, g2 (layer scale) only if set."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int,
        mlp_ratio: float,
        drop_path: float,
        layer_scale: float | None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = NeighborhoodAttention(dim, num_heads, kernel_size, dilation=dilation, backend=backend, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn(self.norm1(x))
        x = x + self.drop_path(attn if self.gamma1 is None else self.gamma1 * attn)
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(mlp if self.gamma2 is None else self.gamma2 * mlp)


class NATLevel(nn.Module):
    """NA blocks, then (levels 0-2) the downsampler; ``forward`` returns (pre-downsample map, level output)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilations: list[int],
        mlp_ratio: float,
        drop_path: list[float],
        layer_scale: float | None,
        downsample: bool,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.blocks = nn.ModuleList(
            NATBlock(dim, num_heads, kernel_size, d, mlp_ratio, dp, layer_scale, backend, **dd)
            for d, dp in zip(dilations, drop_path)
        )
        self.downsample = ConvDownsampler(dim, **dd) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
        return x, (x if self.downsample is None else self.downsample(x))


class NAT(StagesMixin, PooledClassifierMixin, nn.Module):
    """NAT / DiNAT classifier and backbone. ``dilations``: one list per level (None: NAT, all 1). ``backend``:
    the ``neighborhood_attention`` backend ("auto": fused Triton on CUDA; "flex"; "torch": the unfused reference).

    ``forward_features`` returns the normalized last map, channels-last ``(B, H/32, W/32, 8C)``.
    """

    stages_attr = "levels"
    output_fmt = "NHWC"
    pool_dims = (1, 2)

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: tuple[int, ...] = (3, 4, 18, 5),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        kernel_size: int = 7,
        dilations: list[list[int]] | None = None,
        mlp_ratio: float = 3.0,
        layer_scale: float | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_backend(backend, backend_choices("na"))
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self._init_classifier(in_chans, num_classes, global_pool, dims[-1])
        dilations = [[1] * depth for depth in depths] if dilations is None else [list(d) for d in dilations]
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(f"dilations must hold one list of {list(depths)} dilations per level, got {dilations}")
        self.patch_embed = ConvTokenizer(in_chans, embed_dim, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = stage_drop_path_rates(drop_path_rate, depths)
        self.levels = nn.ModuleList(
            NATLevel(
                dims[i], num_heads[i], kernel_size, dilations[i], mlp_ratio, rates[i], layer_scale,
                downsample=i < len(depths) - 1, backend=backend, **dd,
            )
            for i in range(len(depths))
        )  # fmt: skip
        self.feature_info = self._stage_feature_info(dims)
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self._init_head(drop_rate, **dd)
        self.apply(self._init_weights)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"rpb"}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith(".rpb")}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(x))

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: NAT) -> dict[str, torch.Tensor]:
    """Official NAT/DiNAT files are raw state dicts with our key names; unwrap ``model``/``state_dict`` containers
    written by training scripts (timm's, the official one's)."""
    return state_dict.get("state_dict_ema", state_dict.get("state_dict", state_dict.get("model", state_dict)))


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    return build_getter_model(NAT, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def _cfg(url: str) -> dict:
    return imagenet_cfg(url, first_conv="patch_embed.proj.0", license="mit")


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/{}.pth"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/{}_in1k_224.pth"
_SIZES = ("mini", "tiny", "small", "base")
# DiNAT at 224: dilated blocks alternate with plain ones, the dilation covering the level's map (56/7, 28/7, 14/7).
_DINAT_DILATIONS_224 = ([1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5)
_DINAT_MINI_DILATIONS_224 = ([1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5)

default_cfgs = generate_default_cfgs(
    {
        **{f"nat_{size}.in1k": _cfg(_NAT_URL.format(f"nat_{size}")) for size in _SIZES},
        **{f"dinat_{size}.in1k": _cfg(_DINAT_URL.format(f"dinat_{size}")) for size in _SIZES},
    }
)


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    model_args = {"embed_dim": 64, "depths": (3, 4, 6, 5), "num_heads": (2, 4, 8, 16), "mlp_ratio": 3}
    return _create_nat("nat_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    model_args = {"embed_dim": 64, "depths": (3, 4, 18, 5), "num_heads": (2, 4, 8, 16), "mlp_ratio": 3}
    return _create_nat("nat_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    model_args = {"embed_dim": 96, "depths": (3, 4, 18, 5), "num_heads": (3, 6, 12, 24), "mlp_ratio": 2,
                  "layer_scale": 1e-5, "drop_path_rate": 0.3}  # fmt: skip
    return _create_nat("nat_small", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    model_args = {"embed_dim": 128, "depths": (3, 4, 18, 5), "num_heads": (4, 8, 16, 32), "mlp_ratio": 2,
                  "layer_scale": 1e-5, "drop_path_rate": 0.5}  # fmt: skip
    return _create_nat("nat_base", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    model_args = {"embed_dim": 64, "depths": (3, 4, 6, 5), "num_heads": (2, 4, 8, 16), "mlp_ratio": 3,
                  "dilations": _DINAT_MINI_DILATIONS_224}  # fmt: skip
    return _create_nat("dinat_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    model_args = {"embed_dim": 64, "depths": (3, 4, 18, 5), "num_heads": (2, 4, 8, 16), "mlp_ratio": 3,
                  "dilations": _DINAT_DILATIONS_224}  # fmt: skip
    return _create_nat("dinat_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    model_args = {"embed_dim": 96, "depths": (3, 4, 18, 5), "num_heads": (3, 6, 12, 24), "mlp_ratio": 2,
                  "drop_path_rate": 0.3, "dilations": _DINAT_DILATIONS_224}  # fmt: skip
    return _create_nat("dinat_small", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    model_args = {"embed_dim": 128, "depths": (3, 4, 18, 5), "num_heads": (4, 8, 16, 32), "mlp_ratio": 2,
                  "layer_scale": 1e-5, "drop_path_rate": 0.5, "dilations": _DINAT_DILATIONS_224}  # fmt: skip
    return _create_nat("dinat_base", pretrained, **dict(model_args, **kwargs))
