"""The backend registry: which backends run each kernel family, where, and which one `backend="auto"` takes.

Every public kernel function takes `backend=`: `"auto"` or one of its family's backends in `REGISTRY`. Each
backend has a capability predicate, `can_run_<backend>(family, q)` (as NATTEN's `can_run_*`), that says whether it
runs a case (device, dtype, head dim) here; `supported_backends(family, q)` lists the backends that do, fastest
first, and `"auto"` takes the first. On CUDA the order is the registry's (our Triton kernels, then FlexAttention,
then the reference); elsewhere the reference comes first, since Triton runs there only interpreted
(`TRITON_INTERPRET=1`, exact but slow) and FlexAttention only eagerly (unfused). `resolve_backend` turns a user's
choice into the backend to run: an explicit backend that cannot run the case is an error naming `backend`.
`backend_info` (the `mmattn info` table) says per device which backends run at all.

Everything a public function calls here is plain Python on tensor attributes, so torch.compile traces it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "BACKENDS",
    "FAMILIES",
    "INTERPRETED",
    "REGISTRY",
    "backend_choices",
    "backend_info",
    "can_run_flex",
    "can_run_torch",
    "can_run_triton",
    "check_backend",
    "resolve_backend",
    "supported_backends",
]

FAMILIES = ("block_sparse", "na", "routed", "column_sets")
"""The kernel families, one public module each (`block_sparse.py`, `na.py`, `routed.py`, `column_sets.py`)."""

REGISTRY: dict[str, tuple[str, ...]] = {
    # A FlashAttention-4 backend for block-sparse attention goes first here ("fa4", "triton", ...), with its
    # predicate `can_run_fa4` in _PREDICATES, its name in BACKENDS and its branch in block_sparse.py.
    "block_sparse": ("triton", "flex", "torch"),
    "na": ("triton", "flex", "torch"),
    "routed": ("triton", "torch"),
    "column_sets": ("triton", "torch"),
}
"""Per family, its backends in preference order on a GPU (fastest first); "torch" (the exact reference) runs all."""

BACKENDS = ("auto", "triton", "flex", "torch")
"""Every value a `backend=` argument may take (each family takes "auto" and its own, `backend_choices`)."""

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton runs its interpreter on the CPU (read once: triton reads it when imported)."""

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = {  # (smallest, largest, multiple): the tiled kernels need multiples of 8 for their dots
    "block_sparse": (16, 256, 8),
    "na": (16, 256, 8),
    "routed": (16, 256, 8),
    "column_sets": (1, 256, 1),  # no dots: any head dim up to 256
}

_Problem = tuple[type[Exception], str] | None
"""Why a backend cannot run a case (the error to raise and its text after `backend='name'`), or None."""


def _triton_runs_on(device: torch.device) -> bool:
    """Cheap enough to be traced by torch.compile: no imports, no device queries."""
    return _HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


def _registered(family: str) -> tuple[str, ...]:
    if family not in REGISTRY:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return REGISTRY[family]


def _triton_problem(family: str, q: torch.Tensor) -> _Problem:
    if not _triton_runs_on(q.device):
        return ValueError, f"cannot run here: {backend_info(q.device)['triton'][1]}"
    if q.dtype not in _TRITON_DTYPES:
        return TypeError, f"takes float16, bfloat16 or float32 inputs, got {q.dtype}"
    smallest, largest, multiple = _TRITON_HEAD_DIMS[family]
    head_dim = q.shape[-1]
    if not smallest <= head_dim <= largest or head_dim % multiple:
        return ValueError, f"takes head_dim a multiple of {multiple} in [{smallest}, {largest}], got {head_dim}"
    return None


def _flex_problem(family: str, q: torch.Tensor) -> _Problem:
    if not _HAS_FLEX:
        return ValueError, f"cannot run here: {backend_info(q.device)['flex'][1]}"
    if q.is_cuda and not _HAS_TRITON:
        return ValueError, "cannot run here: FlexAttention compiles to Triton on CUDA, and triton is not installed"
    if q.is_cuda and q.dtype not in _TRITON_DTYPES:
        return TypeError, f"takes float16, bfloat16 or float32 inputs on CUDA, got {q.dtype}"
    return None


def _torch_problem(family: str, q: torch.Tensor) -> _Problem:
    return None


def _can_run(name: str, problem: Callable[[str, torch.Tensor], _Problem], family: str, q: torch.Tensor,
             raise_error: bool) -> bool:
    found = None if name in _registered(family) else (ValueError, f"has no {family} kernel")
    found = found or problem(family, q)
    if found is not None and raise_error:
        error, reason = found
        raise error(f"backend={name!r} {reason}")
    return found is None


def can_run_triton(family: str, q: torch.Tensor, *, raise_error: bool = False) -> bool:
    """Whether our Triton kernels run `family` on tensors like `q` here: a CUDA device (or the CPU under
    `TRITON_INTERPRET=1`), float16/bfloat16/float32, a head dim the kernels take. With `raise_error`, a
    ValueError/TypeError naming `backend` says why not."""
    return _can_run("triton", _triton_problem, family, q, raise_error)


def can_run_flex(family: str, q: torch.Tensor, *, raise_error: bool = False) -> bool:
    """Whether FlexAttention runs `family` (block-sparse and neighborhood attention) on tensors like `q`: torch has it;
    on CUDA it compiles to Triton (triton installed; float16/bfloat16/float32)."""
    return _can_run("flex", _flex_problem, family, q, raise_error)


def can_run_torch(family: str, q: torch.Tensor, *, raise_error: bool = False) -> bool:
    """The exact reference runs every family on every device and dtype."""
    return _can_run("torch", _torch_problem, family, q, raise_error)


_PREDICATES: dict[str, Callable[..., bool]] = {"triton": can_run_triton, "flex": can_run_flex, "torch": can_run_torch}


def backend_choices(family: str) -> tuple[str, ...]:
    """The values `backend=` takes for `family`: "auto", then its backends in preference order."""
    return ("auto", *_registered(family))


def check_backend(backend: str, choices: tuple[str, ...]) -> str:
    """`backend` if it is one of `choices`; a ValueError naming the argument otherwise."""
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    return backend


def _supported(family: str, q: torch.Tensor) -> Iterator[str]:
    backends = _registered(family)
    if q.device.type != "cuda":
        backends = ("torch", *(name for name in backends if name != "torch"))
    return (name for name in backends if _PREDICATES[name](family, q))


def supported_backends(family: str, q: torch.Tensor) -> tuple[str, ...]:
    """The backends that run `family` on tensors like `q` here, in the order `"auto"` prefers them (fastest first;
    "torch" always last on CUDA, first elsewhere)."""
    return tuple(_supported(family, q))


def resolve_backend(family: str, backend: str, q: torch.Tensor) -> str:
    """The backend to run `family` on `q`: `"auto"` takes the first of `supported_backends`; an explicit choice that
    cannot run here is a clear error. An empty `q` (a batch of 0) runs torch, whose reference returns the empty
    result, as SDPA does: there is nothing for a kernel to launch."""
    check_backend(backend, backend_choices(family))
    if backend == "auto":
        backend = next(_supported(family, q))  # the first: "torch" runs everything
    else:
        _PREDICATES[backend](family, q, raise_error=True)
    return "torch" if q.numel() == 0 else backend


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
    if not _HAS_FLEX:
        info["flex"] = (False, f"torch {torch.__version__} has no FlexAttention (needs >= 2.5)")
    else:
        info["flex"] = (True, "compiled FlexAttention" if device.type == "cuda" else "eager FlexAttention (unfused)")
    info["torch"] = (True, "exact reference, memory-bounded")
    return info
