"""Shared builders for the kernel tests: random inputs and an independent dense oracle."""

import math

import torch

from mmattn.kernels import BlockSparseMask


def random_mask(batch, heads, q_len, kv_len, block_size, density=0.6, seed=0, empty_row=True):
    q_block, kv_block = block_size
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand((batch, heads, math.ceil(q_len / q_block), math.ceil(kv_len / kv_block)), generator=g) < density
    blocks[..., -1, -1] = True  # the partial corner block is always exercised
    if empty_row and blocks.shape[-2] > 1:
        blocks[..., 0, :] = False  # a query block with no key at all
    return BlockSparseMask.from_dense(blocks, block_size, q_len, kv_len)


def random_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, seed=0, layout="bhld"):
    """Random q, k, v; layout "blhd" gives non-contiguous (B, H, L, D) views of (B, L, H, D) storage."""
    g = torch.Generator().manual_seed(seed)

    def make(h, length):
        if layout == "blhd":
            return torch.randn(batch, length, h, head_dim, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(batch, h, length, head_dim, generator=g).to(dtype)

    return make(heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len)


def dense_oracle(q, k, v, mask: BlockSparseMask, scale):
    """Float64 attention over the token mask expanded in one piece: independent of the chunked reference."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    allowed = mask.to_dense().repeat_interleave(mask.block_size[0], -2).repeat_interleave(mask.block_size[1], -1)
    allowed = allowed[..., : q.shape[2], : k.shape[2]]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e300)).nan_to_num(0.0)
    return weights @ v, lse
