"""Block-sparse attention: each query block attends only to the key blocks a `BlockSparseMask` lists.

Backends (`backends.REGISTRY["block_sparse"]`): `"fa4"` (FlashAttention-4's CuTe kernels, `fa4.py`, where
`flash_attn.cute` is installed on a Hopper/Blackwell GPU and the block sizes fit its tiles), `"triton"` (fused
kernels, forward and backward, the backward deterministic except on Hopper at head dim 128,
`triton/block_sparse.py`), `"flex"` (FlexAttention on the same mask, `flex.py`), `"torch"` (the exact reference,
`reference.block_sparse_attention`); `"auto"` takes the fastest that runs the case here.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import resolve_backend
from .mask import BlockSparseMask
from .validation import check_qkv, resolve_scale

__all__ = ["block_sparse_attention"]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask) -> None:
    check_qkv(q, k, v, (4,), "(batch, heads, tokens, head_dim)")
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask, got {type(mask).__name__}")
    if mask.device != q.device:
        raise ValueError(f"mask must be on the device of q ({q.device}), got {mask.device}")
    (batch, heads, q_len, _), kv_len = q.shape, k.shape[2]
    if (mask.q_len, mask.kv_len) != (q_len, kv_len):
        raise ValueError(f"mask: built for q_len={mask.q_len}, kv_len={mask.kv_len}, got q_len={q_len}, kv_len={kv_len}")
    mask_batch, mask_heads = mask.shape[:2]
    if mask_batch not in (1, batch) or mask_heads not in (1, heads):
        raise ValueError(f"mask: batch/heads ({mask_batch}, {mask_heads}) must be 1 or ({batch}, {heads}) of q")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention: each query block attends only to the key blocks `mask` lists.

    q `(B, Hq, Lq, D)`, k/v `(B, Hkv, Lk, D)` with Hq a multiple of Hkv (grouped-query attention). Query rows
    with no key get a zero output and no gradient. `scale` defaults to `D ** -0.5`. `backend`: `"fa4"`
    (FlashAttention-4; its Hopper backward is not bitwise reproducible), `"triton"` (fused kernels, forward and
    backward; on Hopper at head dim 128 dQ is added atomically unless torch asks for deterministic algorithms or
    MMATTN_TRITON_ATOMIC_DQ=0, elsewhere the backward is deterministic), `"flex"` (FlexAttention on the
    same mask), `"torch"` (exact reference) or `"auto"` (the first of `supported_backends("block_sparse", q, k=k,
    v=v, mask=mask)`: FA4 where it runs the case, else Triton on CUDA, and Triton first for a case small enough to be
    host-bound (`backends.HOST_BOUND_WORK`); torch elsewhere; under `torch.use_deterministic_algorithms(True)` not
    FA4 on Hopper). With `return_lse`, also returns the natural-log sum of exponentials `(B, Hq, Lq)` in float32
    (`-inf` on empty rows), differentiable too.
    """
    _check_inputs(q, k, v, mask)
    scale = resolve_scale(scale, q.shape[-1])
    backend = resolve_backend("block_sparse", backend, q, k=k, v=v, mask=mask)
    if backend == "fa4":
        from .fa4 import fa4_block_sparse_attention

        out, lse = fa4_block_sparse_attention(q, k, v, mask, scale)
    elif backend == "triton":
        from .triton.block_sparse import attend

        out, lse = attend(q, k, v, mask, scale)
    elif backend == "flex":
        from .flex import flex_block_sparse_attention

        out, lse = flex_block_sparse_attention(q, k, v, mask, scale)
    else:
        out, lse = reference.block_sparse_attention(q, k, v, mask, scale)
    return (out, lse) if return_lse else out
