"""The massive-activation test (VAR's sink tokens), both backends (Triton: the interpreter on the CPU, compiled on a
GPU), against phi computed in float64 here with thresholds set between its distinct values, so that rounding in
float32 cannot flip a token."""

import pytest
import torch

from mmattn.kernels import backend_info, massive_activation_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not backend_info(DEVICE)["triton"][0],
                                reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())


def hidden_states(dtype, shape=(3, 45, 300), seed=0, massive=((0, 3, 7, 40.0), (1, 5, 100, -60.0), (2, 44, 299, 9.0))):
    """Gaussian hidden states with a few planted massive activations (batch, token, dim, value)."""
    hidden = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for b, t, d, value in massive:
        hidden[b, t, d] = value
    return hidden.to(dtype)


def phi64(hidden: torch.Tensor, dims) -> torch.Tensor:
    """max_{d in dims} |h_d| / sqrt(mean(h^2) + 1e-6), in float64 from the rounded inputs."""
    h = hidden.double()
    return h[..., list(dims)].abs().max(-1).values / (h.square().sum(-1) / h.shape[-1] + 1e-6).sqrt()


def thresholds_between(phi: torch.Tensor) -> list[float]:
    """Midpoints between the largest distinct values of phi, and one above them all."""
    values = phi.flatten().unique().sort(descending=True).values[:6]
    return [float(values[0]) + 1.0, *((values[:-1] + values[1:]) / 2).tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(7, 100), (299,), (7, 100, 299, 3, 150)])
def test_flags_the_tokens_above_the_threshold(backend, dtype, dims):
    hidden = hidden_states(dtype)
    phi = phi64(hidden, dims)
    for threshold in thresholds_between(phi):
        flags = massive_activation_tokens(hidden.to(DEVICE), dims, threshold=threshold, backend=backend)
        assert flags.dtype == torch.bool and flags.shape == hidden.shape[:-1]
        assert torch.equal(flags.cpu(), phi > threshold), threshold


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_index_tensors_and_odd_widths(backend):
    """Rows of a wider buffer (a stride that is not the width), a width off the block size, int32 index tensors,
    one row, and no rows."""
    wide = hidden_states(torch.float32, shape=(2, 33, 150), massive=((1, 32, 70, 30.0), (0, 0, 5, 12.0)))
    hidden = wide[..., :77]
    phi = phi64(hidden, (5, 70))
    dims = torch.tensor([5, 70], dtype=torch.int32, device=DEVICE)
    for threshold in thresholds_between(phi):
        flags = massive_activation_tokens(hidden.to(DEVICE), dims, threshold=threshold, backend=backend)
        assert torch.equal(flags.cpu(), phi > threshold)
    one = massive_activation_tokens(hidden[1, 32].to(DEVICE), [70], threshold=5.0, backend=backend)
    assert one.shape == () and bool(one) == bool(phi[1, 32] > 5.0)
    assert massive_activation_tokens(hidden[:, :0].to(DEVICE), [70], threshold=5.0, backend=backend).shape == (2, 0)


def test_triton_custom_op_passes_opcheck():
    """The custom op a compiled prefill would record: schema, fake (output shape and dtype) and dispatch."""
    from mmattn.kernels.triton.massive_activations import massive_activations_op

    hidden = hidden_states(torch.float32).to(DEVICE)
    torch.library.opcheck(massive_activations_op.op, (hidden, torch.tensor([7, 100], device=DEVICE), 5.0))


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"dims": []}, ValueError, "dims: expected hidden dimensions in"),
        ({"dims": [300]}, ValueError, r"dims: expected hidden dimensions in \[0, 300\)"),
        ({"dims": torch.tensor([1.0])}, ValueError, "dims: expected a non-empty 1-D int32/int64 tensor"),
        ({"threshold": float("nan")}, ValueError, "threshold must be finite"),
        ({"hidden": torch.zeros(4, 300, dtype=torch.int64)}, TypeError, "hidden: expected a floating-point"),
        ({"backend": "fa4"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_are_named(arguments, error, message):
    call = {"hidden": torch.zeros(4, 300), "dims": [7], "threshold": 5.0, **arguments}
    with pytest.raises(error, match=message):
        massive_activation_tokens(call.pop("hidden"), call.pop("dims"), **call)
