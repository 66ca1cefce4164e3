"""The fused neighborhood attention kernels under the Triton interpreter against the float64 reference.

Forward, dQ, dK, dV and d rpb, on tiny odd grids: extents not divisible by the dilation, kernel x dilation =
extent, causal axes, strides, GQA, even kernels, non-contiguous inputs; fp32 and fp16.
"""

import pytest
import torch

from mmattn.kernels import neighborhood_attention
from mmattn.kernels.triton.neighborhood import neighborhood_op

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3}

CASES = [
    # shape, kernel_size, dilation, stride, causal
    ((13,), 5, 1, 1, False),
    ((19,), 3, 4, 1, False),
    ((16,), 4, 2, 2, True),
    ((7, 9), (3, 5), (2, 1), 1, False),
    ((9, 7), 3, (3, 2), 1, (True, False)),
    ((5, 8), (5, 4), 1, (2, 4), False),
    ((7, 9), (3, 5), (2, 1), (3, 2), (False, True)),
    ((3, 5, 6), (3, 3, 2), (1, 1, 3), 1, (False, True, False)),
]


def run(q, k, v, rpb, backend, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rpb)]
    out = neighborhood_attention(*leaves[:3], rpb=leaves[3], backend=backend, **kwargs)
    (out.to(grad_out.dtype) * grad_out).sum().backward()
    return [out, *(t.grad for t in leaves)]


def check(shape, kernel_size, dilation, stride, causal, dtype, heads=2, kv_heads=2, head_dim=16, layout="bhnd"):
    g = torch.Generator().manual_seed(len(shape) * 7 + head_dim)

    def make(h):
        if layout == "bnhd":  # non-contiguous (B, H, *spatial, D) views of (B, *spatial, H, D) storage
            return torch.randn(2, *shape, h, head_dim, generator=g).movedim(-2, 1)
        return torch.randn(2, h, *shape, head_dim, generator=g)

    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * len(shape)
    rpb = torch.randn(heads, *(2 * x - 1 for x in ks), generator=g)
    grad = torch.randn(2, heads, *shape, head_dim, generator=g, dtype=torch.float64)
    kwargs = {"kernel_size": kernel_size, "dilation": dilation, "stride": stride, "is_causal": causal}
    ours = run(*(t.to(dtype) for t in (q, k, v, rpb)), "triton", grad.to(dtype), **kwargs)
    exact = run(*(t.double() for t in (q, k, v, rpb)), "torch", grad, **kwargs)
    for name, a, e in zip(("out", "dq", "dk", "dv", "drpb"), ours, exact):
        assert torch.isfinite(a).all(), name
        err = (a.double() - e).abs().max().item()
        assert err <= TOLERANCE[dtype] * max(1.0, e.abs().max().item()), f"{name}: max error {err:.3g}"


@pytest.mark.parametrize("shape,kernel_size,dilation,stride,causal", CASES)
def test_matches_reference_fp32(shape, kernel_size, dilation, stride, causal):
    check(shape, kernel_size, dilation, stride, causal, torch.float32)


@pytest.mark.parametrize("shape,kernel_size,dilation,stride,causal", [CASES[1], CASES[3], CASES[7]])
def test_matches_reference_fp16(shape, kernel_size, dilation, stride, causal):
    check(shape, kernel_size, dilation, stride, causal, torch.float16)


def test_grouped_query_attention_and_non_contiguous_inputs():
    check((6, 7), 3, (1, 2), 1, False, torch.float32, heads=4, kv_heads=2, layout="bnhd")


def test_head_dim_not_a_power_of_two():
    check((11,), 3, 1, 1, False, torch.float32, head_dim=24)


def test_without_rpb_and_gradient_through_lse():
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    out, lse = neighborhood_attention(q, k, v, 3, dilation=2, backend="triton", return_lse=True)
    ref_out, ref_lse = neighborhood_attention(q, k, v, 3, dilation=2, backend="torch", return_lse=True)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref_out.sum() + ref_lse.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_operator_registration_passes_opcheck():
    q, k, v = (torch.randn(1, 2, 12, 16, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, requires_grad=True)
    pattern = [1, 1, 12, 1, 1, 3, 1, 1, 2, 1, 1, 1, 0, 0, 0]
    torch.library.opcheck(neighborhood_op.forward_op, (q, k, v, rpb, pattern, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
