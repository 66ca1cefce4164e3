"""Context-parallel block-sparse attention (Ulysses, ring, both) in gloo processes equals one process's result."""

import torch
import torch.distributed as dist

from mmattn.kernels import BlockSparseMask, block_sparse_attention
from mmattn.kernels.distributed import context_parallel_attention

from ..gloo import run_gloo
from .helpers import random_mask, random_qkv

TOKENS, HEADS, KV_HEADS, HEAD_DIM = 100, 4, 2, 8  # shards of 50 or 25 tokens: not aligned with 16-token blocks


def _inputs(seed=0):
    mask = random_mask(1, HEADS, TOKENS, TOKENS, (16, 16), density=0.5, seed=seed)
    q, k, v = random_qkv(2, HEADS, KV_HEADS, TOKENS, TOKENS, HEAD_DIM, torch.float64, seed=seed)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return mask, (q, k, v), grad


def _groups(rank, ulysses, ring):
    """diffusers' (ring, ulysses) mesh: rank = ring_rank * ulysses + ulysses_rank. Every rank builds every group."""
    mine = {}
    for r in range(ring):
        group = dist.new_group([r * ulysses + u for u in range(ulysses)])
        if rank // ulysses == r:
            mine["ulysses_group"] = group
    for u in range(ulysses):
        group = dist.new_group([r * ulysses + u for r in range(ring)])
        if rank % ulysses == u:
            mine["ring_group"] = group
    return mine


def _check_against_single_process(rank, world, ulysses, ring):
    mask, tensors, grad = _inputs()
    expected = [t.clone().requires_grad_() for t in tensors]
    full = block_sparse_attention(*expected, mask, backend="torch")
    full.backward(grad)

    shard = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)
    local = [t[:, :, shard].clone().requires_grad_() for t in tensors]
    out = context_parallel_attention(*local, mask, backend="torch", **_groups(rank, ulysses, ring))
    out.backward(grad[:, :, shard])
    torch.testing.assert_close(out, full[:, :, shard].detach(), rtol=1e-10, atol=1e-10)
    for name, mine, reference in zip("qkv", local, expected):
        torch.testing.assert_close(mine.grad, reference.grad[:, :, shard], rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_ulysses_and_ring_match_one_process():
    run_gloo(_check_against_single_process, 2, 2, 1)
    run_gloo(_check_against_single_process, 2, 1, 2)


def test_ulysses_inside_ring_matches_one_process():
    run_gloo(_check_against_single_process, 4, 2, 2)


def _check_errors(rank, world):
    import pytest

    mask, (q, k, v), _ = _inputs()
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="mask: expected the global mask"):
        context_parallel_attention(q, k, v, mask, ring_group=group)
    shard = [t[:, :1, : TOKENS // world] for t in (q, k, v)]
    with pytest.raises(ValueError, match="q: Ulysses splits heads over 2 ranks, got 1"):
        context_parallel_attention(*shard, mask.crop((0, TOKENS), (0, TOKENS), heads=(0, 1)), ulysses_group=group)
    # The last rank's queries attend to nothing, so it computes nothing: it still refuses a bad scale or backend.
    blocks = mask.to_dense()
    blocks[..., 3:, :] = False
    mask = BlockSparseMask.from_dense(blocks, mask.block_size, TOKENS, TOKENS)
    local = [t[:, :, rank * TOKENS // world : (rank + 1) * TOKENS // world] for t in (q, k, v)]
    with pytest.raises(TypeError, match="scale must be a real number, got 'big'"):
        context_parallel_attention(*local, mask, ring_group=group, scale="big")
    with pytest.raises(ValueError, match="backend must be one of"):
        context_parallel_attention(*local, mask, ring_group=group, backend="bogus")


def test_bad_shards_are_named():
    run_gloo(_check_errors, 2)
