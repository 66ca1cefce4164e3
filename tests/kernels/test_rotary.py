"""The rotary embedding, both backends (Triton: the interpreter on the CPU, compiled on a GPU), against the rotation
written out in float64 here. The tables are random numbers, not cosines and sines of one angle per pair, so that
reading a table at the wrong channel of a pair shows."""

import pytest
import torch

from mmattn.kernels import backend_info, reference, rotary_embedding
from mmattn.kernels.rotary import PAIRINGS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not backend_info(DEVICE)["triton"][0],
                                reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rotated64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str = "interleaved") -> torch.Tensor:
    """Interleaved: out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i+1], out[2i+1] = x[2i] sin[2i+1] + x[2i+1] cos[2i];
    halves: out[i] = x[i] cos[i] - x[i+h] sin[i], out[i+h] = x[i] sin[i] + x[i+h] cos[i] (h = head_dim / 2); in
    float64. Tables of head_dim / 2 entries hold pair i's at i."""
    half = x.shape[-1] // 2
    x = x.double()
    cos, sin = (t.double().expand(*x.shape[:-1], t.shape[-1]) for t in (cos, sin))
    out = torch.empty_like(x)
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if pairing == "interleaved" else (i, i + half)
        by_pair = pairing == "halves"
        c = cos[..., i if by_pair or cos.shape[-1] == half else a]
        s = sin[..., i if by_pair or sin.shape[-1] == half else b]
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


def case(shape, table_shape, dtype=torch.float32, table_dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    cos, sin = (torch.randn(table_shape, generator=generator).to(DEVICE, table_dtype) for _ in range(2))
    return x, cos, sin


def assert_rounded_from(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Within one unit in the last place of out's dtype of the float64 result (float32 arithmetic below that)."""
    torch.testing.assert_close(out.double(), expected, rtol=torch.finfo(out.dtype).eps, atol=1e-6)


LAYOUTS = {
    "(B, L, H, D), tables (1, L, 1, D)": ((2, 37, 3, 16), (1, 37, 1, 16)),
    "(B, H, L, D), tables (L, D)": ((2, 3, 37, 16), (37, 16)),
    "head_dim 12 (6 pairs)": ((1, 5, 2, 12), (1, 5, 1, 12)),
    "per-sample tables": ((2, 7, 3, 8), (2, 7, 1, 8)),
    "one entry per pair, per head (Mochi: tables (L, H, D/2))": ((2, 7, 3, 8), (7, 3, 4)),
}


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rotates_each_channel_pair(backend, dtype, layout, pairing):
    x, cos, sin = case(*LAYOUTS[layout], dtype=dtype)
    out = rotary_embedding(x, cos, sin, pairing=pairing, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert_rounded_from(out, rotated64(x, cos, sin, pairing))


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table_shape", [(1, 9, 1, 16), (9, 3, 8)], ids=["per channel", "per pair"])
def test_gradient_is_the_inverse_rotation(backend, table_shape, pairing):
    x, cos, sin = case((2, 9, 3, 16), table_shape)
    leaf = x.clone().requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    (got,) = torch.autograd.grad(rotary_embedding(leaf, cos, sin, pairing=pairing, backend=backend), leaf, grad)
    leaf64 = x.double().requires_grad_()
    (expected,) = torch.autograd.grad(rotated64(leaf64, cos, sin, pairing), leaf64, grad.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_output_and_gradient_keep_the_layout_of_x():
    """A (B, H, L, D) view of a model's (B, L, H, D) tensor gets outputs and gradients that are such views."""
    x, cos, sin = case((2, 3, 11, 16), (11, 16))
    model = x.transpose(1, 2).contiguous().requires_grad_()  # (B, L, H, D) memory
    view = model.transpose(1, 2)
    out = rotary_embedding(view, cos, sin, backend="triton")
    assert out.stride() == view.stride()
    out.backward(torch.ones_like(out))
    assert model.grad.is_contiguous()
    assert_rounded_from(out, rotated64(x, cos, sin))


def test_reads_a_strided_channel_dim():
    x, cos, sin = case((1, 6, 2, 32), (1, 6, 1, 16))
    strided = x[..., ::2]  # channel stride 2
    assert_rounded_from(rotary_embedding(strided, cos, sin, backend="triton"), rotated64(strided, cos, sin))


def test_tables_that_need_a_gradient_go_to_torch():
    x, cos, sin = case((1, 5, 2, 8), (1, 5, 1, 8))
    cos.requires_grad_()
    out = rotary_embedding(x, cos, sin)  # auto: the reference differentiates the tables
    (got,) = torch.autograd.grad(out.sum(), cos)
    cos64 = cos.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(rotated64(x, cos64, sin).sum(), cos64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="cos/sin require grad"):
        rotary_embedding(x, cos, sin, backend="triton")


def test_reference_is_the_stock_wan_rotation():
    """diffusers' Wan processor: x1 * cos[0::2] - x2 * sin[1::2] into the even channels, x1 * sin + x2 * cos the odd."""
    x, cos, sin = case((2, 7, 3, 8), (1, 7, 1, 8), dtype=torch.float64, table_dtype=torch.float64)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    stock = torch.empty_like(x)
    stock[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    stock[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    torch.testing.assert_close(reference.rotary_embedding(x, cos, sin), stock, rtol=1e-15, atol=1e-15)


def test_reference_halves_is_the_stock_rotate_half():
    """transformers' Qwen vision towers (and LLaMA-style RoPE): x * cos + rotate_half(x) * sin, with tables that
    repeat one angle per pair in both halves; and diffusers' LTX-2 split form with tables of one entry per pair."""
    x, angles = case((2, 7, 3, 8), (1, 7, 1, 4), dtype=torch.float64, table_dtype=torch.float64)[:2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.chunk(2, -1)
    stock = x * cos + torch.cat([-x2, x1], -1) * sin
    for tables in ((cos, sin), (angles.cos(), angles.sin())):
        torch.testing.assert_close(reference.rotary_embedding(x, *tables, pairing="halves"), stock,
                                   rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_compiled_forward_and_backward_equal_eager(pairing):
    x, cos, sin = case((1, 9, 2, 16), (1, 9, 1, 16))

    def loss(t):
        out = rotary_embedding(t, cos, sin, pairing=pairing, backend="triton")
        return (out**2 * torch.arange(16.0, device=DEVICE)).sum()

    eager, compiled = (x.clone().requires_grad_() for _ in range(2))
    loss(eager).backward()
    torch.compile(loss, fullgraph=True)(compiled).backward()
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (((1, 4, 2, 7), (1, 4, 1, 7), (1, 4, 1, 7)), ValueError, "x: expected .* even last dim"),
        (((1, 4, 2, 8), (1, 5, 1, 8), (1, 4, 1, 8)), ValueError, "cos: expected a shape broadcastable"),
        (((1, 4, 2, 8), (1, 4, 1, 8), (4, 4, 1, 8)), ValueError, "sin: expected a shape broadcastable"),
        (((1, 4, 2, 8), (1, 4, 1, 6), (1, 4, 1, 8)), ValueError, "cos: expected .* one entry per channel pair"),
        (((4, 2, 8), (4, 1, 8), (4, 1, 8)), ValueError, "x: expected .* 4-D"),
    ],
)
def test_bad_input_names_the_argument(args, error, match):
    x, cos, sin = (torch.randn(shape) for shape in args)
    with pytest.raises(error, match=match):
        rotary_embedding(x, cos, sin)


def test_bad_types_and_devices_name_the_argument():
    x, table = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="pairing: expected one of"):
        rotary_embedding(x, table, table, pairing="split")
    with pytest.raises(TypeError, match="sin: expected a floating-point tensor"):
        rotary_embedding(x, table, table.long())
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        rotary_embedding(x.long(), table, table)
    with pytest.raises(ValueError, match="cos: expected a tensor on x's device"):
        rotary_embedding(x, table.to("meta"), table)
