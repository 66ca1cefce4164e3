"""Triton kernel of the rotary embedding: each row of `head_dim` channels is read once, its pairs rotated in float32
and written once (`rotary_kernel`); the backward is the same kernel rotating back. Pairs are interleaved channels
(2i, 2i+1) or, with HALVES, the two halves' channels (i, i + head_dim / 2)."""

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
    COS_PAIRS: tl.constexpr, SIN_PAIRS: tl.constexpr, HALVES: tl.constexpr,
):
    """OUT row = the pairs of X's row (i0, i1, i2) rotated, by the negative angle if INVERSE. Interleaved pairs
    (x[2i], x[2i+1]) turn by the angle with cosine COS[.., 2i] and sine SIN[.., 2i+1] (COS[.., i], SIN[.., i] where
    COS_PAIRS / SIN_PAIRS: tables of one entry per pair); with HALVES, pairs (x[i], x[i + HEAD_DIM / 2]) by COS[.., i]
    and SIN[.., i] (tables of either length). X, OUT: unit channel stride; COS/SIN any strides, 0 where broadcast.
    BLOCK_D covers a row (interleaved, split into pairs in registers) or half a row (HALVES)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i2 = r % size2
    i1 = (r // size2) % size1
    i0 = (r // size2 // size1).to(tl.int64)
    i1, i2 = i1.to(tl.int64), i2.to(tl.int64)
    channel = tl.arange(0, BLOCK_D)
    x_row = X + (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    out_row = OUT + (i0 * so0 + i1 * so1 + i2 * so2)[:, None]
    cos_row = COS + (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None]
    sin_row = SIN + (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None]
    if HALVES:
        ok = (r < rows)[:, None] & (channel < HEAD_DIM // 2)[None, :]
        first = tl.load(x_row + channel[None, :], mask=ok).to(tl.float32)
        second = tl.load(x_row + HEAD_DIM // 2 + channel[None, :], mask=ok).to(tl.float32)
        cos = tl.load(cos_row + (channel * sc3)[None, :], mask=ok).to(tl.float32)
        sin = tl.load(sin_row + (channel * ss3)[None, :], mask=ok).to(tl.float32)
    else:
        ok = (r < rows)[:, None] & (channel < HEAD_DIM)[None, :]
        x = tl.load(x_row + channel[None, :], mask=ok)
        cos = tl.load(cos_row + ((channel // 2 if COS_PAIRS else channel) * sc3)[None, :], mask=ok)
        sin = tl.load(sin_row + ((channel // 2 if SIN_PAIRS else channel) * ss3)[None, :], mask=ok)
        first, second = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_R, BLOCK_D // 2, 2)))
        cos, _ = tl.split(tl.reshape(cos.to(tl.float32), (BLOCK_R, BLOCK_D // 2, 2)))
        _, sin = tl.split(tl.reshape(sin.to(tl.float32), (BLOCK_R, BLOCK_D // 2, 2)))
    if INVERSE:
        sin = -sin
    first, second = first * cos - second * sin, first * sin + second * cos
    if HALVES:
        tl.store(out_row + channel[None, :], first.to(OUT.dtype.element_ty), mask=ok)
        tl.store(out_row + HEAD_DIM // 2 + channel[None, :], second.to(OUT.dtype.element_ty), mask=ok)
    else:
        out = tl.reshape(tl.join(first, second), (BLOCK_R, BLOCK_D))
        tl.store(out_row + channel[None, :], out.to(OUT.dtype.element_ty), mask=ok)


def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, out: torch.Tensor,
                   cos_pairs: bool, sin_pairs: bool, halves: bool) -> torch.Tensor:
    """x `(d0, d1, d2, head_dim)` rotated by cos/sin (broadcastable to x, or where `cos_pairs` / `sin_pairs` to x
    with one entry per channel pair) into `out` (a unit channel stride); `halves` pairs channel i with
    i + head_dim / 2 instead of 2i with 2i + 1."""
    x = rows_contiguous(x)
    cos, sin = (table.expand(*x.shape[:-1], table.shape[-1] if per_pair else x.shape[-1])
                for table, per_pair in ((cos, cos_pairs), (sin, sin_pairs)))
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    head_dim = x.shape[-1]
    block_d = next_power_of_2(head_dim // 2 if halves else head_dim)
    block_r = max(1, ELEMENTS_BLOCK // (2 * block_d if halves else block_d))
    if rows:
        rotary_kernel[(ceil_div(rows, block_r),)](
            x, cos, sin, out, rows, x.shape[1], x.shape[2], *x.stride()[:3], *out.stride()[:3], *cos.stride(),
            *sin.stride(), HEAD_DIM=head_dim, BLOCK_D=block_d, INVERSE=inverse, BLOCK_R=block_r, COS_PAIRS=cos_pairs,
            SIN_PAIRS=sin_pairs, HALVES=halves, num_warps=4,
        )
    return out
