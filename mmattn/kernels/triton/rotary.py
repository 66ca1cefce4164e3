"""Triton kernel of the interleaved rotary embedding: each row of `head_dim` channels is read once, its pairs
rotated in float32 and written once (`rotary_kernel`); the backward is the same kernel rotating back."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import ceil_div, next_power_of_2, rows_contiguous

ELEMENTS_BLOCK = 4096
"""Channels per program (whole rows of head_dim)."""


@triton.jit
def rotary_kernel(
    X, COS, SIN, OUT, rows, size1, size2,
    sx0, sx1, sx2, so0, so1, so2, sc0, sc1, sc2, sc3, ss0, ss1, ss2, ss3,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """OUT row = the pairs (x[2i], x[2i+1]) of X's row (i0, i1, i2) rotated by the angle with cosine COS[.., 2i] and
    sine SIN[.., 2i+1] (by its negative if INVERSE); X, OUT rows have a unit channel stride, COS/SIN any strides
    (0 where broadcast)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    i2 = r % size2
    i1 = (r // size2) % size1
    i0 = (r // size2 // size1).to(tl.int64)
    i1, i2 = i1.to(tl.int64), i2.to(tl.int64)
    pair = tl.arange(0, BLOCK_HALF)
    ok = live[:, None] & (pair < HALF)[None, :]
    channels = (2 * pair)[None, :, None] + tl.arange(0, 2)[None, None, :]
    x = tl.load(X + (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None, None] + channels, mask=ok[:, :, None])
    even, odd = tl.split(x.to(tl.float32))
    cos_row = (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None]
    cos = tl.load(COS + cos_row + (2 * pair * sc3)[None, :], mask=ok).to(tl.float32)
    sin_row = (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None]
    sin = tl.load(SIN + sin_row + ((2 * pair + 1) * ss3)[None, :], mask=ok).to(tl.float32)
    if INVERSE:
        sin = -sin
    out = tl.join(even * cos - odd * sin, even * sin + odd * cos)
    tl.store(OUT + (i0 * so0 + i1 * so1 + i2 * so2)[:, None, None] + channels, out.to(OUT.dtype.element_ty),
             mask=ok[:, :, None])


def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool,
                   out: torch.Tensor) -> torch.Tensor:
    """x `(d0, d1, d2, head_dim)` rotated by cos/sin (broadcastable to x) into `out` (a unit channel stride)."""
    x = rows_contiguous(x)
    cos, sin = cos.expand(x.shape), sin.expand(x.shape)
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    head_dim = x.shape[-1]
    block_half = next_power_of_2(head_dim // 2)
    block_r = max(1, ELEMENTS_BLOCK // (2 * block_half))
    if rows:
        rotary_kernel[(ceil_div(rows, block_r),)](
            x, cos, sin, out, rows, x.shape[1], x.shape[2], *x.stride()[:3], *out.stride()[:3], *cos.stride(),
            *sin.stride(), HALF=head_dim // 2, BLOCK_HALF=block_half, INVERSE=inverse, BLOCK_R=block_r, num_warps=4,
        )
    return out
