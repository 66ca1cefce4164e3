"""mmattn's shared kernel layer: block-sparse, neighborhood and routed attention with Triton, FlexAttention and exact
torch backends.

Tensors use the SDPA layout `(batch, heads, tokens, head_dim)`; spatial kernels take
`(batch, heads, *spatial, head_dim)`.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import BACKENDS, backend_info, resolve_backend
from .column_sets import (
    ColumnSets,
    column_set_attention,
    ranked_head_enhancement,
    sink_redistribution_attention,
)
from .mask import BlockSparseMask
from .neighborhood import Neighborhood
from .routed import routed_attention
from .validation import check_qkv, resolve_scale

__all__ = [
    "BACKENDS",
    "BlockSparseMask",
    "ColumnSets",
    "Neighborhood",
    "backend_info",
    "block_sparse_attention",
    "column_set_attention",
    "neighborhood_attention",
    "ranked_head_enhancement",
    "routed_attention",
    "sink_redistribution_attention",
]


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
    with no key get a zero output and no gradient. `scale` defaults to `D ** -0.5`. `backend`: `"triton"`
    (fused kernels, forward and deterministic backward), `"flex"` (FlexAttention on the same mask), `"torch"`
    (exact reference) or `"auto"` (Triton on CUDA, else torch). With `return_lse`, also returns the natural-log
    sum of exponentials `(B, Hq, Lq)` in float32 (`-inf` on empty rows), differentiable too.
    """
    _check_inputs(q, k, v, mask)
    scale = resolve_scale(scale, q.shape[-1])
    backend = resolve_backend(backend, q)
    if backend == "triton":
        from .ops import attend

        out, lse = attend(q, k, v, mask, scale)
    elif backend == "flex":
        from .flex import flex_block_sparse_attention

        out, lse = flex_block_sparse_attention(q, k, v, mask, scale)
    else:
        out, lse = reference.block_sparse_attention(q, k, v, mask, scale)
    return (out, lse) if return_lse else out


def _check_rpb(rpb: torch.Tensor | None, q: torch.Tensor, nbhd: Neighborhood) -> None:
    if rpb is None:
        return
    if not isinstance(rpb, torch.Tensor):
        raise TypeError(f"rpb must be a torch.Tensor or None, got {type(rpb).__name__}")
    expected = (q.shape[1], *nbhd.rpb_shape)
    if tuple(rpb.shape) != expected:
        raise ValueError(f"rpb must have shape (heads, 2 * kernel_size - 1 per axis) = {expected}, got {tuple(rpb.shape)}")
    if rpb.device != q.device or not rpb.is_floating_point():
        raise ValueError(f"rpb must be a floating tensor on {q.device}, got {rpb.dtype} on {rpb.device}")


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | tuple[int, ...],
    *,
    dilation: int | tuple[int, ...] = 1,
    stride: int | tuple[int, ...] = 1,
    is_causal: bool | tuple[bool, ...] = False,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Neighborhood attention (NA, DiNA with `dilation`, GNA with `stride`) with NATTEN's semantics.

    q `(B, Hq, *spatial, D)`, k/v `(B, Hkv, *spatial, D)` with 1, 2 or 3 spatial axes; `kernel_size`,
    `dilation`, `stride` and `is_causal` are one value or one per axis (see `Neighborhood`). `rpb` is the
    relative position bias of NAT/DiNAT, `(Hq, 2k - 1, ...)`, added to the logit at index
    `(key - query) / dilation + k - 1` per axis (gradients flow to it). `backend`: `"triton"` (fused forward
    and backward, memory linear in tokens), `"flex"` (FlexAttention with the NA mask), `"torch"` (exact,
    gathers each query's keys chunk by chunk) or `"auto"` (Triton on CUDA, else torch). With `return_lse`,
    also returns the log-sum-exp `(B, Hq, *spatial)` in float32.
    """
    check_qkv(q, k, v, (4, 5, 6), "(batch, heads, *spatial, head_dim) with 1 to 3 spatial axes")
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k: expected batch, spatial extents and head_dim of q {tuple(q.shape)}, got {tuple(k.shape)}")
    nbhd = Neighborhood.create(q.shape[2:-1], kernel_size, dilation, stride, is_causal)
    _check_rpb(rpb, q, nbhd)
    scale = resolve_scale(scale, q.shape[-1])
    backend = resolve_backend(backend, q)
    spatial = q.shape[2:-1]
    q, k, v = (t.flatten(2, -2) for t in (q, k, v))
    if backend == "triton":
        from .na_ops import neighborhood_attend

        out, lse = neighborhood_attend(q, k, v, nbhd, rpb, scale)
    elif backend == "flex":
        from .flex import flex_neighborhood_attention

        out, lse = flex_neighborhood_attention(q, k, v, nbhd, rpb, scale)
    else:
        out, lse = reference.neighborhood_attention(q, k, v, nbhd, rpb, scale)
    out = out.unflatten(2, spatial)
    return (out, lse.unflatten(2, spatial)) if return_lse else out
