"""Neighborhood attention (NA, DiNA with a dilation, GNA with a stride) with NATTEN's semantics.

The pattern is a `Neighborhood` (`neighborhood.py`). Backends (`backends.REGISTRY["na"]`): `"triton"` (fused
forward and backward, memory linear in tokens, `triton/neighborhood.py`), `"flex"` (FlexAttention with the NA
`mask_mod`, `flex.py`), `"torch"` (the exact reference, `reference.neighborhood_attention`); `"auto"` takes the
fastest that runs the case here.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import resolve_backend
from .neighborhood import Neighborhood
from .validation import check_qkv, resolve_scale

__all__ = ["neighborhood_attention"]


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
    gathers each query's keys chunk by chunk) or `"auto"` (the first of `supported_backends("na", q)`: Triton on
    CUDA, else torch). With `return_lse`, also returns the log-sum-exp `(B, Hq, *spatial)` in float32.
    """
    check_qkv(q, k, v, (4, 5, 6), "(batch, heads, *spatial, head_dim) with 1 to 3 spatial axes")
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k: expected batch, spatial extents and head_dim of q {tuple(q.shape)}, got {tuple(k.shape)}")
    nbhd = Neighborhood.create(q.shape[2:-1], kernel_size, dilation, stride, is_causal)
    _check_rpb(rpb, q, nbhd)
    scale = resolve_scale(scale, q.shape[-1])
    backend = resolve_backend("na", backend, q)
    spatial = q.shape[2:-1]
    q, k, v = (t.flatten(2, -2) for t in (q, k, v))
    if backend == "triton":
        from .triton.neighborhood import attend

        out, lse = attend(q, k, v, nbhd, rpb, scale)
    elif backend == "flex":
        from .flex import flex_neighborhood_attention

        out, lse = flex_neighborhood_attention(q, k, v, nbhd, rpb, scale)
    else:
        out, lse = reference.neighborhood_attention(q, k, v, nbhd, rpb, scale)
    out = out.unflatten(2, spatial)
    return (out, lse.unflatten(2, spatial)) if return_lse else out
