"""A small table timing mmattn's kernel backends on this machine (median wall time of a few calls)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from mmattn.kernels import (
    BlockSparseMask,
    backend_info,
    block_sparse_attention,
    neighborhood_attention,
)
from mmattn.kernels.backends import INTERPRETED, backend_choices

__all__ = ["HEADERS", "time_backends"]

HEADERS = ["kernel", "shape", "backend", "median ms", "note"]
INTERPRETED_NOTE = "interpreted (TRITON_INTERPRET=1), no kernel runs"


def _median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up (compiles Flex / Triton once)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def time_backends(tokens: int = 1024, head_dim: int = 64, heads: int = 4, repeats: int = 3) -> list[list]:
    """Rows of `HEADERS`: block-sparse attention at density 1/2 and 2-D neighborhood attention (7x7 window)
    on each backend that can run here; the others, and Triton under its interpreter (which would time Python, not a
    kernel), are listed untimed with the reason."""
    if tokens < 64 or int(tokens ** 0.5) ** 2 != tokens:
        raise ValueError(f"tokens must be a square number >= 64, got {tokens}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    blocks = torch.rand(tokens // 64, tokens // 64, generator=torch.Generator().manual_seed(0)) < 0.5
    blocks |= torch.eye(tokens // 64, dtype=torch.bool)
    mask = BlockSparseMask.from_dense(blocks.to(device), 64, tokens, tokens)
    side = int(tokens ** 0.5)
    grid = [t.unflatten(2, (side, side)) for t in (q, k, v)]
    kernels = {  # label: (family, run)
        f"block-sparse (density {mask.density():.2f})":
            ("block_sparse", lambda backend: block_sparse_attention(q, k, v, mask, backend=backend)),
        "neighborhood 2-D, 7x7": ("na", lambda backend: neighborhood_attention(*grid, 7, backend=backend)),
    }
    rows = []
    for backend, (usable, detail) in backend_info(device).items():
        for kernel, (family, run) in kernels.items():
            if backend not in backend_choices(family):
                continue  # e.g. FlashAttention-4 runs block-sparse attention only
            shape = f"{heads}x{tokens}x{head_dim} {str(dtype).removeprefix('torch.')}"
            if not usable:
                rows.append([kernel, shape, backend, None, f"not usable: {detail}"])
            elif backend == "triton" and INTERPRETED:
                rows.append([kernel, shape, backend, None, f"not timed: {INTERPRETED_NOTE}"])
            else:
                timed = _median_ms(lambda run=run, backend=backend: run(backend), repeats)
                rows.append([kernel, shape, backend, round(timed, 2), detail])
    return rows
