"""Triton kernels of one-row attention split by column sets (decode steps of the LVLM interventions).

A decoding step has one query row per head, so one program per (batch, head) would leave most of a GPU idle while it
walks the whole key cache. The keys are split instead (FlashDecoding): each program of `column_set_kernel` folds one
chunk of keys of one (batch, head) with the online softmax into, per column set n, the unnormalized mass
sum_j p_j S_jn and set-weighted output sum_j p_j S_jn v_j; an all-ones set after the user's gives the softmax sum and
the output O. The last program of a group to finish rescales the chunks to their common max and normalizes: O, the
masses m_n and W_n = sum_j A_j S_jn v_j (one launch per call: a decoding step is host-bound). Column edits
A_j <- A_j (1 + sum_n c_n S_jn) are linear in A, so the edited row's output is O + sum_n c_n W_n without A ever being
written. The combine's epilogue (`EPILOGUE`) writes these statistics, or applies the visual attention sink
redistribution (sets image, receivers, sinks) or the head-ranked enhancement (sets image, boost, query), whose head
ranking needs every head's masses of the batch row. A prompt's rows (VAR's rows after the image) go in blocks of
`ROW_BLOCK.rows` per program, so each block reads the keys once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..autograd import inference_op
from .common import LOG2E, program_heads
from .launch import ceil_div, head_dim_block, next_power_of_2

TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal
SETS_BLOCK = 16
"""The padded set count of a one-row program: the (at most 8) column sets and the all-ones set, as tl.dot's smallest
side (with a block of rows a program pads them to a power of two only)."""
KEYS_BLOCK = 32
"""Keys per tile of a split."""


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a call's query rows map onto programs; values from a tile sweep on an H100 (LLaVA-1.5-7B's rows)."""

    rows: int
    """Query rows per program."""
    warps: int
    """Warps per program."""
    programs_per_sm: int
    """Splits are sized so that each multiprocessor gets at most this many programs (those that fit at once)."""

    def compile_args(self, sets: int, splits: int) -> dict:
        """The launch's compile-time arguments for `sets` column sets over `splits` key splits."""
        return {"BLOCK_T": KEYS_BLOCK, "BLOCK_R": self.rows, "BLOCK_S": next_power_of_2(splits),
                "SETS": SETS_BLOCK if self.rows == 1 else next_power_of_2(sets + 1), "num_warps": self.warps}


ONE_ROW = Tiling(rows=1, warps=2, programs_per_sm=4)
"""A decoding step's row: few warps and many splits (memory latency-bound)."""
ROW_BLOCK = Tiling(rows=16, warps=4, programs_per_sm=2)
"""A prompt's rows (VAR's rows after the image): one tl.dot per key tile for the block's logits."""
MAX_SPLITS = 64
"""The combine holds one float per split and head dim in registers ([splits, head_dim] per set)."""


@triton.jit
def _pick(values, sets, index):
    """values[index] of a [SETS] vector."""
    return tl.sum(tl.where(sets == index, values, 0.0), 0)


@triton.jit
def _pick_row(values, sets, index):
    """Row `index` of a [SETS, D] block."""
    return tl.sum(tl.where(sets[:, None] == index, values, 0.0), 0)


@triton.jit
def _dot_exact(p, v):
    """p @ v for float32 p to about float32 accuracy on tensor cores: a half-precision v multiplies p's two leading
    half-precision parts (p = high + low + O(2^-16 p) for bfloat16), float32 v takes the IEEE dot (a float32 dot
    on CUDA cores, whose operands spill beyond small tiles, is what this avoids for half-precision inputs)."""
    if v.dtype == tl.float32:
        return tl.dot(p, v, input_precision="ieee")
    high = p.to(v.dtype)
    low = (p - high.to(tl.float32)).to(v.dtype)
    return tl.dot(low, v, tl.dot(high, v))


@triton.jit
def _fold_keys(
    Q, K, V, COLUMNS, VISIBLE, PARTS, b, h, kh, block_rows, in_row, split,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_cb, stride_ct, stride_mb, stride_mr, stride_mt,
    num_heads, rows, kv_len, column_len, num_sets, chunk, num_splits, record_len, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    SETS: tl.constexpr, HAS_VISIBLE: tl.constexpr,
):
    """Keys [split * chunk, (split + 1) * chunk) of BLOCK_R query rows of one (batch, head): per row, the max logit
    (base 2) and, per set, the masses and set-weighted outputs of p_j = exp2(s_j - max); set `num_sets` is every
    key. Each (row, split) writes one record of PARTS: max, masses [num_sets + 1], set-weighted outputs
    [num_sets + 1, HEAD_DIM]. Several rows share each key tile (one tl.dot per tile for their logits and one for
    their set-weighted outputs), so a prompt's rows read the keys once per row block, not once per row."""
    dims = tl.arange(0, BLOCK_D)
    sets = tl.arange(0, SETS)
    in_dim = dims < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + block_rows[:, None] * stride_qr + dims[None, :],
                mask=in_row[:, None] & in_dim[None, :], other=0.0)
    k_base, v_base = K + b * stride_kb + kh * stride_kh, V + b * stride_vb + kh * stride_vh

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    mass = tl.zeros([BLOCK_R, SETS], tl.float32)
    weighted = tl.zeros([BLOCK_R * SETS, BLOCK_D], tl.float32)
    first = split * chunk
    last = tl.minimum(first + chunk, kv_len)
    for start in range(first, last, BLOCK_T):
        keys = start + tl.arange(0, BLOCK_T)
        in_range = keys < last
        visible = in_row[:, None] & in_range[None, :]
        if HAS_VISIBLE:
            flags = tl.load(VISIBLE + b * stride_mb + block_rows[:, None] * stride_mr + keys[None, :] * stride_mt,
                            mask=visible, other=0)
            visible = visible & (flags != 0)
        tile = in_range[:, None] & in_dim[None, :]
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kt + dims[None, :], mask=tile, other=0.0)
        if BLOCK_R == 1:  # a decoding step: one row, below tl.dot's smallest side
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
        else:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.where(visible, s * (scale * LOG2E), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vt + dims[None, :], mask=tile, other=0.0)
        columns = tl.load(COLUMNS + b * stride_cb + keys[None, :] * stride_ct + sets[:, None],
                          mask=(keys[None, :] < column_len) & (sets[:, None] < num_sets), other=0.0)
        columns = tl.where(sets[:, None] == num_sets, 1.0, columns)  # [SETS, BLOCK_T]
        p_sets = p[:, None, :] * columns[None, :, :]  # [BLOCK_R, SETS, BLOCK_T]
        mass = mass * alpha[:, None] + tl.sum(p_sets, 2)
        row_alpha = tl.reshape(tl.broadcast_to(alpha[:, None], [BLOCK_R, SETS]), [BLOCK_R * SETS])
        weighted = weighted * row_alpha[:, None] + _dot_exact(tl.reshape(p_sets, [BLOCK_R * SETS, BLOCK_T]), v)
        m_i = m_new

    records = PARTS + (((b * rows + block_rows) * num_heads + h) * num_splits + split) * record_len  # [BLOCK_R]
    in_set = sets <= num_sets
    tl.store(records, m_i, mask=in_row)
    tl.store(records[:, None] + 1 + sets[None, :], mass, mask=in_row[:, None] & in_set[None, :])
    tl.store(records[:, None, None] + num_sets + 2 + sets[None, :, None] * HEAD_DIM + dims[None, None, :],
             tl.reshape(weighted, [BLOCK_R, SETS, BLOCK_D]),
             mask=in_row[:, None, None] & in_set[None, :, None] & in_dim[None, None, :])


STATISTICS, REDISTRIBUTE, RANK_HEADS = (tl.constexpr(n) for n in range(3))
"""The combine's epilogues (constexpr: a kernel reads no other globals): write O, masses and set-weighted outputs
(float32), or the output of the sink redistribution or of the head-ranked enhancement (the query's dtype)."""


@triton.jit
def _inverse(total):
    """1 / total, and 0 where total is 0 (a row that saw no key gives zeros, not NaN)."""
    return tl.where(total == 0.0, 0.0, 1.0 / tl.where(total == 0.0, 1.0, total))


@triton.jit
def _top_half(values, heads, num_heads, BLOCK_H: tl.constexpr):
    """1.0 on the max(H // 2, 1) largest of `values` [BLOCK_H] (ties to the lower head), 0.0 elsewhere."""
    other = tl.arange(0, BLOCK_H)
    above = (values[None, :] > values[:, None]) | ((values[None, :] == values[:, None]) & (other[None, :] < heads[:, None]))
    rank = tl.sum((above & (other[None, :] < num_heads)).to(tl.int32), 1)
    return tl.where(rank < tl.maximum(num_heads // 2, 1), 1.0, 0.0)


@triton.jit
def _combine(
    PARTS, OUT, STAT_OUT, MASSES, WEIGHTED, SELECTED, b, r, h,
    stride_ob, stride_oh, stride_or, stride_tb, stride_th, stride_sb, stride_sh, stride_wb, stride_wh, stride_wn,
    stride_eb, stride_er, num_heads, rows, num_sets, num_splits, record_len, share, rho, min_mass,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SETS: tl.constexpr, BLOCK_S: tl.constexpr,
    EPILOGUE: tl.constexpr, HAS_SELECTED: tl.constexpr,
):
    """The split records of one (batch, query row, head) rescaled to their common max and normalized by the all-ones
    set's mass (records written by other programs: read from L2, past the multiprocessor's own cache; every split
    at once, so the combine waits on a few loads, not two per split), then written:
    REDISTRIBUTE edits the rows SELECTED marks into OUT; STATISTICS and RANK_HEADS write O (STAT_OUT), the masses
    and the set-weighted outputs (RANK_HEADS: into its scratch, for `_rank_heads`)."""
    dims = tl.arange(0, BLOCK_D)
    sets = tl.arange(0, SETS)
    in_dim = dims < HEAD_DIM
    in_set = sets <= num_sets
    splits = tl.arange(0, BLOCK_S)
    in_split = splits < num_splits
    records = PARTS + (((b * rows + r) * num_heads + h) * num_splits + splits) * record_len  # [BLOCK_S]
    m = tl.load(records, mask=in_split, other=float("-inf"), cache_modifier=".cg")
    top = tl.max(m, 0)
    factor = tl.math.exp2(m - tl.where(top == float("-inf"), 0.0, top))  # 0 for the padding splits
    mass = tl.sum(factor[:, None] * tl.load(records[:, None] + 1 + sets[None, :],
                                            mask=in_split[:, None] & in_set[None, :], other=0.0,
                                            cache_modifier=".cg"), 0)
    weighted = tl.zeros([SETS, BLOCK_D], tl.float32)
    for n in range(num_sets + 1):  # one set at a time: [BLOCK_S, BLOCK_D] in registers, not [BLOCK_S, SETS, ...]
        row = tl.sum(factor[:, None] * tl.load(records[:, None] + num_sets + 2 + n * HEAD_DIM + dims[None, :],
                                               mask=in_split[:, None] & in_dim[None, :], other=0.0,
                                               cache_modifier=".cg"), 0)
        weighted = tl.where(sets[:, None] == n, row[None, :], weighted)

    inverse = _inverse(_pick(mass, sets, num_sets))
    mass, weighted = mass * inverse, weighted * inverse
    acc = _pick_row(weighted, sets, num_sets)
    if EPILOGUE == REDISTRIBUTE:
        # sets (image, receivers, sinks): image-centric rows move `share` of the sinks' mass to the receivers
        image, receivers, sinks = _pick(mass, sets, 0), _pick(mass, sets, 1), _pick(mass, sets, 2)
        centric = (receivers - rho * image >= 0.0) & (image >= min_mass) & (receivers >= TINY)
        if HAS_SELECTED:
            centric = centric & (tl.load(SELECTED + b * stride_eb + r * stride_er) != 0)
        gain = tl.where(centric, sinks / tl.where(centric, receivers, 1.0), 0.0)
        moved = gain * _pick_row(weighted, sets, 1) - tl.where(centric, _pick_row(weighted, sets, 2), 0.0)
        tl.store(OUT + b * stride_ob + h * stride_oh + r * stride_or + dims,
                 (acc + share * moved).to(OUT.dtype.element_ty), mask=in_dim)
    else:
        tl.store(STAT_OUT + b * stride_tb + h * stride_th + dims, acc, mask=in_dim)
        user_set = sets < num_sets
        tl.store(MASSES + b * stride_sb + h * stride_sh + sets, mass, mask=user_set)
        tl.store(WEIGHTED + b * stride_wb + h * stride_wh + sets[:, None] * stride_wn + dims[None, :], weighted,
                 mask=user_set[:, None] & in_dim[None, :])


@triton.jit
def _rank_heads(
    OUT, STAT_OUT, MASSES, WEIGHTED, b, stride_ob, stride_oh, stride_tb, stride_th, stride_sb, stride_sh, stride_wb,
    stride_wh, stride_wn, num_heads, beta,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """GIFT's head-ranked enhancement of one batch row's query row, every head at once, from the heads' combined
    statistics (sets image, boost = image (M - 1), query): the top half of heads by image mass (vision heads) add
    W_boost, the top half by query mass add (beta r - 1) W_query with r the vision heads' image-mass gain, and each
    head's row is rescaled to its original mass."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    in_head = heads < num_heads
    tile = in_head[:, None] & (dims < HEAD_DIM)[None, :]
    masses = MASSES + b * stride_sb + heads * stride_sh
    image = tl.load(masses, mask=in_head, other=0.0, cache_modifier=".cg")
    boost = tl.load(masses + 1, mask=in_head, other=0.0, cache_modifier=".cg")
    query = tl.load(masses + 2, mask=in_head, other=0.0, cache_modifier=".cg")
    vision = _top_half(image, heads, num_heads, BLOCK_H)
    gain = tl.sum(vision * boost, 0) / tl.maximum(tl.sum(vision * image, 0), TINY)
    query_gain = _top_half(query, heads, num_heads, BLOCK_H) * (beta * (1.0 + gain) - 1.0)
    weighted = WEIGHTED + b * stride_wb + heads[:, None] * stride_wh + dims[None, :]
    edited = tl.load(STAT_OUT + b * stride_tb + heads[:, None] * stride_th + dims[None, :], mask=tile, other=0.0,
                     cache_modifier=".cg")
    edited += vision[:, None] * tl.load(weighted + stride_wn, mask=tile, other=0.0, cache_modifier=".cg")
    edited += query_gain[:, None] * tl.load(weighted + 2 * stride_wn, mask=tile, other=0.0, cache_modifier=".cg")
    kept = 1.0 + vision * boost + query_gain * query
    tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             (edited / kept[:, None]).to(OUT.dtype.element_ty), mask=tile)


@triton.jit
def column_set_kernel(
    Q, K, V, COLUMNS, VISIBLE, PARTS, ARRIVALS, OUT, STAT_OUT, MASSES, WEIGHTED, SELECTED,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_cb, stride_ct, stride_mb, stride_mr, stride_mt, stride_ob, stride_oh, stride_or, stride_tb, stride_th,
    stride_sb, stride_sh, stride_wb, stride_wh, stride_wn, stride_eb, stride_er,
    num_heads, rows, kv_len, column_len, num_sets, chunk, num_splits, record_len, scale, share, rho, min_mass, beta,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr, SETS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
    EPILOGUE: tl.constexpr, HAS_VISIBLE: tl.constexpr, HAS_SELECTED: tl.constexpr,
):
    """One program per (batch, block of BLOCK_R query rows, head) and key split folds its keys (`_fold_keys`); the
    last of a program's splits to arrive (ARRIVALS: zeroed counters, one per program, then one per batch row)
    combines their records (`_combine`), and for RANK_HEADS the last head of a batch row to arrive ranks the heads
    (`_rank_heads`, which needs them all). One launch per call: a decoding step is host-bound, and a launch costs
    tens of microseconds of Python. RANK_HEADS keeps the heads' statistics in PARTS past the records (the host
    passes PARTS and zero strides for them, as for REDISTRIBUTE, which writes none)."""
    pid, split = tl.program_id(0), tl.program_id(1)
    if EPILOGUE == RANK_HEADS:  # one row per program: (batch, head) programs, batch * heads * (O, masses, W)
        STAT_OUT = PARTS + tl.num_programs(0) * num_splits * record_len
        MASSES = STAT_OUT + tl.num_programs(0) * HEAD_DIM
        WEIGHTED = MASSES + tl.num_programs(0) * num_sets
        stride_tb, stride_th = num_heads * HEAD_DIM, HEAD_DIM
        stride_sb, stride_sh = num_heads * num_sets, num_sets
        stride_wb, stride_wh, stride_wn = num_heads * num_sets * HEAD_DIM, num_sets * HEAD_DIM, HEAD_DIM
    block, h, kh = program_heads(pid, num_heads, GROUPS)
    row_blocks = tl.cdiv(rows, BLOCK_R)
    b, first_row = block // row_blocks, (block % row_blocks) * BLOCK_R
    block_rows = first_row + tl.arange(0, BLOCK_R)
    _fold_keys(Q, K, V, COLUMNS, VISIBLE, PARTS, b, h, kh, block_rows, block_rows < rows, split,
               stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
               stride_cb, stride_ct, stride_mb, stride_mr, stride_mt,
               num_heads, rows, kv_len, column_len, num_sets, chunk, num_splits, record_len, scale,
               HEAD_DIM, BLOCK_D, BLOCK_T, BLOCK_R, SETS, HAS_VISIBLE)

    tl.debug_barrier()  # every thread's stores are made before the (release) arrival
    if tl.atomic_add(ARRIVALS + pid, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
        for row in range(first_row, tl.minimum(first_row + BLOCK_R, rows)):
            _combine(PARTS, OUT, STAT_OUT, MASSES, WEIGHTED, SELECTED, b, row, h,
                     stride_ob, stride_oh, stride_or, stride_tb, stride_th, stride_sb, stride_sh, stride_wb,
                     stride_wh, stride_wn, stride_eb, stride_er, num_heads, rows, num_sets, num_splits, record_len,
                     share, rho, min_mass, HEAD_DIM, BLOCK_D, SETS, BLOCK_S, EPILOGUE, HAS_SELECTED)
        if EPILOGUE == RANK_HEADS:  # one query row per batch row
            tl.debug_barrier()
            row_arrivals = ARRIVALS + tl.num_programs(0) + b
            if tl.atomic_add(row_arrivals, 1, sem="acq_rel", scope="gpu") == num_heads - 1:
                _rank_heads(OUT, STAT_OUT, MASSES, WEIGHTED, b, stride_ob, stride_oh, stride_tb, stride_th,
                            stride_sb, stride_sh, stride_wb, stride_wh, stride_wn, num_heads, beta,
                            HEAD_DIM, BLOCK_D, BLOCK_H)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The multiprocessors the key splits are sized for (4 under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, as on a small GPU


def key_splits(programs: int, kv_len: int, multiprocessors: int, programs_per_sm: int) -> tuple[int, int]:
    """(chunk, splits): chunks of whole key tiles, as many as fit `programs_per_sm` programs on each multiprocessor
    (one wave: rounding up to fill it left a partial second wave, batch 8 x 32 heads at 2,048 keys 157 us with 3
    splits, 122 with 2 on an H100), at least one, at most `MAX_SPLITS`."""
    wanted = programs_per_sm * multiprocessors // programs
    splits = max(1, min(ceil_div(kv_len, KEYS_BLOCK), wanted, MAX_SPLITS))
    chunk = max(1, ceil_div(ceil_div(kv_len, splits), KEYS_BLOCK)) * KEYS_BLOCK
    return chunk, max(1, ceil_div(kv_len, chunk))


class _Plan(NamedTuple):
    """What a launch's shape decides: the grid, the key chunk, the scratch sizes and the compile-time arguments."""

    grid: tuple[int, int]
    chunk: int
    record_len: int
    scratch: int
    """Floats of PARTS: the split records (and RANK_HEADS' statistics)."""
    counters: int
    constants: dict


@functools.lru_cache(maxsize=64)
def launch_plan(batch: int, heads: int, kv_heads: int, rows: int, head_dim: int, kv_len: int, sets: int, epilogue: int,
                multiprocessors: int) -> _Plan:
    """The launch plan of a call's shape on a GPU of `multiprocessors` SMs, worked out once per shape: every edited
    layer of a step has the same."""
    tiling = ONE_ROW if rows == 1 else ROW_BLOCK
    programs = batch * ceil_div(rows, tiling.rows) * heads
    chunk, splits = key_splits(programs, kv_len, multiprocessors, tiling.programs_per_sm)
    record_len = 1 + (sets + 1) * (head_dim + 1)  # max, masses, set-weighted outputs
    ranked = epilogue == RANK_HEADS.value
    statistics = batch * heads * (sets + 1) * (head_dim + 1) if ranked else 0
    scratch = batch * rows * heads * splits * record_len + statistics
    constants = {"GROUPS": heads // kv_heads, "HEAD_DIM": head_dim, "BLOCK_D": head_dim_block(head_dim),
                 "BLOCK_H": next_power_of_2(heads, 2) if ranked else 1, "EPILOGUE": epilogue,
                 **tiling.compile_args(sets, splits)}
    return _Plan((programs, splits), chunk, record_len, scratch, programs + (batch if ranked else 0), constants)


def _flags(flags: torch.Tensor | None, dims: int) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    """A bool tensor of `dims` axes as the kernels read it (uint8), and its strides (zeros without one)."""
    return (None, (0,) * dims) if flags is None else (flags.view(torch.uint8), flags.stride())


def _launch(q, k, v, columns, visible, scale, out, epilogue: tl.constexpr, statistics=None, selected=None,
            share=0.0, rho=0.0, min_mass=0.0, beta=0.0) -> None:
    """`column_set_kernel` writing `out` with the `epilogue`'s parameters (STATISTICS: `out` is O and `statistics`
    = (masses, weighted)), over every (batch, query row, head): one row per program in a decoding step, blocks of
    rows for a prompt's rows."""
    batch, heads, rows, head_dim = q.shape
    plan = launch_plan(batch, heads, k.shape[1], rows, head_dim, k.shape[2], columns.shape[2], epilogue.value,
                       multiprocessors(q.device))
    parts = q.new_empty((plan.scratch,), dtype=torch.float32)
    arrivals = torch.zeros((plan.counters,), dtype=torch.int32, device=q.device)
    if visible is not None and visible.dim() == 2:  # every row sees the same keys: a row stride of 0
        visible = visible[:, None].expand(-1, rows, -1)
    visible, visible_strides = _flags(visible, 3)
    selected, selected_strides = _flags(selected, 2)
    if statistics:
        stat_out, (masses, weighted) = out, statistics
        statistics_strides = (*out.stride()[:2], *masses.stride()[:2], *weighted.stride()[:3])
    else:
        stat_out = masses = weighted = parts
        statistics_strides = (0,) * 7
    column_set_kernel[plan.grid](
        q, k, v, columns, columns if visible is None else visible, parts, arrivals, out, stat_out, masses, weighted,
        parts if selected is None else selected,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], columns.stride(0), columns.stride(1), *visible_strides,
        *out.stride()[:3], *statistics_strides, *selected_strides,
        heads, rows, k.shape[2], columns.shape[1], columns.shape[2], plan.chunk, plan.grid[1], plan.record_len, scale,
        share, rho, min_mass, beta, HAS_VISIBLE=visible is not None, HAS_SELECTED=selected is not None,
        **plan.constants,
    )


def column_sets_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor, visible: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, H, 1, D], masses [B, H, N], weighted [B, H, N, D]), float32."""
    out, masses, weighted = _statistics_like(q, k, v, columns)
    _launch(q, k, v, columns, visible, scale, out, STATISTICS, (masses, weighted))
    return out, masses, weighted


def sink_redistribution_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor, visible: torch.Tensor | None,
    selected: torch.Tensor | None, scale: float, share: float, rho: float, min_mass: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The redistributed output [B, H, R, D] in q's dtype (sets image, receivers, sinks) of the rows `selected`
    [B, R] marks (all without it), written into `out` where given; the other rows are plain attention."""
    out = q.new_empty(q.shape) if out is None else out
    _launch(q, k, v, columns, visible, scale, out, REDISTRIBUTE, selected=selected, share=share, rho=rho,
            min_mass=min_mass)
    return out


def ranked_heads_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor, visible: torch.Tensor | None,
    scale: float, beta: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The head-ranked enhancement's output [B, H, 1, D] in q's dtype (sets image, boost, query), written into `out`
    where given."""
    out = q.new_empty(q.shape) if out is None else out
    _launch(q, k, v, columns, visible, scale, out, RANK_HEADS, beta=beta)
    return out


def _statistics_like(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor, *rest
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`column_sets_forward`'s outputs, unwritten (its fake)."""
    batch, heads, _, head_dim = q.shape
    sets = columns.shape[2]
    return (q.new_empty(q.shape, dtype=torch.float32), q.new_empty((batch, heads, sets), dtype=torch.float32),
            q.new_empty((batch, heads, sets, head_dim), dtype=torch.float32))


column_sets_op = inference_op("mmattn::column_sets", column_sets_forward, fake=_statistics_like)
sink_redistribution_op = inference_op("mmattn::sink_redistribution", sink_redistribution_forward,
                                      fake=lambda q, *rest: q.new_empty(q.shape))
ranked_heads_op = inference_op("mmattn::ranked_heads", ranked_heads_forward, fake=lambda q, *rest: q.new_empty(q.shape))
