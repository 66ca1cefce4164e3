"""Block-sparse FlashAttention for Hopper (sm90): TMA tensor descriptors and warp specialization.

The algorithm, the mask walk and the outputs are those of `block_sparse`'s pointer-load kernels (FlashAttention-2's
online softmax in base 2 over the key blocks each query block lists in `kv_indices`; the backward's dK/dV over the
transposed index and a deterministic dQ kernel); two Hopper features change how the tiles move:

- the Tensor Memory Accelerator (TMA) loads the Q, K, V (and dO) tiles and stores O, dQ, dK, dV through 2-D tensor
  descriptors (`tl.make_tensor_descriptor`) over one head's `[tokens, head_dim]` rows, built in the kernel. A
  descriptor fills rows past the length with zeros on load and drops them on store; keys past kv_len still need
  -inf logits (p = 0 in dQ), query rows past q_len take lse = +inf;
- warp specialization (`tl.range(..., warp_specialize=True)`): producer warps issue the TMA loads of the next tile
  while consumer warps run the matmuls and the softmax of this one (FlashAttention-3's producer-consumer split, done
  by the Triton compiler).

Forward. Dense, on the H200 with Triton 3.6, this form reaches 560 TF/s against 462 for the pointer-load kernel
(specs/kernels.md section 5). `block_sparse.forward` takes it where `eligible` says it applies and the call is not
host-bound; the backward reads the same `out` and `lse` whichever forward ran. On by default; MMATTN_TRITON_TMA=0
(read once at import) turns it off. Measured on the H200 (2026-12-04, benchmarks/results/block_sparse_tma.md): at B1
H24 L32760 D128 our Triton forward went from 0.61-0.83x to 0.78-0.87x FlashAttention-4's, checked against
FlexAttention in float32 (out, dQ, dK, dV); on host-bound calls (under `backends.HOST_BOUND_WORK`) it was 0.05-0.14
ms slower than the pointer kernel (block_sparse_host_bound_tma.md), where `block_sparse.forward` keeps the pointer
kernel. A Triton 3.6 miscompile shaped its epilogue: after the warp-specialized loop a pointer store of the lse wrote
only rows 0-63 of each 128-row tile (rows 64-127 stayed unwritten, so dQ was wrong); the lse now goes out through a
TMA descriptor as `out` does (`LSE_WIDTH`), and so do the backward's gradients.

Backward (`backward_eligible`, `backward`): the dK/dV kernel runs one program per key tile and query head (with
grouped-query heads each writes a float32 gradient of its own, summed per group afterwards: no atomics, so the
backward stays deterministic), the dQ kernel mirrors the forward. Every tile builds for sm_90a without spills
(benchmarks/results/kernel_resources.md). dQ stays a kernel of its own: added atomically inside the warp-specialized
dK/dV loop (by pointer atomics or a TMA reduce, FlashAttention-3's way), the 4-warp tiles crash the warp
specialization pass of Triton 3.6 and 3.8 ("operation destroyed but still has uses") and 64x128 with 8 warps spills
at head dim 128. `block_sparse.backward` runs it for deterministic backwards at head dim 128 (see `BWD_SWITCH`).

Under the Triton interpreter (TRITON_INTERPRET=1) the CPU tests run both in float16 and float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse import (
    _INTERPRETER_CONFIGS,
    _TUNE_KEY,
    _index_strides,
    _tune_key,
    dkdv_step,
    dq_step,
    launch_args,
    launch_dq,
    launch_forward,
    load_row_values,
    prune_configs,
)
from .common import LOG2E, backward_lse2, online_softmax_step, program_heads, softmax_output
from .launch import (
    ceil_div,
    descriptor_reason,
    env_switch,
    hopper,
    row_strides,
    set_allocator,
    size_bucket,
    tile_configs,
    tuned,
)

__all__ = [
    "BWD_SWITCH", "DKDV_CONFIGS", "DQ_CONFIGS", "FWD_CONFIGS", "SWITCH", "backward", "backward_eligible", "eligible",
    "forward", "runs_on",
]

SWITCH: bool = env_switch("MMATTN_TRITON_TMA", default=True)
"""Whether this kernel runs where it applies; on unless MMATTN_TRITON_TMA=0."""

# Warp-specialized tiles on sm90 with Triton 3.6 (specs/kernels.md section 5): 128x128 with 4 warps and 2 stages is
# the fastest measured; the 2-stage 128x64 and 64x64 tiles serve blocks that 128 does not divide. Left out: 128x64
# with 3 or 4 stages and 64x64 with 3 stages, which Triton 3.6 miscompiles to NaN under warp specialization;
# 128x128 with 3+ stages (out of shared memory) and 8 warps (slower). tests/kernels/test_block_sparse_tma.py runs
# every tile listed here on the GPU.
FWD_CONFIGS = tile_configs([(128, 128, 4, 2), (128, 64, 4, 2), (64, 64, 4, 2)])

BWD_SWITCH: bool = env_switch("MMATTN_TRITON_TMA_BWD", default=True)
"""Whether the backward kernels below may run; on unless MMATTN_TRITON_TMA_BWD=0. `block_sparse.backward` takes them
for deterministic backwards where `block_sparse.hopper_backward_pays` (head dim 128): there, on the H200
(2026-12-05), forward+backward took 0.93-1.00x the pointer kernels' time, with gradients equal to theirs bit for bit;
the atomic-dQ pointer backward, faster still, runs where bitwise reproducibility is not asked for."""
# Backward tiles (BLOCK_M query rows x BLOCK_N keys), warp-specialized with 2 stages as the forward's: dK/dV keeps
# two [BLOCK_N, D] float32 accumulators per program, dQ one [BLOCK_M, D]. Fastest first, as timed at that shape on
# the H100 (dK/dV: 125.3, 132.5, 160.5, 196.0 ms forward+backward with the 128x64 dQ tile; dQ: 122.0, 125.3, 146.8,
# 148.3 ms with the first dK/dV tile), so that the untuned pick is the best measured.
DKDV_CONFIGS = tile_configs([(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2)])
DQ_CONFIGS = tile_configs([(128, 128, 8, 2), (128, 64, 8, 2), (64, 128, 4, 2), (64, 64, 4, 2)])
LSE_WIDTH = tl.constexpr(4)
"""Float32 values per lse row in the kernel's output buffer: 16 bytes, the least a TMA descriptor moves per row."""


@triton.jit
def _head_rows(base, n_rows, stride_row, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A TMA descriptor over one head's `[n_rows, BLOCK_D]` rows (unit last stride), moving `BLOCK_ROWS` rows."""
    return tl.make_tensor_descriptor(base, shape=[n_rows, BLOCK_D], strides=[stride_row, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_D])


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
    tl.static_assert(HEAD_DIM == BLOCK_D, "the descriptors tile the whole head dim")
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    q_blk = start_m // Q_BLOCK
    TILES: tl.constexpr = KV_BLOCK // BLOCK_N

    q_desc = _head_rows(Q + b * stride_qb + h * stride_qh, q_len, stride_qm, BLOCK_M, BLOCK_D)
    k_desc = _head_rows(K + b * stride_kb + kv_h * stride_kh, kv_len, stride_kn, BLOCK_N, BLOCK_D)
    v_desc = _head_rows(V + b * stride_vb + kv_h * stride_vh, kv_len, stride_vn, BLOCK_N, BLOCK_D)
    o_desc = _head_rows(Out + b * stride_ob + h * stride_oh, q_len, stride_om, BLOCK_M, BLOCK_D)
    q = q_desc.load([start_m, 0])
    n_blocks = tl.load(KvNum + b * stride_nb + h * stride_nh + q_blk)
    idx_ptr = KvIdx + b * stride_ib + h * stride_ih + q_blk * stride_iq
    qk_scale = sm_scale * LOG2E
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # One warp-specialized loop over every listed tile: Triton 3.6 and 3.8 fail to build a second loop for the
    # trailing partial block (the pointer kernel's split) on sm90, and drop warp specialization for a tail tile after
    # the loop. Where kv_len is not a multiple of the block, keys past it (zeros from the descriptor) get a -inf bias
    # instead, on every tile, which fuses with the scaling into one multiply-add.
    for it in tl.range(0, n_blocks * TILES, warp_specialize=True):
        start_n = tl.load(idx_ptr + it // TILES) * KV_BLOCK + (it % TILES) * BLOCK_N
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if not EVEN_KV:
            s += tl.where(start_n + offs_n < kv_len, 0.0, float("-inf"))[None, :]
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, DOT_PRECISION)

    out, lse = softmax_output(acc, l_i, m_i)
    o_desc.store([start_m, 0], out.to(Out.dtype.element_ty))
    # Lse rows are LSE_WIDTH float32 wide, the 16 bytes a TMA row needs: a pointer store of the lse after this
    # warp-specialized loop leaves rows 64-127 of 128-row tiles unwritten (Triton 3.6 on the H200), a TMA one does not.
    lse_desc = tl.make_tensor_descriptor(Lse + pid_bh.to(tl.int64) * q_len * LSE_WIDTH, shape=[q_len, LSE_WIDTH],
                                         strides=[LSE_WIDTH, 1], block_shape=[BLOCK_M, LSE_WIDTH])
    lse_desc.store([start_m, 0], tl.broadcast_to(lse[:, None], [BLOCK_M, LSE_WIDTH]))


fwd_kernel = tuned(_fwd_kernel, FWD_CONFIGS, _TUNE_KEY, prune_configs, _INTERPRETER_CONFIGS)


@triton.jit(do_not_specialize=["q_len", "kv_len", "size_bucket"])
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, QNum, QIdx,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_iq,
    num_heads, q_len, kv_len, sm_scale, size_bucket,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key tile from one query head: the query tiles of the blocks its key block lists in the
    transposed index, one warp-specialized loop (Q and dO tiles by TMA). Each program writes its own rows of
    DK/DV `(B, H, kv_len, D)`, indexed by query head (the launcher sums the heads of a GQA group)."""
    tl.static_assert(HEAD_DIM == BLOCK_D, "the descriptors tile the whole head dim")
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    kv_blk = start_n // KV_BLOCK
    TILES: tl.constexpr = Q_BLOCK // BLOCK_M

    q_desc = _head_rows(Q + b * stride_qb + h * stride_qh, q_len, stride_qm, BLOCK_M, BLOCK_D)
    do_desc = _head_rows(DOut + b * stride_db + h * stride_dh, q_len, stride_dm, BLOCK_M, BLOCK_D)
    k = _head_rows(K + b * stride_kb + kv_h * stride_kh, kv_len, stride_kn, BLOCK_N, BLOCK_D).load([start_n, 0])
    v = _head_rows(V + b * stride_vb + kv_h * stride_vh, kv_len, stride_vn, BLOCK_N, BLOCK_D).load([start_n, 0])
    n_blocks = tl.load(QNum + b * stride_nb + h * stride_nh + kv_blk)
    idx_ptr = QIdx + b * stride_ib + h * stride_ih + kv_blk * stride_iq
    row_base = pid_bh.to(tl.int64) * q_len
    qk_scale = sm_scale * LOG2E
    offs_m = tl.arange(0, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Rows past q_len come as zeros from the descriptors and take lse = +inf (p = 0): one loop, as in the forward.
    # Keys past kv_len need no mask: their rows of dK and dV are dropped by the store.
    for it in tl.range(0, n_blocks * TILES, warp_specialize=True):
        start_m = tl.load(idx_ptr + it // TILES) * Q_BLOCK + (it % TILES) * BLOCK_M
        q = q_desc.load([start_m, 0])
        do = do_desc.load([start_m, 0])
        rows = start_m + offs_m
        lse = load_row_values(Lse + row_base, rows, q_len, float("inf"), not EVEN_Q)
        delta = load_row_values(Delta + row_base, rows, q_len, 0.0, not EVEN_Q)
        dk, dv, _ = dkdv_step(dk, dv, k, v, q, do, backward_lse2(lse), delta, qk_scale, DOT_PRECISION)

    # Stored through descriptors, as the forward's epilogue (a pointer store after a warp-specialized loop lost rows).
    _head_rows(DK + b * stride_dkb + h * stride_dkh, kv_len, stride_dkn, BLOCK_N, BLOCK_D).store(
        [start_n, 0], (dk * sm_scale).to(DK.dtype.element_ty))
    _head_rows(DV + b * stride_dvb + h * stride_dvh, kv_len, stride_dvn, BLOCK_N, BLOCK_D).store(
        [start_n, 0], dv.to(DV.dtype.element_ty))


@triton.jit(do_not_specialize=["q_len", "kv_len", "size_bucket"])
def _bwd_dq_kernel(
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
    """dQ of one query tile: the forward's walk over the listed key tiles (K, V by TMA), one warp-specialized loop."""
    tl.static_assert(HEAD_DIM == BLOCK_D, "the descriptors tile the whole head dim")
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    q_blk = start_m // Q_BLOCK
    TILES: tl.constexpr = KV_BLOCK // BLOCK_N

    q = _head_rows(Q + b * stride_qb + h * stride_qh, q_len, stride_qm, BLOCK_M, BLOCK_D).load([start_m, 0])
    do = _head_rows(DOut + b * stride_db + h * stride_dh, q_len, stride_dm, BLOCK_M, BLOCK_D).load([start_m, 0])
    k_desc = _head_rows(K + b * stride_kb + kv_h * stride_kh, kv_len, stride_kn, BLOCK_N, BLOCK_D)
    v_desc = _head_rows(V + b * stride_vb + kv_h * stride_vh, kv_len, stride_vn, BLOCK_N, BLOCK_D)
    rows = start_m + tl.arange(0, BLOCK_M)
    row_base = pid_bh.to(tl.int64) * q_len
    lse2 = backward_lse2(load_row_values(Lse + row_base, rows, q_len, float("inf"), not EVEN_Q))
    delta = load_row_values(Delta + row_base, rows, q_len, 0.0, not EVEN_Q)
    n_blocks = tl.load(KvNum + b * stride_nb + h * stride_nh + q_blk)
    idx_ptr = KvIdx + b * stride_ib + h * stride_ih + q_blk * stride_iq
    qk_scale = sm_scale * LOG2E
    offs_n = tl.arange(0, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in tl.range(0, n_blocks * TILES, warp_specialize=True):
        start_n = tl.load(idx_ptr + it // TILES) * KV_BLOCK + (it % TILES) * BLOCK_N
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        # keys past kv_len (zeros from the descriptor) get p = 0
        dq = dq_step(dq, q, do, lse2, delta, k, v, start_n + offs_n, kv_len, qk_scale, not EVEN_KV, DOT_PRECISION)

    _head_rows(DQ + b * stride_dqb + h * stride_dqh, q_len, stride_dqm, BLOCK_M, BLOCK_D).store(
        [start_m, 0], (dq * sm_scale).to(DQ.dtype.element_ty))


dkdv_kernel = tuned(_bwd_dkdv_kernel, DKDV_CONFIGS, _TUNE_KEY, prune_configs, _INTERPRETER_CONFIGS)
dq_kernel = tuned(_bwd_dq_kernel, DQ_CONFIGS, _TUNE_KEY, prune_configs, _INTERPRETER_CONFIGS)


@torch.compiler.assume_constant_result
def runs_on(device: torch.device) -> bool:
    """Whether a kernel of this module (forward or backward) is switched on and `device` runs it (a compiled sm90 GPU,
    or any under the interpreter). A constant to torch.compile, which would otherwise trace the cached device query
    of `attend`'s call."""
    return (SWITCH or BWD_SWITCH) and hopper(device)


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_block: int, kv_block: int) -> tuple[bool, str]:
    """Whether this kernel runs the forward of `(B, H, L, D)` q, k, v with mask blocks `q_block x kv_block`, and if
    not, why. It needs MMATTN_TRITON_TMA unset or 1, what `launch.descriptor_reason` asks and a tile of FWD_CONFIGS
    dividing the blocks."""
    if not SWITCH:
        return False, "off (MMATTN_TRITON_TMA=0)"
    reason = descriptor_reason(q, k, v) or _tile_reason(fwd_kernel, q_block, kv_block)
    return not reason, reason


def _tile_reason(kernel, q_block: int, kv_block: int) -> str:
    """Why no tile of `kernel` fits mask blocks `q_block x kv_block` (a tile side must divide the block side), or ""."""
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kernel.configs]
    if any(q_block % m == 0 and kv_block % n == 0 for m, n in tiles):
        return ""
    return f"no tile of {tiles} divides the blocks ({q_block}, {kv_block})"


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    q_block: int, kv_block: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the Hopper forward kernel on inputs `eligible` accepts: `(out, lse)` as `block_sparse.forward`."""
    set_allocator()
    return launch_forward(fwd_kernel, q, k, v, kv_num_blocks, kv_indices, q_block, kv_block, scale, LSE_WIDTH.value)


def backward_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, q_block: int,
                      kv_block: int) -> tuple[bool, str]:
    """Whether the backward kernels run the backward of `(B, H, L, D)` q, k, v and grad_out with mask blocks
    `q_block x kv_block`, and if not, why: MMATTN_TRITON_TMA_BWD unset or 1, what `launch.descriptor_reason` asks of
    the four and, for each of the dK/dV and dQ kernels, a tile dividing the blocks."""
    if not BWD_SWITCH:
        return False, "off (MMATTN_TRITON_TMA_BWD=0)"
    reason = (descriptor_reason(q, k, v, grad_out=grad_out) or _tile_reason(dkdv_kernel, q_block, kv_block)
              or _tile_reason(dq_kernel, q_block, kv_block))
    return not reason, reason


def backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
    delta: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, q_num_blocks: torch.Tensor,
    q_indices: torch.Tensor, q_block: int, kv_block: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the Hopper backward kernels on inputs `backward_eligible` accepts (`delta` from
    `launch.backward_delta`): `(dq, dk, dv)`, deterministic. With grouped-query heads the dK/dV kernel writes one
    float32 gradient per query head, summed here over each group."""
    set_allocator()
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    launch = launch_args(q, k, q_block, kv_block)
    groups = launch["GROUPS"]
    if groups == 1:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:
        dk, dv = (q.new_empty((batch, heads, kv_len, head_dim), dtype=torch.float32) for _ in range(2))

    def dkdv_grid(meta):
        return (ceil_div(kv_len, meta["BLOCK_N"]), batch * heads)

    dkdv_kernel.launch(
        dkdv_grid, _tune_key(q, launch),
        q, k, v, grad_out, lse, delta, dk, dv, q_num_blocks, q_indices,
        *row_strides(q, k, v, grad_out, dk, dv),
        *_index_strides(q_num_blocks, q_indices),
        heads, q_len, kv_len, scale, size_bucket(q_len),
        **launch,
    )
    if groups > 1:
        dk, dv = (torch.empty_like(t).copy_(g.view(batch, kv_heads, groups, kv_len, head_dim).sum(2))
                  for t, g in ((k, dk), (v, dv)))
    return launch_dq(dq_kernel, grad_out, q, k, v, lse, delta, kv_num_blocks, kv_indices, launch, scale), dk, dv
