"""Block-sparse FlashAttention in Triton: forward, and an atomic-free (deterministic) backward.

Forward (FlashAttention-2 online softmax in base 2): one program per (query tile, batch x query head) walks the
key blocks its query block lists in `kv_indices`. Backward: `_bwd_preprocess` forms delta = rowsum(dO * O)
minus dLSE; `_bwd_dkdv` gives each (key tile, batch x key head) program its own dK and dV, accumulated over the
query blocks of the transposed index and over the query heads of its GQA group; `_bwd_dq` mirrors the forward.
No program writes another's output, so the backward needs no atomics and is bitwise reproducible.

A mask block of `Q_BLOCK x KV_BLOCK` tokens is covered by tiles of `BLOCK_M x BLOCK_N` (the tile sides divide
the block sides). Rows and columns past the true lengths are masked by position.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


FWD_CONFIGS = _configs(
    [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4), (32, 32, 4, 2), (16, 16, 2, 2)]
)
DKDV_CONFIGS = _configs(
    [(64, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2), (16, 16, 2, 2)]
)
DQ_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (32, 32, 4, 2), (16, 16, 2, 2)]
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
        smem = 2 * block_d * (m + config.num_stages * 2 * n)
        if block_d >= 256 and m * n > 64 * 64:
            continue
        if smem <= 200 * 1024:
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
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    kv_h = h // GROUPS
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
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(n_blocks * TILES):
        start_n = tl.load(idx_ptr + it // TILES) * KV_BLOCK + (it % TILES) * BLOCK_N
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, offs_d, stride_kn, kv_len, HEAD_DIM, EVEN_KV, BLOCK_D)
        v = _load_tile(v_base, cols, offs_d, stride_vn, kv_len, HEAD_DIM, EVEN_KV, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if not EVEN_KV:
            qk = tl.where(cols[None, :] < kv_len, qk, float("-inf"))
        # A row with no visible key so far keeps m = -inf; it is shifted by 0 so that no inf - inf appears.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Rows that attended to nothing keep l_i = 0: they get a zero output and lse = -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = Out + b * stride_ob + h * stride_oh
    _store_tile(o_base, out.to(Out.dtype.element_ty), rows, offs_d, stride_om, q_len, HEAD_DIM, EVEN_Q, BLOCK_D)
    lse_ptrs = Lse + pid_bh.to(tl.int64) * q_len + rows
    if EVEN_Q:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=rows < q_len)


@triton.jit
def _bwd_preprocess(
    Out, DOut, DLse, Delta,
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    num_heads, q_len,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE (the gradient of the log-sum-exp output enters here)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(Out + b * stride_ob + h * stride_oh, rows, offs_d, stride_om, q_len, HEAD_DIM, False, BLOCK_D)
    do = _load_tile(DOut + b * stride_db + h * stride_dh, rows, offs_d, stride_dm, q_len, HEAD_DIM, False, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    ptrs = pid_bh.to(tl.int64) * q_len + rows
    if HAS_DLSE:
        dlse = tl.load(DLse + ptrs, mask=rows < q_len, other=0.0)
        delta -= tl.where(dlse == dlse, dlse, 0.0)
    tl.store(Delta + ptrs, delta, mask=rows < q_len)


@triton.jit(do_not_specialize=["q_len", "kv_len", "size_bucket"])
def _bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV, QNum, QIdx,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_iq,
    num_heads, num_kv_heads, q_len, kv_len, sm_scale, size_bucket,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUPS):
        h = kv_h * GROUPS + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_db + h * stride_dh
        row_base = (b * num_heads + h) * q_len
        n_blocks = tl.load(QNum + b * stride_nb + h * stride_nh + kv_blk)
        idx_ptr = QIdx + b * stride_ib + h * stride_ih + kv_blk * stride_iq
        for it in range(n_blocks * TILES):
            start_m = tl.load(idx_ptr + it // TILES) * Q_BLOCK + (it % TILES) * BLOCK_M
            rows = start_m + offs_m
            q = _load_tile(q_base, rows, offs_d, stride_qm, q_len, HEAD_DIM, EVEN_Q, BLOCK_D)
            do = _load_tile(do_base, rows, offs_d, stride_dm, q_len, HEAD_DIM, EVEN_Q, BLOCK_D)
            if EVEN_Q:
                lse = tl.load(Lse + row_base + rows)
                delta = tl.load(Delta + row_base + rows)
            else:
                lse = tl.load(Lse + row_base + rows, mask=rows < q_len, other=float("inf"))
                delta = tl.load(Delta + row_base + rows, mask=rows < q_len, other=0.0)
            # Rows past q_len (and empty rows, lse = -inf) must get p = 0: give them lse = +inf.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk_base = b * stride_dkb + kv_h * stride_dkh
    _store_tile(DK + dk_base, (dk * sm_scale).to(DK.dtype.element_ty), cols, offs_d, stride_dkn, kv_len,
                HEAD_DIM, EVEN_KV, BLOCK_D)
    _store_tile(DV + dk_base, dv.to(DV.dtype.element_ty), cols, offs_d, stride_dkn, kv_len, HEAD_DIM, EVEN_KV,
                BLOCK_D)


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
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    kv_h = h // GROUPS
    q_blk = start_m // Q_BLOCK
    TILES: tl.constexpr = KV_BLOCK // BLOCK_N

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, offs_d, stride_qm, q_len, HEAD_DIM, EVEN_Q, BLOCK_D)
    do = _load_tile(DOut + b * stride_db + h * stride_dh, rows, offs_d, stride_dm, q_len, HEAD_DIM, EVEN_Q, BLOCK_D)
    row_ptrs = pid_bh.to(tl.int64) * q_len + rows
    if EVEN_Q:
        lse = tl.load(Lse + row_ptrs)
        delta = tl.load(Delta + row_ptrs)
    else:
        lse = tl.load(Lse + row_ptrs, mask=rows < q_len, other=float("inf"))
        delta = tl.load(Delta + row_ptrs, mask=rows < q_len, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    n_blocks = tl.load(KvNum + b * stride_nb + h * stride_nh + q_blk)
    idx_ptr = KvIdx + b * stride_ib + h * stride_ih + q_blk * stride_iq
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(n_blocks * TILES):
        start_n = tl.load(idx_ptr + it // TILES) * KV_BLOCK + (it % TILES) * BLOCK_N
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, offs_d, stride_kn, kv_len, HEAD_DIM, EVEN_KV, BLOCK_D)
        v = _load_tile(v_base, cols, offs_d, stride_vn, kv_len, HEAD_DIM, EVEN_KV, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if not EVEN_KV:
            p = tl.where(cols[None, :] < kv_len, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq_base = DQ + b * stride_dqb + h * stride_dqh
    _store_tile(dq_base, (dq * sm_scale).to(DQ.dtype.element_ty), rows, offs_d, stride_dqm, q_len, HEAD_DIM, EVEN_Q,
                BLOCK_D)


_TUNE_KEY = ["Q_BLOCK", "KV_BLOCK", "HEAD_DIM", "GROUPS", "size_bucket"]


def _tuned(kernel, configs):
    """The kernel autotuned over `configs` on a GPU; under the interpreter, only the smallest fitting tile."""
    if INTERPRETED:
        configs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
                   triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]

        def first_fitting(configs, named_args, **kwargs):
            return prune_configs(configs, named_args, **kwargs)[:1]

        return triton.autotune(configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": first_fitting})(kernel)
    return triton.autotune(configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})(kernel)


fwd_kernel = _tuned(_fwd_kernel, FWD_CONFIGS)
dkdv_kernel = _tuned(_bwd_dkdv, DKDV_CONFIGS)
dq_kernel = _tuned(_bwd_dq, DQ_CONFIGS)
preprocess_kernel = _bwd_preprocess
