"""Outputs and gradients come back laid out like their inputs, for every differentiable Triton family.

A model's `(B, L, H, D)` projections reach the kernels as `(B, H, L, D)` views; the output (and each input's
gradient) must be the same kind of view, so that reshaping back to `(B, L, H * D)` costs no copy, and the custom
ops' fakes must say so (torch.compile plans strides from them). k and v get different layouts here: their
gradients are written by one kernel. Values against the float64 torch backend.
"""

import pytest
import torch

from mmattn.kernels import block_sparse_attention, neighborhood_attention, routed_attention
from mmattn.kernels.backends import backend_info
from mmattn.kernels.triton.block_sparse import block_sparse_op
from mmattn.kernels.triton.neighborhood import neighborhood_op
from mmattn.kernels.triton.routed import routed_op

from .helpers import random_mask

pytestmark = pytest.mark.skipif(not backend_info("cpu")["triton"][0], reason="needs TRITON_INTERPRET=1")

BATCH, HEADS, TOKENS, HEAD_DIM = 2, 2, 64, 16
MASK = random_mask(BATCH, HEADS, TOKENS, TOKENS, (16, 16), seed=1)
ROUTES = torch.tensor([[[[1, 0], [2, 3], [0, 2], [3, 1]]]])  # (1, 1, n_q_regions, topk), regions of 16 tokens


def _block_sparse(q, k, v, backend):
    return block_sparse_attention(q, k, v, MASK, backend=backend, return_lse=True)


def _neighborhood(q, k, v, backend):
    grid = (8, 8)
    q, k, v = (t.unflatten(2, grid) for t in (q, k, v))
    out, lse = neighborhood_attention(q, k, v, kernel_size=3, dilation=2, backend=backend, return_lse=True)
    return out.flatten(2, 3), lse.flatten(2)


def _routed(q, k, v, backend):
    return routed_attention(q, k, v, ROUTES[:, 0], q_region_size=16, backend=backend, return_lse=True)


FAMILIES = {"block_sparse": _block_sparse, "neighborhood": _neighborhood, "routed": _routed}


def _storages(seed):
    """q, k as (B, H, L, D) views of (B, L, H, D) storage, v contiguous (B, H, L, D): the leaves and the views."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(BATCH, TOKENS, HEADS, HEAD_DIM, generator=g) for _ in range(2)]
    leaves.append(torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM, generator=g))
    leaves = [t.requires_grad_() for t in leaves]
    return leaves, [leaves[0].transpose(1, 2), leaves[1].transpose(1, 2), leaves[2]]


@pytest.mark.parametrize("family", FAMILIES)
def test_output_and_gradients_keep_the_inputs_layout(family):
    attend = FAMILIES[family]
    leaves, (q, k, v) = _storages(seed=len(family))
    out, lse = attend(q, k, v, "triton")
    assert out.stride() == q.stride(), "the output is laid out like q"
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * grad_out).sum().backward()
    for leaf in leaves:
        assert leaf.grad.is_contiguous(), "each gradient is laid out like its input"

    exact = [t.detach().double().requires_grad_() for t in leaves]
    want_out, _ = attend(exact[0].transpose(1, 2), exact[1].transpose(1, 2), exact[2], "torch")
    (want_out * grad_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    for leaf, want in zip(leaves, exact):
        torch.testing.assert_close(leaf.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def _op_inputs(family, q, k, v):
    """The family's custom op, its forward inputs and the backward's inputs after `(grad_out, grad_lse, out, lse)`."""
    scale = HEAD_DIM ** -0.5
    if family == "block_sparse":
        index = (MASK.kv_num_blocks, MASK.kv_indices, MASK.q_num_blocks, MASK.q_indices, *MASK.block_size, scale)
        return block_sparse_op, (q, k, v, *index, False), (q, k, v, *index)
    if family == "neighborhood":
        pattern = [1, 8, 8, 1, 3, 3, 1, 2, 2, 1, 1, 1, 0, 0, 0]  # shape, kernel, dilation, stride, causal (3D)
        return neighborhood_op, (q, k, v, None, pattern, scale), (q, k, v, None, pattern, scale, False)
    inputs = (q, k, v, ROUTES.int(), None, 16, 16, scale)
    return routed_op, inputs, inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_fakes_give_the_strides_of_the_real_outputs(family):
    _, views = _storages(seed=7)
    op, forward_inputs, backward_inputs = _op_inputs(family, *(t.detach() for t in views))
    torch.library.opcheck(op.forward_op, forward_inputs, test_utils=("test_schema", "test_faketensor"))
    out, lse = op.forward_op(*forward_inputs)
    torch.library.opcheck(op.backward_op, (torch.randn_like(out), None, out, lse, *backward_inputs),
                          test_utils=("test_schema", "test_faketensor"))
