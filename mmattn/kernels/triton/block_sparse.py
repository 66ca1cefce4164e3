"""Block-sparse FlashAttention in Triton: forward, and a backward that is atomic-free (deterministic) by default.

Forward (FlashAttention-2 online softmax in base 2): one program per (query tile, batch x query head) walks the
key blocks its query block lists in `kv_indices`. Backward: the shared delta kernel forms delta = rowsum(dO * O)
minus dLSE; `_bwd_dkdv` gives each (key tile, batch x key head) program its own dK and dV, accumulated over the
query blocks of the transposed index and over the query heads of its GQA group; `_bwd_dq` mirrors the forward.
No program writes another's output, so the backward needs no atomics and is bitwise reproducible. Where
`atomic_dq` says so (on Hopper at head dim 128 unless torch asks for deterministic algorithms or
MMATTN_TRITON_ATOMIC_DQ=0), `_bwd_dkdv` also adds each tile pair's dQ partial atomically into a float32 buffer and
`_bwd_dq` does not run: 5 block matmuls per tile pair instead of 7, in no fixed order of addition.

A mask block of `Q_BLOCK x KV_BLOCK` tokens is covered by tiles of `BLOCK_M x BLOCK_N` (the tile sides divide
the block sides). Rows and columns past the true lengths are masked by position.

`forward` and `backward` launch the kernels; `attend` is the differentiable entry point the public
`block_sparse_attention` calls (custom ops under torch.compile, see `..autograd`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends
from ..autograd import kernel_op
from ..mask import BlockSparseMask
from .common import LOG2E, backward_lse2, online_softmax_step, program_heads, softmax_output
from .launch import (
    TunedKernel,
    backward_delta,
    broadcast_stride,
    ceil_div,
    dot_precision,
    env_switch,
    head_dim_block,
    hopper,
    row_strides,
    rows_contiguous,
    size_bucket,
    tile_configs,
    tuned,
)

__all__ = ["attend", "atomic_dq", "backward", "block_sparse_op", "forward"]

FWD_CONFIGS = tile_configs(
    [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3),
     (64, 32, 4, 4), (32, 32, 4, 2), (16, 16, 2, 2)]
)
# At head dim 128 the larger backward tiles spill registers; (64, 64, 8 warps) for dK/dV and (64, 32) for dQ do
# not (benchmarks/results/kernel_resources.md).
DKDV_CONFIGS = tile_configs(
    [(64, 64, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 4, 3), (32, 128, 4, 5), (64, 128, 4, 3),
     (128, 128, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3), (32, 32, 4, 2), (16, 16, 2, 2)]
)
# The fused backward also holds a dQ partial in registers: at head dim 128 only tiles with a side of 32 build
# without spills (64x32 and 32x32; 64x64 with 8 warps spills 156 bytes, 64x128 396, ptxas of Triton 3.8 for
# sm_90a), while wider key tiles halve the atomic adds per matmul. Measured, the adds win: on the H200 at B1 H24
# L32760 D128 (all blocks, forward+backward) 64x128 with 8 warps took 119 ms, 64x64 186-199 ms, 64x32 and 32x64
# 300-308 ms (the deterministic backward 130 ms; tiles pinned, untimed), so 64x128 comes first.
DKDVQ_CONFIGS = tile_configs(
    [(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 3), (64, 32, 8, 2), (32, 64, 8, 2),
     (32, 32, 4, 2), (16, 16, 2, 2)]
)
DQ_CONFIGS = tile_configs(
    [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2),
     (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 2, 2)]
)


def prune_configs(configs, named_args, **kwargs):
    """Keeps the tiles that divide the mask blocks and fit in shared memory for this head dim."""
    args = {**named_args, **kwargs}
    q_block, kv_block, block_d = args["Q_BLOCK"], args["KV_BLOCK"], args["BLOCK_D"]
    kept = []
    for config in configs:
        m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if q_block % m or kv_block % n:
            continue
        # Shared memory: one Q tile plus (stages - 1) buffered K and V tiles of 2-byte elements; configs
        # that still do not fit are dropped by the autotuner (OutOfResources).
        smem = 2 * block_d * (m + (config.num_stages - 1) * 2 * n)
        if smem <= 228 * 1024 and not (block_d >= 256 and m * n > 64 * 64):
            kept.append(config)
    return kept or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=2, num_stages=1)]


@triton.jit
def _load_tile(base, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr, EVEN_ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Loads a `[rows, BLOCK_D]` tile (last dim contiguous), zero past `n_rows` and past `HEAD_DIM`."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    if EVEN_ROWS and BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_tile(base, value, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr, EVEN_ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    if EVEN_ROWS and BLOCK_D == HEAD_DIM:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _partial_last_block(idx_ptr, n_blocks, length, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """1 if the last listed block is the trailing partial block (it then needs masking by position), else 0."""
    if EVEN:
        return 0
    last = tl.load(idx_ptr + tl.maximum(n_blocks - 1, 0))
    return ((n_blocks > 0) & ((last + 1) * BLOCK > length)).to(tl.int32)


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_base, v_base, idx_ptr, it_begin, it_end, stride_kn, stride_vn, kv_len, qk_scale,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update over key tiles `[it_begin, it_end)` of the listed blocks; MASKED: past kv_len."""
    TILES: tl.constexpr = KV_BLOCK // BLOCK_N
    for it in range(it_begin, it_end):
        start_n = tl.load(idx_ptr + it // TILES) * KV_BLOCK + (it % TILES) * BLOCK_N
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, offs_d, stride_kn, kv_len, HEAD_DIM, not MASKED, BLOCK_D)
        v = _load_tile(v_base, cols, offs_d, stride_vn, kv_len, HEAD_DIM, not MASKED, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(cols[None, :] < kv_len, s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["q_len", "kv_len", "size_bucket"])
def _fwd_kernel(
    Q, K, V, Out, Lse, KvNum, KvIdx,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_iq,
    num_heads, q_len, kv_len, sm_scale, size_bucket,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    q_blk = start_m // Q_BLOCK
    TILES: tl.constexpr = KV_BLOCK // BLOCK_N

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, offs_d, stride_qm, q_len, HEAD_DIM, EVEN_Q, BLOCK_D)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    n_blocks = tl.load(KvNum + b * stride_nb + h * stride_nh + q_blk)
    idx_ptr = KvIdx + b * stride_ib + h * stride_ih + q_blk * stride_iq
    qk_scale = sm_scale * LOG2E
    n_full = (n_blocks - _partial_last_block(idx_ptr, n_blocks, kv_len, KV_BLOCK, EVEN_KV)) * TILES

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, idx_ptr, 0, n_full, stride_kn, stride_vn, kv_len,
                               qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, KV_BLOCK, BLOCK_N, False, DOT_PRECISION)
    if not EVEN_KV:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, idx_ptr, n_full, n_blocks * TILES, stride_kn,
                                   stride_vn, kv_len, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, KV_BLOCK, BLOCK_N,
                                   True, DOT_PRECISION)

    out, lse = softmax_output(acc, l_i, m_i)
    o_base = Out + b * stride_ob + h * stride_oh
    _store_tile(o_base, out.to(Out.dtype.element_ty), rows, offs_d, stride_om, q_len, HEAD_DIM, EVEN_Q, BLOCK_D)
    lse_ptrs = Lse + pid_bh.to(tl.int64) * q_len + rows
    if EVEN_Q:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=rows < q_len)


@triton.jit
def load_row_values(ptr, rows, q_len, other, MASKED: tl.constexpr):
    """One float per row (lse, delta); MASKED: `other` at rows past q_len."""
    if MASKED:
        return tl.load(ptr + rows, mask=rows < q_len, other=other)
    return tl.load(ptr + rows)


@triton.jit
def dkdv_step(dk, dv, k, v, q, do, lse2, delta, qk_scale, DOT_PRECISION: tl.constexpr):
    """Folds one query tile (q, dO, its base-2 lse and delta) into a key tile's dK and dV (unscaled):
    `(dk, dv, dS^T)`. Rows past the length take lse2 = +inf (p = 0)."""
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
    return dk, dv, ds_t


@triton.jit
def dq_step(dq, q, do, lse2, delta, k, v, cols, kv_len, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Folds one key tile (k, v at key positions `cols`) into a query tile's dQ (unscaled); MASKED: keys at or past
    kv_len get p = 0."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(cols[None, :] < kv_len, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, idx_ptr, it_begin, it_end, stride_qm, stride_dm,
    stride_dqm, q_len, qk_scale, offs_m, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dK, dV contributions of query tiles `[it_begin, it_end)` of the listed blocks; MASKED: past q_len. With
    ATOMIC_DQ, also each tile's unscaled dQ partial dS K, added atomically into float32 rows at `dq_base`."""
    TILES: tl.constexpr = Q_BLOCK // BLOCK_M
    for it in range(it_begin, it_end):
        rows = tl.load(idx_ptr + it // TILES) * Q_BLOCK + (it % TILES) * BLOCK_M + offs_m
        q = _load_tile(q_base, rows, offs_d, stride_qm, q_len, HEAD_DIM, not MASKED, BLOCK_D)
        do = _load_tile(do_base, rows, offs_d, stride_dm, q_len, HEAD_DIM, not MASKED, BLOCK_D)
        # Rows past q_len and empty rows (lse = -inf) must get p = 0: they take lse = +inf.
        lse = load_row_values(lse_base, rows, q_len, float("inf"), MASKED)
        delta = load_row_values(delta_base, rows, q_len, 0.0, MASKED)
        dk, dv, ds_t = dkdv_step(dk, dv, k, v, q, do, backward_lse2(lse), delta, qk_scale, DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
            ptrs = dq_base + rows[:, None].to(tl.int64) * stride_dqm + offs_d[None, :]
            tl.atomic_add(ptrs, dq, mask=(rows[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["q_len", "kv_len", "size_bucket"])
def _bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV, DQ, QNum, QIdx,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqb, stride_dqh, stride_dqm,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_iq,
    num_heads, num_kv_heads, q_len, kv_len, sm_scale, size_bucket,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_h = (pid_bh % num_kv_heads).to(tl.int64)
    kv_blk = start_n // KV_BLOCK
    TILES: tl.constexpr = Q_BLOCK // BLOCK_M

    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * stride_kb + kv_h * stride_kh, cols, offs_d, stride_kn, kv_len, HEAD_DIM, EVEN_KV, BLOCK_D)
    v = _load_tile(V + b * stride_vb + kv_h * stride_vh, cols, offs_d, stride_vn, kv_len, HEAD_DIM, EVEN_KV, BLOCK_D)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUPS):
        h = kv_h * GROUPS + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_db + h * stride_dh
        dq_base = DQ + b * stride_dqb + h * stride_dqh
        row_base = (b * num_heads + h) * q_len
        n_blocks = tl.load(QNum + b * stride_nb + h * stride_nh + kv_blk)
        idx_ptr = QIdx + b * stride_ib + h * stride_ih + kv_blk * stride_iq
        n_full = (n_blocks - _partial_last_block(idx_ptr, n_blocks, q_len, Q_BLOCK, EVEN_Q)) * TILES
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base, dq_base, idx_ptr, 0,
                             n_full, stride_qm, stride_dm, stride_dqm, q_len, qk_scale, offs_m, offs_d, HEAD_DIM,
                             BLOCK_D, Q_BLOCK, BLOCK_M, False, DOT_PRECISION, ATOMIC_DQ)
        if not EVEN_Q:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base, dq_base, idx_ptr,
                                 n_full, n_blocks * TILES, stride_qm, stride_dm, stride_dqm, q_len, qk_scale, offs_m,
                                 offs_d, HEAD_DIM, BLOCK_D, Q_BLOCK, BLOCK_M, True, DOT_PRECISION, ATOMIC_DQ)

    _store_tile(DK + b * stride_dkb + kv_h * stride_dkh, (dk * sm_scale).to(DK.dtype.element_ty), cols, offs_d,
                stride_dkn, kv_len, HEAD_DIM, EVEN_KV, BLOCK_D)
    _store_tile(DV + b * stride_dvb + kv_h * stride_dvh, dv.to(DV.dtype.element_ty), cols, offs_d, stride_dvn,
                kv_len, HEAD_DIM, EVEN_KV, BLOCK_D)


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, k_base, v_base, idx_ptr, it_begin, it_end, stride_kn, stride_vn, kv_len, qk_scale,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ contributions of key tiles `[it_begin, it_end)` of the listed blocks; MASKED: past kv_len."""
    TILES: tl.constexpr = KV_BLOCK // BLOCK_N
    for it in range(it_begin, it_end):
        cols = tl.load(idx_ptr + it // TILES) * KV_BLOCK + (it % TILES) * BLOCK_N + offs_n
        k = _load_tile(k_base, cols, offs_d, stride_kn, kv_len, HEAD_DIM, not MASKED, BLOCK_D)
        v = _load_tile(v_base, cols, offs_d, stride_vn, kv_len, HEAD_DIM, not MASKED, BLOCK_D)
        dq = dq_step(dq, q, do, lse2, delta, k, v, cols, kv_len, qk_scale, MASKED, DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["q_len", "kv_len", "size_bucket"])
def _bwd_dq(
    Q, K, V, DOut, Lse, Delta, DQ, KvNum, KvIdx,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_iq,
    num_heads, q_len, kv_len, sm_scale, size_bucket,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    q_blk = start_m // Q_BLOCK
    TILES: tl.constexpr = KV_BLOCK // BLOCK_N

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, offs_d, stride_qm, q_len, HEAD_DIM, EVEN_Q, BLOCK_D)
    do = _load_tile(DOut + b * stride_db + h * stride_dh, rows, offs_d, stride_dm, q_len, HEAD_DIM, EVEN_Q, BLOCK_D)
    row_base = pid_bh.to(tl.int64) * q_len
    lse = load_row_values(Lse + row_base, rows, q_len, float("inf"), not EVEN_Q)
    delta = load_row_values(Delta + row_base, rows, q_len, 0.0, not EVEN_Q)
    lse2 = backward_lse2(lse)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    n_blocks = tl.load(KvNum + b * stride_nb + h * stride_nh + q_blk)
    idx_ptr = KvIdx + b * stride_ib + h * stride_ih + q_blk * stride_iq
    qk_scale = sm_scale * LOG2E
    n_full = (n_blocks - _partial_last_block(idx_ptr, n_blocks, kv_len, KV_BLOCK, EVEN_KV)) * TILES

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, idx_ptr, 0, n_full, stride_kn, stride_vn, kv_len,
                   qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, KV_BLOCK, BLOCK_N, False, DOT_PRECISION)
    if not EVEN_KV:
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, idx_ptr, n_full, n_blocks * TILES, stride_kn,
                       stride_vn, kv_len, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, KV_BLOCK, BLOCK_N, True,
                       DOT_PRECISION)

    dq_base = DQ + b * stride_dqb + h * stride_dqh
    _store_tile(dq_base, (dq * sm_scale).to(DQ.dtype.element_ty), rows, offs_d, stride_dqm, q_len, HEAD_DIM, EVEN_Q,
                BLOCK_D)


_TUNE_KEY = ["Q_BLOCK", "KV_BLOCK", "HEAD_DIM", "GROUPS", "size_bucket"]


# Under the interpreter: tiles small enough for tiny test shapes.
_INTERPRETER_CONFIGS = tile_configs([(32, 32, 4, 1), (16, 16, 4, 1)])
fwd_kernel = tuned(_fwd_kernel, FWD_CONFIGS, _TUNE_KEY, prune_configs, _INTERPRETER_CONFIGS)
dkdv_kernel = tuned(_bwd_dkdv, DKDV_CONFIGS, _TUNE_KEY, prune_configs, _INTERPRETER_CONFIGS)
dq_kernel = tuned(_bwd_dq, DQ_CONFIGS, _TUNE_KEY, prune_configs, _INTERPRETER_CONFIGS)
dkdvq_kernel = tuned(_bwd_dkdv, DKDVQ_CONFIGS, _TUNE_KEY, prune_configs, _INTERPRETER_CONFIGS, reset_to_zero=["DQ"])
"""`_bwd_dkdv` with ATOMIC_DQ: dK, dV and dQ in one kernel (tuned apart: the dQ partial adds a tile of registers;
the autotuner zeroes the dQ sums before each timed tile and the real run, or the timing runs' sums would stay)."""

ATOMIC_DQ_SWITCH: bool = env_switch("MMATTN_TRITON_ATOMIC_DQ", default=True)
"""Whether the backward may add dQ atomically in the dK/dV kernel (5 block matmuls per tile pair, as FlashAttention-3
and FA4 on Hopper do) instead of running a second, deterministic dQ kernel that recomputes QK^T and dO V^T (7); on
unless MMATTN_TRITON_ATOMIC_DQ=0. It does so where `hopper_backward_pays` and no bitwise reproducibility is asked
for (`atomic_dq`)."""

FAST_BACKWARD_HEAD_DIMS = frozenset({128})
"""Head dims at which the Hopper backwards beat the deterministic pointer backward. On the H200 (2026-12-05,
benchmarks/results/block_sparse_backward.md; every block, band, random and Radial masks at B1 H24/H12 L32760)
forward+backward at head dim 128 took 0.89-0.98x the pointer kernels' time with atomic dQ and 0.93-1.00x with the
TMA backward (`block_sparse_tma`); at head dim 64 (B1 H12 L16384) 1.07-1.21x and 1.08-1.19x."""


def hopper_backward_pays(q: torch.Tensor) -> bool:
    """Whether `q`'s backward takes a Hopper form (atomic dQ, else the TMA kernels): its head dim is one of
    `FAST_BACKWARD_HEAD_DIMS` on an sm90 GPU (or under the interpreter, which runs every kernel)."""
    return q.shape[-1] in FAST_BACKWARD_HEAD_DIMS and hopper(q.device)


def atomic_dq(q: torch.Tensor) -> bool:
    """Whether the backward of `q` adds dQ atomically: switched on, where `hopper_backward_pays`, and no bitwise
    reproducibility asked for (`torch.use_deterministic_algorithms`); the float32 additions then land in any order."""
    return ATOMIC_DQ_SWITCH and hopper_backward_pays(q) and not torch.are_deterministic_algorithms_enabled()


def launch_args(q: torch.Tensor, k: torch.Tensor, q_block: int, kv_block: int) -> dict:
    """Compile-time kernel arguments shared by the forward and backward launches."""
    head_dim = q.shape[-1]
    return {
        "GROUPS": q.shape[1] // k.shape[1],
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim_block(head_dim),
        "Q_BLOCK": q_block,
        "KV_BLOCK": kv_block,
        "EVEN_Q": q.shape[2] % q_block == 0,
        "EVEN_KV": k.shape[2] % kv_block == 0,
        "DOT_PRECISION": dot_precision(q.dtype),
    }


def _tune_key(q: torch.Tensor, launch: dict) -> tuple:
    """What the tuned tile depends on: dtype, length bucket and the compile-time arguments."""
    return (q.dtype, size_bucket(q.shape[2]), *launch.values())


def _index_strides(counts: torch.Tensor, indices: torch.Tensor) -> tuple[int, ...]:
    """Strides of a `[B|1, H|1, n]` count tensor and its `[B|1, H|1, n, width]` index; 0 on broadcast dims."""
    return (broadcast_stride(counts, 0), broadcast_stride(counts, 1), broadcast_stride(indices, 0),
            broadcast_stride(indices, 1), indices.stride(2))


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor, q_indices: torch.Tensor, q_block: int, kv_block: int, scale: float,
    host_bound: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel: `(out, lse)`; `q_num_blocks`/`q_indices` are kept for the backward. On Hopper
    the TMA, warp-specialized kernel of `block_sparse_tma` runs where it applies and the call is not `host_bound`
    (`backends.host_bound`: so little work that fixed costs decide, and the pointer-load kernel is faster, as
    benchmarks/results/block_sparse_host_bound_tma.md shows), this module's kernel otherwise."""
    from . import block_sparse_tma  # imports this module

    q, k, v = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    if not host_bound and block_sparse_tma.eligible(q, k, v, q_block, kv_block)[0]:
        return block_sparse_tma.forward(q, k, v, kv_num_blocks, kv_indices, q_block, kv_block, scale)
    return launch_forward(fwd_kernel, q, k, v, kv_num_blocks, kv_indices, q_block, kv_block, scale)


def launch_forward(
    kernel: TunedKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor, q_block: int, kv_block: int, scale: float, lse_width: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a forward kernel with `_fwd_kernel`'s arguments (it or `block_sparse_tma`'s) on q, k, v with unit
    last stride: `(out, lse)`. The kernel writes each row's lse into a row of `lse_width` float32 values (the TMA
    kernel's are 16 bytes wide), of which the first is returned."""
    batch, heads, q_len, _head_dim = q.shape
    out = torch.empty_like(q)
    lse_rows = torch.empty((batch, heads, q_len, lse_width), device=q.device, dtype=torch.float32)

    def grid(meta):
        return (ceil_div(q_len, meta["BLOCK_M"]), batch * heads)

    launch = launch_args(q, k, q_block, kv_block)
    kernel.launch(
        grid, _tune_key(q, launch),
        q, k, v, out, lse_rows, kv_num_blocks, kv_indices,
        *row_strides(q, k, v, out),
        *_index_strides(kv_num_blocks, kv_indices),
        heads, q_len, k.shape[2], scale, size_bucket(q_len),
        **launch,
    )
    return out, lse_rows[..., 0].contiguous()


def backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor,
    k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor, q_indices: torch.Tensor, q_block: int, kv_block: int, scale: float,
    host_bound: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward kernels: `(dq, dk, dv)`. Where `atomic_dq` says so the dK/dV kernel adds dQ
    atomically; otherwise the backward is deterministic (no atomics: a dQ kernel of its own), by `block_sparse_tma`'s
    kernels where `hopper_backward_pays`, they apply and the call is not `host_bound` (as in the forward), else by
    the pointer kernels."""
    from . import block_sparse_tma  # imports this module

    q, k, v, out, grad_out = (rows_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    delta = backward_delta(out, grad_out, grad_lse, lse)
    atomic = atomic_dq(q)
    if (not atomic and not host_bound and hopper_backward_pays(q)
            and block_sparse_tma.backward_eligible(q, k, v, grad_out, q_block, kv_block)[0]):
        return block_sparse_tma.backward(grad_out, q, k, v, lse, delta, kv_num_blocks, kv_indices, q_num_blocks,
                                         q_indices, q_block, kv_block, scale)
    launch = launch_args(q, k, q_block, kv_block)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # float32 rows dQ is added into; the deterministic kernel is handed dk there, a pointer it never reads
    dq_sums = torch.zeros((batch, heads, q_len, head_dim), device=q.device, dtype=torch.float32) if atomic else dk

    def dkdv_grid(meta):
        return (ceil_div(kv_len, meta["BLOCK_N"]), batch * kv_heads)

    (dkdvq_kernel if atomic else dkdv_kernel).launch(
        dkdv_grid, _tune_key(q, launch),
        q, k, v, grad_out, lse, delta, dk, dv, dq_sums, q_num_blocks, q_indices,
        *row_strides(q, k, v, grad_out, dk, dv, dq_sums),
        *_index_strides(q_num_blocks, q_indices),
        heads, kv_heads, q_len, kv_len, scale, size_bucket(q_len),
        **launch, ATOMIC_DQ=atomic,
    )
    if atomic:
        return torch.empty_like(q).copy_(dq_sums.mul_(scale)), dk, dv
    return launch_dq(dq_kernel, grad_out, q, k, v, lse, delta, kv_num_blocks, kv_indices, launch, scale), dk, dv


def launch_dq(
    kernel: TunedKernel, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    lse: torch.Tensor, delta: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, launch: dict,
    scale: float,
) -> torch.Tensor:
    """Runs a dQ kernel with `_bwd_dq`'s arguments (it or `block_sparse_tma`'s) over the forward's index: dq, laid
    out like q; `launch` is `launch_args`'s."""
    batch, heads, q_len, _head_dim = q.shape
    dq = torch.empty_like(q)

    def grid(meta):
        return (ceil_div(q_len, meta["BLOCK_M"]), batch * heads)

    kernel.launch(
        grid, _tune_key(q, launch),
        q, k, v, grad_out, lse, delta, dq, kv_num_blocks, kv_indices,
        *row_strides(q, k, v, grad_out, dq),
        *_index_strides(kv_num_blocks, kv_indices),
        heads, q_len, k.shape[2], scale, size_bucket(q_len),
        **launch,
    )
    return dq


def _save(inputs: tuple, needs_input_grad: tuple[bool, ...]) -> tuple[tuple, tuple]:
    q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, q_block, kv_block, scale, *host_bound = inputs
    return (q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices), (q_block, kv_block, scale, *host_bound)


block_sparse_op = kernel_op("mmattn::block_sparse", forward, backward, save=_save, grads=3)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with the Triton kernels: `(out, lse)`, differentiable in q, k, v (and through lse).
    The mask's block count (a device read, once per mask) is asked for only where a TMA kernel could run."""
    from . import block_sparse_tma  # imports this module

    host_bound = block_sparse_tma.runs_on(q.device) and backends.host_bound(q, mask)
    return block_sparse_op(q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices,
                           *mask.block_size, scale, host_bound)
