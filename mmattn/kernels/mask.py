"""`BlockSparseMask`: which key blocks each query block attends to.

The layout is FlexAttention's `BlockMask` (a CSR-like list per batch, head and query block), restricted to
whole blocks: every listed block is attended in full, except positions past the true sequence lengths, which
the kernels mask by position. The transposed index (query blocks per key block) that the backward pass
walks is built once, at construction.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

__all__ = ["BLOCK_MULTIPLE", "MIN_BLOCK", "BlockSparseMask"]

MIN_BLOCK = 16
"""Smallest block size the Triton kernels run (one `tl.dot` tile side)."""
BLOCK_MULTIPLE = 16
"""Block sizes must be multiples of this, so a kernel tile of 16, 32, 64 or 128 rows divides them."""


def _check_block_size(block_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    if (
        not isinstance(block_size, (tuple, list))
        or len(block_size) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in block_size)
    ):
        raise TypeError(f"block_size must be an int or a pair of ints (q_block, kv_block), got {block_size!r}")
    for name, b in zip(("q_block", "kv_block"), block_size):
        if b < MIN_BLOCK or b % BLOCK_MULTIPLE:
            raise ValueError(
                f"block_size: {name} must be a multiple of {BLOCK_MULTIPLE} and >= {MIN_BLOCK} "
                f"(the kernels tile blocks by 16..128 rows), got {b}"
            )
    return int(block_size[0]), int(block_size[1])


def _check_length(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _dense_to_csr(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a bool `[..., rows, cols]` tensor: the count and the sorted column ids (padded with 0)."""
    counts = dense.sum(-1, dtype=torch.int32)
    cols = dense.shape[-1]
    # A stable sort of the negated mask puts the set columns first, in ascending order.
    order = torch.sort((~dense).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    valid = torch.arange(cols, device=dense.device) < counts.unsqueeze(-1)
    return counts, torch.where(valid, order, torch.zeros_like(order)).contiguous()


def _csr_to_dense(counts: torch.Tensor, indices: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `_dense_to_csr`; entries of `indices` past `counts` are never read."""
    slots = torch.arange(indices.shape[-1], device=indices.device)
    valid = slots < counts.unsqueeze(-1).to(slots.dtype)
    dense = torch.zeros(*indices.shape[:-1], cols + 1, dtype=torch.bool, device=indices.device)
    # Invalid slots scatter into a spare last column that is cut away afterwards.
    target = torch.where(valid, indices.long(), torch.full_like(indices, cols, dtype=torch.long))
    dense.scatter_(-1, target, True)
    return dense[..., :cols]


@dataclass(frozen=True, eq=False, repr=False)
class BlockSparseMask:
    """Block-sparse attention pattern: per (batch, head, query block) the sorted key blocks to attend.

    Tensors (int32, batch and head dims may be 1 to broadcast; heads are query heads):

    * `kv_num_blocks` `[B|1, H|1, n_q_blocks]` and `kv_indices` `[B|1, H|1, n_q_blocks, n_kv_blocks]`:
      the forward index; entries of `kv_indices` past `kv_num_blocks` are padding and never read.
    * `q_num_blocks` `[B|1, H|1, n_kv_blocks]` and `q_indices` `[B|1, H|1, n_kv_blocks, n_q_blocks]`: the
      transposed index the backward walks, derived at construction.

    `block_size = (q_block, kv_block)`; `q_len` and `kv_len` are the true sequence lengths: a trailing partial
    block is attended only up to them. Build one with `from_dense`, `from_kv_blocks` or `from_flex`.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: tuple[int, int]
    q_len: int
    kv_len: int
    q_num_blocks: torch.Tensor = field(init=False)
    q_indices: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)
        dense = self.to_dense()
        counts, indices = _dense_to_csr(dense.transpose(-1, -2))
        object.__setattr__(self, "q_num_blocks", counts)
        object.__setattr__(self, "q_indices", indices)

    # ----------------------------------------------------------------------------------------------
    # constructors

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        block_size: int | tuple[int, int],
        q_len: int,
        kv_len: int,
    ) -> BlockSparseMask:
        """Wraps per-query-block key-block lists (e.g. a router's top-k), checking every field.

        `kv_num_blocks` `[B|1, H|1, n_q_blocks]` counts, `kv_indices` `[B|1, H|1, n_q_blocks, width]` with
        `width <= n_kv_blocks`: the first `count` entries of each row must be strictly increasing and in
        `[0, n_kv_blocks)`. Rows may be empty (those queries get zero output).
        """
        q_block, kv_block = _check_block_size(block_size)
        q_len, kv_len = _check_length("q_len", q_len), _check_length("kv_len", kv_len)
        n_q, n_kv = math.ceil(q_len / q_block), math.ceil(kv_len / kv_block)
        for name, t, dims in (("kv_num_blocks", kv_num_blocks, 3), ("kv_indices", kv_indices, 4)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
                raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
            if t.dim() != dims:
                raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
        if kv_num_blocks.shape[-1] != n_q:
            raise ValueError(
                f"kv_num_blocks: expected {n_q} query blocks (ceil(q_len={q_len} / q_block={q_block})), "
                f"got shape {tuple(kv_num_blocks.shape)}"
            )
        if kv_indices.shape[:3] != kv_num_blocks.shape or not 1 <= kv_indices.shape[-1] <= n_kv:
            raise ValueError(
                f"kv_indices: expected shape {tuple(kv_num_blocks.shape)} + (width,) with 1 <= width <= "
                f"{n_kv} key blocks, got {tuple(kv_indices.shape)}"
            )
        if kv_indices.device != kv_num_blocks.device:
            raise ValueError(f"kv_indices is on {kv_indices.device} but kv_num_blocks on {kv_num_blocks.device}")
        counts, indices = kv_num_blocks.to(torch.int32), kv_indices.to(torch.int32)
        width = indices.shape[-1]
        if bool(((counts < 0) | (counts > width)).any()):
            raise ValueError(f"kv_num_blocks: counts must lie in [0, {width}] (the width of kv_indices)")
        valid = torch.arange(width, device=indices.device) < counts.unsqueeze(-1)
        if bool((valid & ((indices < 0) | (indices >= n_kv))).any()):
            raise ValueError(f"kv_indices: block ids must lie in [0, {n_kv}) for kv_len={kv_len}, kv_block={kv_block}")
        if bool((valid[..., 1:] & (indices[..., 1:] <= indices[..., :-1])).any()):
            raise ValueError("kv_indices: each row's listed block ids must be sorted and free of duplicates")
        if width < n_kv:
            indices = torch.nn.functional.pad(indices, (0, n_kv - width))
        indices = torch.where(torch.arange(n_kv, device=indices.device) < counts.unsqueeze(-1), indices, 0)
        return cls(counts.contiguous(), indices.contiguous(), (q_block, kv_block), q_len, kv_len)

    @classmethod
    def from_dense(
        cls,
        blocks: torch.Tensor,
        block_size: int | tuple[int, int],
        q_len: int | None = None,
        kv_len: int | None = None,
    ) -> BlockSparseMask:
        """From a bool block matrix `[n_q_blocks, n_kv_blocks]`, `[H, ...]` or `[B, H, ...]` (True = attend).

        `q_len`/`kv_len` default to the full extent of the blocks.
        """
        q_block, kv_block = _check_block_size(block_size)
        if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool:
            got = blocks.dtype if isinstance(blocks, torch.Tensor) else type(blocks).__name__
            raise TypeError(f"blocks must be a bool tensor, got {got}")
        if not 2 <= blocks.dim() <= 4:
            raise ValueError(f"blocks must have 2 to 4 dims ([B, H,] n_q_blocks, n_kv_blocks), got {tuple(blocks.shape)}")
        while blocks.dim() < 4:
            blocks = blocks.unsqueeze(0)
        n_q, n_kv = blocks.shape[-2:]
        q_len = n_q * q_block if q_len is None else _check_length("q_len", q_len)
        kv_len = n_kv * kv_block if kv_len is None else _check_length("kv_len", kv_len)
        if math.ceil(q_len / q_block) != n_q or math.ceil(kv_len / kv_block) != n_kv:
            raise ValueError(
                f"blocks: shape {tuple(blocks.shape[-2:])} does not match q_len={q_len}, kv_len={kv_len} with "
                f"block_size=({q_block}, {kv_block}); expected ({math.ceil(q_len / q_block)}, {math.ceil(kv_len / kv_block)})"
            )
        counts, indices = _dense_to_csr(blocks)
        return cls(counts, indices, (q_block, kv_block), q_len, kv_len)

    @classmethod
    def from_flex(cls, block_mask) -> BlockSparseMask:
        """From a FlexAttention `BlockMask`: the union of its full and partial blocks.

        A `BlockSparseMask` attends whole blocks, so a partial block is only representable when the block
        mask's `mask_mod` is the no-op one; otherwise the element-level mask would be lost and this raises.
        """
        from torch.nn.attention.flex_attention import noop_mask

        if block_mask.mask_mod is not noop_mask and bool((block_mask.kv_num_blocks > 0).any()):
            raise ValueError(
                "block_mask has partial blocks refined by a mask_mod; a BlockSparseMask attends whole blocks only. "
                "Build the BlockMask from full blocks (mask_mod=None) or use a block-aligned mask_mod."
            )
        q_len, kv_len = block_mask.seq_lengths
        dense = block_mask.to_dense().bool()
        return cls.from_dense(dense, tuple(block_mask.BLOCK_SIZE), q_len=q_len, kv_len=kv_len)

    # ----------------------------------------------------------------------------------------------
    # views

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """`(B|1, H|1, n_q_blocks, n_kv_blocks)`."""
        return (*self.kv_indices.shape[:3], self.num_kv_blocks)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_size[1])

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to_dense(self) -> torch.Tensor:
        """The bool block matrix `[B|1, H|1, n_q_blocks, n_kv_blocks]`."""
        return _csr_to_dense(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks)

    def to_token_mask(self, q_start: int = 0, q_end: int | None = None) -> torch.Tensor:
        """The bool token mask `[B|1, H|1, q_end - q_start, kv_len]` for query rows `[q_start, q_end)`."""
        q_block, kv_block = self.block_size
        q_end = self.q_len if q_end is None else q_end
        rows = torch.arange(q_start, q_end, device=self.device) // q_block
        cols = torch.arange(self.kv_len, device=self.device) // kv_block
        return self.to_dense()[:, :, rows][..., cols]

    def density(self) -> float:
        """Share of the (batch, head, query, key) pairs attended, counted at token level."""
        q_block, kv_block = self.block_size
        n_q, n_kv = self.shape[2:]
        rows = torch.full((n_q,), q_block, dtype=torch.float64, device=self.device)
        rows[-1] = self.q_len - (n_q - 1) * q_block
        cols = torch.full((n_kv,), kv_block, dtype=torch.float64, device=self.device)
        cols[-1] = self.kv_len - (n_kv - 1) * kv_block
        kept = (self.to_dense().double() * rows[:, None] * cols[None, :]).sum((-1, -2)).mean()
        return float(kept) / (self.q_len * self.kv_len)

    def crop(
        self, q_range: tuple[int, int], kv_range: tuple[int, int], heads: tuple[int, int] | None = None
    ) -> BlockSparseMask:
        """The mask of query tokens `[q_start, q_end)` against key tokens `[kv_start, kv_end)` (and query heads
        `[h_start, h_end)` of a per-head mask), e.g. one (query shard, key shard) pair of ring attention.

        Starts must lie on block boundaries; ends on a block boundary or at `q_len` / `kv_len`. The whole mask
        (a per-head crop of a head-shared one included) is this mask itself.
        """
        whole = tuple(q_range) == (0, self.q_len) and tuple(kv_range) == (0, self.kv_len)
        if whole and (heads is None or self.shape[1] == 1):
            return self
        blocks = self.to_dense()
        spans = []
        for name, (start, end), size, length in (
            ("q_range", q_range, self.block_size[0], self.q_len),
            ("kv_range", kv_range, self.block_size[1], self.kv_len),
        ):
            if not (0 <= start < end <= length) or start % size or (end % size and end != length):
                raise ValueError(
                    f"{name}: expected 0 <= start < end <= {length} with start a multiple of {size} and end a "
                    f"multiple of {size} or {length}, got ({start}, {end})"
                )
            spans.append(slice(start // size, math.ceil(end / size)))
        blocks = blocks[..., spans[0], spans[1]]
        if heads is not None and blocks.shape[1] > 1:
            if not 0 <= heads[0] < heads[1] <= blocks.shape[1]:
                raise ValueError(f"heads: expected 0 <= start < end <= {blocks.shape[1]}, got {heads}")
            blocks = blocks[:, heads[0] : heads[1]]
        return BlockSparseMask.from_dense(
            blocks, self.block_size, q_len=q_range[1] - q_range[0], kv_len=kv_range[1] - kv_range[0]
        )

    def to(self, device: torch.device | str) -> BlockSparseMask:
        return BlockSparseMask(
            self.kv_num_blocks.to(device), self.kv_indices.to(device), self.block_size, self.q_len, self.kv_len
        )

    def to_flex(self):
        """The equivalent FlexAttention `BlockMask`.

        Every listed block is marked full, so compiled FlexAttention never calls the `mask_mod`; the `mask_mod`
        (a lookup in the block matrix) defines the same mask for FlexAttention's eager path.
        """
        from torch.nn.attention.flex_attention import BlockMask

        blocks = self.to_dense()
        q_block, kv_block = self.block_size
        batch, heads = blocks.shape[:2]

        def block_lookup(b, h, q_idx, kv_idx):
            return blocks[b % batch, h % heads, q_idx // q_block, kv_idx // kv_block]

        return BlockMask.from_kv_blocks(
            torch.zeros_like(self.kv_num_blocks),
            torch.zeros_like(self.kv_indices),
            full_kv_num_blocks=self.kv_num_blocks,
            full_kv_indices=self.kv_indices,
            BLOCK_SIZE=self.block_size,
            mask_mod=block_lookup,
            seq_lengths=(self.q_len, self.kv_len),
        )

    @functools.cached_property
    def kept_blocks(self) -> int:
        """How many (batch|1, head|1, query block, key block) entries the mask lists: read to the host once per mask
        (a device sync on first use) and kept."""
        return int(self.kv_num_blocks.sum())

    @functools.cached_property
    def flex_block_mask(self):
        """`to_flex()`, built on first use and kept with this mask."""
        return self.to_flex()

    def __repr__(self) -> str:
        return (
            f"BlockSparseMask(shape={self.shape}, block_size={self.block_size}, q_len={self.q_len}, "
            f"kv_len={self.kv_len}, density={self.density():.3f}, device={self.device})"
        )
