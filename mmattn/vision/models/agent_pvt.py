"""Agent-PVT (Agent Attention, ECCV 2024): PVTv1-style pyramid with global agent attention in every block.

Official code: LeapLabTHU/Agent-Attention, agent_transformer/models/agent_pvt.py (``PVT_LA_SR_RATIOS=1111``: no
spatial reduction, attention type ``AAAA``). Each stage: patch-embed conv (4x4 s4, then 2x2 s2) + LN, a learned
position embedding, agent blocks. There is no final norm: the head reads the mean of the stage-4 tokens.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, resample_abs_pos_embed
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from torch import nn
from torch.nn.init import trunc_normal_

from mmattn.kernels.backends import check_backend

from ..layers.agent import AGENT_BACKENDS, AgentBlock, resize_grid_bias
from ._classifier import PooledClassifierMixin
from ._factory import agent_attention_cfg, build_getter_model
from ._stages import StagesMixin, stage_drop_path_rates

__all__ = ["AgentPVT", "checkpoint_filter_fn"]


_layer_norm = partial(nn.LayerNorm, eps=1e-6)


@register_notrace_function  # torch.fx: whether to resize depends on the grid
def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], trained_grid: tuple[int, int]) -> torch.Tensor:
    """The position embedding ``(1, h*w, C)`` of the trained grid, bilinearly resized to ``grid`` if it differs."""
    if grid == trained_grid:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, grid, trained_grid, num_prefix_tokens=0, interpolation="bilinear")


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv + LN; pads the image to a multiple of the patch so no border pixel is dropped."""

    def __init__(
        self, in_chans: int, dim: int, patch_size: int, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, **dd)
        self.norm = _layer_norm(dim, **dd)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[-2], x.shape[-1])


class AgentPVTStage(nn.Module):
    """Patch embedding, position embedding (bilinearly resized for other grids), agent blocks; NCHW in and out."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        agent_num: int,
        mlp_ratio: float,
        patch_size: int,
        grid_size: tuple[int, int],
        drop_path: list[float],
        qkv_bias: bool,
        drop_rate: float,
        backend: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grid_size = grid_size
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], dim, **dd))
        trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            AgentBlock(
                dim,
                num_heads,
                agent_num,
                grid_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=dp,
                norm_layer=_layer_norm,
                backend=backend,
                **dd,
            )
            for dp in drop_path
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self.patch_embed(x)
        x = self.pos_drop(x + resize_pos_embed(self.pos_embed, hw, self.grid_size))
        for block in self.blocks:
            x = checkpoint(block, x, hw) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x, hw)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *hw)


class AgentPVT(StagesMixin, PooledClassifierMixin, nn.Module):
    """Agent-PVT classifier/backbone: ``forward_features`` gives the stage-4 map (B, C4, H/32, W/32).

    ``backend``: "auto" (agent attention with fewer launches) or "torch" (the official order).
    """

    trailing_downsample = False
    stem_pattern = r"^stages\.0\.(?:patch_embed|pos_embed)"
    downsample_pattern = r"(?:patch_embed|pos_embed)"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        agent_nums: tuple[int, ...] = (9, 16, 49, 49),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_backend(backend, AGENT_BACKENDS)
        self._init_classifier(in_chans, num_classes, global_pool, embed_dims[-1])
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        rates = stage_drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList()
        in_chs, reduction = in_chans, 1
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            patch_size = 4 if i == 0 else 2
            reduction *= patch_size
            grid = (-(-img_size[0] // reduction), -(-img_size[1] // reduction))
            self.stages.append(
                AgentPVTStage(
                    in_chs, dim, depth, num_heads[i], agent_nums[i], mlp_ratios[i], patch_size, grid, rates[i],
                    qkv_bias, drop_rate, backend, **dd,
                )
            )  # fmt: skip
            in_chs = dim
        self.feature_info = self._stage_feature_info(embed_dims)
        self._init_head(drop_rate, **dd)
        self.apply(self._init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.pos_embed" for i in range(len(self.stages))}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentPVT) -> dict[str, torch.Tensor]:
    """Official Agent-PVT (``ckpt['model']``) -> ours: ``patch_embed{i}/pos_embed{i}/block{i}`` become
    ``stages.{i-1}.*``, ``attn.q`` + ``attn.kv`` are fused into ``attn.qkv`` (rows q | k | v), and position
    embeddings and row/column agent biases are resized to the model's grids."""
    state_dict = state_dict.get("model", state_dict)
    if not any(key.startswith("patch_embed1.") for key in state_dict):
        return state_dict
    out = {}
    for official, value in state_dict.items():
        if official.endswith((".attn.kv.weight", ".attn.kv.bias")):
            continue
        if ".attn.q." in official:
            value = torch.cat([value, state_dict[official.replace(".attn.q.", ".attn.kv.")]], dim=0)
        key = re.sub(r"^(patch_embed|pos_embed|block)(\d)", _stage_prefix, official).replace(".attn.q.", ".attn.qkv.")
        if not key.startswith("stages."):
            out[key] = value
            continue
        stage = model.stages[int(key.split(".")[1])]
        if key.endswith(".pos_embed") and value.shape != stage.pos_embed.shape:
            old = _square_grid(value.shape[1])
            value = resample_abs_pos_embed(value, stage.grid_size, old, num_prefix_tokens=0, interpolation="bilinear")
        out[key] = resize_grid_bias(key.rsplit(".", 1)[-1], value, stage.grid_size)
    return out


def _stage_prefix(match: re.Match) -> str:
    name = "blocks" if match[1] == "block" else match[1]
    return f"stages.{int(match[2]) - 1}.{name}"


def _square_grid(num_tokens: int) -> tuple[int, int]:
    side = round(num_tokens**0.5)
    return side, side


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPVT:
    return build_getter_model(AgentPVT, variant, pretrained, checkpoint_filter_fn, 4, **kwargs)


def _cfg(file_id: str, **kwargs) -> dict:
    return agent_attention_cfg(file_id, first_conv="stages.0.patch_embed.proj", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "agent_pvt_tiny.in1k": _cfg("13fdf0e0a7c5498c934f"),
        "agent_pvt_small.in1k": _cfg("36b8be9a8863456685a3"),
        "agent_pvt_medium.in1k": _cfg("4d00ecacf18b45f9b88c"),
        "agent_pvt_medium.in1k_256": _cfg("654df734121643b19c52", input_size=(3, 256, 256), pool_size=(8, 8)),
        "agent_pvt_large.in1k": _cfg("040cfe0cfbbe4762ad09"),
    }
)


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs) -> AgentPVT:
    model_args = {"depths": (2, 2, 2, 2), "drop_path_rate": 0.1}
    return _create_agent_pvt("agent_pvt_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs) -> AgentPVT:
    model_args = {"depths": (3, 4, 6, 3), "drop_path_rate": 0.1}
    return _create_agent_pvt("agent_pvt_small", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs) -> AgentPVT:
    model_args = {"depths": (3, 4, 18, 3), "drop_path_rate": 0.3}
    return _create_agent_pvt("agent_pvt_medium", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs) -> AgentPVT:
    model_args = {"depths": (3, 8, 27, 3), "drop_path_rate": 0.3}
    return _create_agent_pvt("agent_pvt_large", pretrained, **dict(model_args, **kwargs))
