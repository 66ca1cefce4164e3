"""Routed (region-gathered) attention in Triton: forward and an atomic-free (deterministic) backward.

Tokens are grouped by region: query region `r` owns rows `[r * Q_REGION, (r + 1) * Q_REGION)` and key region `j`
owns rows `[j * KV_REGION, (j + 1) * KV_REGION)`. Query region `r` attends to the keys of the `TOPK` regions listed
in `idx[r]` (BiFormer's bi-level routing). The routed keys form a virtual sequence of `TOPK * KV_REGION` rows
whose tiles are loaded through index arithmetic (`row = idx[n // KV_REGION] * KV_REGION + n % KV_REGION`), so the
k-fold copy of the gathered keys and values that the official BRA materializes never exists.

Regions may hold any number of tokens (64, 16, 4, ...): tiles have at least 16 rows and rows past a region's end
are masked. Keys flagged invalid in `kv_valid` (padding) and out-of-range region indices are masked too.

Forward: one program per (query region x query tile, batch x head), FlashAttention-2 online softmax in base 2.
Backward: `_dq_kernel` mirrors the forward; `_dkdv_kernel` gives each (key region x key tile, batch x key head)
its own dK and dV, summed over the query regions that routed to it (a CSR transposed index) and over its GQA
group, so no program writes another's output.

`forward` and `backward` launch the kernels; `attend` is the differentiable entry point the public
`routed_attention` calls (custom ops under torch.compile, see `..autograd`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..autograd import kernel_op
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
    broadcast_stride,
    ceil_div,
    dot_precision,
    head_dim_block,
    next_power_of_2,
    row_strides,
    rows_contiguous,
    tile_configs,
    tuned,
)

__all__ = ["attend", "backward", "forward", "routed_op", "transpose_routing"]

FWD_CONFIGS = tile_configs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2),
                            (16, 32, 2, 2), (16, 16, 2, 2)])
DKDV_CONFIGS = tile_configs([(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (16, 64, 4, 2), (16, 32, 2, 2),
                             (16, 16, 2, 2)])
DQ_CONFIGS = FWD_CONFIGS


def _prune(configs, named_args, **kwargs):
    """Keeps tiles no larger than the query region (BLOCK_M) and the key rows a program walks (BLOCK_N): the next
    power of two of each, at least 16."""
    args = {**named_args, **kwargs}
    m_cap, n_cap = next_power_of_2(args["Q_REGION"], 16), next_power_of_2(args["N_TILE_ROWS"], 16)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap]
    return kept or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=2, num_stages=2)]


_TUNE_KEY = ["Q_REGION", "KV_REGION", "TOPK", "HEAD_DIM", "GROUPS"]
_INTERPRETER_CONFIGS = tile_configs([(16, 32, 4, 1), (16, 16, 4, 1)])


@triton.jit
def _routed_keys(idx_ptr, valid_ptr, n, n_kv_regions, KV_REGION: tl.constexpr, TOPK: tl.constexpr,
                 HAS_VALID: tl.constexpr):
    """Rows of positions `n` of the routed key sequence, and whether each is a real, attended key."""
    slot = n // KV_REGION
    ok = slot < TOPK
    region = tl.load(idx_ptr + slot, mask=ok, other=-1)
    ok = ok & (region >= 0) & (region < n_kv_regions)
    rows = tl.where(ok, region * KV_REGION + n % KV_REGION, 0)
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + rows, mask=ok, other=0) != 0)
    return rows, ok


@triton.jit
def _region_rows(pid, Q_REGION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query tile `pid` (regions split into tiles of BLOCK_M rows): (region, rows, which rows are in the region)."""
    M_TILES: tl.constexpr = (Q_REGION + BLOCK_M - 1) // BLOCK_M
    region = pid // M_TILES
    local = (pid % M_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    return region, region * Q_REGION + local, local < Q_REGION


@triton.jit(do_not_specialize=["n_kv_regions"])
def _fwd_kernel(
    Q, K, V, Out, Lse, Idx, Valid,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_ib, stride_ih, stride_ir, stride_valid_b,
    num_heads, q_len, n_kv_regions, sm_scale,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_REGION: tl.constexpr,
    KV_REGION: tl.constexpr, TOPK: tl.constexpr, HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr,
    N_TILE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    region, rows, row_ok = _region_rows(tl.program_id(0), Q_REGION, BLOCK_M)
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, offs_d, stride_qm, HEAD_DIM)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    idx_ptr = Idx + b * stride_ib + h * stride_ih + region * stride_ir
    valid_ptr = Valid + b * stride_valid_b
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, TOPK * KV_REGION, BLOCK_N):
        key_rows, key_ok = _routed_keys(idx_ptr, valid_ptr, start + offs_n, n_kv_regions, KV_REGION, TOPK, HAS_VALID)
        k = load_rows(k_base, key_rows, key_ok, offs_d, stride_kn, HEAD_DIM)
        v = load_rows(v_base, key_rows, key_ok, offs_d, stride_vn, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where(key_ok[None, :], qk * qk_scale, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, DOT_PRECISION)

    out, lse = softmax_output(acc, l_i, m_i)
    store_rows(Out + b * stride_ob + h * stride_oh, out.to(Out.dtype.element_ty), rows, row_ok, offs_d, stride_om,
                HEAD_DIM)
    tl.store(Lse + pid_bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["n_kv_regions"])
def _dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Idx, Valid,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_ib, stride_ih, stride_ir, stride_valid_b,
    num_heads, q_len, n_kv_regions, sm_scale,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_REGION: tl.constexpr,
    KV_REGION: tl.constexpr, TOPK: tl.constexpr, HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr,
    N_TILE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    region, rows, row_ok = _region_rows(tl.program_id(0), Q_REGION, BLOCK_M)
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, offs_d, stride_qm, HEAD_DIM)
    do = load_rows(DOut + b * stride_db + h * stride_dh, rows, row_ok, offs_d, stride_dm, HEAD_DIM)
    row_base = pid_bh.to(tl.int64) * q_len
    # Rows past the region and empty rows (lse = -inf) must get p = 0: they take lse = +inf.
    lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf"))
    lse2 = backward_lse2(lse)
    delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    idx_ptr = Idx + b * stride_ib + h * stride_ih + region * stride_ir
    valid_ptr = Valid + b * stride_valid_b
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, TOPK * KV_REGION, BLOCK_N):
        key_rows, key_ok = _routed_keys(idx_ptr, valid_ptr, start + offs_n, n_kv_regions, KV_REGION, TOPK, HAS_VALID)
        k = load_rows(k_base, key_rows, key_ok, offs_d, stride_kn, HEAD_DIM)
        v = load_rows(v_base, key_rows, key_ok, offs_d, stride_vn, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.where(key_ok[None, :], tl.math.exp2(qk * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    store_rows(DQ + b * stride_dqb + h * stride_dqh, (dq * sm_scale).to(DQ.dtype.element_ty), rows, row_ok, offs_d,
                stride_dqm, HEAD_DIM)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, QStart, QCount, QList, Valid,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_tb, stride_th, stride_lb, stride_lh, stride_valid_b,
    num_heads, num_kv_heads, q_len, n_kv_regions, sm_scale,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_REGION: tl.constexpr,
    KV_REGION: tl.constexpr, TOPK: tl.constexpr, HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr,
    N_TILE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    M_TILES: tl.constexpr = (Q_REGION + BLOCK_M - 1) // BLOCK_M
    N_TILES: tl.constexpr = (KV_REGION + BLOCK_N - 1) // BLOCK_N
    kv_region = tl.program_id(0) // N_TILES
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_h = (pid_bh % num_kv_heads).to(tl.int64)

    local = (tl.program_id(0) % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = kv_region * KV_REGION + local
    col_in = local < KV_REGION
    col_ok = col_in
    if HAS_VALID:
        col_ok = col_ok & (tl.load(Valid + b * stride_valid_b + cols, mask=col_in, other=0) != 0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(K + b * stride_kb + kv_h * stride_kh, cols, col_in, offs_d, stride_kn, HEAD_DIM)
    v = load_rows(V + b * stride_vb + kv_h * stride_vh, cols, col_in, offs_d, stride_vn, HEAD_DIM)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUPS):
        h = kv_h * GROUPS + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_db + h * stride_dh
        row_base = (b * num_heads + h) * q_len
        head_index = b * stride_tb + h * stride_th + kv_region
        first = tl.load(QStart + head_index)
        count = tl.load(QCount + head_index)
        list_ptr = QList + b * stride_lb + h * stride_lh + first
        for it in range(count * M_TILES):
            q_region = tl.load(list_ptr + it // M_TILES)
            local_m = (it % M_TILES) * BLOCK_M + offs_m
            row_ok = local_m < Q_REGION
            rows = q_region * Q_REGION + local_m
            q = load_rows(q_base, rows, row_ok, offs_d, stride_qm, HEAD_DIM)
            do = load_rows(do_base, rows, row_ok, offs_d, stride_dm, HEAD_DIM)
            lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf"))
            lse2 = backward_lse2(lse)
            delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            p_t = tl.where(col_ok[:, None], tl.math.exp2(qk_t * qk_scale - lse2[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    store_rows(DK + b * stride_dkb + kv_h * stride_dkh, (dk * sm_scale).to(DK.dtype.element_ty), cols, col_in,
               offs_d, stride_dkn, HEAD_DIM)
    store_rows(DV + b * stride_dvb + kv_h * stride_dvh, dv.to(DV.dtype.element_ty), cols, col_in, offs_d,
               stride_dvn, HEAD_DIM)


fwd_kernel = tuned(_fwd_kernel, FWD_CONFIGS, _TUNE_KEY, _prune, _INTERPRETER_CONFIGS)
dq_kernel = tuned(_dq_kernel, DQ_CONFIGS, _TUNE_KEY, _prune, _INTERPRETER_CONFIGS)
dkdv_kernel = tuned(_dkdv_kernel, DKDV_CONFIGS, _TUNE_KEY, _prune, _INTERPRETER_CONFIGS)


def launch_args(q: torch.Tensor, k: torch.Tensor, q_region: int, kv_region: int, topk: int,
                has_valid: bool) -> dict:
    head_dim = q.shape[-1]
    return {
        "GROUPS": q.shape[1] // k.shape[1], "HEAD_DIM": head_dim, "BLOCK_D": head_dim_block(head_dim),
        "Q_REGION": q_region, "KV_REGION": kv_region, "TOPK": topk, "HAS_VALID": has_valid,
        "DOT_PRECISION": dot_precision(q.dtype),
        "N_TILE_ROWS": topk * kv_region,
    }


def _tune_key(q: torch.Tensor, launch: dict) -> tuple:
    return (q.dtype, *launch.values())


def _valid_args(kv_valid: torch.Tensor | None, k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The key-validity pointer (a dummy when absent) and its batch stride."""
    if kv_valid is None:
        return k, 0
    return kv_valid, broadcast_stride(kv_valid, 0)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, kv_valid: torch.Tensor | None,
    q_region: int, kv_region: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out, lse)` of routed attention. `indices` int32 `(B|1, H|1, n_q_regions, topk)`; `kv_valid` uint8
    `(B|1, Lk)` or None."""
    q, k, v = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    batch, heads, q_len, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, q_len), device=q.device, dtype=torch.float32)
    launch = launch_args(q, k, q_region, kv_region, indices.shape[-1], kv_valid is not None)
    valid, stride_valid = _valid_args(kv_valid, k)
    n_q_regions = q_len // q_region

    def grid(meta):
        return (n_q_regions * ceil_div(q_region, meta["BLOCK_M"]), batch * heads)

    fwd_kernel.launch(
        grid, _tune_key(q, launch),
        q, k, v, out, lse, indices, valid,
        *row_strides(q, k, v, out),
        broadcast_stride(indices, 0), broadcast_stride(indices, 1), indices.stride(2), stride_valid,
        heads, q_len, k.shape[2] // kv_region, scale,
        **launch,
    )
    return out, lse


def transpose_routing(indices: torch.Tensor, n_kv_regions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each key region, the query regions routed to it, as CSR: `(starts, counts, query_regions)`, int32,
    shapes `(B|1, H|1, n_kv_regions)` twice and `(B|1, H|1, n_q_regions * topk)`. Out-of-range entries are dropped
    (they sort after every real region)."""
    flat = indices.flatten(-2).long()
    topk = indices.shape[-1]
    bucket = torch.where((flat >= 0) & (flat < n_kv_regions), flat, n_kv_regions)
    order = torch.sort(bucket, dim=-1, stable=True).indices
    counts = torch.zeros((*flat.shape[:-1], n_kv_regions + 1), dtype=torch.long, device=flat.device)
    counts.scatter_add_(-1, bucket, torch.ones_like(bucket))
    counts = counts[..., :n_kv_regions]
    starts = counts.cumsum(-1) - counts
    return starts.int().contiguous(), counts.int().contiguous(), (order // topk).int().contiguous()


def backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor,
    k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, kv_valid: torch.Tensor | None, q_region: int,
    kv_region: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dq, dk, dv)` of routed attention, deterministic (no atomics)."""
    q, k, v, out, grad_out = (rows_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    batch, heads, q_len, _head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    n_kv_regions = kv_len // kv_region
    launch = launch_args(q, k, q_region, kv_region, indices.shape[-1], kv_valid is not None)
    valid, stride_valid = _valid_args(kv_valid, k)

    delta = backward_delta(out, grad_out, grad_lse, lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = row_strides(q, k, v, grad_out)

    def dq_grid(meta):
        return ((q_len // q_region) * ceil_div(q_region, meta["BLOCK_M"]), batch * heads)

    dq_kernel.launch(
        dq_grid, _tune_key(q, launch),
        q, k, v, grad_out, lse, delta, dq, indices, valid, *strides,
        *row_strides(dq),
        broadcast_stride(indices, 0), broadcast_stride(indices, 1), indices.stride(2), stride_valid,
        heads, q_len, n_kv_regions, scale,
        **launch,
    )

    starts, counts, query_regions = transpose_routing(indices, n_kv_regions)

    def dkdv_grid(meta):
        return (n_kv_regions * ceil_div(kv_region, meta["BLOCK_N"]), batch * kv_heads)

    dkdv_kernel.launch(
        dkdv_grid, _tune_key(q, {**launch, "N_TILE_ROWS": kv_region}),
        q, k, v, grad_out, lse, delta, dk, dv, starts, counts, query_regions, valid, *strides,
        *row_strides(dk, dv),
        broadcast_stride(starts, 0), broadcast_stride(starts, 1),
        broadcast_stride(query_regions, 0), broadcast_stride(query_regions, 1), stride_valid,
        heads, kv_heads, q_len, n_kv_regions, scale,
        **{**launch, "N_TILE_ROWS": kv_region},
    )
    return dq, dk, dv


def _save(inputs: tuple, needs_input_grad: tuple[bool, ...]) -> tuple[tuple, tuple]:
    q, k, v, indices, kv_valid, q_region, kv_region, scale = inputs
    return (q, k, v, indices, kv_valid), (q_region, kv_region, scale)


routed_op = kernel_op("mmattn::routed", forward, backward, save=_save, grads=3)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, kv_valid: torch.Tensor | None,
           q_region: int, kv_region: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention with the Triton kernels: `(out, lse)`, differentiable in q, k, v (and through lse).
    `indices` `(B|1, H|1, n_q_regions, topk)`, `kv_valid` bool `(B|1, Lk)` or None."""
    valid = None if kv_valid is None else kv_valid.view(torch.uint8).contiguous()
    return routed_op(q, k, v, indices.int().contiguous(), valid, q_region, kv_region, scale)
