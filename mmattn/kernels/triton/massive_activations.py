"""Triton kernel of the massive-activation test: per hidden state, its RMS over the width and the largest magnitude
among a few named dimensions, in one read (`massive_activation_kernel`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..autograd import inference_op
from .launch import ceil_div, next_power_of_2

ROWS_BLOCK = 4
"""Hidden states per program."""
WIDTH_BLOCK = 512
"""Hidden dimensions per step of the RMS loop."""


@triton.jit(do_not_specialize=["width"])
def massive_activation_kernel(
    HIDDEN, DIMS, FLAGS, rows, width, stride_r, num_dims, threshold,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """FLAGS[r] = max_n |h_r[DIMS[n]]| / sqrt(mean(h_r^2) + 1e-6) > threshold for BLOCK_R rows, in float32 with
    IEEE square root and division (as torch's)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    row_start = HIDDEN + r.to(tl.int64)[:, None] * stride_r
    squares = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, width, BLOCK_W):
        w = start + tl.arange(0, BLOCK_W)
        x = tl.load(row_start + w[None, :], mask=live[:, None] & (w < width)[None, :], other=0.0).to(tl.float32)
        squares += tl.sum(x * x, 1)
    rms = tl.sqrt_rn(tl.div_rn(squares, width * 1.0) + 1e-6)
    n = tl.arange(0, BLOCK_N)
    named = n < num_dims
    index = tl.load(DIMS + n, mask=named, other=0)
    values = tl.load(row_start + index[None, :], mask=live[:, None] & named[None, :], other=0.0).to(tl.float32)
    peak = tl.max(tl.abs(values), 1)
    tl.store(FLAGS + r, tl.div_rn(peak, rms) > threshold, mask=live)


def massive_activations_forward(hidden: torch.Tensor, dims: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool flags (...) of hidden (..., width); rows read with their own stride when the width is contiguous."""
    width = hidden.shape[-1]
    flat = hidden.reshape(-1, width)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    flags = torch.empty(flat.shape[0], dtype=torch.bool, device=hidden.device)
    if flat.shape[0]:
        massive_activation_kernel[(ceil_div(flat.shape[0], ROWS_BLOCK),)](
            flat, dims, flags, flat.shape[0], width, flat.stride(0), dims.shape[0], threshold,
            BLOCK_R=ROWS_BLOCK, BLOCK_W=min(WIDTH_BLOCK, next_power_of_2(width, 16)),
            BLOCK_N=next_power_of_2(dims.shape[0], 2), num_warps=4,
        )
    return flags.view(hidden.shape[:-1])


massive_activations_op = inference_op(
    "mmattn::massive_activations", massive_activations_forward,
    fake=lambda hidden, dims, threshold: hidden.new_empty(hidden.shape[:-1], dtype=torch.bool),
)
