"""The helpers that make a kernel's launchers one call, eagerly and compiled: with autograd (`kernel_op`) or for
inference only (`inference_op`).

`kernel_op(name, forward, backward, save=..., grads=...)` makes a `KernelOp`; calling it runs the forward with
autograd, two ways that save the same tensors and run the same backward:

- eagerly, through an `autograd.Function` that calls the launchers directly: the custom-op dispatcher costs more
  host time than a sparse kernel may take on the GPU;
- under torch.compile, through the `torch.library` custom ops `<name>_fwd` and `<name>_bwd` (`register_fake`
  gives the compiler their output shapes, `register_autograd` links them), so that each stays one opaque call in a
  full graph and the Triton autotuner, not Inductor, picks the tiles.

What the launchers follow (the three differentiable families, block-sparse, neighborhood and routed, do):

- `forward(*inputs) -> (out, lse)`; its annotated signature is the forward op's schema. `out` is laid out like q
  (`inputs[0]`: `torch.empty_like(q)`, so a `(B, H, L, D)` view of a model's `(B, L, H, D)` tensor gets an output
  that is the same kind of view, and the model's reshape back costs no copy), `lse` is float32 `q.shape[:3]`,
  unless `forward_fake` says otherwise.
- `save(inputs, needs_input_grad) -> (tensors, constants)`: what the backward needs besides `out` and `lse`: the
  tensors, of which the first `grads` are the inputs that get gradients (in order; None allowed), and the other
  values (ints, floats, bools, lists of ints).
- `backward(grad_out, grad_lse, out, lse, *tensors, *constants) -> grads`, one tensor per gradient input, laid
  out like it (`torch.empty_like`) unless `backward_fake` says otherwise; its annotated signature is the backward
  op's schema. A missing `grad_out` arrives as zeros, a missing `grad_lse` as None (an unused lse costs nothing).
  Gradients of inputs that need none are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.library import custom_op

__all__ = ["InferenceOp", "KernelOp", "inference_op", "kernel_op", "written_into"]

Save = Callable[[tuple, tuple[bool, ...]], tuple[tuple[torch.Tensor | None, ...], tuple[Any, ...]]]


def attention_outputs_like(q: torch.Tensor, *rest) -> tuple[torch.Tensor, torch.Tensor]:
    """The default forward fake: `out` laid out like q, float32 `lse` of q's `(batch, heads, tokens)`."""
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


class KernelOp:
    """A differentiable kernel: `op(*inputs) -> (out, lse)`. `forward_op`/`backward_op` are the custom ops (what
    torch.compile records and `torch.library.opcheck` checks), `function` the eager `autograd.Function`."""

    def __init__(self, name: str, forward: Callable, backward: Callable, save: Save, grads: int,
                 forward_fake: Callable, backward_fake: Callable | None) -> None:
        self.forward_op = custom_op(f"{name}_fwd", forward, mutates_args=())
        self.backward_op = custom_op(f"{name}_bwd", backward, mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op.register_fake(backward_fake or _gradients_like(grads))

        def setup_context(ctx, inputs: tuple, output: tuple) -> None:
            tensors, constants = save(inputs, ctx.needs_input_grad)
            ctx.save_for_backward(*output, *tensors)
            ctx.constants = constants

        self.forward_op.register_autograd(_backward_through(self.backward_op, grads), setup_context=setup_context)
        self.function = _eager_function(name, forward, setup_context, _backward_through(backward, grads))

    def __call__(self, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return self.forward_op(*inputs)
        return self.function.apply(*inputs)


def kernel_op(name: str, forward: Callable, backward: Callable, *, save: Save, grads: int,
              forward_fake: Callable = attention_outputs_like, backward_fake: Callable | None = None) -> KernelOp:
    """The custom ops `<name>_fwd`/`<name>_bwd` (`name` like `"mmattn::block_sparse"`), their fakes and autograd,
    and the eager `autograd.Function`, from the launchers `forward` and `backward` (see the module docstring)."""
    return KernelOp(name, forward, backward, save, grads, forward_fake, backward_fake)


class InferenceOp:
    """A kernel without autograd: calling it runs the launcher directly when eager and the custom op `op` (one opaque
    call in a full graph, its output shapes from the fake) under torch.compile. A launcher whose last parameter is
    `out` (None: a new tensor) writes its result there eagerly; the op never gets it (its result is copied)."""

    def __init__(self, name: str, launcher: Callable, fake: Callable) -> None:
        self.launcher = launcher
        self.op = custom_op(name, launcher, mutates_args=())
        self.op.register_fake(fake)

    def __call__(self, *inputs, out: torch.Tensor | None = None):
        if torch.compiler.is_compiling():
            return written_into(self.op(*inputs), out)
        return self.launcher(*inputs) if out is None else self.launcher(*inputs, out)


def written_into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`result`, or `out` with `result` copied into it (torch's `out=` convention for a result made elsewhere)."""
    return result if out is None else out.copy_(result)


def inference_op(name: str, launcher: Callable, *, fake: Callable) -> InferenceOp:
    """The custom op `name` of the launcher `launcher` (its annotated signature is the op's schema) with `fake`."""
    return InferenceOp(name, launcher, fake)


def _gradients_like(grads: int) -> Callable:
    """The default backward fake: one gradient laid out like each of the first `grads` saved tensors."""

    def fake(grad_out, grad_lse, out, lse, *saved):
        return tuple(torch.empty_like(t) for t in saved[:grads])

    return fake


def _backward_through(launch: Callable, grads: int) -> Callable:
    """The autograd backward running the backward launcher through `launch` (the custom op or a direct call)."""

    def backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None) -> tuple:
        out, lse, *tensors = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        results = launch(grad_out, grad_lse, out, lse, *tensors, *ctx.constants)
        needs = ctx.needs_input_grad
        return (*(g if need else None for g, need in zip(results, needs[:grads])), *(None,) * (len(needs) - grads))

    return backward


def _eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """The eager path: the custom ops' forward and backward without the dispatcher. (Its forward takes `ctx`: with a
    separate `setup_context`, `apply` binds its arguments through `inspect.signature` every call.)"""

    def eager_forward(ctx, *inputs):
        ctx.set_materialize_grads(False)  # an unused lse gets no gradient tensor
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    title = "".join(part.title() for part in name.split("::")[-1].split("_"))
    return type(f"{title}Function", (torch.autograd.Function,),
                {"forward": staticmethod(eager_forward), "backward": staticmethod(backward)})
