"""Block-sparse FlashAttention forward for Hopper (sm90): TMA tensor descriptors and warp specialization.

The algorithm, the mask walk and the outputs are those of `block_sparse._fwd_kernel` (FlashAttention-2's online
softmax in base 2 over the key blocks each query block lists in `kv_indices`); two Hopper features change how the
tiles move:

- the Tensor Memory Accelerator (TMA) loads the Q, K, V tiles and stores O through 2-D tensor descriptors
  (`tl.make_tensor_descriptor`) over one head's `[tokens, head_dim]` rows, built in the kernel. A descriptor fills
  rows past the length with zeros on load and drops them on store; keys past kv_len still need -inf logits;
- warp specialization (`tl.range(..., warp_specialize=True)`): producer warps issue the TMA loads of the next key
  tile while consumer warps run the matmuls and the softmax of this one (FlashAttention-3's producer-consumer
  split, done by the Triton compiler).

Dense, on the H200 with Triton 3.6, this form reaches 560 TF/s against 462 for the pointer-load kernel
(specs/kernels.md section 5). `block_sparse.forward` takes it where `eligible` says it applies and the call is not
host-bound; the backward reads the same `out` and `lse` whichever forward ran.

On by default; MMATTN_TRITON_TMA=0 (read once at import) turns it off. Measured on the H200 (2026-12-04,
benchmarks/results/block_sparse_tma.md): at B1 H24 L32760 D128 our Triton forward went from 0.61-0.83x to 0.78-0.87x
FlashAttention-4's, checked against FlexAttention in float32 (out, dQ, dK, dV); on host-bound calls (under
`backends.HOST_BOUND_WORK`) it was 0.05-0.14 ms slower than the pointer kernel (block_sparse_host_bound_tma.md),
where `block_sparse.forward` keeps the pointer kernel. A Triton 3.6 miscompile shaped its epilogue: after the
warp-specialized loop a pointer store of the lse wrote only rows 0-63 of each 128-row tile (rows 64-127 stayed
unwritten, so dQ was wrong); the lse now goes out through a TMA descriptor as `out` does (`LSE_WIDTH`). Under the
Triton interpreter (TRITON_INTERPRET=1) the CPU tests run it in float16 and float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse import _INTERPRETER_CONFIGS, _TUNE_KEY, launch_forward, prune_configs
from .common import LOG2E, online_softmax_step, program_heads, softmax_output
from .launch import descriptor_reason, env_switch, hopper, set_allocator, tile_configs, tuned

__all__ = ["FWD_CONFIGS", "SWITCH", "eligible", "forward", "runs_on"]

SWITCH: bool = env_switch("MMATTN_TRITON_TMA", default=True)
"""Whether this kernel runs where it applies; on unless MMATTN_TRITON_TMA=0."""

# Warp-specialized tiles on sm90 with Triton 3.6 (specs/kernels.md section 5): 128x128 with 4 warps and 2 stages is
# the fastest measured; the 2-stage 128x64 and 64x64 tiles serve blocks that 128 does not divide. Left out: 128x64
# with 3 or 4 stages and 64x64 with 3 stages, which Triton 3.6 miscompiles to NaN under warp specialization;
# 128x128 with 3+ stages (out of shared memory) and 8 warps (slower). tests/kernels/test_block_sparse_tma.py runs
# every tile listed here on the GPU.
FWD_CONFIGS = tile_configs([(128, 128, 4, 2), (128, 64, 4, 2), (64, 64, 4, 2)])
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


@torch.compiler.assume_constant_result
def runs_on(device: torch.device) -> bool:
    """Whether this kernel is switched on and `device` runs it (a compiled sm90 GPU, or any under the interpreter).
    A constant to torch.compile, which would otherwise trace the cached device query of `attend`'s call."""
    return SWITCH and hopper(device)


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_block: int, kv_block: int) -> tuple[bool, str]:
    """Whether this kernel runs the forward of `(B, H, L, D)` q, k, v with mask blocks `q_block x kv_block`, and if
    not, why. It needs MMATTN_TRITON_TMA unset or 1, what `launch.descriptor_reason` asks and a tile of FWD_CONFIGS
    dividing the blocks."""
    if not SWITCH:
        return False, "off (MMATTN_TRITON_TMA=0)"
    if reason := descriptor_reason(q, k, v):
        return False, reason
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in fwd_kernel.configs]
    if not any(q_block % m == 0 and kv_block % n == 0 for m, n in tiles):
        return False, f"no tile of {tiles} divides the blocks ({q_block}, {kv_block})"
    return True, ""


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    q_block: int, kv_block: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the Hopper forward kernel on inputs `eligible` accepts: `(out, lse)` as `block_sparse.forward`."""
    set_allocator()
    return launch_forward(fwd_kernel, q, k, v, kv_num_blocks, kv_indices, q_block, kv_block, scale, LSE_WIDTH.value)
