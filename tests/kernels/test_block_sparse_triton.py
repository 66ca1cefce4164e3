"""The Triton kernels (under TRITON_INTERPRET=1 on the CPU) against the float64 reference.

Accuracy follows the FlashAttention criterion of specs/kernels.md section 8 (`helpers.check_against_reference`):
the kernel's error against the float64 reference is at most twice the error of the naive computation on the same
low-precision inputs (plus a small absolute slack), for the output and all three gradients.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmattn.kernels import BlockSparseMask, backend_info, block_sparse_attention

from .helpers import block_sparse_run, check_against_reference, random_mask, random_qkv

pytestmark = pytest.mark.skipif(
    not backend_info("cpu")["triton"][0], reason="the Triton interpreter runs only with TRITON_INTERPRET=1"
)

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("length", [1, 17, 127, 129])
def test_lengths_not_multiple_of_the_block(dtype, length):
    mask = random_mask(1, 2, length, length, (32, 32), seed=length)
    check_against_reference(*random_qkv(1, 2, 2, length, length, 32, dtype, seed=length), mask)


def test_long_sparse_sequence_1025():
    mask = random_mask(1, 1, 1025, 1025, (64, 64), density=0.15, seed=1)
    check_against_reference(*random_qkv(1, 1, 1, 1025, 1025, 16, torch.float16), mask)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_grouped_query_attention(heads, kv_heads):
    mask = random_mask(2, heads, 70, 90, (32, 32), seed=heads + kv_heads)
    check_against_reference(*random_qkv(2, heads, kv_heads, 70, 90, 32, torch.float32), mask)


@pytest.mark.parametrize("head_dim", [16, 64, 80])
def test_head_dims_including_non_powers_of_two(head_dim):
    mask = random_mask(1, 2, 64, 48, (32, 16), seed=head_dim)
    check_against_reference(*random_qkv(1, 2, 1, 64, 48, head_dim, torch.float16), mask)


def test_non_contiguous_inputs_and_broadcast_mask():
    mask = random_mask(1, 1, 96, 80, (32, 16), seed=5)
    q, k, v = random_qkv(2, 4, 2, 96, 80, 32, torch.float32, layout="blhd")
    assert not q.is_contiguous()
    check_against_reference(q, k, v, mask)


def test_key_blocks_spanning_several_kernel_tiles():
    mask = random_mask(1, 2, 128, 200, (64, 128), density=0.7, seed=11)
    check_against_reference(*random_qkv(1, 2, 2, 128, 200, 32, torch.float16), mask)


def test_gradient_through_the_log_sum_exp():
    mask = random_mask(1, 2, 64, 64, (32, 32), seed=2)
    check_against_reference(*random_qkv(1, 2, 2, 64, 64, 32, torch.float32), mask, with_lse_grad=True)


def test_fully_masked_rows_are_zero_without_nan():
    mask = BlockSparseMask.from_dense(torch.zeros(2, 2, dtype=torch.bool), 32, q_len=50, kv_len=40)
    q, k, v = random_qkv(1, 2, 2, 50, 40, 32, torch.float16)
    out, lse, dq, dk, dv = block_sparse_run(q, k, v, mask, "triton", torch.ones(q.shape))
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    assert all(torch.all(g == 0) for g in (dq, dk, dv))


def test_expanded_upstream_gradient_of_a_sum():
    mask = random_mask(1, 2, 40, 72, (16, 32), seed=8)
    q, k, v = random_qkv(1, 2, 1, 40, 72, 16, torch.float32)
    grads = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        block_sparse_attention(*leaves, mask, backend=backend).sum().backward()  # dO has all strides 0
        grads.append([t.grad for t in leaves])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_compiles_fullgraph_with_autograd():
    mask = random_mask(1, 2, 64, 48, (32, 16), seed=4)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 64, 48, 16, torch.float32))

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, mask, backend="triton").square().sum()

    torch._dynamo.reset()
    loss = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    want = attend(q, k, v)
    for got, exp in zip(grads, torch.autograd.grad(want, (q, k, v))):
        torch.testing.assert_close(got, exp)
    torch.testing.assert_close(loss, want)


def test_operator_registration_passes_opcheck():
    from mmattn.kernels.triton.block_sparse import block_sparse_op

    mask = random_mask(1, 2, 48, 64, (16, 32), seed=6)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 1, 48, 64, 16, torch.float32))
    args = (q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices, 16, 32, 0.25)
    torch.library.opcheck(block_sparse_op.forward_op, args)


def test_backward_is_deterministic():
    mask = random_mask(1, 4, 96, 96, (32, 32), seed=9)
    q, k, v = random_qkv(1, 4, 1, 96, 96, 32, torch.float32)
    grad = torch.randn(q.shape)
    first, second = block_sparse_run(q, k, v, mask, "triton", grad), block_sparse_run(q, k, v, mask, "triton", grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@settings(max_examples=12, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (2, 1), (2, 2)]),
    q_len=st.integers(1, 100),
    kv_len=st.integers(1, 100),
    block_size=st.sampled_from([(16, 16), (32, 16), (16, 48), (64, 32)]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_random_masks_and_shapes(heads, q_len, kv_len, block_size, density, seed):
    mask = random_mask(1, heads[0], q_len, kv_len, block_size, density, seed, empty_row=False)
    check_against_reference(*random_qkv(1, *heads, q_len, kv_len, 16, torch.float32, seed=seed), mask)


@pytest.fixture
def atomic_dq(monkeypatch):
    """The backward with dQ added atomically in the dK/dV kernel: the dQ kernel must not run."""
    from mmattn.kernels.triton import block_sparse as triton_block_sparse

    monkeypatch.setattr(triton_block_sparse, "ATOMIC_DQ_SWITCH", True)
    monkeypatch.setattr(triton_block_sparse, "hopper_backward_pays", lambda q: True)  # at these head dims too

    def no_dq_kernel(*args, **kwargs):
        raise AssertionError("the dQ kernel ran although dQ is added atomically")

    monkeypatch.setattr(triton_block_sparse.dq_kernel, "launch", no_dq_kernel)


@pytest.mark.parametrize(
    "heads, kv_heads, q_len, kv_len, head_dim, dtype, block",
    [
        (4, 2, 100, 90, 32, torch.float32, (32, 32)),  # GQA, partial last blocks both ways
        (2, 2, 64, 200, 24, torch.float16, (16, 64)),  # a head dim the tile pads; kv blocks of several tiles
        (2, 1, 129, 129, 16, torch.float32, (64, 32)),  # query blocks of several tiles
    ],
)
def test_atomic_dq_backward_matches_the_reference(atomic_dq, heads, kv_heads, q_len, kv_len, head_dim, dtype, block):
    mask = random_mask(2, heads, q_len, kv_len, block, density=0.6, seed=q_len)
    check_against_reference(*random_qkv(2, heads, kv_heads, q_len, kv_len, head_dim, dtype, seed=3), mask,
                            with_lse_grad=True)


def test_atomic_dq_gives_way_to_deterministic_algorithms(atomic_dq):
    from mmattn.kernels.triton.block_sparse import atomic_dq as atomic

    q = torch.zeros(1, 1, 16, 128)
    deterministic = torch.are_deterministic_algorithms_enabled()
    assert atomic(q)
    try:
        torch.use_deterministic_algorithms(True)
        assert not atomic(q)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def test_atomic_dq_by_default_only_at_the_head_dims_where_it_is_faster(monkeypatch):
    """On Hopper (the interpreter stands in for it: `launch.hopper`) dQ is added atomically at head dim 128 unless
    switched off, not at 64."""
    from mmattn.kernels.triton import block_sparse as triton_block_sparse

    assert triton_block_sparse.atomic_dq(torch.zeros(1, 1, 16, 128))
    assert not triton_block_sparse.atomic_dq(torch.zeros(1, 1, 16, 64))
    monkeypatch.setattr(triton_block_sparse, "ATOMIC_DQ_SWITCH", False)
    assert not triton_block_sparse.atomic_dq(torch.zeros(1, 1, 16, 128))
