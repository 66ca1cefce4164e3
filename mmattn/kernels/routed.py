"""Routed attention (BiFormer's bi-level routing, token-to-token level): each query region attends to the keys of
the key regions its routing index lists.

Backends (`backends.REGISTRY["routed"]`): `"triton"` loads the routed regions' rows through index arithmetic,
forward and deterministic backward, never materializing the gathered keys and values (`triton/routed.py`);
`"torch"` is the official gather algorithm (a k-fold copy of the routed keys and values, then softmax attention per
region, `reference.gather_attention`), kept as the reference path; `"auto"` takes the fastest that runs the case
here.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import resolve_backend
from .validation import check_qkv, resolve_scale

__all__ = ["routed_attention"]


def _check_region_size(name: str, value: int, length: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if length % value:
        raise ValueError(f"{name}={value} must divide the token count {length} (tokens grouped region by region)")
    return value


def _check_indices(indices: torch.Tensor, q: torch.Tensor, n_q_regions: int) -> torch.Tensor:
    """Returns the index as `(B|1, H|1, n_q_regions, topk)`."""
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
        raise TypeError(f"region_indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
    if indices.dim() != 4:
        raise ValueError(f"region_indices must be (batch, n_q_regions, topk) or (batch, heads, n_q_regions, topk), "
                         f"got shape {tuple(indices.shape)}")
    batch, heads = q.shape[:2]
    if indices.shape[0] not in (1, batch) or indices.shape[1] not in (1, heads) or indices.shape[2] != n_q_regions:
        raise ValueError(f"region_indices: expected (1|{batch}, 1|{heads}, {n_q_regions}, topk), "
                         f"got {tuple(indices.shape)}")
    if indices.shape[3] < 1:
        raise ValueError("region_indices: topk must be at least 1, got 0")
    if indices.device != q.device:
        raise ValueError(f"region_indices must be on {q.device}, got {indices.device}")
    return indices


def _check_kv_valid(kv_valid: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
    """Returns the key-padding mask as bool `(B|1, Lk)`, or None."""
    if kv_valid is None:
        return None
    if not isinstance(kv_valid, torch.Tensor) or kv_valid.dtype != torch.bool:
        raise TypeError(f"kv_valid must be a bool tensor, got {getattr(kv_valid, 'dtype', type(kv_valid))}")
    if kv_valid.dim() == 1:
        kv_valid = kv_valid.unsqueeze(0)
    if kv_valid.dim() != 2 or kv_valid.shape[0] not in (1, k.shape[0]) or kv_valid.shape[1] != k.shape[2]:
        raise ValueError(f"kv_valid: expected (1|{k.shape[0]}, {k.shape[2]}), got {tuple(kv_valid.shape)}")
    if kv_valid.device != k.device:
        raise ValueError(f"kv_valid must be on {k.device}, got {kv_valid.device}")
    return kv_valid


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    region_indices: torch.Tensor,
    *,
    q_region_size: int,
    kv_region_size: int | None = None,
    kv_valid: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Routed attention: the token-to-token attention of BiFormer's Bi-Level Routing Attention (BRA).

    q `(B, Hq, Lq, D)` and k/v `(B, Hkv, Lk, D)` hold their tokens region by region: query region `r` is rows
    `[r * q_region_size, (r + 1) * q_region_size)`, key region `j` rows `[j * kv_region_size, ...)` (default: the
    query region size). `region_indices` `(B|1, n_q_regions, topk)` or `(B|1, Hq|1, n_q_regions, topk)` lists the
    key regions each query region attends to (the routing index, e.g. `topk` of the region affinity graph);
    entries of a row should be distinct. `kv_valid` `(B|1, Lk)` bool marks real keys: False keys (padding) are
    never attended. Rows with no key get zeros. `scale` defaults to `D ** -0.5`.

    `backend`: `"triton"` (fused, forward and deterministic backward; out-of-range indices are skipped),
    `"torch"` (the official gather algorithm; out-of-range indices raise) or `"auto"`. With `return_lse`, also
    returns the natural-log sum of exponentials `(B, Hq, Lq)` in float32 (`-inf` on empty rows).
    """
    check_qkv(q, k, v, (4,), "(batch, heads, tokens, head_dim)")
    q_region = _check_region_size("q_region_size", q_region_size, q.shape[2])
    kv_region = _check_region_size("kv_region_size", q_region if kv_region_size is None else kv_region_size,
                                   k.shape[2])
    indices = _check_indices(region_indices, q, q.shape[2] // q_region)
    kv_valid = _check_kv_valid(kv_valid, k)
    scale = resolve_scale(scale, q.shape[-1])
    backend = resolve_backend("routed", backend, q)
    if backend == "triton":
        from .triton.routed import attend

        out, lse = attend(q, k, v, indices, kv_valid, q_region, kv_region, scale)
    else:
        n_kv_regions = k.shape[2] // kv_region
        if not torch.compiler.is_compiling() and not indices.is_meta and bool((indices < 0).any() | (indices >= n_kv_regions).any()):
            raise ValueError(f"region_indices must lie in [0, {n_kv_regions}) (the key regions), got values outside")
        out, lse = reference.gather_attention(q, k, v, indices, kv_valid, q_region, kv_region, scale)
    return (out, lse) if return_lse else out
