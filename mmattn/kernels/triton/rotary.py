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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr, BLOCK_R: tl.constexpr,
    COS_PAIRS: tl.constexpr, SIN_PAIRS: tl.constexpr,
):
    """OUT row = the pairs (x[2i], x[2i+1]) of X's row (i0, i1, i2) rotated by the angle with cosine COS[.., 2i] and
    sine SIN[.., 2i+1] (COS[.., i], SIN[.., i] where COS_PAIRS / SIN_PAIRS: tables of one entry per pair), by its
    negative if INVERSE. Rows are loaded whole (X, OUT: unit channel stride; COS/SIN any strides, 0 where
    broadcast) and split into pairs in registers."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i2 = r % size2
    i1 = (r // size2) % size1
    i0 = (r // size2 // size1).to(tl.int64)
    i1, i2 = i1.to(tl.int64), i2.to(tl.int64)
    channel = tl.arange(0, BLOCK_D)
    ok = (r < rows)[:, None] & (channel < HEAD_DIM)[None, :]
    x = tl.load(X + (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None] + channel[None, :], mask=ok)
    cos_channel = channel // 2 if COS_PAIRS else channel
    sin_channel = channel // 2 if SIN_PAIRS else channel
    cos = tl.load(COS + (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None] + (cos_channel * sc3)[None, :], mask=ok)
    sin = tl.load(SIN + (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None] + (sin_channel * ss3)[None, :], mask=ok)
    even, odd = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_R, BLOCK_D // 2, 2)))
    cos, _ = tl.split(tl.reshape(cos.to(tl.float32), (BLOCK_R, BLOCK_D // 2, 2)))
    _, sin = tl.split(tl.reshape(sin.to(tl.float32), (BLOCK_R, BLOCK_D // 2, 2)))
    if INVERSE:
        sin = -sin
    out = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_R, BLOCK_D))
    tl.store(OUT + (i0 * so0 + i1 * so1 + i2 * so2)[:, None] + channel[None, :], out.to(OUT.dtype.element_ty),
             mask=ok)


def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, out: torch.Tensor,
                   cos_pairs: bool, sin_pairs: bool) -> torch.Tensor:
    """x `(d0, d1, d2, head_dim)` rotated by cos/sin (broadcastable to x, or where `cos_pairs` / `sin_pairs` to x
    with one entry per channel pair) into `out` (a unit channel stride)."""
    x = rows_contiguous(x)
    cos, sin = (table.expand(*x.shape[:-1], table.shape[-1] if per_pair else x.shape[-1])
                for table, per_pair in ((cos, cos_pairs), (sin, sin_pairs)))
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    head_dim = x.shape[-1]
    block_d = next_power_of_2(head_dim)
    block_r = max(1, ELEMENTS_BLOCK // block_d)
    if rows:
        rotary_kernel[(ceil_div(rows, block_r),)](
            x, cos, sin, out, rows, x.shape[1], x.shape[2], *x.stride()[:3], *out.stride()[:3], *cos.stride(),
            *sin.stride(), HEAD_DIM=head_dim, BLOCK_D=block_d, INVERSE=inverse, BLOCK_R=block_r, COS_PAIRS=cos_pairs,
            SIN_PAIRS=sin_pairs, num_warps=4,
        )
    return out
