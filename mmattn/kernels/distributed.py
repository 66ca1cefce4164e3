"""Block-sparse attention over a sequence sharded across ranks: context parallelism (CP).

Each rank of a process group holds one contiguous shard of the tokens, rank r the r-th. Two schemes, which compose
(Ulysses inside each ring rank, as diffusers' "ring" x "ulysses" mesh):

* **Ulysses** (DeepSpeed-Ulysses): an all-to-all trades the token split for a head split, so every rank sees the
  whole sequence for `heads / world` heads and applies the global mask unchanged; a second all-to-all trades back.
* **Ring attention**: queries stay sharded; each rank attends to the key/value shards one by one with the mask cut
  to the (query shard, key shard) pair, skipping pairs the mask leaves empty, and merges the partial outputs
  through their log-sum-exp. Keys and values travel by all-gather (diffusers' `rotate_method="allgather"`).

A mask over a permuted token order (sliding-tile attention's 3D tiles) takes `order=`: the permutation is applied
where the tokens are whole, after the Ulysses exchange, to each ring rank's tokens, so under ring attention it must
keep every ring shard in place.

Communication is torch.distributed's own (NCCL on GPUs, gloo on CPUs), made differentiable here, so training
works too.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .backends import resolve_backend
from .block_sparse import block_sparse_attention
from .mask import BlockSparseMask
from .validation import resolve_scale

__all__ = ["context_parallel_attention"]

# torch >= 2.14 renamed all_gather_into_tensor (same arguments).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllToAll(torch.autograd.Function):
    """Chunk i of dim 0 goes to rank i; chunk i of the result came from rank i. Its own adjoint."""

    @staticmethod
    def forward(ctx, chunks: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        chunks = chunks.contiguous()
        out = torch.empty_like(chunks)
        dist.all_to_all_single(out, chunks, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    """Concatenates every rank's tensor along a new leading dim; the gradient sums each rank's slice back."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = shard.new_empty((world * shard.shape[0], *shard.shape[1:]))
        _all_gather_single(out, shard.contiguous(), group=group)
        return out.unflatten(0, (world, shard.shape[0]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad.flatten(0, 1), ctx.group).unflatten(0, grad.shape[:2]).sum(0), None


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, S/W, D) token shard -> (B, H/W, S, D) head shard (all-to-all)."""
    world = dist.get_world_size(group)
    batch, heads, shard, dim = x.shape
    chunks = x.reshape(batch, world, heads // world, shard, dim).transpose(0, 1)
    return _AllToAll.apply(chunks, group).permute(1, 2, 0, 3, 4).reshape(batch, heads // world, world * shard, dim)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of `_seq_to_heads`: (B, H/W, S, D) -> (B, H, S/W, D)."""
    world = dist.get_world_size(group)
    batch, heads, total, dim = x.shape
    chunks = x.reshape(batch, heads, world, total // world, dim).permute(2, 0, 1, 3, 4)
    return _AllToAll.apply(chunks, group).transpose(0, 1).reshape(batch, world * heads, total // world, dim)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _check_shards(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, world: int) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"q, k, v: expected equal token shards (batch, heads, tokens / world, head_dim), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    total = q.shape[2] * world
    if (mask.q_len, mask.kv_len) != (total, total):
        raise ValueError(f"mask: expected the global mask over {world} x {q.shape[2]} = {total} tokens, got {mask}")


_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""mask -> {crop arguments or "has blocks": value}, kept while the mask lives (a data-dependent mask such as NABLA's,
new each layer and step, takes its pieces with it)."""


def _cached(mask: BlockSparseMask, key, make):
    pieces = _PIECES.setdefault(mask, {})
    if key not in pieces:
        pieces[key] = make()
    return pieces[key]


def _cropped(
    mask: BlockSparseMask, q_range: tuple[int, int], kv_range: tuple[int, int], heads: tuple[int, int] | None = None
) -> BlockSparseMask:
    """`mask.crop(...)`, cached on the mask: every layer and step asks for the same pieces."""
    return _cached(mask, (q_range, kv_range, heads), lambda: mask.crop(q_range, kv_range, heads))


def _has_blocks(mask: BlockSparseMask) -> bool:
    return _cached(mask, "has blocks", lambda: bool(mask.kv_num_blocks.any()))


def _aligned(position: int, block: int, total: int) -> int:
    return min(math.ceil(position / block) * block, total)


@functools.lru_cache(maxsize=64)
def _shard_order(
    order: torch.Tensor, shards: int, index: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(permutation, inverse) on `device` of the tokens of shard `index` of `shards` equal ones under the global
    `order`. Cached per order tensor (callers pass the same cached tensor at every call): checked and copied once.
    """
    size = order.numel() // shards
    positions = torch.arange(order.numel(), device=order.device)
    if shards > 1 and not torch.equal(order // size, positions // size):  # every shard checked: all ranks refuse alike
        raise ValueError(
            f"order: ring attention keeps the query shards in place, so order must map each of the {shards} "
            f"contiguous shards of {size} tokens onto itself"
        )
    local = order[index * size : (index + 1) * size].to(device) - index * size
    return local, torch.argsort(local)


def _check_order(order, total: int) -> None:
    if not isinstance(order, torch.Tensor) or order.dim() != 1 or order.numel() != total or order.dtype != torch.long:
        raise ValueError(
            f"order: expected a permutation of the {total} tokens (1-D int64 tensor), got "
            f"{tuple(order.shape) if isinstance(order, torch.Tensor) else type(order).__name__}"
            f"{f' {order.dtype}' if isinstance(order, torch.Tensor) else ''}"
        )


def _merge(out, lse, part_out, part_lse):
    """Merges two partial attentions over disjoint keys through their log-sum-exp (at least fp32; empty rows stay 0)."""
    part_out, part_lse = part_out.to(torch.promote_types(part_out.dtype, torch.float32)), part_lse.unsqueeze(-1)
    if out is None:
        return part_out, part_lse
    merged = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    return out * torch.exp(lse - safe) + part_out * torch.exp(part_lse - safe), merged


def _ring(q, k, v, mask: BlockSparseMask, group, scale, backend) -> torch.Tensor:
    """Ring attention of this rank's query shard against every rank's key/value shard, merged by log-sum-exp.

    Shards need not align with mask blocks: the query shard is computed over the blocks it touches (the extra rows
    are zero padding, dropped after) and key shard j is taken as the keys of the blocks that start in rank j's
    tokens, so every key is attended exactly once. (query shard, key shard) pairs without a block are skipped.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard, total = q.shape[2], mask.q_len
    (q_block, kv_block), start = mask.block_size, rank * shard
    rows = (start // q_block * q_block, _aligned(start + shard, q_block, total))
    padded = F.pad(q, (0, 0, start - rows[0], rows[1] - start - shard))
    # Gathered token-major, (S, B, H, D), so the (B, H, S, D) view needs no copy of the whole sequence.
    keys, values = (_AllGather.apply(t.permute(2, 0, 1, 3), group).flatten(0, 1).permute(1, 2, 0, 3) for t in (k, v))
    out = lse = None
    for step in range(world):
        source = (rank + step) % world
        cols = (_aligned(source * shard, kv_block, total), _aligned((source + 1) * shard, kv_block, total))
        if cols[0] == cols[1] or not _has_blocks(part := _cropped(mask, rows, cols)):
            continue
        part_out, part_lse = block_sparse_attention(
            padded, keys[:, :, cols[0] : cols[1]], values[:, :, cols[0] : cols[1]], part,
            scale=scale, backend=backend, return_lse=True,
        )
        out, lse = _merge(out, lse, part_out, part_lse)
    if out is None:
        return torch.zeros_like(q)
    return out[:, :, start - rows[0] : start - rows[0] + shard].to(q.dtype)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    ulysses_group=None,
    ring_group=None,
    scale: float | None = None,
    backend: str = "auto",
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention of token shards under Ulysses, ring attention, or both (Ulysses inside ring).

    q, k, v: this rank's `(B, H, S / W, D)` token shard, W = ulysses size x ring size; shard
    `ring_rank * ulysses_size + ulysses_rank` is this rank's (diffusers' mesh order), so the Ulysses exchange
    yields the ring rank's contiguous tokens. `mask` is the global mask over all S tokens. Ulysses needs the query
    and key/value heads to divide by its group size. A group of None or of size 1 is not used. `order` (optional):
    the token order the mask is over, `order[i]` the index of its i-th token in the sharded order (e.g. a
    sliding-tile reordering); it is applied after the Ulysses exchange, where every rank holds whole ring shards,
    and undone before the exchange back, so under ring attention it must map each ring shard onto itself (a
    `ValueError` otherwise). Returns this rank's `(B, H, S / W, D)` output, in the sharded order.
    """
    ulysses, ring = _group_size(ulysses_group), _group_size(ring_group)
    _check_shards(q, k, v, mask, ulysses * ring)
    if order is not None:
        _check_order(order, mask.q_len)
        order, inverse = _shard_order(order, ring, dist.get_rank(ring_group) if ring > 1 else 0, q.device)
    # Before any exchange, so that every rank refuses a bad argument alike.
    scale, backend = resolve_scale(scale, q.shape[-1]), resolve_backend("block_sparse", backend, q)
    if ulysses > 1:
        for name, heads in (("q", q.shape[1]), ("k", k.shape[1])):
            if heads % ulysses:
                raise ValueError(f"{name}: Ulysses splits heads over {ulysses} ranks, got {heads} heads")
        first = dist.get_rank(ulysses_group) * q.shape[1] // ulysses
        mask = _cropped(mask, (0, mask.q_len), (0, mask.kv_len), (first, first + q.shape[1] // ulysses))
        q, k, v = (_seq_to_heads(t, ulysses_group) for t in (q, k, v))
    if order is not None:
        q, k, v = (t.index_select(2, order) for t in (q, k, v))
    if ring > 1:
        out = _ring(q, k, v, mask, ring_group, scale, backend)
    else:
        out = block_sparse_attention(q, k, v, mask, scale=scale, backend=backend)
    if order is not None:
        out = out.index_select(2, inverse)
    return _heads_to_seq(out, ulysses_group) if ulysses > 1 else out
