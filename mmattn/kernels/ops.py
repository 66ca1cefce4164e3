"""The Triton kernels with autograd, for eager use, training and `torch.compile`.

`attend(...)` is the entry point. Eagerly it runs an `autograd.Function` that launches the kernels directly
(the custom-op dispatcher costs more host time than a sparse kernel may take on the GPU). Under torch.compile
it calls the `torch.library` custom ops `mmattn::block_sparse_fwd` -> `(out, lse)` and `mmattn::block_sparse_bwd`,
whose fake implementations let the compiler keep each as one opaque call in a full graph; the Triton autotuner,
not Inductor, picks their tiles.
"""

from __future__ import annotations

import torch
import triton
from torch.library import custom_op

from .triton import block_sparse as bs
from .triton.launch import (
    dot_precision,
    head_dim_block,
    row_strides,
    rows_contiguous,
    size_bucket,
)

__all__ = ["attend", "block_sparse_bwd", "block_sparse_fwd"]


def _launch_args(q: torch.Tensor, k: torch.Tensor, q_block: int, kv_block: int) -> dict:
    """Compile-time kernel arguments shared by the forward and backward launches."""
    head_dim = q.shape[-1]
    return {
        "GROUPS": q.shape[1] // k.shape[1],
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim_block(head_dim),
        "Q_BLOCK": q_block,
        "KV_BLOCK": kv_block,
        "EVEN_Q": q.shape[2] % q_block == 0,
        "EVEN_KV": k.shape[2] % kv_block == 0,
        "DOT_PRECISION": dot_precision(q.dtype),
    }


def _tune_key(q: torch.Tensor, launch: dict) -> tuple:
    """What the tuned tile depends on: dtype, length bucket and the compile-time arguments."""
    return (q.dtype, size_bucket(q.shape[2]), *launch.values())


def _index_strides(counts: torch.Tensor, indices: torch.Tensor) -> tuple[int, ...]:
    """Strides of a `[B|1, H|1, n]` count tensor and its `[B|1, H|1, n, width]` index; 0 on broadcast dims."""
    def stride(t: torch.Tensor, dim: int) -> int:
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    return stride(counts, 0), stride(counts, 1), stride(indices, 0), stride(indices, 1), indices.stride(2)


def forward_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    q_block: int,
    kv_block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel: `(out, lse)`."""
    q, k, v = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    batch, heads, q_len, _head_dim = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, heads, q_len), device=q.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    launch = _launch_args(q, k, q_block, kv_block)
    bs.fwd_kernel.launch(
        grid, _tune_key(q, launch),
        q, k, v, out, lse, kv_num_blocks, kv_indices,
        *row_strides(q, k, v, out),
        *_index_strides(kv_num_blocks, kv_indices),
        heads, q_len, k.shape[2], scale, size_bucket(q_len),
        **launch,
    )
    return out, lse


def backward_kernels(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor,
    q_indices: torch.Tensor,
    q_block: int,
    kv_block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward kernels: `(dq, dk, dv)`, deterministic (no atomics)."""
    q, k, v, out, grad_out = (rows_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    batch, heads, q_len, _head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    launch = _launch_args(q, k, q_block, kv_block)
    delta = bs.backward_delta(out, grad_out, grad_lse, lse)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(k.shape, device=v.device, dtype=v.dtype)
    strides = row_strides(q, k, v, grad_out)

    def dkdv_grid(meta):
        return (triton.cdiv(kv_len, meta["BLOCK_N"]), batch * kv_heads)

    bs.dkdv_kernel.launch(
        dkdv_grid, _tune_key(q, launch),
        q, k, v, grad_out, lse, delta, dk, dv, q_num_blocks, q_indices,
        *strides,
        *row_strides(dk),
        *_index_strides(q_num_blocks, q_indices),
        heads, kv_heads, q_len, kv_len, scale, size_bucket(q_len),
        **launch,
    )

    def dq_grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    bs.dq_kernel.launch(
        dq_grid, _tune_key(q, launch),
        q, k, v, grad_out, lse, delta, dq, kv_num_blocks, kv_indices,
        *strides,
        *row_strides(dq),
        *_index_strides(kv_num_blocks, kv_indices),
        heads, q_len, kv_len, scale, size_bucket(q_len),
        **launch,
    )
    return dq, dk, dv


@custom_op("mmattn::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor,
    q_indices: torch.Tensor,
    q_block: int,
    kv_block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward: `(out, lse)`; `q_num_blocks`/`q_indices` are kept for the backward."""
    return forward_kernels(q, k, v, kv_num_blocks, kv_indices, q_block, kv_block, scale)


@custom_op("mmattn::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor,
    q_indices: torch.Tensor,
    q_block: int,
    kv_block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-sparse attention backward: `(dq, dk, dv)`."""
    return backward_kernels(
        grad_out, grad_lse, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, q_block,
        kv_block, scale,
    )


@block_sparse_fwd.register_fake
def _block_sparse_fwd_fake(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, q_block, kv_block, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@block_sparse_bwd.register_fake
def _block_sparse_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, *index_and_blocks):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, q_block, kv_block, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices)
    ctx.blocks = (q_block, kv_block)
    ctx.scale = scale


def _backward_through(launch):
    """The autograd backward running the backward kernels through `launch` (the custom op or a direct call)."""

    def backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
        q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = launch(
            grad_out, grad_lse, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
            *ctx.blocks, ctx.scale,
        )
        return dq, dk, dv, None, None, None, None, None, None, None

    return backward


block_sparse_fwd.register_autograd(_backward_through(block_sparse_bwd), setup_context=_setup_context)


class _BlockSparseAttention(torch.autograd.Function):
    """The eager path: the same forward and backward as the custom ops, without the dispatcher. (A forward taking
    `ctx`: with a separate `setup_context`, `apply` binds its arguments through `inspect.signature` every call.)"""

    @staticmethod
    def forward(ctx, q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, q_block, kv_block, scale):
        ctx.set_materialize_grads(False)  # an unused lse gets no gradient tensor
        output = forward_kernels(q, k, v, kv_num_blocks, kv_indices, q_block, kv_block, scale)
        inputs = (q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, q_block, kv_block, scale)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward_through(backward_kernels))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with the Triton kernels: `(out, lse)`, differentiable in q, k, v (and through lse)."""
    args = (q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices, *mask.block_size, scale)
    if torch.compiler.is_compiling():
        return block_sparse_fwd(*args)
    return _BlockSparseAttention.apply(*args)
