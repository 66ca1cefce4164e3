"""Triton building blocks shared by the kernel families: FlashAttention-2's online softmax in base 2, its finish,
the backward's row terms (the forward's lse in base 2, and the delta kernel), row gathers/scatters by token index,
and the constant `LOG2E` that turns natural-log logits into base 2."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
"""log2(e): `scale * LOG2E` scales logits for `exp2`."""


@triton.jit
def program_heads(pid_bh, num_heads, GROUPS: tl.constexpr):
    """(batch, head, key head) of a program over `batch x num_heads` (grouped-query attention: GROUPS query heads
    share one key head), as int64 for address arithmetic."""
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    return b, h, h // GROUPS


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, DOT_PRECISION: tl.constexpr):
    """Folds one key tile into the running (acc, row sum, row max): `s` are base-2 logits (-inf where masked).
    A row with no visible key so far keeps m = -inf and is shifted by 0, so no inf - inf appears."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def softmax_output(acc, l_i, m_i):
    """(out, natural-log lse); rows that attended to nothing get out = 0 and lse = -inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return out, lse


@triton.jit
def backward_lse2(lse):
    """The forward's lse in base 2 for recomputing probabilities; empty rows (-inf) take +inf, so p = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def load_rows(base, rows, ok, cols, stride_row, HEAD_DIM: tl.constexpr):
    """`[rows, cols]` of a row-strided tensor with unit last stride; zero where `ok` is False or past HEAD_DIM."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def store_rows(base, value, rows, ok, cols, stride_row, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    tl.store(ptrs, value, mask=ok[:, None] & (cols[None, :] < HEAD_DIM))


@triton.jit
def backward_delta_kernel(
    Out, DOut, DLse, Delta,
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    num_heads, q_len,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE (the gradient of the log-sum-exp output enters here); launched by
    `launch.backward_delta`."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    b, h, _ = program_heads(pid_bh, num_heads, 1)
    offs_d = tl.arange(0, BLOCK_D)
    in_rows = rows < q_len
    o = load_rows(Out + b * stride_ob + h * stride_oh, rows, in_rows, offs_d, stride_om, HEAD_DIM)
    do = load_rows(DOut + b * stride_db + h * stride_dh, rows, in_rows, offs_d, stride_dm, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    ptrs = pid_bh.to(tl.int64) * q_len + rows
    if HAS_DLSE:
        dlse = tl.load(DLse + ptrs, mask=in_rows, other=0.0)
        delta -= tl.where(dlse == dlse, dlse, 0.0)
    tl.store(Delta + ptrs, delta, mask=in_rows)
