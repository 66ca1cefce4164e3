"""The compiled fused neighborhood kernels on a CUDA GPU in bf16/fp16 (skipped without CUDA).

FlashAttention criterion: error <= 2x the naive low-precision error (same inputs, float32 reference path) + slack.
"""

import pytest
import torch

from mmattn.kernels import neighborhood_attention
from mmattn.kernels.backends import INTERPRETED

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                reason="needs a CUDA GPU and MMATTN_TEST_GPU=1 (compiled Triton)")


def run(q, k, v, rpb, backend, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (q, k, v, rpb)]
    out = neighborhood_attention(*leaves[:3], rpb=leaves[3], backend=backend, **kwargs)
    (out.to(grad_out.dtype) * grad_out).sum().backward()
    return [out, *(t.grad for t in leaves if t is not None)]


def check(batch, heads, kv_heads, shape, head_dim, dtype=torch.bfloat16, with_rpb=True, atol=2e-3, **kwargs):
    g = torch.Generator().manual_seed(sum(shape) + head_dim)
    q = torch.randn(batch, heads, *shape, head_dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, *shape, head_dim, generator=g) for _ in range(2))
    ks = kwargs["kernel_size"]
    ks = ks if isinstance(ks, tuple) else (ks,) * len(shape)
    rpb = torch.randn(heads, *(2 * x - 1 for x in ks), generator=g) if with_rpb else None
    grad = torch.randn(q.shape, generator=g).cuda()
    inputs = [t.cuda() if t is not None else None for t in (q, k, v, rpb)]
    low = [t.to(dtype) if t is not None else None for t in inputs]
    ours = run(*low, "triton", grad, **kwargs)
    naive = run(*low, "torch", grad, **kwargs)
    exact = run(*(t.double() if t is not None else None for t in inputs), "torch", grad.double(), **kwargs)
    for name, a, n, e in zip(("out", "dq", "dk", "dv", "drpb"), ours, naive, exact):
        assert torch.isfinite(a).all(), name
        err, naive_err = (a.double() - e).abs().max().item(), (n.double() - e).abs().max().item()
        assert err <= 2 * naive_err + atol * max(1.0, e.abs().max().item()), f"{name}: {err:.3g} vs naive {naive_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nat_stage_2d(dtype):
    check(2, 4, 4, (56, 56), 32, dtype, kernel_size=7)


def test_dinat_dilated_odd_extent():
    check(2, 4, 4, (29, 31), 32, kernel_size=7, dilation=(2, 3))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_1d_long_and_causal(head_dim):
    check(1, 4, 2, (3000,), head_dim, with_rpb=False, kernel_size=257, is_causal=True)


def test_3d_video_with_stride():
    check(1, 2, 2, (6, 20, 24), 128, with_rpb=False, kernel_size=(3, 8, 8), stride=(1, 4, 4))


def test_large_2d_kernel():
    check(1, 2, 2, (64, 64), 128, with_rpb=False, kernel_size=(21, 19))


def test_deterministic_backward():
    q, k, v = (torch.randn(2, 4, 40, 40, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    grad = torch.randn(q.shape, device="cuda")
    first, second = (run(q, k, v, None, "triton", grad, kernel_size=9, dilation=2) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_compile_fullgraph_inductor_with_autograd():
    q, k, v = (torch.randn(2, 4, 24, 24, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    rpb = torch.randn(4, 13, 13, device="cuda", requires_grad=True)

    def loss(q, k, v, rpb):
        return neighborhood_attention(q, k, v, 7, rpb=rpb).float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, rpb), (q, k, v, rpb))
    expected = torch.autograd.grad(loss(q, k, v, rpb), (q, k, v, rpb))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
