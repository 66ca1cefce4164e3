"""Neighborhood attention: NATTEN semantics, the torch reference, FlexAttention and argument errors."""

import math
import warnings

import pytest
import torch

from mmattn.kernels import Neighborhood, backend_info, neighborhood_attention

from .na_oracle import dense_allowed, dense_na

# (shape, kernel_size, dilation, causal): odd extents, extents not divisible by dilation, k x d = extent
CASES = [
    ((13,), (5,), (1,), (False,)),
    ((17,), (3,), (4,), (False,)),
    ((12,), (4,), (3,), (False,)),
    ((9,), (3,), (3,), (False,)),
    ((11,), (4,), (2,), (True,)),
    ((7, 9), (3, 5), (2, 1), (False, False)),
    ((6, 7), (3, 3), (1, 2), (True, False)),
    ((8, 5), (2, 5), (3, 1), (False, False)),
    ((3, 5, 6), (3, 3, 2), (1, 1, 3), (False, True, False)),
]


def _qkv(shape, heads=2, kv_heads=2, head_dim=8, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, *shape, head_dim, generator=g, dtype=dtype)
    return make(heads), make(kv_heads), make(kv_heads)


def _rpb(heads, kernel_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, *(2 * k - 1 for k in kernel_size), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape,kernel_size,dilation,causal", CASES)
def test_pattern_matches_natten_closed_form(shape, kernel_size, dilation, causal):
    nbhd = Neighborhood.create(shape, kernel_size, dilation, is_causal=causal)
    tokens = torch.arange(nbhd.num_tokens)
    allowed = nbhd.allowed(tokens[:, None], tokens[None, :])
    assert torch.equal(allowed, dense_allowed(shape, kernel_size, dilation, causal))
    if not any(causal):
        assert (allowed.sum(-1) == math.prod(kernel_size)).all()


@pytest.mark.parametrize("shape,kernel_size,dilation,causal", CASES)
def test_reference_equals_dense_oracle(shape, kernel_size, dilation, causal):
    q, k, v = _qkv(shape, heads=4, kv_heads=2)
    rpb = _rpb(4, kernel_size)
    out = neighborhood_attention(q, k, v, kernel_size, dilation=dilation, is_causal=causal, rpb=rpb, backend="torch")
    expected = dense_na(*(t.flatten(2, -2) for t in (q, k, v)), shape, kernel_size, dilation, causal, rpb)
    torch.testing.assert_close(out.flatten(2, -2), expected, rtol=1e-10, atol=1e-10)


def test_reference_gradients_in_chunks(monkeypatch):
    """With a tiny budget the reference runs many checkpointed chunks; gradients equal the one-chunk run."""
    from mmattn.kernels import reference

    shape, kernel_size = (6, 7), (3, 5)
    inputs = [t.requires_grad_() for t in (*_qkv(shape), _rpb(2, kernel_size))]

    def grads():
        out = neighborhood_attention(*inputs[:3], kernel_size, rpb=inputs[3], backend="torch")
        return torch.autograd.grad(out.square().sum(), inputs)

    whole = grads()
    monkeypatch.setattr(reference, "_SCORE_BUDGET", 1000)
    for a, b in zip(whole, grads()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# (shape, kernel_size, dilation, stride, causal): generalized NA, odd and even kernels and strides, with dilation
STRIDE_CASES = [
    ((13,), (5,), (1,), (2,), (False,)),
    ((17,), (4,), (2,), (3,), (False,)),
    ((10,), (3,), (3,), (3,), (False,)),
    ((16,), (4,), (2,), (2,), (True,)),
    ((11,), (5,), (1,), (3,), (True,)),
    ((7, 9), (3, 5), (2, 1), (3, 2), (False, True)),
    ((5, 8), (5, 4), (1, 1), (2, 4), (False, False)),
    ((3, 5, 6), (3, 3, 2), (1, 1, 3), (2, 3, 2), (True, False, False)),
]


@pytest.mark.parametrize("shape,kernel_size,dilation,stride,causal", STRIDE_CASES)
def test_strided_pattern_matches_the_stride_group_leader_rule(shape, kernel_size, dilation, stride, causal):
    nbhd = Neighborhood.create(shape, kernel_size, dilation, stride, causal)
    tokens = torch.arange(nbhd.num_tokens)
    allowed = nbhd.allowed(tokens[:, None], tokens[None, :])
    assert torch.equal(allowed, dense_allowed(shape, kernel_size, dilation, causal, stride))
    if not any(causal):
        assert (allowed.sum(-1) == math.prod(kernel_size)).all()


@pytest.mark.parametrize("shape,kernel_size,dilation,stride,causal", STRIDE_CASES)
def test_strided_reference_and_its_gradients_equal_the_dense_oracle(shape, kernel_size, dilation, stride, causal):
    """Output and the gradients of q, k, v and rpb (the reference gathers keys and biases through `neighbors`)."""
    leaves = [t.requires_grad_() for t in (*_qkv(shape, heads=4, kv_heads=2), _rpb(4, kernel_size))]
    kwargs = {"dilation": dilation, "stride": stride, "is_causal": causal}
    out = neighborhood_attention(*leaves[:3], kernel_size, rpb=leaves[3], backend="torch", **kwargs).flatten(2, -2)
    expected = dense_na(*(t.flatten(2, -2) for t in leaves[:3]), shape, kernel_size, dilation, causal, leaves[3],
                        stride=stride)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = [torch.autograd.grad((y * weight).sum(), leaves, retain_graph=True) for y in (out, expected)]
    for name, a, b in zip(("q", "k", "v", "rpb"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("shape,kernel_size,dilation,stride,causal", [STRIDE_CASES[3], STRIDE_CASES[5], STRIDE_CASES[7]])
def test_strided_flex_equals_the_dense_oracle(shape, kernel_size, dilation, stride, causal):
    q, k, v = _qkv(shape, dtype=torch.float32)
    rpb = _rpb(2, kernel_size).float()
    out = neighborhood_attention(q, k, v, kernel_size, dilation=dilation, stride=stride, is_causal=causal, rpb=rpb,
                                 backend="flex")
    expected = dense_na(*(t.flatten(2, -2) for t in (q, k, v)), shape, kernel_size, dilation, causal, rpb, stride=stride)
    torch.testing.assert_close(out.flatten(2, -2).double(), expected, rtol=1e-5, atol=1e-5)


def test_stride_equal_kernel_is_blocked_attention():
    nbhd = Neighborhood.create((12,), 4, stride=4)
    tokens = torch.arange(12)
    blocks = tokens // 4
    assert torch.equal(nbhd.allowed(tokens[:, None], tokens[None, :]), blocks[:, None] == blocks[None, :])


@pytest.mark.parametrize("shape,kernel_size,dilation,causal", [CASES[1], CASES[5], CASES[8]])
def test_flex_equals_reference(shape, kernel_size, dilation, causal):
    q, k, v = _qkv(shape, dtype=torch.float32)
    rpb = _rpb(2, kernel_size).float()
    kwargs = {"dilation": dilation, "is_causal": causal, "rpb": rpb}
    out = neighborhood_attention(q, k, v, kernel_size, backend="flex", **kwargs)
    expected = neighborhood_attention(q, k, v, kernel_size, backend="torch", **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not backend_info("cpu")["triton"][0], reason="needs TRITON_INTERPRET=1")),
])
def test_compiles_in_a_full_graph_with_rpb_and_autograd(backend):
    """Dynamo traces the whole call, `Neighborhood.create` included, without entering an `lru_cache` wrapper: torch
    2.11 to 2.13 cannot trace one (the H200's torch 2.11 failed in `create`), later ones warn that they bypass it."""
    q, k, v = (t.float().requires_grad_() for t in _qkv((5, 6), head_dim=16))
    rpb = _rpb(2, (3, 3)).float().requires_grad_()

    def attend(q, k, v, rpb, backend=backend):
        return neighborhood_attention(q, k, v, 3, rpb=rpb, backend=backend).double().square().sum()

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache")
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
        grads = torch.autograd.grad(compiled(q, k, v, rpb), (q, k, v, rpb))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    expected = torch.autograd.grad(attend(*exact, backend="torch"), exact)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kernel_size": 6}, "kernel_size x dilation"),
        ({"kernel_size": 3, "dilation": 3}, "kernel_size x dilation"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": (3, 3, 3)}, "kernel_size"),
        ({"kernel_size": 3, "dilation": 0}, "dilation"),
        ({"kernel_size": 3, "stride": 4}, "stride"),
        ({"kernel_size": 3, "is_causal": 1}, "is_causal"),
        ({"kernel_size": 3, "rpb": torch.zeros(2, 3, 3)}, "rpb"),
        ({"kernel_size": 3, "rpb": torch.zeros(2, 5, 5, dtype=torch.long)}, "rpb"),
        ({"kernel_size": 3, "backend": "cuda"}, "backend"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    q, k, v = _qkv((5, 5))
    with pytest.raises((ValueError, TypeError), match=message):
        neighborhood_attention(q, k, v, **kwargs)


def test_layout_mismatch():
    q, k, v = _qkv((5, 5))
    with pytest.raises(ValueError, match="k: expected"):
        neighborhood_attention(q, k[:, :, :4], v[:, :, :4], 3)
    with pytest.raises(ValueError, match="spatial axes"):
        neighborhood_attention(*(t[:, :, None, None] for t in (q, k, v)), 3)
