"""Bi-Level Routing Attention (BRA, BiFormer, CVPR 2023) and BiFormer's global attention with LePE.

BRA splits the map into `n_win x n_win` regions. Region level: the region descriptors (mean query, mean key)
form a region affinity graph whose `topk` entries per row are the routed regions. Token level: every query
attends to the tokens of its routed regions, through `mmattn.kernels.routed_attention` (no gathered copy of the
keys and values). A depthwise-conv local context enhancement (LePE) of V is added before the output projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from mmattn.kernels import routed_attention
from mmattn.kernels.backends import backend_choices, check_backend

from .hilo import dense_attention

__all__ = ["BiLevelRoutingAttention", "GlobalAttentionLePE"]


def _to_regions(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """NHWC `(B, n_win*h, n_win*w, C)` -> `(B, n_win**2 * h * w, C)`, tokens grouped region by region."""
    batch, height, width, channels = x.shape
    x = x.view(batch, n_win, height // n_win, n_win, width // n_win, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height * width, channels)


def _from_regions(tokens: torch.Tensor, n_win: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `_to_regions` for a padded map of `height x width`."""
    batch, channels = tokens.shape[0], tokens.shape[-1]
    x = tokens.view(batch, n_win, n_win, height // n_win, width // n_win, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, channels)


@register_notrace_module  # torch.fx: the region padding depends on the map size
class BiLevelRoutingAttention(nn.Module):
    """BRA on an NHWC map `(B, H, W, C)` (already normalized), as in the released BiFormer-T/S/B.

    `n_win`: regions per side (S); `topk`: routed regions per query region (k); `side_dwconv`: LePE kernel size.
    The scale is `dim ** -0.5` (BiFormer's full-width scale) unless `qk_scale` is given; routing is computed on
    detached descriptors (`diff_routing=False`). Maps whose sides are not multiples of `n_win` are zero-padded to
    them after the qkv projection, and the padded tokens are masked from the routing descriptors and from attention
    (the official `auto_pad` instead attends to unmasked bias vectors). `backend`: `"triton"`, `"torch"`
    (the official gather algorithm) or `"auto"`.
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, topk: int = 4, qk_scale: float | None = None,
                 side_dwconv: int = 5, backend: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if n_win < 1 or not 1 <= topk <= n_win ** 2:
            raise ValueError(f"need n_win >= 1 and 1 <= topk <= n_win**2, got n_win={n_win}, topk={topk}")
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = qk_scale or dim ** -0.5
        self.backend = check_backend(backend, backend_choices("routed"))
        self.qkv = nn.Linear(dim, 3 * dim, **dd)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd)
        self.wo = nn.Linear(dim, dim, **dd)

    def route(self, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, region_tokens: int) -> torch.Tensor:
        """Region-level routing: the `topk` key regions of each query region `(B, n_win**2, topk)` from the
        affinity of mean query and mean key (over real tokens), on detached inputs."""
        q_r, k_r = (t.detach().unflatten(1, (-1, region_tokens)).sum(2) for t in (q, k))  # padding is zero
        if valid is None:
            q_r, k_r = q_r / region_tokens, k_r / region_tokens
            affinity = (q_r * self.scale) @ k_r.transpose(-1, -2)
        else:
            counts = valid.view(-1, region_tokens).sum(-1).to(q_r.dtype)  # (n_win**2,)
            q_r, k_r = (t / counts.clamp_min(1)[:, None] for t in (q_r, k_r))
            affinity = ((q_r * self.scale) @ k_r.transpose(-1, -2)).masked_fill(counts == 0, float("-inf"))
        return affinity.topk(self.topk, dim=-1).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be an NHWC map (B, H, W, {self.dim}), got shape {tuple(x.shape)}")
        batch, height, width, channels = x.shape
        qkv = self.qkv(x)
        v_map = qkv[..., 2 * channels:].permute(0, 3, 1, 2)
        lepe = self.lepe(v_map).permute(0, 2, 3, 1)
        region_h, region_w = math.ceil(height / self.n_win), math.ceil(width / self.n_win)
        padded_h, padded_w = region_h * self.n_win, region_w * self.n_win
        valid = None
        if (padded_h, padded_w) != (height, width):
            qkv = F.pad(qkv, (0, 0, 0, padded_w - width, 0, padded_h - height))
            valid = torch.zeros(1, padded_h, padded_w, 1, dtype=torch.bool, device=x.device)
            valid[:, :height, :width] = True
            valid = _to_regions(valid, self.n_win).view(1, -1)
        tokens = _to_regions(qkv, self.n_win)  # (B, L, 3C), region by region
        region_tokens = region_h * region_w
        q, k, v = tokens.split(channels, dim=-1)
        indices = self.route(q, k, valid, region_tokens)
        heads = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = routed_attention(*heads, indices, q_region_size=region_tokens, kv_valid=valid, scale=self.scale,
                               backend=self.backend)
        out = _from_regions(out.transpose(1, 2).reshape(batch, -1, channels), self.n_win, padded_h, padded_w)
        return self.wo(out[:, :height, :width] + lepe)


class GlobalAttentionLePE(nn.Module):
    """BiFormer's last-stage attention (`AttentionLePE`): global multi-head self-attention on an NHWC map, plus a
    depthwise-conv LePE of the attention input, added before the output projection."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, side_dwconv: int = 5,
                 backend: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.backend = check_backend(backend, backend_choices("routed"))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).view(batch, -1, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        out = dense_attention(qkv[0], qkv[1], qkv[2], self.scale, self.backend)
        lepe = self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, channels) + lepe)
