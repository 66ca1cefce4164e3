"""The fused neighborhood attention kernels with autograd, for eager use, training and `torch.compile`.

`neighborhood_attend(...)` is the entry point: eagerly an `autograd.Function` launching the kernels, under
torch.compile the custom ops `mmattn::neighborhood_fwd` / `mmattn::neighborhood_bwd` (opaque in a full graph).
The pattern travels as 15 ints (`_pattern`): extents, kernel sizes, dilations, strides and causal flags,
each padded to three axes.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
from torch.library import custom_op

from .neighborhood import Neighborhood, eager_cache
from .triton import block_sparse as bs
from .triton import neighborhood as fna
from .triton.launch import (
    dot_precision,
    head_dim_block,
    row_strides,
    rows_contiguous,
    size_bucket,
)

__all__ = ["neighborhood_attend", "neighborhood_bwd", "neighborhood_fwd"]


@eager_cache
def _pattern(nbhd: Neighborhood) -> tuple[int, ...]:
    pad = 3 - len(nbhd.shape)
    fields = (nbhd.shape, nbhd.kernel_size, nbhd.dilation, nbhd.stride, nbhd.is_causal)
    return tuple(int(x) for field, fill in zip(fields, (1, 1, 1, 1, 0)) for x in (fill,) * pad + tuple(field))


def _launch_args(q: torch.Tensor, k: torch.Tensor, pattern: list[int], has_rpb: bool) -> dict:
    return _compile_time_args(tuple(pattern), q.shape[1] // k.shape[1], q.shape[-1], has_rpb, dot_precision(q.dtype))


@functools.lru_cache(maxsize=256)
def _compile_time_args(pattern: tuple[int, ...], groups: int, head_dim: int, has_rpb: bool, precision: str) -> dict:
    """The kernels' compile-time arguments (cached: they are rebuilt on every call otherwise)."""
    shape, kernel, dilation, stride, causal = (pattern[i : i + 3] for i in range(0, 15, 3))
    longest_group = max(-(-n // d) for n, d in zip(shape, dilation))
    args = {
        "GROUPS": groups,
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim_block(head_dim),
        "HAS_RPB": has_rpb,
        "STEPS": longest_group.bit_length() + 1,
        "DOT_PRECISION": precision,
    }
    for name, values in zip("KDSC", (kernel, dilation, stride, causal)):
        args.update({f"{name}{a}": (bool(v) if name == "C" else v) for a, v in enumerate(values)})
    return args


def _grid(pattern: list[int], tile: str, rows: int):
    shape, dilation = pattern[0:3], pattern[6:9]

    def grid(meta):
        tiles = math.prod(triton.cdiv(triton.cdiv(n, d), meta[f"{tile}{a}"]) * d for a, (n, d) in enumerate(zip(shape, dilation)))
        return (tiles, rows)

    return grid


def forward_kernels(q, k, v, rpb, pattern: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel on flat tokens `(B, H, N, D)`: `(out, lse)`."""
    q, k, v = (rows_contiguous(t) for t in (q, k, v))
    batch, heads, tokens, _ = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
    launch = _launch_args(q, k, pattern, rpb is not None)
    fna.fwd_kernel.launch(
        _grid(pattern, "TQ", batch * heads), (q.dtype, size_bucket(tokens), *launch.values()),
        q, k, v, out, lse, rpb.contiguous() if rpb is not None else q,
        *row_strides(q, k, v, out),
        heads, *pattern[0:3], scale, size_bucket=size_bucket(tokens), **launch,
    )
    return out, lse


def backward_kernels(grad_out, grad_lse, q, k, v, out, lse, rpb, pattern: list[int], scale: float, rpb_grad: bool):
    """Launches the backward kernels: `(dq, dk, dv, drpb)`, drpb empty unless `rpb_grad`."""
    q, k, v, out, grad_out = (rows_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    batch, heads, tokens, _head_dim = q.shape
    kv_heads = k.shape[1]
    launch = _launch_args(q, k, pattern, rpb is not None)
    tune_key = (q.dtype, size_bucket(tokens), *launch.values())
    delta = bs.backward_delta(out, grad_out, grad_lse, lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rpb_arg = rpb.contiguous() if rpb is not None else q
    neighbors = math.prod(pattern[3:6])
    ds = torch.zeros((batch, heads, tokens, neighbors), device=q.device, dtype=torch.float32) if rpb_grad else q
    common = row_strides(q, k, v, grad_out)
    fna.dq_kernel.launch(
        _grid(pattern, "TQ", batch * heads), tune_key,
        q, k, v, grad_out, lse, delta, dq, rpb_arg, ds, *common, *row_strides(dq),
        heads, *pattern[0:3], scale, size_bucket=size_bucket(tokens), WRITE_DS=rpb_grad, **launch,
    )
    fna.dkdv_kernel.launch(
        _grid(pattern, "TK", batch * kv_heads), tune_key,
        q, k, v, grad_out, lse, delta, dk, dv, rpb_arg, *common, *row_strides(dk),
        heads, kv_heads, *pattern[0:3], scale, size_bucket=size_bucket(tokens), **launch,
    )
    drpb = _bias_gradient(ds, rpb, pattern) if rpb_grad else q.new_empty(0)
    return dq, dk, dv, drpb


def _bias_gradient(ds: torch.Tensor, rpb: torch.Tensor, pattern: list[int]) -> torch.Tensor:
    """d rpb: dS (neighbor layout) summed over the batch and scattered to each pair's bias offset. Slots holding no
    pair are zero in dS, so every slot is scattered (to a clamped offset) and no boolean selection syncs the host."""
    shape, kernel, dilation, stride, causal = (pattern[i : i + 3] for i in range(0, 15, 3))
    ndim = rpb.dim() - 1
    nbhd = Neighborhood.create(shape[3 - ndim :], kernel[3 - ndim :], dilation[3 - ndim :], stride[3 - ndim :],
                               [bool(c) for c in causal[3 - ndim :]])
    _, _, rpb_index = nbhd.neighbors(0, nbhd.num_tokens, ds.device)
    flat = 0
    for index, extent in zip(rpb_index, nbhd.rpb_shape):
        flat = flat * extent + index.clamp(0, extent - 1)
    flat = flat.expand(nbhd.num_tokens, *nbhd.kernel_size).flatten()
    grad = torch.zeros((rpb.shape[0], math.prod(nbhd.rpb_shape)), device=ds.device, dtype=torch.float32)
    grad.index_add_(1, flat, ds.sum(0).flatten(1))
    return grad.view(rpb.shape).to(rpb.dtype)


@custom_op("mmattn::neighborhood_fwd", mutates_args=())
def neighborhood_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, pattern: list[int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused neighborhood attention forward on flat tokens: `(out, lse)`."""
    return forward_kernels(q, k, v, rpb, pattern, scale)


@custom_op("mmattn::neighborhood_bwd", mutates_args=())
def neighborhood_bwd(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, rpb: torch.Tensor | None, pattern: list[int], scale: float, rpb_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused neighborhood attention backward: `(dq, dk, dv, drpb)`, drpb empty unless `rpb_grad`."""
    return backward_kernels(grad_out, grad_lse, q, k, v, out, lse, rpb, pattern, scale, rpb_grad)


@neighborhood_fwd.register_fake
def _fwd_fake(q, k, v, rpb, pattern, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@neighborhood_bwd.register_fake
def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, rpb, pattern, scale, rpb_grad):
    drpb = rpb.new_empty(rpb.shape) if rpb is not None and rpb_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), drpb


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rpb, pattern, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rpb)
    ctx.pattern, ctx.scale = pattern, scale


def _backward_through(launch):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, rpb = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        rpb_grad = rpb is not None and ctx.needs_input_grad[3]
        dq, dk, dv, drpb = launch(grad_out, grad_lse, q, k, v, out, lse, rpb, ctx.pattern, ctx.scale, rpb_grad)
        return dq, dk, dv, drpb if rpb_grad else None, None, None

    return backward


neighborhood_fwd.register_autograd(_backward_through(neighborhood_bwd), setup_context=_setup_context)


class _NeighborhoodAttention(torch.autograd.Function):
    """The eager path: the custom ops' forward and backward without the dispatcher's host cost. (A forward taking
    `ctx`: with a separate `setup_context`, `apply` binds its arguments through `inspect.signature` every call.)"""

    @staticmethod
    def forward(ctx, q, k, v, rpb, pattern, scale):
        ctx.set_materialize_grads(False)
        output = forward_kernels(q, k, v, rpb, pattern, scale)
        _setup_context(ctx, (q, k, v, rpb, pattern, scale), output)
        return output

    backward = staticmethod(_backward_through(backward_kernels))


def neighborhood_attend(q, k, v, nbhd: Neighborhood, rpb: torch.Tensor | None, scale: float):
    """Fused neighborhood attention on flat tokens `(B, H, N, D)`: `(out, lse)`, differentiable (rpb included)."""
    args = (q, k, v, rpb, list(_pattern(nbhd)), scale)
    if torch.compiler.is_compiling():
        return neighborhood_fwd(*args)
    return _NeighborhoodAttention.apply(*args)
