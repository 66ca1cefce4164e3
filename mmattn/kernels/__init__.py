"""mmattn's shared kernel layer: block-sparse, neighborhood, routed and column-set attention (and the massive-activation
test of VAR's sink tokens, and Wan's rotary embedding) with Triton, FlexAttention and exact torch backends (and
FlashAttention-4 for block-sparse attention where it is installed).

Tensors use the SDPA layout `(batch, heads, tokens, head_dim)`; spatial kernels take
`(batch, heads, *spatial, head_dim)`. Any strides with a unit last one are read as they are, and the fused kernels'
outputs and gradients are laid out like their inputs: pass a model's `(batch, tokens, heads, head_dim)` tensors as
`.transpose(1, 2)` views and the output transposes back without a copy.

Every kernel family has the same shape, and a new kernel follows it:

- `<family>.py` (`block_sparse.py`, `na.py`, `routed.py`, `column_sets.py`, `massive_activations.py`,
  `rotary.py`): the public function users call, its argument checks (errors name the argument) and its dispatch on
  `resolve_backend(<family>, backend, q)`; exported here.
- `triton/<family>.py`: the Triton kernels, their tiles (configs, prune, `tuned`) and their launchers (grid,
  launch arguments, tune key): `forward`, `backward` and `attend`, the differentiable entry point made by
  `autograd.kernel_op` (the custom ops for torch.compile, their fakes and autograd, and the eager
  `autograd.Function`, from the launchers and what they save). Building blocks shared by the families live in
  `triton/common.py` (Triton: online softmax, delta kernel, `LOG2E`, row loads) and `triton/launch.py` (host:
  autotuning, tile lists, strides, `next_power_of_2`, `backward_delta`, the Hopper checks).
- `triton/<family>_tma.py` (`block_sparse_tma.py`, `neighborhood_tma.py`): a Hopper-only form of a kernel (TMA
  descriptors, warp specialization) with `eligible(...)` (where it runs, and why not) and an `MMATTN_TRITON_*`
  switch; the family's `forward` takes it where eligible.
- `reference.py`: the exact PyTorch implementation, the `"torch"` backend and the tests' oracle.
- `backends.py`: the family's entry in `REGISTRY` (its backends, fastest first) and, for a new backend, its
  capability predicate `can_run_<backend>`; `supported_backends(family, q)` then lists it and `"auto"` may pick it.
- An outside library's kernel gets an adapter module beside them (`fa4.py`: FlashAttention-4's block-sparse
  kernels, with its capability check `fa4_supports` and its custom ops from `kernel_op`).
- The data a kernel takes: `mask.py` (`BlockSparseMask`), `neighborhood.py` (`Neighborhood`); `flex.py` runs both
  through FlexAttention; `distributed.py` adds context parallelism over any `BlockSparseMask`.
"""

from __future__ import annotations

from . import reference
from .backends import BACKENDS, backend_info, supported_backends
from .block_sparse import block_sparse_attention
from .column_sets import (
    ColumnSets,
    column_set_attention,
    ranked_head_attention,
    sink_redistribution_attention,
)
from .mask import BlockSparseMask
from .massive_activations import massive_activation_tokens
from .na import neighborhood_attention
from .neighborhood import Neighborhood
from .rotary import rotary_embedding
from .routed import routed_attention

__all__ = [
    "BACKENDS",
    "BlockSparseMask",
    "ColumnSets",
    "Neighborhood",
    "backend_info",
    "block_sparse_attention",
    "column_set_attention",
    "massive_activation_tokens",
    "neighborhood_attention",
    "ranked_head_attention",
    "reference",
    "rotary_embedding",
    "routed_attention",
    "sink_redistribution_attention",
    "supported_backends",
]
