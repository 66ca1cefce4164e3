"""Which kernel backend runs where: `backend_info` for users, `resolve_backend` for the public functions."""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["BACKENDS", "backend_info", "resolve_backend"]

BACKENDS = ("auto", "triton", "flex", "torch")
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


def resolve_backend(
    backend: str, q: torch.Tensor, backends: tuple[str, ...] = BACKENDS, head_dims: range = _TRITON_HEAD_DIMS,
    head_dim_multiple: int = 8,
) -> str:
    """The backend to run: `"auto"` picks Triton for CUDA tensors of a Triton dtype, else torch; an explicit
    choice that cannot run here is a clear error. `head_dims` and `head_dim_multiple`: the head dims the Triton
    kernels take (the tiled ones need multiples of 8 for their dots). An empty `q` (a batch of 0) runs torch,
    whose reference returns the empty result, as SDPA does: there is nothing for a kernel to launch."""
    if not isinstance(backend, str) or backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda and q.dtype in _TRITON_DTYPES and _triton_runs_on(q.device) else "torch"
    elif backend == "triton":
        if not _triton_runs_on(q.device):
            raise ValueError(f"backend='triton' cannot run here: {backend_info(q.device)['triton'][1]}")
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes float16, bfloat16 or float32 inputs, got {q.dtype}")
        if q.shape[-1] not in head_dims or q.shape[-1] % head_dim_multiple:
            raise ValueError(f"backend='triton' takes head_dim a multiple of {head_dim_multiple} in "
                             f"[{head_dims.start}, {head_dims.stop - 1}], got {q.shape[-1]}")
    return "torch" if q.numel() == 0 else backend
