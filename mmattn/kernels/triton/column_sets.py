"""Triton kernels of one-row attention split by column sets (decode steps of the LVLM interventions).

`column_set_kernel`: one program per (batch, head) folds the keys in tiles with the online softmax and returns, besides
the output O = sum_j A_j v_j, each set's attention mass m_n = sum_j A_j S_jn and set-weighted output
W_n = sum_j A_j S_jn v_j. Column edits A_j <- A_j (1 + sum_n c_n S_jn) are linear in A, so the edited row's output is
O + sum_n c_n W_n without A ever being written. Its `REDISTRIBUTE` epilogue applies the visual attention sink
redistribution (sets image, receivers, sinks) in the same program; `ranked_heads_kernel` applies the head-ranked
enhancement, whose coefficients need every head of a batch row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, program_heads
from .launch import head_dim_block, next_power_of_2

TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal


@triton.jit
def _pick(values, sets, index):
    """values[index] of a [SETS] vector."""
    return tl.sum(tl.where(sets == index, values, 0.0), 0)


@triton.jit
def _pick_row(values, sets, index):
    """Row `index` of a [SETS, D] block."""
    return tl.sum(tl.where(sets[:, None] == index, values, 0.0), 0)


@triton.jit
def column_set_kernel(
    Q, K, V, COLUMNS, VISIBLE, OUT, MASSES, WEIGHTED,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_cb, stride_ct, stride_mb, stride_mt, stride_ob, stride_oh, stride_sb, stride_sh, stride_wb, stride_wh,
    stride_wn, num_heads, kv_len, column_len, num_sets, scale, share, rho, min_mass,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    SETS: tl.constexpr, HAS_VISIBLE: tl.constexpr, REDISTRIBUTE: tl.constexpr,
):
    b, h, kh = program_heads(tl.program_id(0), num_heads, GROUPS)
    dims = tl.arange(0, BLOCK_D)
    sets = tl.arange(0, SETS)
    in_dim = dims < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + dims, mask=in_dim, other=0.0).to(tl.float32) * (scale * LOG2E)
    k_base, v_base = K + b * stride_kb + kh * stride_kh, V + b * stride_vb + kh * stride_vh

    m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    mass = tl.zeros([SETS], tl.float32)
    weighted = tl.zeros([SETS, BLOCK_D], tl.float32)
    for start in range(0, kv_len, BLOCK_T):
        keys = start + tl.arange(0, BLOCK_T)
        in_range = keys < kv_len
        visible = in_range
        if HAS_VISIBLE:
            flags = tl.load(VISIBLE + b * stride_mb + keys * stride_mt, mask=in_range, other=0)
            visible = visible & (flags != 0)
        tile = in_range[:, None] & in_dim[None, :]
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kt + dims[None, :], mask=tile, other=0.0)
        s = tl.where(visible, tl.sum(q[None, :] * k.to(tl.float32), 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift)
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vt + dims[None, :], mask=tile, other=0.0)
        v = v.to(tl.float32)
        columns = tl.load(COLUMNS + b * stride_cb + keys[:, None] * stride_ct + sets[None, :],
                          mask=(keys[:, None] < column_len) & (sets[None, :] < num_sets), other=0.0)
        p_sets = p[:, None] * columns
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        mass = mass * alpha + tl.sum(p_sets, 0)
        weighted = weighted * alpha + tl.sum(p_sets[:, :, None] * v[:, None, :], 0)
        m_i = m_new

    inverse = tl.where(l_i == 0.0, 0.0, 1.0 / tl.where(l_i == 0.0, 1.0, l_i))  # a row seeing no key: zeros, not NaN
    acc, mass, weighted = acc * inverse, mass * inverse, weighted * inverse
    out_ptrs = OUT + b * stride_ob + h * stride_oh + dims
    if REDISTRIBUTE:
        # sets (image, receivers, sinks): image-centric rows move `share` of the sinks' mass to the receivers
        image, receivers, sinks = _pick(mass, sets, 0), _pick(mass, sets, 1), _pick(mass, sets, 2)
        centric = (receivers - rho * image >= 0.0) & (image >= min_mass) & (receivers >= TINY)
        gain = tl.where(centric, sinks / tl.where(centric, receivers, 1.0), 0.0)
        moved = gain * _pick_row(weighted, sets, 1) - tl.where(centric, _pick_row(weighted, sets, 2), 0.0)
        tl.store(out_ptrs, (acc + share * moved).to(OUT.dtype.element_ty), mask=in_dim)
    else:
        tl.store(out_ptrs, acc, mask=in_dim)
        in_set = sets < num_sets
        tl.store(MASSES + b * stride_sb + h * stride_sh + sets, mass, mask=in_set)
        tl.store(WEIGHTED + b * stride_wb + h * stride_wh + sets[:, None] * stride_wn + dims[None, :], weighted,
                 mask=in_set[:, None] & in_dim[None, :])


@triton.jit
def _top_half(values, heads, num_heads, BLOCK_H: tl.constexpr):
    """1.0 on the max(H // 2, 1) largest of `values` [BLOCK_H] (ties to the lower head), 0.0 elsewhere."""
    other = tl.arange(0, BLOCK_H)
    above = (values[None, :] > values[:, None]) | ((values[None, :] == values[:, None]) & (other[None, :] < heads[:, None]))
    rank = tl.sum((above & (other[None, :] < num_heads)).to(tl.int32), 1)
    return tl.where(rank < tl.maximum(num_heads // 2, 1), 1.0, 0.0)


@triton.jit
def ranked_heads_kernel(
    OUT, MASSES, WEIGHTED, RESULT, stride_ob, stride_oh, stride_sb, stride_sh, stride_wb, stride_wh, stride_wn,
    stride_rb, stride_rh, num_heads, beta,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Sets (image, boost = image (M - 1), query) per head of batch row `b`: the top half of heads by image mass
    (vision heads) add W_boost, the top half by query mass add (beta r - 1) W_query with r the vision heads' image
    mass gain, and every row is rescaled to its original mass."""
    b = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    in_head = heads < num_heads
    masses = MASSES + b * stride_sb + heads * stride_sh
    image = tl.load(masses, mask=in_head, other=0.0)
    boost = tl.load(masses + 1, mask=in_head, other=0.0)
    query = tl.load(masses + 2, mask=in_head, other=0.0)
    vision_heads = _top_half(image, heads, num_heads, BLOCK_H)
    query_heads = _top_half(query, heads, num_heads, BLOCK_H)
    gain = tl.sum(vision_heads * boost, 0) / tl.maximum(tl.sum(vision_heads * image, 0), TINY)
    query_gain = query_heads * (beta * (1.0 + gain) - 1.0)
    tile = in_head[:, None] & (dims[None, :] < HEAD_DIM)
    out = tl.load(OUT + b * stride_ob + heads[:, None] * stride_oh + dims[None, :], mask=tile, other=0.0)
    weighted = WEIGHTED + b * stride_wb + heads[:, None] * stride_wh + dims[None, :]
    w_boost = tl.load(weighted + stride_wn, mask=tile, other=0.0)
    w_query = tl.load(weighted + 2 * stride_wn, mask=tile, other=0.0)
    mass = 1.0 + vision_heads * boost + query_gain * query
    edited = (out + vision_heads[:, None] * w_boost + query_gain[:, None] * w_query) / mass[:, None]
    result = RESULT + b * stride_rb + heads[:, None] * stride_rh + dims[None, :]
    tl.store(result, edited.to(RESULT.dtype.element_ty), mask=tile)


def column_sets_forward(q, k, v, columns, visible, scale: float, redistribution: tuple[float, float, float] | None):
    """Launches `column_set_kernel`: `(out [B, H, 1, D] fp32, masses [B, H, N], weighted [B, H, N, D])`, or with
    `redistribution = (share, rho, min_mass)` the redistributed output [B, H, 1, D] in q's dtype."""
    batch, heads, _, head_dim = q.shape
    sets = columns.shape[2]
    out = q.new_empty(q.shape, dtype=q.dtype if redistribution else torch.float32)
    masses = q.new_empty((batch, heads, sets), dtype=torch.float32)
    weighted = q.new_empty((batch, heads, sets, head_dim), dtype=torch.float32)
    has_visible = visible is not None
    if has_visible:
        visible = visible.view(torch.uint8)
    share, rho, min_mass = redistribution or (0.0, 0.0, 0.0)
    column_set_kernel[(batch * heads,)](
        q, k, v, columns, visible if has_visible else columns, out, masses, weighted,
        q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], columns.stride(0), columns.stride(1),
        *(visible.stride() if has_visible else (0, 0)), out.stride(0), out.stride(1), masses.stride(0), masses.stride(1),
        *weighted.stride()[:3], heads, k.shape[2], columns.shape[1], sets, scale, share, rho, min_mass,
        GROUPS=heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), BLOCK_T=16,
        SETS=next_power_of_2(sets, 2),  # at least 2: Triton's smallest useful arange
        HAS_VISIBLE=has_visible, REDISTRIBUTE=redistribution is not None, num_warps=4,
    )
    return out if redistribution else (out, masses, weighted)


def ranked_heads_forward(out, masses, weighted, beta: float, dtype):
    """Launches `ranked_heads_kernel` on `column_sets_forward`'s statistics: the enhanced output [B, H, 1, D]."""
    batch, heads, _, head_dim = out.shape
    result = out.new_empty(out.shape, dtype=dtype)
    ranked_heads_kernel[(batch,)](
        out, masses, weighted, result, out.stride(0), out.stride(1), masses.stride(0), masses.stride(1),
        *weighted.stride()[:3], result.stride(0), result.stride(1), heads, beta,
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), BLOCK_H=next_power_of_2(heads, 2), num_warps=4,
    )
    return result
