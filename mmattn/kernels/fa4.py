"""FlashAttention-4 (CuTe DSL) adapter: runs `block_sparse_attention` on FA4's block-sparse kernels.

FA4 (`flash-attn-4` 4.0.0b36, import `flash_attn.cute`) is an optional dependency: it is imported inside the
functions that call it, never when this module is imported. What the adapter relies on, read from that
version's source (`interface.py`, `block_sparsity.py`, `block_sparse_utils.py`, `flash_fwd_sm90.py`,
`flash_bwd_sm90.py`, `flash_bwd_sm100.py`):

* Block sparsity is given as `BlockSparseTensorsTorch`: per (batch, head, q-block) a "mask" list (blocks on
  which a `mask_mod` refines the pattern) and a "full" list (blocks attended whole), plus the transposed lists
  (per kv-block the q-blocks) for the backward. mmattn attends whole blocks, so every kept block goes into the
  full list and the mask list is present but empty (FA4 requires the mask tensors; counts of 0 are never read).
* Sequence bounds: both kernels walk each list from its last entry to its first and apply the key-length mask
  (`mask_seqlen=True`) to the first block they visit of each list (forward, sm90 and sm100), and the sm90
  backward applies it to every block. Our lists are sorted ascending, so a partial last key block, when kept, is
  the last entry and is masked by position; no "mask" list and no `mask_mod` are needed for partial blocks.
  Query rows past `q_len` are padding FA4 never stores. (Unsorted lists would leave the partial block unmasked.)
* Batch and head dims of size 1 are accepted and expanded by FA4 as stride-0 views; keeping the head dim at 1
  also keeps FA4's pack-GQA path available (it is turned off when the sparse tensors have a head dim > 1).
* Rows with no block: the forward resets the softmax state and writes out = 0, lse = -inf, the convention of
  mmattn's kernels; the backward never visits them, so their gradients are 0.
* Deterministic backward with block sparsity needs `dq_write_order` (rank of each kv-block among the kv-blocks
  that write one q-block's dQ, ascending), `dq_write_order_full` and `spt`; it is implemented on sm100/sm110
  only. The sm90 backward asserts `not deterministic` on its block-sparse path, so on Hopper the backward is
  FA4's atomic dQ accumulation (not bitwise reproducible run to run).
* Tile sizes and the block sizes they admit: see `fa4_tiles` and `fa4_supports`. The sm90 kernels take a kv block of
  exactly one tile (`tile_n`, 128 at head dim 128); a mask whose kv block is a multiple of it (STA's 384-token tiles)
  reaches them cut into tiles (`split_kv_blocks`).

The mask's own int32 index tensors (`kv_num_blocks`/`kv_indices` forward, the transposed `q_num_blocks`/`q_indices`
backward) are passed as FA4's full-block lists without a copy: FA4 reads only the first `count` entries of a row.
FA4's forward and backward run as `kernel_op` custom ops (`mmattn::fa4_block_sparse_fwd/_bwd`), one opaque call each
under torch.compile, writing through FA4's `out=`/`dq=`/`dk=`/`dv=` into outputs laid out like the inputs (a
`(B, H, L, D)` view of a model's `(B, L, H, D)` tensor gets the same kind of view: no copy on the way back).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .autograd import kernel_op
from .mask import BlockSparseMask

__all__ = [
    "dq_write_order",
    "fa4_available",
    "fa4_block_sparse_attention",
    "fa4_block_sparse_op",
    "fa4_supports",
    "fa4_tiles",
    "split_kv_blocks",
]

FA4_VERSION = "4.0.0b36"
"""The flash-attn-4 release whose source the rules below were read from."""

_DTYPES = (torch.float16, torch.bfloat16)
_MIN_TILE_N = 64
"""Smallest kv tile we let FA4's sm90 forward shrink to (it would go down to 16; those tiles are unmeasured)."""


# --------------------------------------------------------------------------------------------------
# availability


@functools.cache
def _import_status() -> tuple[bool, str]:
    try:
        import flash_attn.cute  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as exc:  # ImportError, or a DSL library that fails to load (OSError, RuntimeError)
        return False, (f"flash_attn.cute does not import ({type(exc).__name__}: {exc}); "
                       f"install flash-attn-4=={FA4_VERSION}")
    return True, "flash_attn.cute imports"


@torch.compiler.assume_constant_result
def _arch(device: torch.device) -> int:
    """The compute capability as one number (90: Hopper). A constant to torch.compile, which does not trace the
    device query."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.cache
def _available_on(device_index: int | None) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device (FA4's CuTe kernels run on Hopper sm90 and Blackwell sm100/sm110)"
    ok, reason = _import_status()
    if not ok:
        return False, reason
    arch = _arch(torch.device("cuda", device_index) if device_index is not None else torch.device("cuda"))
    if arch // 10 not in (9, 10, 11):
        return False, f"sm{arch}: FA4's block-sparse forward and backward run on sm90 and sm100/sm110"
    return True, f"FlashAttention-4 CuTe kernels on sm{arch}"


@torch.compiler.assume_constant_result
def fa4_available(device: torch.device | str | int | None = None) -> tuple[bool, str]:
    """Whether FA4's block-sparse kernels can run on `device` (default: the current CUDA device), and why (not).
    Cached per device; a constant to torch.compile (which does not trace imports)."""
    if device is not None:
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if device.type != "cuda":
            return False, f"device {device} is not CUDA (FA4's CuTe kernels run on Hopper/Blackwell GPUs)"
        return _available_on(device.index)
    return _available_on(None)


# --------------------------------------------------------------------------------------------------
# BlockSparseMask -> FA4's block-sparse tensors


def _sparse_tensors(counts: torch.Tensor, indices: torch.Tensor, block_size: tuple[int, int],
                    write_order: torch.Tensor | None = None):
    """FA4's `BlockSparseTensorsTorch` listing every block of the CSR pair `(counts, indices)` as a "full" block.

    The mask's int32 tensors go in as they are (FA4 accepts index rows wider than their counts, and batch/head
    dims of 1); the "mask" lists FA4 requires are empty. `write_order`: the deterministic backward's dQ order
    (`dq_write_order`), or None."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    empty_counts = torch.zeros_like(counts)
    empty_indices = torch.zeros(*counts.shape, 1, dtype=torch.int32, device=counts.device)
    deterministic = {}
    if write_order is not None:
        deterministic = {"dq_write_order": torch.zeros_like(empty_indices), "dq_write_order_full": write_order,
                         "spt": False}
    return BlockSparseTensorsTorch(mask_block_cnt=empty_counts, mask_block_idx=empty_indices,
                                   full_block_cnt=counts, full_block_idx=indices, block_size=tuple(block_size),
                                   **deterministic)


def dq_write_order(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, q_num_blocks: torch.Tensor,
                   q_indices: torch.Tensor) -> torch.Tensor:
    """FA4's `dq_write_order_full` for a mask's transposed index: for entry `i` of kv-block `n`'s list (q-block
    `m = q_indices[.., n, i]`), the rank of `n` among the kv-blocks q-block `m` attends, ascending. FA4's
    deterministic backward lets the writers of one dQ block add in that order. Entries past the counts are 0."""
    n_kv = q_indices.shape[-2]
    listed = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)
    dense = torch.zeros(*kv_num_blocks.shape, n_kv + 1, dtype=torch.int32, device=kv_indices.device)
    dense.scatter_(-1, torch.where(listed, kv_indices.long(), n_kv), 1)  # padding lands in the extra column
    dense = dense[..., :n_kv]
    rank = (dense.cumsum(-1, dtype=torch.int32) - dense).transpose(-1, -2)  # rank[n, m]
    rank = rank.expand(*q_indices.shape[:2], *rank.shape[2:])
    order = torch.gather(rank, -1, q_indices.long()).to(torch.int32)
    valid = torch.arange(q_indices.shape[-1], device=q_indices.device) < q_num_blocks.unsqueeze(-1)
    return torch.where(valid, order, 0).contiguous()


def split_kv_blocks(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, q_num_blocks: torch.Tensor, q_indices: torch.Tensor,
    kv_block: int, tile_n: int, kv_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mask's forward and transposed lists with every kv block of `kv_block` keys cut into `kv_block // tile_n`
    blocks of `tile_n` (FA4's sm90 kernels take a kv block of exactly one tile). Pieces wholly past `kv_len` are left
    out, so each row's last entry is still the piece that holds key `kv_len - 1` (FA4 masks keys past kv_len in a
    row's last entry only). Returns `(kv_num_blocks, kv_indices, q_num_blocks, q_indices)`, int32, contiguous."""
    factor = kv_block // tile_n
    if factor == 1:
        return kv_num_blocks, kv_indices, q_num_blocks, q_indices
    pieces = -(-kv_len // tile_n)
    split = (kv_indices[..., None] * factor + torch.arange(factor, device=kv_indices.device, dtype=kv_indices.dtype))
    split = split.flatten(-2)
    listed = torch.arange(split.shape[-1], device=split.device) < (kv_num_blocks * factor).unsqueeze(-1)
    counts = (listed & (split < pieces)).sum(-1, dtype=torch.int32)  # the kept pieces are a prefix: lists ascend
    split = split[..., :pieces]  # FA4 takes index rows at most one entry per kv tile wide
    q_counts = q_num_blocks.repeat_interleave(factor, dim=-1)[..., :pieces]
    q_lists = q_indices.repeat_interleave(factor, dim=-2)[..., :pieces, :]
    return counts, split.contiguous(), q_counts.contiguous(), q_lists.contiguous()


# --------------------------------------------------------------------------------------------------
# capability


@dataclass(frozen=True)
class FA4Tiles:
    """The tiles FA4 picks for a block-sparse call: forward `(tile_m * q_stage, tile_n)`, backward
    `(tile_m, tile_n)`, and whether FA4 walks kv blocks spanning several tiles itself (sm100) or takes blocks of
    exactly one tile (sm90, where the adapter cuts larger multiples into tiles: `split_kv_blocks`)."""

    forward: tuple[int, int]
    backward: tuple[int, int]
    kv_multiple: bool


def fa4_tiles(arch: int, head_dim: int, block_size: tuple[int, int], q_len: int, groups: int) -> FA4Tiles | str:
    """The tiles FA4 4.0.0b36 chooses for a non-causal block-sparse call with `block_size=(q_block, kv_block)`,
    or why it does not run (head dim). Reimplements its selection rules (`_tile_size_fwd_sm90`,
    `_fit_sm90_fwd_tile_to_block_sparsity`, `_tile_size_bwd_sm90`, the sm100 defaults) for head_dim == head_dim_v.
    `groups`: query heads per kv head (FA4 sizes its sm100 Q stages on q_len * groups)."""
    q_block, kv_block = block_size
    if arch // 10 == 9:
        if not (8 <= head_dim <= 256 and head_dim % 8 == 0):
            return f"head_dim {head_dim}: FA4 on sm90 takes 8..256, a multiple of 8"
        # forward: base tile per head dim, then tile_m 64 if the q block is no multiple of it, tile_n shrunk to a
        # smaller kv block (FA4 then requires kv_block == tile_n on sm90)
        if head_dim <= 96:  # 192-row tiles when the q block allows them (192 x 144 for head_dim 65..96)
            wide = q_block % 192 == 0
            tile_m, tile_n = (192 if wide else 128), (144 if wide and head_dim > 64 else 128)
        elif head_dim <= 192:  # 128 x 128; 128 x 112 when head_dim_v (== head_dim here) exceeds 128
            tile_m, tile_n = 128, (128 if head_dim <= 128 else 112)
        else:
            tile_m, tile_n = 128, 80
        if q_block % tile_m and q_block % 64 == 0:
            tile_m = 64
        if kv_block < tile_n and kv_block % 16 == 0:
            tile_n = kv_block
        # backward
        if head_dim <= 64:
            bwd = (128, 128)
        elif head_dim <= 96:
            bwd = (64, 128)
        elif head_dim <= 128:
            bwd = (80 if q_block % 80 == 0 else 64, 128)
        elif head_dim <= 192:
            bwd = (64, 96)
        else:
            bwd = (64, 64)
        return FA4Tiles((tile_m, tile_n), bwd, kv_multiple=False)
    if arch // 10 in (10, 11):
        if not (8 <= head_dim <= 128 and head_dim % 8 == 0):
            return f"head_dim {head_dim}: the adapter runs FA4 on sm100 for 8..128, a multiple of 8"
        q_stage = 2 if q_len * groups > 128 else 1
        return FA4Tiles((128 * q_stage, 128), (128, 128), kv_multiple=True)
    return f"sm{arch}: FA4's block-sparse forward and backward run on sm90 and sm100/sm110"


def fa4_supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, *,
    backward: bool | None = None, deterministic: bool = False, arch: int | None = None,
) -> tuple[bool, str]:
    """Whether `fa4_block_sparse_attention(q, k, v, mask, ...)` runs on FA4 here, and why not.

    `backward`: check the backward's tiles too (default: when autograd will need them: grad mode on and q, k or
    v requires grad). `deterministic`: a bitwise reproducible backward is required (FA4 has it on sm100 only).
    `arch` (e.g. 90, 100): judge the case as on that architecture, skipping the device and import checks
    (planning, tests).
    Inputs are (B, H, L, D) as `block_sparse_attention` takes them (already validated by it).
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not isinstance(mask, BlockSparseMask):
        return False, "q, k, v must be tensors and mask a BlockSparseMask"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in _DTYPES):
        return False, f"dtype {q.dtype}: FA4's block-sparse path takes float16 or bfloat16"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False, "the FA4 adapter takes (batch, heads, tokens, head_dim) tensors"
    if q.numel() == 0 or k.numel() == 0:
        return False, "empty inputs (nothing to launch; the reference returns them)"
    batch, heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    if v.shape[-1] != head_dim or k.shape[-1] != head_dim:
        return False, f"head dims q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]}: the adapter runs equal head dims"
    if kv_heads < 1 or heads % kv_heads:
        return False, f"q heads {heads} not a multiple of k/v heads {kv_heads}"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return False, "q, k, v need a contiguous last dim (stride 1) for FA4's TMA loads"
    if arch is None:
        if not (q.is_cuda and k.is_cuda and v.is_cuda and mask.device.type == "cuda"):
            return False, f"tensors are on {q.device}, mask on {mask.device}: FA4 needs CUDA tensors"
        ok, reason = fa4_available(q.device)
        if not ok:
            return False, reason
        arch = _arch(q.device)
    tiles = fa4_tiles(arch, head_dim, mask.block_size, q_len, heads // kv_heads)
    if isinstance(tiles, str):
        return False, tiles
    if backward is None:
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    q_block, kv_block = mask.block_size
    checks = [("forward", tiles.forward)] + ([("backward", tiles.backward)] if backward else [])
    for name, (tile_m, tile_n) in checks:
        if q_block % tile_m:
            return False, (f"q block {q_block}: FA4's {name} on sm{arch} (head_dim {head_dim}) needs a multiple "
                           f"of tile_m={tile_m}")
        if kv_block % tile_n:  # a multiple of one tile is split into whole tiles on sm90 (`split_kv_blocks`)
            return False, (f"kv block {kv_block}: FA4's {name} on sm{arch} (head_dim {head_dim}) needs a multiple "
                           f"of tile_n={tile_n}")
    if not tiles.kv_multiple and tiles.forward[1] < _MIN_TILE_N:
        return False, (f"kv block {kv_block}: FA4's sm90 forward would run tile_n={tiles.forward[1]} "
                       f"(< {_MIN_TILE_N}, unmeasured)")
    if backward and deterministic and arch // 10 == 9:
        return False, "a deterministic block-sparse backward is not implemented in FA4 on sm90"
    backward_tile = f", backward tile {tiles.backward}" if backward else ""
    return True, f"FA4 on sm{arch}: forward tile {tiles.forward}{backward_tile}"


# --------------------------------------------------------------------------------------------------
# the call: custom ops with autograd (one opaque call each under torch.compile)


def _bhld(t: torch.Tensor) -> torch.Tensor:
    """A `(B, H, L, D)` tensor as the `(B, L, H, D)` view FA4 takes (no copy: FA4 keeps strided layouts)."""
    return t.transpose(1, 2)


def _kv_tile(q: torch.Tensor, k: torch.Tensor, q_block: int, kv_block: int, which: str) -> int:
    """The kv block size FA4's lists are given in: one kv tile of the pass on sm90, the mask's block on sm100."""
    arch = _arch(q.device)
    tiles = fa4_tiles(arch, q.shape[-1], (q_block, kv_block), q.shape[2], q.shape[1] // k.shape[1])
    return kv_block if tiles.kv_multiple else getattr(tiles, which)[1]


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor, q_indices: torch.Tensor, q_block: int, kv_block: int, scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's block-sparse forward: `(out (B, H, Lq, D) laid out like q, lse (B, H, Lq) float32)`; the backward's
    index (`q_num_blocks`, `q_indices`) and `deterministic` are kept for the backward."""
    from flash_attn.cute.interface import _flash_attn_fwd

    tile_n = _kv_tile(q, k, q_block, kv_block, "forward")
    counts, lists, _, _ = split_kv_blocks(kv_num_blocks, kv_indices, q_num_blocks, q_indices, kv_block, tile_n,
                                          k.shape[2])
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _flash_attn_fwd(
        _bhld(q), _bhld(k), _bhld(v), softmax_scale=scale, out=_bhld(out), lse=lse, return_lse=True,
        block_sparse_tensors=_sparse_tensors(counts, lists, (q_block, tile_n)),
    )
    return out, lse


def backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor,
    k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor, q_indices: torch.Tensor, q_block: int, kv_block: int, scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA4's block-sparse backward on the transposed index: `(dq, dk, dv)`, each laid out like its input."""
    from flash_attn.cute.interface import _flash_attn_bwd

    tile_n = _kv_tile(q, k, q_block, kv_block, "backward")
    lists = split_kv_blocks(kv_num_blocks, kv_indices, q_num_blocks, q_indices, kv_block, tile_n, k.shape[2])
    order = dq_write_order(*lists) if deterministic else None
    grads = [torch.empty_like(t) for t in (q, k, v)]
    _flash_attn_bwd(
        _bhld(q), _bhld(k), _bhld(v), _bhld(out), _bhld(grad_out), lse, scale, deterministic=deterministic,
        dq=_bhld(grads[0]), dk=_bhld(grads[1]), dv=_bhld(grads[2]), dlse=grad_lse,
        block_sparse_tensors=_sparse_tensors(lists[2], lists[3], (q_block, tile_n), order),
    )
    return tuple(grads)


def _save(inputs: tuple, needs_input_grad: tuple[bool, ...]) -> tuple[tuple, tuple]:
    *tensors, q_block, kv_block, scale, deterministic = inputs
    return tuple(tensors), (q_block, kv_block, scale, deterministic)


fa4_block_sparse_op = kernel_op("mmattn::fa4_block_sparse", forward, backward, save=_save, grads=3)


def fa4_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float,
    *, deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on FA4: q `(B, Hq, Lq, D)`, k/v `(B, Hkv, Lk, D)` -> `(out (B, Hq, Lq, D), lse
    (B, Hq, Lq) float32, natural log, -inf on rows with no block)`, differentiable in q, k, v (and through lse).
    Check `fa4_supports` first.

    `deterministic`: None takes a reproducible backward where FA4 has one for block sparsity (sm100/sm110) and
    its atomic one on sm90; True on sm90 is an error.
    """
    hopper = _arch(q.device) // 10 == 9
    if deterministic is None:
        deterministic = not hopper
    elif deterministic and hopper:
        raise ValueError("deterministic=True: FA4 has no deterministic block-sparse backward on sm90")
    return fa4_block_sparse_op(q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices,
                               *mask.block_size, float(scale), bool(deterministic))
