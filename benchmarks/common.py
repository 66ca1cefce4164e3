"""Timing helpers shared by the GPU benchmark scripts (medians of `triton.testing.do_bench`, warm-up first)."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
import triton


@dataclass
class Timing:
    fwd_ms: float
    fwd_bwd_ms: float


def bench(fn_fwd, q, k, v) -> Timing:
    """Median times of `fn_fwd(q, k, v)` and of its forward+backward."""
    grad = torch.randn_like(q)

    def fwd_bwd():
        fn_fwd(q, k, v).backward(grad)

    with torch.no_grad():
        fwd_ms = triton.testing.do_bench(lambda: fn_fwd(q, k, v), warmup=50, rep=200, return_mode="median")
    for t in (q, k, v):
        t.requires_grad_()
    fwd_bwd_ms = triton.testing.do_bench(fwd_bwd, warmup=50, rep=300, grad_to_none=[q, k, v], return_mode="median")
    for t in (q, k, v):
        t.requires_grad_(False)
    return Timing(fwd_ms, fwd_bwd_ms)


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def environment() -> str:
    """The device and versions line every results table starts with."""
    return (f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
            f"Python {platform.python_version()}")
