"""The compiled Triton kernels on a CUDA GPU in bf16/fp16 (run on the GPU machine; skipped without CUDA).

Same FlashAttention criterion as the interpreter tests: error <= 2x the naive low-precision error + slack.
"""

import pytest
import torch

from mmattn.kernels import backends, block_sparse_attention
from mmattn.kernels.backends import INTERPRETED
from mmattn.kernels.triton.block_sparse import block_sparse_op

from .helpers import random_mask, random_qkv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                reason="needs a CUDA GPU and MMATTN_TEST_GPU=1 (compiled Triton)")


def run(q, k, v, mask, backend, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(q, k, v, mask, backend=backend)
    (out.float() * grad_out).sum().backward()
    return [out, q.grad, k.grad, v.grad]


def check(q, k, v, mask, atol=1e-3):
    q, k, v, mask = q.cuda(), k.cuda(), v.cuda(), mask.to("cuda")
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).cuda()  # not the global RNG: order-independent
    ours = run(q, k, v, mask, "triton", grad)
    assert [t.stride() for t in ours] == [q.stride(), q.stride(), k.stride(), v.stride()], "laid out like the inputs"
    naive = run(q, k, v, mask, "torch", grad)
    exact = run(q.double(), k.double(), v.double(), mask, "torch", grad.double())
    for name, a, n, e in zip(("out", "dq", "dk", "dv"), ours, naive, exact):
        assert torch.isfinite(a).all(), name
        err, naive_err = (a.double() - e).abs().max().item(), (n.double() - e).abs().max().item()
        assert err <= 2 * naive_err + atol, f"{name}: {err:.3g} vs naive {naive_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [1, 17, 63, 127, 129, 1000, 1025, 4097])
def test_lengths(dtype, length):
    mask = random_mask(1, 2, length, length, (128, 128), density=0.5, seed=length)
    check(*random_qkv(1, 2, 2, length, length, 64, dtype, seed=length), mask)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    mask = random_mask(2, 4, 700, 900, (128, 64), density=0.4, seed=head_dim)
    check(*random_qkv(2, 4, 2, 700, 900, head_dim, torch.bfloat16), mask)


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_gqa_and_non_contiguous(groups):
    mask = random_mask(1, 8, 1024, 1536, (128, 128), density=0.3, seed=groups)
    check(*random_qkv(2, 8, 8 // groups, 1024, 1536, 128, torch.bfloat16, layout="blhd"), mask)


def test_mixed_layouts():
    """q, k as views of (B, L, H, D) storage, v contiguous: dV is written with its own strides, not dK's."""
    q, k, _ = random_qkv(2, 4, 2, 700, 900, 128, torch.bfloat16, layout="blhd")
    v = random_qkv(2, 4, 2, 700, 900, 128, torch.bfloat16, seed=1)[2]
    check(q, k, v, random_mask(2, 4, 700, 900, (128, 128), density=0.4, seed=3))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_deterministic_backward(head_dim):
    """Under torch.use_deterministic_algorithms(True) (at head dim 128 dQ is otherwise added atomically)."""
    mask = random_mask(1, 8, 2048, 2048, (128, 128), density=0.3).to("cuda")
    q, k, v = (t.cuda() for t in random_qkv(1, 8, 2, 2048, 2048, head_dim, torch.bfloat16))
    grad = torch.randn(q.shape, device="cuda")
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first, second = run(q, k, v, mask, "triton", grad), run(q, k, v, mask, "triton", grad)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_compile_fullgraph_inductor_with_autograd(monkeypatch):
    """Compiled forward and backward equal eager bit for bit. Compiled code never asks whether a call is host-bound
    (it would read the mask on the host), so eager is told this small case is not, and runs the same kernels."""
    monkeypatch.setattr(backends, "HOST_BOUND_WORK", 0)
    mask = random_mask(1, 4, 1000, 1000, (128, 128), density=0.5).to("cuda")
    q, k, v = (t.cuda().requires_grad_() for t in random_qkv(1, 4, 2, 1000, 1000, 64, torch.bfloat16))

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, mask, backend="triton").float().square().sum()

    torch._dynamo.reset()
    loss = torch.compile(attend, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    want = attend(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-2)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


def test_opcheck():
    mask = random_mask(1, 2, 300, 200, (64, 32), seed=6).to("cuda")
    q, k, v = (t.cuda().requires_grad_() for t in random_qkv(1, 2, 1, 300, 200, 64, torch.float16))
    args = (q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices, 64, 32, 0.125)
    torch.library.opcheck(block_sparse_op.forward_op, args)


def test_int64_offsets():
    # B*H*L*D > 2**31 elements: offsets must not overflow int32.
    length, heads = 1 << 17, 128
    mask = random_mask(1, 1, length, 1024, (128, 128), density=1.0, empty_row=False).to("cuda")
    q = torch.randn(1, heads, length, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, heads, 1024, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = block_sparse_attention(q, k, v, mask)
    tail = slice(length - 256, length)
    want = torch.nn.functional.scaled_dot_product_attention(q[:, -1:, tail], k[:, -1:], v[:, -1:])
    torch.testing.assert_close(out[:, -1:, tail], want, atol=2e-2, rtol=0)


def test_autotuned_atomic_dq_backward(monkeypatch):
    """The atomic-dQ backward with its tiles timed by the autotuner (the GPU tests otherwise run untimed, first
    tiles): each timing run adds into the dQ sums, which must be zeroed before the real run."""
    from mmattn.kernels.triton import block_sparse as bs
    from mmattn.kernels.triton.launch import tuned

    monkeypatch.setenv("MMATTN_AUTOTUNE", "1")
    timed = tuned(bs._bwd_dkdv, bs.DKDVQ_CONFIGS[:3], bs._TUNE_KEY, bs.prune_configs, bs._INTERPRETER_CONFIGS,
                  reset_to_zero=bs.dkdvq_kernel.autotuner.reset_to_zero)
    monkeypatch.setattr(bs, "dkdvq_kernel", timed)
    monkeypatch.setattr(bs, "ATOMIC_DQ_SWITCH", True)
    monkeypatch.setattr(bs, "hopper_backward_pays", lambda q: True)  # on any GPU, not only sm90
    q, k, v = random_qkv(1, 4, 4, 1000, 1000, 128, torch.bfloat16)
    check(q, k, v, random_mask(1, 4, 1000, 1000, (128, 128), seed=3))
    assert len(timed.picked) == 1, "the backward ran through the autotuner"
