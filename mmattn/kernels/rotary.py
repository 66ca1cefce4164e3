"""Rotary position embedding (RoPE; Su et al., "RoFormer", 2021) on interleaved channel pairs, as Wan, HunyuanVideo,
CogVideoX, LTX-Video, LTX-2 and Mochi apply it to their queries and keys (Mochi with tables of one entry per pair), or
on pairs of the two halves' channels ("rotate half", as LTX-2's split RoPE and the Qwen vision towers apply it).

The stock diffusers form runs about eight elementwise ops per tensor forward (and more backward), each a pass over
the `(batch, tokens, heads, head_dim)` tensor; the Triton kernel (`triton/rotary.py`) reads and writes it once,
forward and backward. Backends (`backends.REGISTRY["rotary"]`): `"triton"`, `"torch"` (the reference,
`reference.rotary_embedding`) or `"auto"` (Triton on CUDA, and the reference where the angle tables need a gradient).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.library import custom_op

from . import reference
from .backends import resolve_backend

__all__ = ["rotary_embedding"]


def _output_like(x: torch.Tensor) -> torch.Tensor:
    """The kernel's output: laid out like x (a unit channel stride, which the kernel reads x with too)."""
    return torch.empty_like(x) if x.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _per_pair(table: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `table` holds one angle per channel pair of x (head_dim / 2 entries, Mochi's), not one per channel."""
    return table.shape[-1] * 2 == x.shape[-1]


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, halves: bool) -> torch.Tensor:
    from .triton.rotary import rotary_forward

    return rotary_forward(x, cos, sin, inverse, _output_like(x), _per_pair(cos, x), _per_pair(sin, x), halves)


_rotary_op = custom_op("mmattn::rotary_embedding", _launch, mutates_args=())
"""The Triton rotation as one opaque call in a torch.compile graph."""


@_rotary_op.register_fake
def _(x, cos, sin, inverse, halves):
    return _output_like(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, halves: bool) -> torch.Tensor:
    """The Triton rotation with autograd: the custom op under torch.compile, and eagerly `_EagerRotation`, the same
    launcher and backward without the custom-op dispatcher (which costs more host time than the kernel's launch)."""
    if torch.compiler.is_compiling():
        return _rotary_op(x, cos, sin, inverse, halves)
    return _EagerRotation.apply(x, cos, sin, inverse, halves)


def _save_tables(ctx, inputs, output) -> None:
    _, cos, sin, inverse, halves = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse, ctx.halves = inverse, halves


def _rotate_back(rotate, ctx, grad: torch.Tensor):
    """The gradient of a rotation is the opposite rotation of the output's gradient (none for the tables), through
    `rotate`: the custom op in the op's autograd (the compiler traces that backward, and older torch does not report
    compiling there), the eager function in the eager one."""
    cos, sin = ctx.saved_tensors
    return rotate(grad, cos, sin, not ctx.inverse, ctx.halves), None, None, None, None


_rotary_op.register_autograd(partial(_rotate_back, _rotary_op), setup_context=_save_tables)


class _EagerRotation(torch.autograd.Function):
    """`_rotary_op` and its autograd as a plain `autograd.Function` (see `_rotate`)."""

    @staticmethod
    def forward(ctx, x, cos, sin, inverse, halves):
        output = _launch(x, cos, sin, inverse, halves)
        _save_tables(ctx, (x, cos, sin, inverse, halves), output)
        return output

    @staticmethod
    def backward(ctx, grad):
        return _rotate_back(_EagerRotation.apply, ctx, grad)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, tensor in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name}: expected a floating-point tensor, got {got}")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x: expected a 4-D tensor with an even last dim (channel pairs), got {tuple(x.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {table.device}")
        pairs = (*x.shape[:-1], table.shape[-1] if _per_pair(table, x) else x.shape[-1])
        fits = table.dim() <= x.dim() and all(t in (1, n) for t, n in zip(reversed(table.shape), reversed(pairs)))
        if not fits:  # (torch.broadcast_shapes says the same at ten times the host time)
            raise ValueError(
                f"{name}: expected a shape broadcastable to x's {tuple(x.shape)}, or to x's with one entry per "
                f"channel pair, got {tuple(table.shape)}"
            )


PAIRINGS = ("interleaved", "halves")
"""Which channels form a rotated pair: (2i, 2i+1), or (i, i + head_dim / 2) ("rotate half")."""


def rotary_embedding(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, pairing: str = "interleaved", backend: str = "auto"
) -> torch.Tensor:
    """x with each channel pair (2i, 2i+1) rotated by the angle whose cosine is `cos[..., 2i]` and sine
    `sin[..., 2i+1]` (tables like diffusers' real RoPE tables, which hold each angle at both channels of its pair),
    or `cos[..., i]` and `sin[..., i]` from tables of head_dim / 2 entries, one per pair (Mochi's).
    `pairing="halves"` pairs channels (i, i + head_dim / 2) instead, turned by `cos[..., i]` and `sin[..., i]`
    (tables of head_dim entries hold each angle at both channels, as `rotate_half` RoPE builds them, or of
    head_dim / 2, as LTX-2's split RoPE does).

    x: 4-D, e.g. a model's `(batch, tokens, heads, head_dim)` with tables `(1, tokens, 1, head_dim)`, or
    `(batch, heads, tokens, head_dim)` with `(tokens, head_dim)`: cos/sin broadcast to x. The result has x's dtype
    (the Triton kernel rotates in float32) and, from the Triton kernel, x's layout. Differentiable in x; the
    `"triton"` backend gives the tables no gradient (`"auto"` takes `"torch"` when they need one).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing: expected one of {PAIRINGS}, got {pairing!r}")
    _check(x, cos, sin)
    tables_need_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if backend == "auto" and tables_need_grad:
        backend = "torch"
    if resolve_backend("rotary", backend, x) == "triton":
        if tables_need_grad:
            raise ValueError("cos/sin require grad: backend='triton' differentiates x only; use backend='torch'")
        return _rotate(x, cos, sin, False, pairing == "halves")
    return reference.rotary_embedding(x, cos, sin, pairing=pairing)
