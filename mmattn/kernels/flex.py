"""The `"flex"` backend: torch's FlexAttention on the `BlockMask` equivalent to a `BlockSparseMask`."""

from __future__ import annotations

import functools

import torch

from .mask import BlockSparseMask

__all__ = ["flex_block_sparse_attention"]


@functools.cache
def _compiled_flex():
    """FlexAttention is only fused when compiled; one compiled callable serves every call (compiled lazily)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention through FlexAttention: `(out, lse)`, compiled on GPUs, eager on the CPU."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    attend = _compiled_flex() if q.is_cuda else flex_attention
    out, aux = attend(
        q, k, v, block_mask=mask.flex_block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        return_aux=AuxRequest(lse=True),
    )
    return out, aux.lse
