"""Fused neighborhood attention (FNA) in Triton: forward and an atomic-free backward, 1D/2D/3D.

Every problem is treated as 3D (missing leading axes have extent 1 and kernel 1). Tokens are row-major
`(B, H, L0 * L1 * L2, D)`. A program owns a multi-dimensional query tile of `TQ0 x TQ1 x TQ2` positions of
one dilation group per axis (so its keys are one strided sub-grid) and walks the bounding box of its
queries' windows in key tiles of `TK0 x TK1 x TK2`, gathering rows by address. Windows are monotone in the
query position, so the box is given by the first and last query of the tile, and a key tile lying inside
every query's window ("full tile") skips the element-wise mask. The backward mirrors FlashAttention-2: dK/dV
per key tile over the queries whose windows reach it (found by bisection), dQ per query tile as in the
forward; no program writes another's output, so it needs no atomics. With a relative position bias (NAT's
`rpb`) the dQ kernel also writes dS in neighbor layout `(B, H, N, prod(K))` for the bias gradient.

`forward` and `backward` launch the kernels on flat tokens; `attend` is the differentiable entry point the public
`neighborhood_attention` calls (custom ops under torch.compile, see `..autograd`). The pattern travels to them
as 15 ints (`pattern_ints`): extents, kernel sizes, dilations, strides and causal flags, each padded to three axes.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..autograd import kernel_op
from ..neighborhood import Neighborhood, eager_cache
from .common import (
    LOG2E,
    backward_lse2,
    load_rows,
    online_softmax_step,
    program_heads,
    softmax_output,
    store_rows,
)
from .launch import (
    backward_delta,
    ceil_div,
    dot_precision,
    head_dim_block,
    next_power_of_2,
    row_strides,
    rows_contiguous,
    size_bucket,
    tuned,
)

__all__ = ["attend", "backward", "forward", "neighborhood_op"]


@triton.jit
def _window(p, n, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr):
    """Inclusive window [lo, hi] of group coordinate p on a group of n positions (see `axis_window`)."""
    if CAUSAL:
        leader = tl.minimum(p // S * S + S - 1, n - 1)
        lo = tl.maximum(leader - K + 1, 0)
        hi = p
    else:
        leader = tl.minimum(p // S * S + S // 2, n - 1)
        center = tl.maximum(tl.minimum(leader, n - 1 - (K // 2 + K % 2 - 1)), K // 2)
        lo = center - K // 2
        hi = center + (K // 2 + K % 2 - 1)
    return lo, hi


@triton.jit
def _window_box(f, end, n, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr, T: tl.constexpr):
    """Windows of the first and last query of a tile starting at f and cut at `end`:
    (first lo, first hi, last lo, last hi)."""
    first_lo, first_hi = _window(f, n, K, S, CAUSAL)
    last_lo, last_hi = _window(tl.minimum(f + T - 1, end), n, K, S, CAUSAL)
    return first_lo, first_hi, last_lo, last_hi


@triton.jit
def _tile_origin(t, L, D: tl.constexpr, T: tl.constexpr):
    """Tile `t` of an axis tiled per dilation group: (group, group length, first group coordinate)."""
    tiles = tl.cdiv(tl.cdiv(L, D), T)
    g = t // tiles
    return g, (L - g + D - 1) // D, (t % tiles) * T


@triton.jit
def _num_tiles(L, D: tl.constexpr, T: tl.constexpr):
    return tl.cdiv(tl.cdiv(L, D), T) * D


@triton.jit
def _split3(i, N1, N2):
    """Row-major (i0, i1, i2) of a flat index over a (*, N1, N2) grid."""
    return i // (N1 * N2), (i // N2) % N1, i % N2


@triton.jit
def _tokens(p0, p1, p2, g0, g1, g2, L1, L2, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """Flat row-major token index of group coordinates p (in groups g)."""
    return ((p0 * D0 + g0) * L1 + (p1 * D1 + g1)) * L2 + (p2 * D2 + g2)


@triton.jit
def _inside(kp0, kp1, kp2, lo0, lo1, lo2, hi0, hi1, hi2):
    """Key coordinates kp inside the query windows [lo, hi] on all axes (arguments broadcast to 2D)."""
    return (kp0 >= lo0) & (kp0 <= hi0) & (kp1 >= lo1) & (kp1 <= hi1) & (kp2 >= lo2) & (kp2 <= hi2)


@triton.jit
def _bias(Rpb, kp0, kp1, kp2, p0, p1, p2, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """Relative position bias (scaled to base 2) at offset (key - query) per axis; indices clamped in range
    (pairs outside the window are masked by the caller). Arguments broadcast to 2D."""
    i0 = tl.minimum(tl.maximum(kp0 - p0 + K0 - 1, 0), 2 * K0 - 2)
    i1 = tl.minimum(tl.maximum(kp1 - p1 + K1 - 1, 0), 2 * K1 - 2)
    i2 = tl.minimum(tl.maximum(kp2 - p2 + K2 - 1, 0), 2 * K2 - 2)
    return tl.load(Rpb + (i0 * (2 * K1 - 1) + i1) * (2 * K2 - 1) + i2).to(tl.float32) * LOG2E


@triton.jit
def _covers(first, last, lo_last, hi_first):
    """A tile of keys [first, last] lies in every window of a query range (monotone windows: the last query's
    start and the first query's end bound them all)."""
    return (lo_last <= first) & (last <= hi_first)


@triton.jit
def _first_reaching(first_key, n, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr, STEPS: tl.constexpr):
    """Smallest group coordinate p whose window ends at or after `first_key` (bisection; n if none)."""
    lo_b = first_key * 0
    hi_b = n
    for _ in range(STEPS):
        mid = (lo_b + hi_b) // 2
        _, end = _window(mid, n, K, S, CAUSAL)
        right = (end < first_key) & (lo_b < hi_b)
        lo_b = tl.where(right, mid + 1, lo_b)
        hi_b = tl.where(right | (lo_b >= hi_b), hi_b, mid)
    return lo_b


@triton.jit
def _last_reaching(last_key, n, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr, STEPS: tl.constexpr):
    """Largest group coordinate p whose window starts at or before `last_key` (bisection)."""
    lo_b = last_key * 0
    hi_b = n
    for _ in range(STEPS):
        mid = (lo_b + hi_b) // 2
        start, _ = _window(mid, n, K, S, CAUSAL)
        right = (start <= last_key) & (lo_b < hi_b)
        lo_b = tl.where(right, mid + 1, lo_b)
        hi_b = tl.where(right | (lo_b >= hi_b), hi_b, mid)
    return lo_b - 1


@triton.jit
def _tile(pid, L0, L1, L2, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
          T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Tile `pid` of the grid tiled per dilation group: groups g, group lengths n, first coordinates f."""
    t0, t1, t2 = _split3(pid, _num_tiles(L1, D1, T1), _num_tiles(L2, D2, T2))
    g0, n0, f0 = _tile_origin(t0, L0, D0, T0)
    g1, n1, f1 = _tile_origin(t1, L1, D1, T1)
    g2, n2, f2 = _tile_origin(t2, L2, D2, T2)
    return g0, g1, g2, n0, n1, n2, f0, f1, f2


@triton.jit
def _query_rows(f0, f1, f2, g0, g1, g2, n0, n1, n2, L1, L2,
                K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                D2: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, C0: tl.constexpr,
                C1: tl.constexpr, C2: tl.constexpr, TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr):
    """A query tile's group coordinates p, which rows exist, their tokens and their windows [lo, hi]."""
    l0, l1, l2 = _split3(tl.arange(0, TQ0 * TQ1 * TQ2), TQ1, TQ2)
    p0, p1, p2 = f0 + l0, f1 + l1, f2 + l2
    rows_ok = (p0 < n0) & (p1 < n1) & (p2 < n2)
    rows = _tokens(p0, p1, p2, g0, g1, g2, L1, L2, D0, D1, D2)
    lo0, hi0 = _window(p0, n0, K0, S0, C0)
    lo1, hi1 = _window(p1, n1, K1, S1, C1)
    lo2, hi2 = _window(p2, n2, K2, S2, C2)
    return p0, p1, p2, rows_ok, rows, lo0, lo1, lo2, hi0, hi1, hi2


@triton.jit
def _tile_count(first0, first1, first2, last0, last1, last2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Tiles of T covering the box [first, last] per axis: (tiles on axis 1, tiles on axis 2, total)."""
    n1 = tl.cdiv(last1 - first1 + 1, T1)
    n2 = tl.cdiv(last2 - first2 + 1, T2)
    return n1, n2, tl.cdiv(last0 - first0 + 1, T0) * n1 * n2


@triton.jit
def _nth_tile(it, n1, n2, first0, first1, first2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Start coordinates of tile `it` of a box walked row-major from `first`."""
    j0, j1, j2 = _split3(it, n1, n2)
    return first0 + j0 * T0, first1 + j1 * T1, first2 + j2 * T2


@triton.jit
def _row_statistics(Lse, Delta, row_base, rows, rows_ok):
    """The backward's per-row log2-sum-exp and delta. Missing rows and empty rows (lse = -inf) take +inf, so
    their probabilities are 0."""
    lse = tl.load(Lse + row_base + rows, mask=rows_ok, other=float("inf"))
    return backward_lse2(lse), tl.load(Delta + row_base + rows, mask=rows_ok, other=0.0)


@triton.jit
def _full(s0, s1, s2, last_lo0, last_lo1, last_lo2, first_hi0, first_hi1, first_hi2,
          T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """The key tile starting at s lies inside every window of the query range (see `_covers`), on all axes."""
    return (_covers(s0, s0 + T0 - 1, last_lo0, first_hi0) & _covers(s1, s1 + T1 - 1, last_lo1, first_hi1)
            & _covers(s2, s2 + T2 - 1, last_lo2, first_hi2))


@triton.jit
def _key_tile(k_base, v_base, s0, s1, s2, m0, m1, m2, last_hi0, last_hi1, last_hi2, g0, g1, g2, L1, L2, offs_d,
              stride_kn, stride_vn, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """Gathers the key tile starting at s (positions past the box's end read as zeros): (kp0, kp1, kp2, k, v)."""
    kp0, kp1, kp2 = s0 + m0, s1 + m1, s2 + m2
    cols_ok = (kp0 <= last_hi0) & (kp1 <= last_hi1) & (kp2 <= last_hi2)
    cols = _tokens(kp0, kp1, kp2, g0, g1, g2, L1, L2, D0, D1, D2)
    k = load_rows(k_base, cols, cols_ok, offs_d, stride_kn, HEAD_DIM)
    v = load_rows(v_base, cols, cols_ok, offs_d, stride_vn, HEAD_DIM)
    return kp0, kp1, kp2, k, v


@triton.jit(do_not_specialize=["L0", "L1", "L2", "size_bucket"])
def _fwd_kernel(
    Q, K, V, Out, Lse, Rpb,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    num_heads, L0, L1, L2, sm_scale, size_bucket,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr,
    TK2: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    g0, g1, g2, n0, n1, n2, f0, f1, f2 = _tile(tl.program_id(0), L0, L1, L2, D0, D1, D2, TQ0, TQ1, TQ2)
    p0, p1, p2, rows_ok, rows, lo0, lo1, lo2, hi0, hi1, hi2 = _query_rows(
        f0, f1, f2, g0, g1, g2, n0, n1, n2, L1, L2, K0, K1, K2, D0, D1, D2, S0, S1, S2, C0, C1, C2, TQ0, TQ1, TQ2)
    # Window bounds of the tile's first and last query per axis.
    first_lo0, first_hi0, last_lo0, last_hi0 = _window_box(f0, n0 - 1, n0, K0, S0, C0, TQ0)
    first_lo1, first_hi1, last_lo1, last_hi1 = _window_box(f1, n1 - 1, n1, K1, S1, C1, TQ1)
    first_lo2, first_hi2, last_lo2, last_hi2 = _window_box(f2, n2 - 1, n2, K2, S2, C2, TQ2)
    nk1, nk2, n_tiles = _tile_count(first_lo0, first_lo1, first_lo2, last_hi0, last_hi1, last_hi2, TK0, TK1, TK2)

    offs_d = tl.arange(0, BLOCK_D)
    m0, m1, m2 = _split3(tl.arange(0, TK0 * TK1 * TK2), TK1, TK2)
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, rows_ok, offs_d, stride_qn, HEAD_DIM)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    rpb_h = Rpb + h * (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([TQ0 * TQ1 * TQ2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TQ0 * TQ1 * TQ2], dtype=tl.float32)
    acc = tl.zeros([TQ0 * TQ1 * TQ2, BLOCK_D], dtype=tl.float32)
    for it in range(n_tiles):
        s0, s1, s2 = _nth_tile(it, nk1, nk2, first_lo0, first_lo1, first_lo2, TK0, TK1, TK2)
        kp0, kp1, kp2, k, v = _key_tile(k_base, v_base, s0, s1, s2, m0, m1, m2, last_hi0, last_hi1, last_hi2,
                                        g0, g1, g2, L1, L2, offs_d, stride_kn, stride_vn, HEAD_DIM, D0, D1, D2)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_RPB:
            s += _bias(rpb_h, kp0[None, :], kp1[None, :], kp2[None, :], p0[:, None], p1[:, None], p2[:, None],
                       K0, K1, K2)
        full = _full(s0, s1, s2, last_lo0, last_lo1, last_lo2, first_hi0, first_hi1, first_hi2, TK0, TK1, TK2)
        if not full:
            inside = _inside(kp0[None, :], kp1[None, :], kp2[None, :], lo0[:, None], lo1[:, None], lo2[:, None],
                             hi0[:, None], hi1[:, None], hi2[:, None])
            s = tl.where(inside, s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, DOT_PRECISION)

    out, lse = softmax_output(acc, l_i, m_i)
    store_rows(Out + b * stride_ob + h * stride_oh, out.to(Out.dtype.element_ty), rows, rows_ok, offs_d, stride_on,
             HEAD_DIM)
    tl.store(Lse + pid_bh.to(tl.int64) * (L0 * L1 * L2) + rows, lse, mask=rows_ok)


@triton.jit(do_not_specialize=["L0", "L1", "L2", "size_bucket"])
def _dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Rpb, DS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn, stride_dqb, stride_dqh, stride_dqn,
    num_heads, L0, L1, L2, sm_scale, size_bucket,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    WRITE_DS: tl.constexpr, STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr,
    TK2: tl.constexpr,
):
    """dQ per query tile (the forward's walk); with WRITE_DS also dS in neighbor layout for the bias gradient."""
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    g0, g1, g2, n0, n1, n2, f0, f1, f2 = _tile(tl.program_id(0), L0, L1, L2, D0, D1, D2, TQ0, TQ1, TQ2)
    p0, p1, p2, rows_ok, rows, lo0, lo1, lo2, hi0, hi1, hi2 = _query_rows(
        f0, f1, f2, g0, g1, g2, n0, n1, n2, L1, L2, K0, K1, K2, D0, D1, D2, S0, S1, S2, C0, C1, C2, TQ0, TQ1, TQ2)
    first_lo0, first_hi0, last_lo0, last_hi0 = _window_box(f0, n0 - 1, n0, K0, S0, C0, TQ0)
    first_lo1, first_hi1, last_lo1, last_hi1 = _window_box(f1, n1 - 1, n1, K1, S1, C1, TQ1)
    first_lo2, first_hi2, last_lo2, last_hi2 = _window_box(f2, n2 - 1, n2, K2, S2, C2, TQ2)
    nk1, nk2, n_tiles = _tile_count(first_lo0, first_lo1, first_lo2, last_hi0, last_hi1, last_hi2, TK0, TK1, TK2)

    offs_d = tl.arange(0, BLOCK_D)
    m0, m1, m2 = _split3(tl.arange(0, TK0 * TK1 * TK2), TK1, TK2)
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, rows_ok, offs_d, stride_qn, HEAD_DIM)
    do = load_rows(DOut + b * stride_db + h * stride_dh, rows, rows_ok, offs_d, stride_dn, HEAD_DIM)
    row_base = pid_bh.to(tl.int64) * (L0 * L1 * L2)
    lse2, delta = _row_statistics(Lse, Delta, row_base, rows, rows_ok)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    rpb_h = Rpb + h * (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
    ds_rows = DS + (row_base + rows.to(tl.int64)) * (K0 * K1 * K2)
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([TQ0 * TQ1 * TQ2, BLOCK_D], dtype=tl.float32)
    for it in range(n_tiles):
        s0, s1, s2 = _nth_tile(it, nk1, nk2, first_lo0, first_lo1, first_lo2, TK0, TK1, TK2)
        kp0, kp1, kp2, k, v = _key_tile(k_base, v_base, s0, s1, s2, m0, m1, m2, last_hi0, last_hi1, last_hi2,
                                        g0, g1, g2, L1, L2, offs_d, stride_kn, stride_vn, HEAD_DIM, D0, D1, D2)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_RPB:
            s += _bias(rpb_h, kp0[None, :], kp1[None, :], kp2[None, :], p0[:, None], p1[:, None], p2[:, None],
                       K0, K1, K2)
        inside = _inside(kp0[None, :], kp1[None, :], kp2[None, :], lo0[:, None], lo1[:, None], lo2[:, None],
                         hi0[:, None], hi1[:, None], hi2[:, None])
        full = _full(s0, s1, s2, last_lo0, last_lo1, last_lo2, first_hi0, first_hi1, first_hi2, TK0, TK1, TK2)
        if not full:
            s = tl.where(inside, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if WRITE_DS:
            slot = ((kp0[None, :] - lo0[:, None]) * K1 + (kp1[None, :] - lo1[:, None])) * K2 + (kp2[None, :] - lo2[:, None])
            tl.store(ds_rows[:, None] + slot, ds, mask=inside & rows_ok[:, None])

    store_rows(DQ + b * stride_dqb + h * stride_dqh, (dq * sm_scale).to(DQ.dtype.element_ty), rows, rows_ok, offs_d,
             stride_dqn, HEAD_DIM)


@triton.jit(do_not_specialize=["L0", "L1", "L2", "size_bucket"])
def _dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Rpb,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn, num_heads, num_kv_heads, L0, L1, L2, sm_scale, size_bucket,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr,
    TK2: tl.constexpr,
):
    """dK, dV per key tile, over the query tiles of the queries whose windows reach it (inverse neighborhood)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_h = (pid_bh % num_kv_heads).to(tl.int64)
    g0, g1, g2, n0, n1, n2, f0, f1, f2 = _tile(tl.program_id(0), L0, L1, L2, D0, D1, D2, TK0, TK1, TK2)
    m0, m1, m2 = _split3(tl.arange(0, TK0 * TK1 * TK2), TK1, TK2)
    kp0, kp1, kp2 = f0 + m0, f1 + m1, f2 + m2
    cols_ok = (kp0 < n0) & (kp1 < n1) & (kp2 < n2)
    cols = _tokens(kp0, kp1, kp2, g0, g1, g2, L1, L2, D0, D1, D2)
    e0, e1, e2 = tl.minimum(f0 + TK0 - 1, n0 - 1), tl.minimum(f1 + TK1 - 1, n1 - 1), tl.minimum(f2 + TK2 - 1, n2 - 1)
    q_first0 = _first_reaching(f0, n0, K0, S0, C0, STEPS)
    q_first1 = _first_reaching(f1, n1, K1, S1, C1, STEPS)
    q_first2 = _first_reaching(f2, n2, K2, S2, C2, STEPS)
    q_last0 = _last_reaching(e0, n0, K0, S0, C0, STEPS)
    q_last1 = _last_reaching(e1, n1, K1, S1, C1, STEPS)
    q_last2 = _last_reaching(e2, n2, K2, S2, C2, STEPS)
    nq1, nq2, n_tiles = _tile_count(q_first0, q_first1, q_first2, q_last0, q_last1, q_last2, TQ0, TQ1, TQ2)

    offs_d = tl.arange(0, BLOCK_D)
    l0, l1, l2 = _split3(tl.arange(0, TQ0 * TQ1 * TQ2), TQ1, TQ2)
    k = load_rows(K + b * stride_kb + kv_h * stride_kh, cols, cols_ok, offs_d, stride_kn, HEAD_DIM)
    v = load_rows(V + b * stride_vb + kv_h * stride_vh, cols, cols_ok, offs_d, stride_vn, HEAD_DIM)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([TK0 * TK1 * TK2, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([TK0 * TK1 * TK2, BLOCK_D], dtype=tl.float32)
    for g in range(GROUPS):
        h = kv_h * GROUPS + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_db + h * stride_dh
        row_base = (b * num_heads + h) * (L0 * L1 * L2)
        rpb_h = Rpb + h * (2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1)
        for it in range(n_tiles):
            s0, s1, s2 = _nth_tile(it, nq1, nq2, q_first0, q_first1, q_first2, TQ0, TQ1, TQ2)
            p0, p1, p2 = s0 + l0, s1 + l1, s2 + l2
            rows_ok = (p0 <= q_last0) & (p1 <= q_last1) & (p2 <= q_last2)
            rows = _tokens(p0, p1, p2, g0, g1, g2, L1, L2, D0, D1, D2)
            q = load_rows(q_base, rows, rows_ok, offs_d, stride_qn, HEAD_DIM)
            do = load_rows(do_base, rows, rows_ok, offs_d, stride_dn, HEAD_DIM)
            lse2, delta = _row_statistics(Lse, Delta, row_base, rows, rows_ok)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            if HAS_RPB:
                s_t += _bias(rpb_h, kp0[:, None], kp1[:, None], kp2[:, None], p0[None, :], p1[None, :], p2[None, :],
                             K0, K1, K2)
            _, first_hi0, last_lo0, _ = _window_box(s0, q_last0, n0, K0, S0, C0, TQ0)
            _, first_hi1, last_lo1, _ = _window_box(s1, q_last1, n1, K1, S1, C1, TQ1)
            _, first_hi2, last_lo2, _ = _window_box(s2, q_last2, n2, K2, S2, C2, TQ2)
            full = _full(f0, f1, f2, last_lo0, last_lo1, last_lo2, first_hi0, first_hi1, first_hi2, TK0, TK1, TK2)
            if not full:
                lo0, hi0 = _window(p0, n0, K0, S0, C0)
                lo1, hi1 = _window(p1, n1, K1, S1, C1)
                lo2, hi2 = _window(p2, n2, K2, S2, C2)
                inside = _inside(kp0[:, None], kp1[:, None], kp2[:, None], lo0[None, :], lo1[None, :], lo2[None, :],
                                 hi0[None, :], hi1[None, :], hi2[None, :])
                s_t = tl.where(inside, s_t, float("-inf"))
            p_t = tl.math.exp2(s_t - lse2[None, :])
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    store_rows(DK + b * stride_dkb + kv_h * stride_dkh, (dk * sm_scale).to(DK.dtype.element_ty), cols, cols_ok,
               offs_d, stride_dkn, HEAD_DIM)
    store_rows(DV + b * stride_dvb + kv_h * stride_dvh, dv.to(DV.dtype.element_ty), cols, cols_ok, offs_d,
               stride_dvn, HEAD_DIM)


def _config(tq: tuple[int, int, int], tk: tuple[int, int, int], warps: int, stages: int) -> triton.Config:
    names = ("TQ0", "TQ1", "TQ2", "TK0", "TK1", "TK2")
    return triton.Config(dict(zip(names, (*tq, *tk))), num_warps=warps, num_stages=stages)


# Tile shapes per head-dim class, best first (H100). Autotuning compiles every kept tile, seconds each, so each
# class lists only the few that can win: 1D rows, then near-square 2D tiles (in group coordinates, so the bounding
# box of a tile's windows wastes the least; they serve 3D too), then 3D boxes.
NARROW_HEAD_CONFIGS = [  # head dims up to 64 (NAT/DiNAT)
    _config((1, 1, 128), (1, 1, 64), 4, 3), _config((1, 1, 128), (1, 1, 128), 8, 3), _config((1, 1, 64), (1, 1, 64), 4, 3),
    _config((1, 8, 8), (1, 8, 8), 4, 3), _config((1, 8, 16), (1, 8, 8), 4, 3), _config((1, 8, 16), (1, 8, 16), 8, 3),
    # Small kernels (NAT's 7x7): one key tile spans a query tile's whole window box.
    _config((1, 8, 8), (1, 16, 16), 8, 2),
    _config((2, 4, 8), (2, 4, 8), 4, 3), _config((2, 8, 8), (2, 8, 8), 8, 3),
]
# Head dims above 64: 128-position tiles spill registers there, 64-position tiles with 8 warps do not, and the
# 32-position sides suit dQ (query tile) and dK/dV (key tile) (benchmarks/results/kernel_resources.md).
WIDE_HEAD_CONFIGS = [
    _config((1, 1, 64), (1, 1, 64), 8, 2), _config((1, 1, 128), (1, 1, 64), 8, 2),
    _config((1, 8, 16), (1, 8, 16), 8, 2), _config((1, 8, 8), (1, 8, 8), 8, 2), _config((1, 4, 8), (1, 8, 8), 8, 2),
    _config((1, 8, 8), (1, 4, 8), 8, 2),
    _config((2, 4, 8), (2, 4, 8), 8, 2), _config((1, 4, 8), (2, 4, 8), 8, 2), _config((2, 4, 8), (1, 4, 8), 8, 2),
    # Video (30x48x80, window 18x24x24): 2x8x8 boxes attend 62 % of the pairs they visit where 1x8x16 tiles attend
    # 47 %; on the H200 the forward took 70.7 ms with them against 94.3 ms (a pinned-tile probe, 2026-12-05: the
    # committed neighborhood.md predates them).
    _config((2, 8, 8), (2, 8, 8), 8, 2), _config((2, 4, 16), (2, 4, 16), 8, 2),
]
CONFIGS = NARROW_HEAD_CONFIGS + WIDE_HEAD_CONFIGS
INTERPRETER_CONFIGS = [_config((1, 1, 16), (1, 1, 16), 4, 1), _config((1, 4, 4), (1, 4, 4), 4, 1),
                       _config((2, 2, 4), (2, 2, 4), 4, 1)]


def _fallback_tile(extents: list[int]) -> tuple[int, int, int]:
    """A tile of 16 to 64 positions for grids no listed tile fits (e.g. a tiny axis): filled from the last axis."""
    tile = [1, 1, 1]
    for a in (2, 1, 0):
        tile[a] = min(next_power_of_2(extents[a]), max(1, 64 // (tile[0] * tile[1] * tile[2])))
    while tile[0] * tile[1] * tile[2] < 16:
        tile[2] *= 2
    return tuple(tile)


def fits(config: triton.Config, extents: list[int]) -> bool:
    """Whether a tile suits a problem of these (group) extents: 1 on unit axes, no longer than an axis rounded up to
    a power of two, rows (1 x 1 x T) for 1D problems only."""
    tq = [config.kwargs[f"TQ{a}"] for a in range(3)]
    tk = [config.kwargs[f"TK{a}"] for a in range(3)]
    if any(e == 1 and (q, k) != (1, 1) or q > next_power_of_2(e) for e, q, k in zip(extents, tq, tk)):
        return False
    return extents[1] == 1 or tq[1] > 1


def prune_configs(configs, named_args, **kwargs):
    """Keeps the tiles of this head dim's class that suit this problem's dilation groups (`fits`) and fit in shared
    memory."""
    args = {**named_args, **kwargs}
    extents = [-(-args[f"L{a}"] // args[f"D{a}"]) for a in range(3)]
    other_class = NARROW_HEAD_CONFIGS if args["BLOCK_D"] > 64 else WIDE_HEAD_CONFIGS
    kept = []
    for config in configs:
        if config in other_class or not fits(config, extents):
            continue
        m = config.kwargs["TQ0"] * config.kwargs["TQ1"] * config.kwargs["TQ2"]
        n = config.kwargs["TK0"] * config.kwargs["TK1"] * config.kwargs["TK2"]
        # Shared memory (2-byte elements): the Q tile and `stages` buffered K and V tiles plus one for the
        # transposed operand; conservative, so the untimed first pick never fails to launch.
        if 2 * args["BLOCK_D"] * (m + (config.num_stages + 1) * 2 * n) <= 227 * 1024:
            kept.append(config)
    if not kept:
        tile = _fallback_tile(extents)
        kept = [_config(tile, tile, 4, 2)]
    return kept


_TUNE_KEY = ["HEAD_DIM", "GROUPS", "HAS_RPB", "K0", "K1", "K2", "D0", "D1", "D2", "S0", "S1", "S2", "C0", "C1", "C2",
             "size_bucket"]


fwd_kernel = tuned(_fwd_kernel, CONFIGS, _TUNE_KEY, prune_configs, INTERPRETER_CONFIGS)
dq_kernel = tuned(_dq_kernel, CONFIGS, _TUNE_KEY, prune_configs, INTERPRETER_CONFIGS)
dkdv_kernel = tuned(_dkdv_kernel, CONFIGS, _TUNE_KEY, prune_configs, INTERPRETER_CONFIGS)


@eager_cache
def pattern_ints(nbhd: Neighborhood) -> tuple[int, ...]:
    """The pattern as the kernels take it: extents, kernel sizes, dilations, strides, causal flags, 3 axes each."""
    pad = 3 - len(nbhd.shape)
    fields = (nbhd.shape, nbhd.kernel_size, nbhd.dilation, nbhd.stride, nbhd.is_causal)
    return tuple(int(x) for field, fill in zip(fields, (1, 1, 1, 1, 0)) for x in (fill,) * pad + tuple(field))


def launch_args(q: torch.Tensor, k: torch.Tensor, pattern: list[int], has_rpb: bool) -> dict:
    return compile_time_args(tuple(pattern), q.shape[1] // k.shape[1], q.shape[-1], has_rpb, dot_precision(q.dtype))


@functools.lru_cache(maxsize=256)
def compile_time_args(pattern: tuple[int, ...], groups: int, head_dim: int, has_rpb: bool, precision: str) -> dict:
    """The kernels' compile-time arguments (cached: they are rebuilt on every call otherwise)."""
    shape, kernel, dilation, stride, causal = (pattern[i : i + 3] for i in range(0, 15, 3))
    longest_group = max(-(-n // d) for n, d in zip(shape, dilation))
    args = {
        "GROUPS": groups,
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim_block(head_dim),
        "HAS_RPB": has_rpb,
        "STEPS": longest_group.bit_length() + 1,
        "DOT_PRECISION": precision,
    }
    for name, values in zip("KDSC", (kernel, dilation, stride, causal)):
        args.update({f"{name}{a}": (bool(v) if name == "C" else v) for a, v in enumerate(values)})
    return args


def _grid(pattern: list[int], tile: str, rows: int):
    shape, dilation = pattern[0:3], pattern[6:9]

    def grid(meta):
        tiles = math.prod(ceil_div(ceil_div(n, d), meta[f"{tile}{a}"]) * d for a, (n, d) in enumerate(zip(shape, dilation)))
        return (tiles, rows)

    return grid


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, pattern: list[int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel on flat tokens `(B, H, N, D)`: `(out, lse)`. On Hopper the TMA kernel of
    `neighborhood_tma` runs where it applies (undilated, no bias, windows of 128+ keys; MMATTN_TRITON_NA_TMA=0 turns
    it off), this module's kernel otherwise."""
    from . import neighborhood_tma  # imports this module

    q, k, v = (rows_contiguous(t) for t in (q, k, v))
    if neighborhood_tma.eligible(q, k, v, rpb is not None, pattern)[0]:
        return neighborhood_tma.forward(q, k, v, pattern, scale)
    batch, heads, tokens, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
    launch = launch_args(q, k, pattern, rpb is not None)
    fwd_kernel.launch(
        _grid(pattern, "TQ", batch * heads), (q.dtype, size_bucket(tokens), *launch.values()),
        q, k, v, out, lse, rpb.contiguous() if rpb is not None else q,
        *row_strides(q, k, v, out),
        heads, *pattern[0:3], scale, size_bucket=size_bucket(tokens), **launch,
    )
    return out, lse


def backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor,
    k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, pattern: list[int], scale: float, rpb_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward kernels: `(dq, dk, dv, drpb)`, drpb empty unless `rpb_grad`."""
    q, k, v, out, grad_out = (rows_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    batch, heads, tokens, _head_dim = q.shape
    kv_heads = k.shape[1]
    launch = launch_args(q, k, pattern, rpb is not None)
    tune_key = (q.dtype, size_bucket(tokens), *launch.values())
    delta = backward_delta(out, grad_out, grad_lse, lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rpb_arg = rpb.contiguous() if rpb is not None else q
    neighbors = math.prod(pattern[3:6])
    ds = torch.zeros((batch, heads, tokens, neighbors), device=q.device, dtype=torch.float32) if rpb_grad else q
    common = row_strides(q, k, v, grad_out)
    dq_kernel.launch(
        _grid(pattern, "TQ", batch * heads), tune_key,
        q, k, v, grad_out, lse, delta, dq, rpb_arg, ds, *common, *row_strides(dq),
        heads, *pattern[0:3], scale, size_bucket=size_bucket(tokens), WRITE_DS=rpb_grad, **launch,
    )
    dkdv_kernel.launch(
        _grid(pattern, "TK", batch * kv_heads), tune_key,
        q, k, v, grad_out, lse, delta, dk, dv, rpb_arg, *common, *row_strides(dk, dv),
        heads, kv_heads, *pattern[0:3], scale, size_bucket=size_bucket(tokens), **launch,
    )
    drpb = _bias_gradient(ds, rpb, pattern) if rpb_grad else q.new_empty(0)
    return dq, dk, dv, drpb


def _bias_gradient(ds: torch.Tensor, rpb: torch.Tensor, pattern: list[int]) -> torch.Tensor:
    """d rpb: dS (neighbor layout) summed over the batch and scattered to each pair's bias offset. Slots holding no
    pair are zero in dS, so every slot is scattered (to a clamped offset) and no boolean selection syncs the host."""
    shape, kernel, dilation, stride, causal = (pattern[i : i + 3] for i in range(0, 15, 3))
    ndim = rpb.dim() - 1
    nbhd = Neighborhood.create(shape[3 - ndim :], kernel[3 - ndim :], dilation[3 - ndim :], stride[3 - ndim :],
                               [bool(c) for c in causal[3 - ndim :]])
    _, _, rpb_index = nbhd.neighbors(0, nbhd.num_tokens, ds.device)
    flat = 0
    for index, extent in zip(rpb_index, nbhd.rpb_shape):
        flat = flat * extent + index.clamp(0, extent - 1)
    flat = flat.expand(nbhd.num_tokens, *nbhd.kernel_size).flatten()
    grad = torch.zeros((rpb.shape[0], math.prod(nbhd.rpb_shape)), device=ds.device, dtype=torch.float32)
    grad.index_add_(1, flat, ds.sum(0).flatten(1))
    return grad.view(rpb.shape).to(rpb.dtype)


def _save(inputs: tuple, needs_input_grad: tuple[bool, ...]) -> tuple[tuple, tuple]:
    q, k, v, rpb, pattern, scale = inputs
    return (q, k, v, rpb), (pattern, scale, rpb is not None and needs_input_grad[3])


def _backward_fake(grad_out, grad_lse, out, lse, q, k, v, rpb, pattern, scale, rpb_grad):
    drpb = rpb.new_empty(rpb.shape) if rpb is not None and rpb_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drpb


neighborhood_op = kernel_op("mmattn::neighborhood", forward, backward, save=_save, grads=4,
                            backward_fake=_backward_fake)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nbhd: Neighborhood, rpb: torch.Tensor | None,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused neighborhood attention on flat tokens `(B, H, N, D)`: `(out, lse)`, differentiable (rpb included)."""
    return neighborhood_op(q, k, v, rpb, list(pattern_ints(nbhd)), scale)
