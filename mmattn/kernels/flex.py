"""The `"flex"` backend: torch's FlexAttention on the `BlockMask` equivalent to a `BlockSparseMask`."""

from __future__ import annotations

import functools
import math

import torch

from .mask import BlockSparseMask
from .neighborhood import Neighborhood

__all__ = ["flex_block_sparse_attention", "flex_neighborhood_attention"]


@functools.cache
def _compiled_flex():
    """FlexAttention is only fused when compiled; one compiled callable serves every call (compiled lazily)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def tile_options(block_size: tuple[int, int]) -> dict[str, int] | None:
    """Compiled FlexAttention's tiles (forward and both backward kernels) for a mask of blocks under 128 tokens, or
    None to keep its defaults. torch 2.11 keeps 128-token tiles and refuses blocks they do not divide (torch 2.14
    shrinks them itself): one tile that divides both block sizes, at most 64."""
    q_block, kv_block = block_size
    if min(q_block, kv_block) >= 128:
        return None
    tile = min(math.gcd(q_block, kv_block), 64)
    return {name: tile for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}


def _flex(q, k, v, block_mask, scale: float, score_mod=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention `(out, lse)`: compiled on GPUs, eager on the CPU."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    attend, options = flex_attention, None
    if q.is_cuda:
        attend, options = _compiled_flex(), tile_options(tuple(block_mask.BLOCK_SIZE))
    out, aux = attend(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=options, return_aux=AuxRequest(lse=True),
    )
    return out, aux.lse


def flex_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention through FlexAttention: `(out, lse)`, compiled on GPUs, eager on the CPU."""
    return _flex(q, k, v, mask.flex_block_mask, scale)


@functools.lru_cache(maxsize=64)
def neighborhood_block_mask(nbhd: Neighborhood, device: torch.device):
    """FlexAttention `BlockMask` of a neighborhood over row-major tokens, built once per pattern and device."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return nbhd.allowed(q_idx, kv_idx)

    tokens = nbhd.num_tokens
    return create_block_mask(mask_mod, None, None, tokens, tokens, device=device, _compile=device.type == "cuda")


def flex_neighborhood_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nbhd: Neighborhood, rpb: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighborhood attention through FlexAttention on flattened tokens: NA `mask_mod`, rpb as `score_mod`."""
    score_mod = None
    if rpb is not None:
        limits = [2 * k - 2 for k in nbhd.kernel_size]

        def score_mod(score, b, h, q_idx, kv_idx):
            # Pairs outside the neighborhood are masked, but their (clamped) bias index is still read.
            index = [i.clamp(0, limit) for i, limit in zip(nbhd.rpb_index(q_idx, kv_idx), limits)]
            return score + rpb[(h, *index)]

    return _flex(q, k, v, neighborhood_block_mask(nbhd, q.device), scale, score_mod)
