"""Agent-Swin (Agent Attention, ECCV 2024): Swin-v1 whose first blocks per stage use global agent attention.

Official code: LeapLabTHU/Agent-Attention, agent_transformer/models/agent_swin.py. Agent ('A') blocks clamp the
56-token window to the stage's map, i.e. one global window; the other ('B') blocks are Swin W-MSA / SW-MSA with a
7x7 window and relative position bias. ``agent_depths`` gives the number of leading agent blocks per stage
(T: AAAB, S: AABB, B: AA, AA, 2 of 18, B). Maps that are not a multiple of the window are padded with the padded
keys masked, not attended.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_module
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from torch import nn
from torch.nn.init import trunc_normal_

from mmattn.kernels.backends import check_backend

from ..layers.agent import AGENT_BACKENDS, AgentBlock, resize_grid_bias
from ..layers.checked_backend import CheckedBackend
from ..layers.inference_cache import InferenceCache
from ._classifier import PooledClassifierMixin
from ._factory import agent_attention_cfg, build_getter_model
from ._stages import StagesMixin, stage_drop_path_rates

__all__ = ["AgentSwinTransformer", "checkpoint_filter_fn"]


def _window_labels(size: int, window: int, shift: int) -> torch.Tensor:
    """Swin's shifted-window region label of every position of one padded axis (0 everywhere without shift)."""
    labels = torch.zeros(size, dtype=torch.long)
    if shift:
        labels[size - window : size - shift] = 1
        labels[size - shift :] = 2
    return labels


@register_notrace_module  # torch.fx: the windows, shifts and padding depend on the map size
class WindowAttention(nn.Module):
    """Swin (shifted) window attention with relative position bias; padded keys are masked, not attended.

    Keys ``qkv``, ``proj``, ``relative_position_bias_table`` as in Swin v1. ``backend``: "auto" (in inference, fused
    SDPA with the masked bias kept between forwards; in training the explicit softmax, which the H100 ran faster than
    SDPA's bias gradient on 49-token windows) or "torch" (explicit softmax, the official path).
    """

    backend = CheckedBackend(AGENT_BACKENDS)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        qkv_bias: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.window_size, self.shift_size = num_heads, window_size, shift_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.backend = backend
        self._bias_cache = InferenceCache()

    def _relative_bias(self, wh: int, ww: int, device: torch.device) -> torch.Tensor:
        """(heads, wh*ww, wh*ww) bias from the table of the trained window (smaller windows use its centre)."""
        ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        span = 2 * self.window_size - 1
        index = (ys[:, None] - ys[None] + self.window_size - 1) * span + (xs[:, None] - xs[None] + self.window_size - 1)
        return self.relative_position_bias_table[index].permute(2, 0, 1)

    def _windows(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Window size (Swin clamps it to small maps), shift and padded map size of an h x w map."""
        wh, ww = min(self.window_size, h), min(self.window_size, w)
        sh = self.shift_size if h > self.window_size else 0
        sw = self.shift_size if w > self.window_size else 0
        return (wh, ww), (sh, sw), (-(-h // wh) * wh, -(-w // ww) * ww)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        (h, w), m = hw, self.num_heads
        (wh, ww), (sh, sw), (hp, wp) = self._windows(h, w)
        x = F.pad(x.reshape(b, h, w, c), (0, 0, 0, wp - w, 0, hp - h))
        x = torch.roll(x, (-sh, -sw), dims=(1, 2))
        windows = x.reshape(b, hp // wh, wh, wp // ww, ww, c).transpose(2, 3).reshape(b, -1, wh * ww, c)
        num_windows = windows.shape[1]
        q, k, v = self.qkv(windows).reshape(b, num_windows, wh * ww, 3, m, c // m).permute(3, 0, 1, 4, 2, 5).unbind(0)
        q, k, v = (t.reshape(b, num_windows * m, wh * ww, -1) for t in (q, k, v))
        table = [self.relative_position_bias_table]
        if self.backend == "auto" and InferenceCache.applies(table):  # one launch on the kept, masked bias
            key = (h, w, x.device, q.dtype)
            bias = self._bias_cache.get(key, table, lambda: self._window_bias(h, w, x.device).to(q.dtype))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:  # explicit softmax: SDPA's bias gradient on 49-token windows measured slower on the H100
            bias = self._window_bias(h, w, x.device)
            out = torch.softmax((q * self.scale) @ k.transpose(-2, -1) + bias, dim=-1) @ v
        out = out.reshape(b, num_windows, m, wh * ww, -1).transpose(2, 3).reshape(b, hp // wh, wp // ww, wh, ww, c)
        out = torch.roll(out.transpose(2, 3).reshape(b, hp, wp, c), (sh, sw), dims=(1, 2))
        return self.proj(out[:, :h, :w].reshape(b, n, c))

    def _window_bias(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(1, windows*heads, N, N): relative position bias, -inf where the shifted-window mask forbids a key."""
        (wh, ww), (sh, sw), (hp, wp) = self._windows(h, w)
        bias = self._relative_bias(wh, ww, device).unsqueeze(0)  # (1, heads, N, N)
        if sh or sw or hp != h or wp != w:
            bias = bias.masked_fill(~self._allowed(h, w, hp, wp, wh, ww, sh, sw, device).unsqueeze(1), float("-inf"))
        num_windows = (hp // wh) * (wp // ww)
        return bias.expand(num_windows, -1, -1, -1).reshape(1, num_windows * self.num_heads, wh * ww, wh * ww)

    def _allowed(self, h, w, hp, wp, wh, ww, sh, sw, device) -> torch.Tensor:
        """(windows, N, N): same shifted-window region, and a real key unless the query itself is padding."""
        labels = _window_labels(hp, wh, sh)[:, None] * 3 + _window_labels(wp, ww, sw)[None]
        real = torch.zeros(hp, wp, dtype=torch.bool)
        real[:h, :w] = True
        real = torch.roll(real, (-sh, -sw), dims=(0, 1))

        def windows(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(hp // wh, wh, wp // ww, ww).transpose(1, 2).reshape(-1, wh * ww)

        labels, real = windows(labels).to(device), windows(real).to(device)
        same_region = labels[:, :, None] == labels[:, None, :]
        return same_region & (real[:, None, :] | ~real[:, :, None])


class SwinBlock(nn.Module):
    """Swin-v1 block: ``x += DropPath(W-MSA(LN x)); x += DropPath(MLP(LN x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop_path: float,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = WindowAttention(dim, num_heads, window_size, shift_size, backend=backend, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Swin-v1 merging: concat the 2x2 neighbours (order (0,0), (1,0), (0,1), (1,1)), LN(4C), Linear(4C, 2C); NHWC in
    and out."""

    def __init__(self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(4 * dim, **dd)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class AgentSwinStage(nn.Module):
    """``agent_depth`` agent blocks, then Swin blocks (shift on odd block indices), then (optionally) merging. NHWC
    maps: ``forward`` returns (the map before merging, the stage output)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        agent_depth: int,
        num_heads: int,
        agent_num: int,
        grid_size: tuple[int, int],
        window_size: int,
        mlp_ratio: float,
        drop_path: list[float],
        downsample: bool,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        blocks = []
        for i in range(depth):
            if i < agent_depth:
                blocks.append(
                    AgentBlock(dim, num_heads, agent_num, grid_size, mlp_ratio=mlp_ratio, drop_path=drop_path[i],
                               backend=backend, **dd)
                )  # fmt: skip
            else:
                shift = 0 if i % 2 == 0 or min(grid_size) <= window_size else window_size // 2
                blocks.append(
                    SwinBlock(dim, num_heads, window_size, shift, mlp_ratio, drop_path[i], backend, **dd)
                )
        self.blocks = nn.ModuleList(blocks)
        self.downsample = PatchMerging(dim, **dd) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, c = x.shape
        x, hw = x.reshape(b, h * w, c), (h, w)
        for block in self.blocks:
            x = checkpoint(block, x, hw) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x, hw)
        x = x.reshape(b, h, w, c)
        return x, (x if self.downsample is None else self.downsample(x))


class AgentSwinTransformer(StagesMixin, PooledClassifierMixin, nn.Module):
    """Agent-Swin classifier and backbone; ``forward_features`` returns the normalized last map, channels-last
    ``(B, H/32, W/32, 8C)`` as timm's Swin.

    ``backend``: "auto" (agent attention with fewer launches, fused SDPA for window
    attention in inference) or "torch" (the official explicit softmax).
    """

    stages_attr = "layers"
    output_fmt = "NHWC"
    pool_dims = (1, 2)

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        agent_depths: tuple[int, ...] = (2, 2, 6, 0),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        agent_nums: tuple[int, ...] = (9, 16, 49, 49),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_backend(backend, AGENT_BACKENDS)
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self._init_classifier(in_chans, num_classes, global_pool, dims[-1])
        if any(a > d for a, d in zip(agent_depths, depths)):
            raise ValueError(f"agent_depths must not exceed depths {depths}, got {agent_depths}")
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, 4, stride=4, **dd)
        self.patch_embed.norm = nn.LayerNorm(embed_dim, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = stage_drop_path_rates(drop_path_rate, depths)
        grids = [-(-img_size // (4 * 2**i)) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            AgentSwinStage(
                dims[i], depths[i], agent_depths[i], num_heads[i], agent_nums[i], (grids[i], grids[i]), window_size,
                mlp_ratio, rates[i], downsample=i < len(depths) - 1, backend=backend, **dd,
            )
            for i in range(len(depths))
        )  # fmt: skip
        self.feature_info = self._stage_feature_info(dims)
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self._init_head(drop_rate, **dd)
        self.apply(self._init_weights)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(F.pad(x, (0, -x.shape[-1] % 4, 0, -x.shape[-2] % 4)))
        return self.pos_drop(self.patch_embed.norm(x.permute(0, 2, 3, 1)))

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentSwinTransformer) -> dict[str, torch.Tensor]:
    """Official Agent-Swin (``ckpt['model']``) -> ours: drop the ``relative_position_index`` / ``attn_mask``
    buffers (recomputed here) and resize the row/column agent biases to the model's grids."""
    state_dict = state_dict.get("model", state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if key.startswith("layers.") and ".attn." in key:
            layer = model.layers[int(key.split(".")[1])]
            block = layer.blocks[int(key.split(".")[3])]
            if isinstance(block, AgentBlock):
                value = resize_grid_bias(key.rsplit(".", 1)[-1], value, block.attn.grid_size)
        out[key] = value
    return out


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    return build_getter_model(AgentSwinTransformer, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def _cfg(file_id: str) -> dict:
    return agent_attention_cfg(file_id, crop_pct=0.9)


default_cfgs = generate_default_cfgs(
    {
        "agent_swin_tiny.in1k": _cfg("a2ddc1190c224f768a41"),
        "agent_swin_small.in1k": _cfg("f607172c9fea4d6e99bb"),
        "agent_swin_base.in1k": _cfg("4fcd2d0114bb490483c3"),
    }
)


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    model_args = {"embed_dim": 96, "depths": (2, 2, 6, 2), "agent_depths": (2, 2, 6, 0), "num_heads": (3, 6, 12, 24),
                  "drop_path_rate": 0.2}  # fmt: skip
    return _create_agent_swin("agent_swin_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    model_args = {"embed_dim": 96, "depths": (2, 2, 18, 2), "agent_depths": (2, 2, 0, 0), "num_heads": (3, 6, 12, 24),
                  "drop_path_rate": 0.3}  # fmt: skip
    return _create_agent_swin("agent_swin_small", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    model_args = {"embed_dim": 128, "depths": (2, 2, 18, 2), "agent_depths": (2, 2, 2, 0), "num_heads": (4, 8, 16, 32),
                  "drop_path_rate": 0.5}  # fmt: skip
    return _create_agent_swin("agent_swin_base", pretrained, **dict(model_args, **kwargs))
