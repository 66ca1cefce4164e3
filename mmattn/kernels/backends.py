"""The backend registry: which backends run each kernel family, where, and which one `backend="auto"` takes.

Every public kernel function takes `backend=`: `"auto"` or one of its family's backends in `REGISTRY`. Each
backend has a capability predicate, `can_run_<backend>(family, q, **case)` (as NATTEN's `can_run_*`), that says
whether it runs a case (device, dtype, head dim; for FlashAttention-4 also k, v and the mask's block sizes, passed
as `case`) here; `supported_backends(family, q, **case)` lists the backends that do, fastest first, and `"auto"`
takes the first. On CUDA the order is the registry's (FlashAttention-4 for block-sparse attention where
`flash_attn.cute` imports, our Triton kernels, FlexAttention, the reference), except that a block-sparse case small
enough to be host-bound puts Triton first (`HOST_BOUND_WORK`); elsewhere the reference comes first,
since Triton runs there only interpreted (`TRITON_INTERPRET=1`, exact but slow) and FlexAttention only eagerly
(unfused). `resolve_backend` turns a user's choice into the backend to run: an explicit backend that cannot run
the case is an error naming `backend`; what `"auto"` took is logged at DEBUG level (logger `mmattn.kernels`).
`backend_info` (the `mmattn info` table) says per device which backends run at all.

Everything a public function calls here is plain Python on tensor attributes, so torch.compile traces it.
"""

from __future__ import annotations

import importlib.util
import logging
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
    "can_run_fa4",
    "can_run_flex",
    "can_run_torch",
    "can_run_triton",
    "check_backend",
    "resolve_backend",
    "supported_backends",
]

FAMILIES = ("block_sparse", "na", "routed", "column_sets", "massive_activations", "rotary")
"""The kernel families, one public module each (`block_sparse.py`, `na.py`, `routed.py`, `column_sets.py`,
`massive_activations.py`, `rotary.py`)."""

REGISTRY: dict[str, tuple[str, ...]] = {
    "block_sparse": ("fa4", "triton", "flex", "torch"),
    "na": ("triton", "flex", "torch"),
    "routed": ("triton", "torch"),
    "column_sets": ("triton", "torch"),
    "massive_activations": ("triton", "torch"),
    "rotary": ("triton", "torch"),
}
"""Per family, its backends in preference order on a GPU (fastest first); "torch" (the exact reference) runs all."""

BACKENDS = ("auto", "fa4", "triton", "flex", "torch")
"""Every value a `backend=` argument may take (each family takes "auto" and its own, `backend_choices`)."""

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton runs its interpreter on the CPU (read once: triton reads it when imported)."""

_log = logging.getLogger("mmattn.kernels")
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = {  # (smallest, largest, multiple): the tiled kernels need multiples of 8 for their dots
    "block_sparse": (16, 256, 8),
    "na": (16, 256, 8),
    "routed": (16, 256, 8),
    "column_sets": (1, 256, 1),  # its one dot (over the keys) pads the head dim: any up to 256
    "massive_activations": (1, 1 << 20, 1),  # the hidden width, read in blocks
    "rotary": (2, 1 << 12, 2),  # channel pairs, a row per program
}

_FLEX_MIN_HEAD_DIM = 16
"""FlexAttention's CUDA lowering refuses smaller query/key/value head dims (inductor's flex_attention, torch 2.11 to
2.15)."""

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
    if q.is_cuda and q.shape[-1] < _FLEX_MIN_HEAD_DIM:
        return ValueError, f"takes head_dim >= {_FLEX_MIN_HEAD_DIM} on CUDA (its compiled dots), got {q.shape[-1]}"
    return None


def _torch_problem(family: str, q: torch.Tensor) -> _Problem:
    return None


def _fa4_problem(family: str, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                 mask=None) -> _Problem:
    if q.device.type != "cuda":
        return ValueError, f"cannot run here: {q.device} is not CUDA (FA4's CuTe kernels run on sm90/sm100 GPUs)"
    from .fa4 import fa4_available, fa4_supports

    ok, reason = fa4_available(q.device)
    if not ok:
        return ValueError, f"cannot run here: {reason}"
    if mask is not None:
        ok, reason = fa4_supports(q, k, v, mask, deterministic=torch.are_deterministic_algorithms_enabled())
        if not ok:
            return ValueError, f"cannot run this case: {reason}"
    return None


def _can_run(name: str, problem: Callable[..., _Problem], family: str, q: torch.Tensor, raise_error: bool,
             **case) -> bool:
    found = None if name in _registered(family) else (ValueError, f"has no {family} kernel")
    found = found or problem(family, q, **case)
    if found is not None and raise_error:
        error, reason = found
        raise error(f"backend={name!r} {reason}")
    return found is None


def can_run_fa4(family: str, q: torch.Tensor, *, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                mask=None, raise_error: bool = False) -> bool:
    """Whether FlashAttention-4's block-sparse kernels (`fa4.py`) run `family` on tensors like `q`: a Hopper or
    Blackwell GPU where `flash_attn.cute` imports; given `k`, `v` and `mask`, also this case (dtype, head dims,
    block sizes against FA4's tiles, and a deterministic backward when torch asks for deterministic algorithms:
    `fa4.fa4_supports`)."""
    return _can_run("fa4", _fa4_problem, family, q, raise_error, k=k, v=v, mask=mask)


def can_run_triton(family: str, q: torch.Tensor, *, raise_error: bool = False, **case) -> bool:
    """Whether our Triton kernels run `family` on tensors like `q` here: a CUDA device (or the CPU under
    `TRITON_INTERPRET=1`), float16/bfloat16/float32, a head dim the kernels take. With `raise_error`, a
    ValueError/TypeError naming `backend` says why not."""
    return _can_run("triton", _triton_problem, family, q, raise_error)


def can_run_flex(family: str, q: torch.Tensor, *, raise_error: bool = False, **case) -> bool:
    """Whether FlexAttention runs `family` (block-sparse and neighborhood attention) on tensors like `q`: torch has it;
    on CUDA it compiles to Triton (triton installed; float16/bfloat16/float32)."""
    return _can_run("flex", _flex_problem, family, q, raise_error)


def can_run_torch(family: str, q: torch.Tensor, *, raise_error: bool = False, **case) -> bool:
    """The exact reference runs every family on every device and dtype."""
    return _can_run("torch", _torch_problem, family, q, raise_error)


_PREDICATES: dict[str, Callable[..., bool]] = {
    "fa4": can_run_fa4, "triton": can_run_triton, "flex": can_run_flex, "torch": can_run_torch,
}


def backend_choices(family: str) -> tuple[str, ...]:
    """The values `backend=` takes for `family`: "auto", then its backends in preference order."""
    return ("auto", *_registered(family))


def check_backend(backend: str, choices: tuple[str, ...]) -> str:
    """`backend` if it is one of `choices`; a ValueError naming the argument otherwise."""
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    return backend


HOST_BOUND_WORK = 2.0e6
"""Kept 128x128-block equivalents x head dim under which a block-sparse call is host-bound on an H200 and our Triton
kernels may finish before FlashAttention-4: FA4's Python path takes ~0.15-0.5 ms of host time per forward (it varies
with the load of the host from run to run) and its forward+backward does not go below ~0.7 ms, ours ~0.07-0.1 ms per
forward. At 1.28e6-1.57e6 (B1 H12 L16384 D64 and B8 H16 L4096 D128, density ~0.1) Triton took 0.25-0.32 ms forward:
1.3-1.9x faster than FA4 through mmattn in the run of 2026-12-04 (0.41-0.59 ms), 0.85-0.90x of FA4 in that of
2026-12-05 (0.22-0.28 ms, benchmarks/results/block_sparse_host_bound.md); from 3.1e6 on FA4 was faster in both."""


def host_bound(q: torch.Tensor, mask) -> bool:
    """Whether a block-sparse case is small enough that host time, not the kernel, decides (`HOST_BOUND_WORK`).
    Reads the mask's block count once per mask (`BlockSparseMask.kept_blocks`); never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    batch, heads = q.shape[:2]
    q_block, kv_block = mask.block_size
    blocks = mask.kept_blocks * (batch // mask.shape[0]) * (heads // mask.shape[1]) * q_block * kv_block / 128**2
    return blocks * q.shape[-1] < HOST_BOUND_WORK


def _supported(family: str, q: torch.Tensor, **case) -> Iterator[str]:
    backends = _registered(family)
    if q.device.type != "cuda":
        backends = ("torch", *(name for name in backends if name != "torch"))
    elif family == "block_sparse" and case.get("mask") is not None and host_bound(q, case["mask"]):
        backends = ("triton", *(name for name in backends if name != "triton"))
    return (name for name in backends if _PREDICATES[name](family, q, **case))


def supported_backends(family: str, q: torch.Tensor, **case) -> tuple[str, ...]:
    """The backends that run `family` on tensors like `q` here, in the order `"auto"` prefers them (fastest first;
    "torch" always last on CUDA, first elsewhere). `case`: the call's other inputs a predicate looks at (block-
    sparse attention: `k`, `v`, `mask`); without them FA4 is judged on the device alone."""
    return tuple(_supported(family, q, **case))


def resolve_backend(family: str, backend: str, q: torch.Tensor, **case) -> str:
    """The backend to run `family` on `q` (and the other inputs in `case`, see `supported_backends`): `"auto"` takes
    the first of `supported_backends`; an explicit choice that cannot run here is a clear error. An empty `q` (a
    batch of 0) runs torch, whose reference returns the empty result, as SDPA does: there is nothing for a kernel
    to launch."""
    check_backend(backend, backend_choices(family))
    if backend == "auto":
        backend = next(_supported(family, q, **case))  # the first: "torch" runs everything
        if not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s attention on %s %s %s: backend='auto' runs %r", family, q.device, q.dtype,
                       tuple(q.shape), backend)
    else:
        _PREDICATES[backend](family, q, raise_error=True, **case)
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
    if device.type == "cuda":
        from .fa4 import fa4_available

        info["fa4"] = fa4_available(device)
    else:
        info["fa4"] = (False, f"needs a Hopper/Blackwell GPU, not {device.type} (block-sparse attention only)")
    info["torch"] = (True, "exact reference, memory-bounded")
    return {name: info[name] for name in BACKENDS if name in info}  # preference order
