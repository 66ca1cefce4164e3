"""mmattn's shared kernel layer: block-sparse and neighborhood attention with Triton, FlexAttention and exact
torch backends.

Tensors use the SDPA layout `(batch, heads, tokens, head_dim)`; spatial kernels take `(batch, heads, *spatial, head_dim)`.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from . import reference
from .mask import BlockSparseMask
from .neighborhood import Neighborhood

__all__ = [
    "BlockSparseMask", "Neighborhood", "block_sparse_attention", "neighborhood_attention", "backend_info", "BACKENDS"
]

BACKENDS = ("auto", "triton", "flex", "torch")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = range(16, 257)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_runs_on(device: torch.device) -> bool:
    """Cheap enough to be traced by torch.compile: no imports, no device queries."""
    return _HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and _TRITON_INTERPRETED))


def backend_info(device: str | torch.device | None = None) -> dict[str, tuple[bool, str]]:
    """For each backend, whether it can run on `device` (default: CUDA if present, else CPU) and why (not)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict[str, tuple[bool, str]] = {}
    if not _HAS_TRITON:
        info["triton"] = (False, "triton is not installed (pip install 'mmattn[triton]')")
    elif device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        usable = major >= 8
        info["triton"] = (usable, f"compute capability {major}.{minor}" + ("" if usable else " < 8.0"))
    elif _triton_runs_on(device):
        info["triton"] = (True, "Triton interpreter (TRITON_INTERPRET=1): exact but slow")
    else:
        info["triton"] = (False, f"needs a CUDA GPU, or TRITON_INTERPRET=1 on {device.type}")
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        info["flex"] = (False, f"torch {torch.__version__} has no FlexAttention (needs >= 2.5)")
    else:
        info["flex"] = (True, "compiled FlexAttention" if device.type == "cuda" else "eager FlexAttention (unfused)")
    info["torch"] = (True, "exact reference, memory-bounded")
    return info


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...], layout: str) -> None:
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
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for grouped-query attention")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask) -> None:
    _check_tensors(q, k, v, (4,), "(batch, heads, tokens, head_dim)")
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a BlockSparseMask, got {type(mask).__name__}")
    if mask.device != q.device:
        raise ValueError(f"mask must be on the device of q ({q.device}), got {mask.device}")
    (batch, heads, q_len, head_dim), (kv_batch, _, kv_len, kv_dim) = q.shape, k.shape
    if kv_batch != batch or kv_dim != head_dim:
        raise ValueError(f"k: expected batch {batch} and head_dim {head_dim} as q, got shape {tuple(k.shape)}")
    if (mask.q_len, mask.kv_len) != (q_len, kv_len):
        raise ValueError(f"mask: built for q_len={mask.q_len}, kv_len={mask.kv_len}, got q_len={q_len}, kv_len={kv_len}")
    mask_batch, mask_heads = mask.shape[:2]
    if mask_batch not in (1, batch) or mask_heads not in (1, heads):
        raise ValueError(f"mask: batch/heads ({mask_batch}, {mask_heads}) must be 1 or ({batch}, {heads}) of q")


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda and q.dtype in _TRITON_DTYPES and _triton_runs_on(q.device) else "torch"
    if backend == "triton":
        if not _triton_runs_on(q.device):
            raise ValueError(f"backend='triton' cannot run here: {backend_info(q.device)['triton'][1]}")
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes float16, bfloat16 or float32 inputs, got {q.dtype}")
        if q.shape[-1] not in _TRITON_HEAD_DIMS or q.shape[-1] % 8:
            raise ValueError(f"backend='triton' takes head_dim a multiple of 8 in [16, 256], got {q.shape[-1]}")
    return backend


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
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    backend = _resolve_backend(backend, q)
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
    _check_tensors(q, k, v, (4, 5, 6), "(batch, heads, *spatial, head_dim) with 1 to 3 spatial axes")
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k: expected batch, spatial extents and head_dim of q {tuple(q.shape)}, got {tuple(k.shape)}")
    nbhd = Neighborhood.create(q.shape[2:-1], kernel_size, dilation, stride, is_causal)
    _check_rpb(rpb, q, nbhd)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    backend = _resolve_backend(backend, q)
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

from .routed import routed_attention

__all__ += ["routed_attention"]
