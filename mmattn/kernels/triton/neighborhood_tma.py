"""Fused neighborhood attention forward for Hopper (sm90): TMA tensor descriptors.

The algorithm is `neighborhood._fwd_kernel`'s (a query tile walks the bounding box of its queries' windows in key
tiles, full tiles skip the element-wise mask, FlashAttention-2's online softmax in base 2); what changes is how
tiles move. Without dilation a tile of `T0 x T1 x T2` positions is a box of the token grid, so the Tensor Memory
Accelerator loads it through a 4-D descriptor over one head's `[L0, L1, L2, head_dim]` tokens (positions past the
grid read as zeros, which the window mask excludes) into shared memory, where it is viewed as `[T0 * T1 * T2,
head_dim]` rows for the matmuls, and stores the output the same way. The pointer kernel gathers rows by address
instead, which at 128-position tiles and head dim 128 costs it registers it spills (kernel_resources.md).

Not warp-specialized: Triton 3.6 and 3.8 fail to partition a loop that reshapes a descriptor's multi-dimensional
tile (`NVGPUWarpSpecialization`: "number of src and dst elements of reshape must be the same"), so the software
pipeliner overlaps the loads with the compute.

`neighborhood.forward` takes it where `eligible` says it applies, unless MMATTN_TRITON_NA_TMA=0; the backward reads
the same `out` and `lse`. Its tiles pass test_gpu_tiles.py on an H100 (2026-12-05). Forward there, against cuDNN
dense SDPA in the same process (`benchmarks/neighborhood.py`): FLUX-like 2D (B1 H24 256x256 D128, window 80x80)
13.5 ms, 6.4x, and video 3D (30x48x80, window 18x24x24) 56.3 ms, 4.7x; the pointer kernel was not re-timed there
(H200: 4.8-5.2x and 3.9x). A first version loaded Q by TMA too and was wrong with 128-position key tiles (the first
key tile landed in Q's shared buffer before Q was read; Q is now loaded by address); on the H200 its loop, the same
work, took 13.8 ms against the pointer kernel's 17.7 (FLUX-like) and 57.1 against 70.7 (video).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backends import INTERPRETED
from .common import LOG2E, load_rows, online_softmax_step, program_heads, softmax_output
from .launch import descriptor_reason, env_switch, row_strides, set_allocator, size_bucket, tuned
from .neighborhood import (
    _TUNE_KEY, _config, _full, _grid, _inside, _nth_tile, _query_rows, _split3, _tile, _tile_count, _window_box,
    fits, launch_args,
)

__all__ = ["CONFIGS", "SWITCH", "eligible", "forward", "pattern_reason"]

SWITCH: bool = env_switch("MMATTN_TRITON_NA_TMA", default=True)
"""Whether this kernel runs where it applies; on unless MMATTN_TRITON_NA_TMA=0."""

# 128-position tiles with 8 warps (no spills at head dim 128; 4 warps spill 1.2 KB): 3-D boxes for video first (the
# untimed pick), 2-D tiles for image grids, keys in the same boxes or in halves of them.
CONFIGS = [
    _config((2, 8, 8), (2, 8, 8), 8, 3), _config((1, 8, 16), (1, 8, 16), 8, 3), _config((2, 8, 8), (2, 8, 8), 8, 2),
    _config((1, 8, 16), (1, 8, 16), 8, 2), _config((2, 8, 8), (2, 4, 8), 8, 3), _config((1, 8, 16), (1, 8, 8), 8, 3),
]
INTERPRETER_CONFIGS = [_config((1, 4, 4), (1, 4, 4), 4, 1), _config((2, 2, 4), (2, 2, 4), 4, 1)]
MIN_WINDOW = 128
"""Keys per window below which the pointer kernel keeps the problem: a 7x7 window (NAT) visits four of these 128-key
tiles per query tile where the pointer kernel's 16x16 key tile covers it once."""


@triton.jit
def _grid_tiles(base, L0, L1, L2, stride_n, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """A TMA descriptor over one head's token grid `[L0, L1, L2, BLOCK_D]` moving `T0 x T1 x T2` boxes."""
    row = L2.to(tl.int64) * stride_n  # int64: a head of a large grid may span more than 2**31 elements
    return tl.make_tensor_descriptor(base, shape=[L0, L1, L2, BLOCK_D], strides=[L1 * row, row, stride_n, 1],
                                     block_shape=[T0, T1, T2, BLOCK_D])


@triton.jit(do_not_specialize=["L0", "L1", "L2", "size_bucket"])
def _fwd_kernel(
    Q, K, V, Out, Lse,
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
    """`neighborhood._fwd_kernel`'s arguments less the bias, on an undilated grid (no bias, dilations 1)."""
    tl.static_assert(HEAD_DIM == BLOCK_D, "the descriptors tile the whole head dim")
    tl.static_assert(not HAS_RPB and D0 == 1 and D1 == 1 and D2 == 1, "no bias, no dilation")
    M: tl.constexpr = TQ0 * TQ1 * TQ2
    N: tl.constexpr = TK0 * TK1 * TK2
    pid_bh = tl.program_id(1)
    b, h, kv_h = program_heads(pid_bh, num_heads, GROUPS)
    _, _, _, n0, n1, n2, f0, f1, f2 = _tile(tl.program_id(0), L0, L1, L2, 1, 1, 1, TQ0, TQ1, TQ2)
    _, _, _, rows_ok, rows, lo0, lo1, lo2, hi0, hi1, hi2 = _query_rows(
        f0, f1, f2, 0, 0, 0, n0, n1, n2, L1, L2, K0, K1, K2, 1, 1, 1, S0, S1, S2, C0, C1, C2, TQ0, TQ1, TQ2)
    first_lo0, first_hi0, last_lo0, last_hi0 = _window_box(f0, n0 - 1, n0, K0, S0, C0, TQ0)
    first_lo1, first_hi1, last_lo1, last_hi1 = _window_box(f1, n1 - 1, n1, K1, S1, C1, TQ1)
    first_lo2, first_hi2, last_lo2, last_hi2 = _window_box(f2, n2 - 1, n2, K2, S2, C2, TQ2)
    nk1, nk2, n_tiles = _tile_count(first_lo0, first_lo1, first_lo2, last_hi0, last_hi1, last_hi2, TK0, TK1, TK2)

    k_desc = _grid_tiles(K + b * stride_kb + kv_h * stride_kh, L0, L1, L2, stride_kn, TK0, TK1, TK2, BLOCK_D)
    v_desc = _grid_tiles(V + b * stride_vb + kv_h * stride_vh, L0, L1, L2, stride_vn, TK0, TK1, TK2, BLOCK_D)
    # Q by address: loaded into shared memory by TMA, its buffer was reused for the first key tile while still being
    # read (Triton 3.6, 128-position key tiles: wrong outputs on the H200)
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, rows_ok, tl.arange(0, BLOCK_D), stride_qn, HEAD_DIM)
    m0, m1, m2 = _split3(tl.arange(0, N), TK1, TK2)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, BLOCK_D], dtype=tl.float32)
    for it in range(n_tiles):
        s0, s1, s2 = _nth_tile(it, nk1, nk2, first_lo0, first_lo1, first_lo2, TK0, TK1, TK2)
        k = k_desc.load([s0, s1, s2, 0]).reshape(N, BLOCK_D)
        v = v_desc.load([s0, s1, s2, 0]).reshape(N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if not _full(s0, s1, s2, last_lo0, last_lo1, last_lo2, first_hi0, first_hi1, first_hi2, TK0, TK1, TK2):
            inside = _inside((s0 + m0)[None, :], (s1 + m1)[None, :], (s2 + m2)[None, :], lo0[:, None],
                             lo1[:, None], lo2[:, None], hi0[:, None], hi1[:, None], hi2[:, None])
            s = tl.where(inside, s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, DOT_PRECISION)

    out, lse = softmax_output(acc, l_i, m_i)
    o_desc = _grid_tiles(Out + b * stride_ob + h * stride_oh, L0, L1, L2, stride_on, TQ0, TQ1, TQ2, BLOCK_D)
    o_desc.store([f0, f1, f2, 0], out.to(Out.dtype.element_ty).reshape(TQ0, TQ1, TQ2, BLOCK_D))
    tl.store(Lse + pid_bh.to(tl.int64) * (L0 * L1 * L2) + rows, lse, mask=rows_ok)


def _prune(configs, named_args, **kwargs):
    """Keeps the tiles that suit this problem's axes (`neighborhood.fits`; `eligible` asks for one)."""
    args = {**named_args, **kwargs}
    return [config for config in configs if fits(config, [args[f"L{a}"] for a in range(3)])]


fwd_kernel = tuned(_fwd_kernel, CONFIGS, _TUNE_KEY, _prune, INTERPRETER_CONFIGS)


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_rpb: bool, pattern: list[int]) -> tuple[bool, str]:
    """Whether this kernel runs the forward of flat-token `(B, H, N, D)` q, k, v on `pattern`
    (`neighborhood.pattern_ints`), and if not, why. It needs MMATTN_TRITON_NA_TMA unset or 1, what
    `launch.descriptor_reason` asks, no relative position bias, no dilation (a tile is then a box of the grid) and a
    tile of its list that suits the grid's axes, and windows of at least `MIN_WINDOW` keys."""
    if not SWITCH:
        return False, "off (MMATTN_TRITON_NA_TMA=0)"
    reason = descriptor_reason(q, k, v) or pattern_reason(has_rpb, pattern)
    return not reason, reason


def pattern_reason(has_rpb: bool, pattern: list[int]) -> str:
    """Why this kernel cannot run `pattern` (`neighborhood.pattern_ints`), or "" if it can (see `eligible`)."""
    if has_rpb:
        return "a relative position bias is added by the pointer kernel only"
    if any(d != 1 for d in pattern[6:9]):
        return f"dilation {pattern[6:9]}: a dilated tile is no box of the grid"
    if (window := math.prod(pattern[3:6])) < MIN_WINDOW:
        return f"windows of {window} keys, under {MIN_WINDOW}: the pointer kernel's smaller tiles waste less"
    configs = INTERPRETER_CONFIGS if INTERPRETED else CONFIGS
    if not any(fits(config, pattern[0:3]) for config in configs):
        return f"no tile of the list suits the grid {pattern[0:3]}"
    return ""


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: list[int], scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the Hopper forward on inputs `eligible` accepts (rows with unit last stride): `(out, lse)` as
    `neighborhood.forward`."""
    set_allocator()
    batch, heads, tokens, _head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
    launch = launch_args(q, k, pattern, False)
    fwd_kernel.launch(
        _grid(pattern, "TQ", batch * heads), (q.dtype, size_bucket(tokens), *launch.values()),
        q, k, v, out, lse, *row_strides(q, k, v, out),
        heads, *pattern[0:3], scale, size_bucket=size_bucket(tokens), **launch,
    )
    return out, lse
