"""Argument checks shared by the public kernel functions: errors name the argument, the expected and the
received value."""

from __future__ import annotations

import math
from numbers import Real

import torch

__all__ = ["check_number", "check_qkv", "resolve_scale"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...], layout: str) -> None:
    """q, k, v: tensors of `dims` dimensions (`layout` names them), one float dtype and device, k and v alike,
    the batch and head dim of q, and q heads a multiple of k/v heads (grouped-query attention)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in dims:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] < 1 or q.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a positive multiple of k/v heads ({k.shape[1]}) for "
                         "grouped-query attention")
    if k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected batch {q.shape[0]} and head_dim {q.shape[-1]} as q, got shape {tuple(k.shape)}")


def check_number(name: str, value) -> float:
    """`value` as a float: a finite real number (not a bool). Finiteness is checked eagerly only: under
    torch.compile the number may be symbolic."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not torch.compiler.is_compiling() and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: `head_dim ** -0.5` by default, else a finite real number."""
    return head_dim ** -0.5 if scale is None else check_number("scale", scale)
