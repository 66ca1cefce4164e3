"""HiLo attention (LITv2, "Fast Vision Transformers with HiLo Attention", NeurIPS 2022).

The heads are split in two groups: Hi-Fi heads attend inside non-overlapping `s x s` windows (high frequencies),
Lo-Fi heads let every token attend to the `s x s`-average-pooled map (low frequencies). The outputs are
concatenated, Hi-Fi first, each group with its own output projection. With `window_size=1` every head is Lo-Fi
and HiLo is plain multi-head self-attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from mmattn.kernels import reference, routed_attention
from mmattn.kernels.backends import backend_choices, check_backend

__all__ = ["HiLoAttention", "dense_attention"]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """Full softmax attention `(B, H, L, D)`: the fused SDPA kernel, or with `backend="torch"` the official
    explicit `softmax(q k^T * scale) v` (the reference path, scores materialized)."""
    if backend == "torch":
        return reference.masked_attention(q, k, v, None, scale)[0]
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NHWC map -> `(B, n_windows * window**2, C)` tokens window by window, zero-padded at the bottom/right to a
    multiple of `window`, and the bool validity of those tokens `(1, n_windows * window**2)` (None if unpadded)."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = -height % window, -width % window
    valid = None
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        valid = torch.zeros(height + pad_h, width + pad_w, dtype=torch.bool, device=x.device)
        valid[:height, :width] = True
        valid = valid.view((height + pad_h) // window, window, (width + pad_w) // window, window)
        valid = valid.permute(0, 2, 1, 3).reshape(1, -1)
    rows, cols = (height + pad_h) // window, (width + pad_w) // window
    x = x.view(batch, rows, window, cols, window, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, -1, channels), valid


def window_reverse(tokens: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: `(B, n_windows * window**2, C)` -> NHWC `(B, height, width, C)` (cropped)."""
    rows, cols = math.ceil(height / window), math.ceil(width / window)
    x = tokens.view(tokens.shape[0], rows, cols, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(tokens.shape[0], rows * window, cols * window, -1)[:, :height, :width]


@register_notrace_module  # torch.fx: the window padding depends on the map size
class HiLoAttention(nn.Module):
    """HiLo attention on an NHWC map `(B, H, W, C)`; any H, W (windows are padded and the padding masked).

    `alpha` is the Lo-Fi share of the heads (`int(num_heads * alpha)` Lo-Fi heads); `window_size` is `s`. Hi-Fi
    windows run through `mmattn.kernels.routed_attention` (each window routed to itself); Lo-Fi through SDPA.
    `backend="torch"` gives the official algorithm (explicit softmax), `"triton"`/`"auto"` the fused kernels.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 window_size: int = 2, alpha: float = 0.5, backend: str = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        head_dim = dim // num_heads
        self.window_size = window_size
        self.backend = check_backend(backend, backend_choices("routed"))
        self.scale = qk_scale or head_dim ** -0.5
        self.l_heads = num_heads if window_size == 1 else int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        self.head_dim = head_dim
        self.l_dim, self.h_dim = self.l_heads * head_dim, self.h_heads * head_dim
        if self.l_heads > 0:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias, **dd)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias, **dd)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim, **dd)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias, **dd)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim, **dd)

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        """Window attention of the Hi-Fi heads: NHWC in, NHWC `(B, H, W, h_dim)` out."""
        batch, height, width, _ = x.shape
        tokens, valid = window_partition(self.h_qkv(x), self.window_size)
        qkv = tokens.view(batch, -1, 3, self.h_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        n_windows = tokens.shape[1] // self.window_size ** 2
        self_routing = torch.arange(n_windows, device=x.device).view(1, n_windows, 1)
        out = routed_attention(qkv[0], qkv[1], qkv[2], self_routing, q_region_size=self.window_size ** 2,
                               kv_valid=valid, scale=self.scale, backend=self.backend)
        out = window_reverse(out.transpose(1, 2).reshape(batch, -1, self.h_dim), self.window_size, height, width)
        return self.h_proj(out)

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of every token to the average-pooled map (Lo-Fi heads): NHWC in, `(B, H, W, l_dim)` out."""
        batch, height, width, _ = x.shape
        q = self.l_q(x).view(batch, -1, self.l_heads, self.head_dim).transpose(1, 2)
        pooled = x
        if self.window_size > 1:  # partial windows at the border average their real pixels only
            pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), self.window_size, ceil_mode=True, count_include_pad=False)
            pooled = pooled.permute(0, 2, 3, 1)
        kv = self.l_kv(pooled).view(batch, -1, 2, self.l_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = dense_attention(q, kv[0], kv[1], self.scale, self.backend)
        return self.l_proj(out.transpose(1, 2).reshape(batch, height, width, self.l_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be an NHWC map (B, H, W, C), got shape {tuple(x.shape)}")
        if self.h_heads == 0:
            return self.lofi(x)
        if self.l_heads == 0:
            return self.hifi(x)
        return torch.cat([self.hifi(x), self.lofi(x)], dim=-1)
