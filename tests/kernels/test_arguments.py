"""What every public kernel function shares: a batch of 0 gives empty outputs and gradients (as SDPA does, on every
backend), and an argument of the wrong kind is refused with an error naming it, the expected and the received value."""

import warnings

import pytest
import torch

from mmattn.kernels import (
    BlockSparseMask,
    backend_info,
    block_sparse_attention,
    column_set_attention,
    neighborhood_attention,
    ranked_head_attention,
    routed_attention,
    sink_redistribution_attention,
)

needs_interpreter = pytest.mark.skipif(not backend_info("cpu")["triton"][0], reason="needs TRITON_INTERPRET=1")


def backends(*names, call=None):
    """pytest params of the backends (of `call` too, if given); Triton's need the interpreter."""
    return [pytest.param(*([call] if call else []), name, marks=needs_interpreter if name == "triton" else ())
            for name in names]


def leaves(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).requires_grad_() for shape in shapes]


# Each call: `(inputs, outputs)` of one family on small valid inputs; keyword arguments go to the kernel function.

def block_sparse(backend="torch", batch=2, **kwargs):
    q, k, v = leaves((batch, 2, 32, 16), (batch, 1, 32, 16), (batch, 1, 32, 16))
    mask = BlockSparseMask.from_dense(torch.ones(2, 2, dtype=torch.bool), 16)
    return (q, k, v), block_sparse_attention(q, k, v, mask, backend=backend, return_lse=True, **kwargs)


def neighborhood(backend="torch", batch=2, **kwargs):
    q, k, v, rpb = leaves((batch, 2, 6, 7, 16), (batch, 2, 6, 7, 16), (batch, 2, 6, 7, 16), (2, 5, 5))
    kwargs = {"kernel_size": 3, **kwargs}
    return (q, k, v, rpb), neighborhood_attention(q, k, v, rpb=rpb, backend=backend, return_lse=True, **kwargs)


def routed(backend="torch", batch=2, **kwargs):
    q, k, v = leaves((batch, 2, 32, 16), (batch, 2, 32, 16), (batch, 2, 32, 16))
    indices = torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]])
    kwargs = {"q_region_size": 8, **kwargs}
    return (q, k, v), routed_attention(q, k, v, indices, backend=backend, return_lse=True, **kwargs)


def column_set_inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((batch, 2, 1, 16), (batch, 1, 32, 16), (batch, 1, 32, 16)))
    return q, k, v, (torch.rand(batch, 20, 3, generator=g) < 0.5).float()


def column_sets(backend="torch", batch=2, **kwargs):
    inputs = column_set_inputs(batch)
    return inputs, column_set_attention(*inputs, backend=backend, **kwargs)


def sink_redistribution(backend="torch", batch=2, **kwargs):
    inputs = column_set_inputs(batch)
    kwargs = {"share": 0.5, "rho": 0.5, "min_mass": 0.1, **kwargs}
    return inputs, (sink_redistribution_attention(*inputs, backend=backend, **kwargs),)


def ranked_heads(backend="torch", batch=2, **kwargs):
    inputs = column_set_inputs(batch)
    return inputs, (ranked_head_attention(*inputs, backend=backend, **kwargs),)


@pytest.mark.parametrize("call, backend", [
    *backends("auto", "torch", "flex", "triton", call=block_sparse),
    *backends("auto", "torch", "flex", "triton", call=neighborhood),
    *backends("auto", "torch", "triton", call=routed),
])
def test_empty_batch_gives_empty_outputs_and_gradients(call, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        inputs, (out, lse) = call(backend, batch=0)
    q = inputs[0]
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    grads = torch.autograd.grad(out.sum() + lse.sum(), inputs)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, inputs))


@pytest.mark.parametrize("backend", backends("auto", "torch", "triton"))
def test_empty_batch_gives_empty_column_set_outputs(backend):
    (q, *_), sets = column_sets(backend, batch=0)
    assert [tuple(t.shape) for t in sets] == [(0, 2, 1, 16), (0, 2, 3), (0, 2, 3, 16)]
    assert ranked_heads(backend, batch=0)[1][0].shape == q.shape
    assert sink_redistribution(backend, batch=0)[1][0].shape == q.shape


def test_zero_heads_are_refused():
    q, k, v = leaves((2, 2, 32, 16), (2, 0, 32, 16), (2, 0, 32, 16))
    mask = BlockSparseMask.from_dense(torch.ones(2, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match=r"q heads \(2\) must be a positive multiple of k/v heads \(0\)"):
        block_sparse_attention(q, k, v, mask)


WITH_SCALE = [block_sparse, neighborhood, routed, column_sets, sink_redistribution, ranked_heads]


@pytest.mark.parametrize("call", WITH_SCALE)
@pytest.mark.parametrize("scale, error, message", [
    ("big", TypeError, "scale must be a real number, got 'big' of type str"),
    (True, TypeError, "scale must be a real number, got True of type bool"),
    (torch.tensor(0.5), TypeError, "scale must be a real number, got tensor"),
    (float("nan"), ValueError, "scale must be finite, got nan"),
])
def test_scale_must_be_a_finite_real_number(call, scale, error, message):
    with pytest.raises(error, match=message):
        call(scale=scale)


@pytest.mark.parametrize("call", WITH_SCALE)
def test_scale_of_any_real_type_is_taken(call):
    as_float, as_int, as_numpy = (call(scale=scale)[1][0] for scale in (2.0, 2, torch.tensor(2.0).numpy()[()]))
    torch.testing.assert_close(as_int, as_float, rtol=0, atol=0)
    torch.testing.assert_close(as_numpy, as_float, rtol=0, atol=0)


@pytest.mark.parametrize("call", WITH_SCALE)
@pytest.mark.parametrize("backend", ["bogus", None, "Torch"])
def test_unknown_backend_names_itself(call, backend):
    with pytest.raises(ValueError, match=rf"backend must be one of \(.*\), got {backend!r}"):
        call(backend)


@pytest.mark.parametrize("call, kwargs, error, message", [
    (sink_redistribution, {"share": "half"}, TypeError, "share must be a real number, got 'half' of type str"),
    (sink_redistribution, {"rho": None}, TypeError, "rho must be a real number, got None"),
    (sink_redistribution, {"min_mass": float("inf")}, ValueError, "min_mass must be finite, got inf"),
    (ranked_heads, {"beta": "1.5"}, TypeError, "beta must be a real number, got '1.5' of type str"),
    (column_sets, {"visible": [True] * 32}, ValueError,
     r"visible: expected a bool \(2, 32\) or \(2, 1, 32\) tensor on cpu, got list"),
    (neighborhood, {"kernel_size": "3"}, TypeError, "kernel_size must hold int values, got '3'"),
    (neighborhood, {"kernel_size": [[3], [3]]}, TypeError, r"kernel_size must hold int values, got \(\[3\], \[3\]\)"),
    (neighborhood, {"kernel_size": {3: 3}}, TypeError, r"kernel_size must hold int values, got \{3: 3\}"),
    (neighborhood, {"dilation": 1.5}, TypeError, "dilation must hold int values, got 1.5"),
    (neighborhood, {"stride": None}, TypeError, "stride must hold int values, got None"),
    (neighborhood, {"stride": (1, 2, 1)}, ValueError, r"stride must be one int or 2 \(one per spatial axis\)"),
    (routed, {"q_region_size": 8.0}, ValueError, "q_region_size must be a positive int, got 8.0"),
])
def test_other_arguments_name_themselves(call, kwargs, error, message):
    with pytest.raises(error, match=message):
        call(**kwargs)


def test_numpy_integer_kernel_sizes_are_taken():
    numpy_int = torch.tensor(3).numpy()[()]
    torch.testing.assert_close(neighborhood(kernel_size=numpy_int)[1], neighborhood(kernel_size=3)[1], rtol=0, atol=0)


@pytest.mark.parametrize("value, default, expected", [(None, True, True), (None, False, False), ("1", False, True),
                                                      ("0", True, False)])
def test_kernel_switches_read_unset_1_or_0(monkeypatch, value, default, expected):
    from mmattn.kernels.triton.launch import env_switch

    if value is None:
        monkeypatch.delenv("MMATTN_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("MMATTN_TEST_SWITCH", value)
    assert env_switch("MMATTN_TEST_SWITCH", default) is expected


def test_kernel_switch_with_another_value_names_the_variable(monkeypatch):
    from mmattn.kernels.triton.launch import env_switch

    monkeypatch.setenv("MMATTN_TRITON_ATOMIC_DQ", "yes")
    with pytest.raises(ValueError, match="MMATTN_TRITON_ATOMIC_DQ must be unset, '0' or '1', got 'yes'"):
        env_switch("MMATTN_TRITON_ATOMIC_DQ", False)
