"""Column-set attention (the decode rows of VAR and GIFT): the Triton kernels (interpreter on the CPU, compiled on a
GPU) against the float64 reference, and the reference against explicit column edits of the probabilities."""

import pytest
import torch

from mmattn.kernels import (
    backend_info,
    column_set_attention,
    ranked_head_enhancement,
    reference,
    sink_redistribution_attention,
)

from .helpers import random_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not backend_info(DEVICE)["triton"][0], reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
DTYPES = (torch.float32,) if DEVICE == "cpu" else (torch.float32, torch.bfloat16)  # the interpreter has no bf16
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def inputs(dtype, batch=2, heads=4, kv_heads=2, kv_len=45, head_dim=32, prompt=40, sets=3, seed=0):
    q, k, v = (t.to(DEVICE) for t in random_qkv(batch, heads, kv_heads, 1, kv_len, head_dim, dtype, seed))
    g = torch.Generator().manual_seed(seed)
    columns = (torch.rand(batch, prompt, sets, generator=g) < 0.4).float().to(DEVICE)
    visible = (torch.rand(batch, kv_len, generator=g) > 0.2).to(DEVICE)
    visible[0] = False  # a row that sees no key
    return q, k, v, columns, visible


def exact_sets(q, k, v, columns, visible):
    return reference.column_set_attention(q.double(), k.double(), v.double(), columns, visible, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 32, 128])
def test_statistics_match_the_float64_reference(dtype, head_dim, backend):
    q, k, v, columns, visible = inputs(dtype, head_dim=head_dim)
    sets = column_set_attention(q, k, v, columns, visible=visible, backend=backend)
    for ours, exact in zip(sets, exact_sets(q, k, v, columns, visible)):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), exact, atol=ATOL[dtype], rtol=0)
    assert torch.equal(sets.output[0], torch.zeros_like(sets.output[0]))  # no NaN on the fully masked row


def explicit_edit(q, k, v, visible, column_sets, coefficients, renormalize):
    """A_j <- A_j (1 + sum_n c_n S_jn) on explicit float64 probabilities, optionally rescaled to the row mass."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    prompt = column_sets.shape[1]
    factor = 1 + torch.einsum("bhn,bcn->bhc", coefficients.double(), column_sets.double())
    edited = probs.clone()
    edited[..., :prompt] *= factor[:, :, None]
    if renormalize:
        edited *= probs.sum(-1, keepdim=True) / edited.sum(-1, keepdim=True).clamp_min(1e-300)
    return edited @ v


def test_sink_redistribution_moves_share_of_the_sink_mass_in_image_centric_rows():
    q, k, v, columns, visible = inputs(torch.float32)
    image = columns[..., 0] > 0
    sinks = image & (torch.arange(columns.shape[1], device=DEVICE) % 4 == 0)
    text_sinks = (columns[..., 2] > 0) & ~image
    columns = torch.stack([image, image & ~sinks, sinks | text_sinks], -1).float()
    share, rho, min_mass = 0.6, 0.3, 0.05
    exact = exact_sets(q, k, v, columns, visible)
    image_mass, receivers, sink_mass = exact[1].unbind(-1)
    centric = (receivers >= rho * image_mass) & (image_mass >= min_mass) & (receivers > 0)
    assert centric.any() and not centric.all()
    coefficients = torch.stack([torch.zeros_like(receivers), share * sink_mass / receivers, -share * centric], -1)
    coefficients = torch.where(centric[..., None], coefficients, 0.0)
    expected = explicit_edit(q, k, v, visible, columns, coefficients, renormalize=False)
    torch.testing.assert_close(reference.sink_redistribution(*exact, share, rho, min_mass), expected)
    for backend in ("triton", "torch"):
        ours = sink_redistribution_attention(q, k, v, columns, share=share, rho=rho, min_mass=min_mass,
                                             visible=visible, backend=backend)
        torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_ranked_head_enhancement_scales_vision_and_query_heads(beta):
    q, k, v, columns, visible = inputs(torch.float32, heads=6, kv_heads=3)
    boost = torch.rand(columns.shape[:2], generator=torch.Generator().manual_seed(3)).to(DEVICE) * 4
    columns = torch.stack([columns[..., 0], columns[..., 0] * boost, columns[..., 2]], -1)
    exact = exact_sets(q, k, v, columns, visible)
    image, gained, query = exact[1].unbind(-1)
    vision = torch.zeros_like(image).scatter_(1, image.topk(3, 1).indices, 1.0)
    query_heads = torch.zeros_like(query).scatter_(1, query.topk(3, 1).indices, 1.0)
    gain = (vision * gained).sum(1, keepdim=True) / (vision * image).sum(1, keepdim=True)
    coefficients = torch.stack([torch.zeros_like(image), vision, query_heads * (beta * (1 + gain) - 1)], -1)
    expected = explicit_edit(q, k, v, visible, columns, coefficients.nan_to_num(0.0), renormalize=True)
    expected[0] = 0.0  # the row that sees no key
    torch.testing.assert_close(reference.ranked_head_enhancement(*exact, beta).nan_to_num(0.0), expected)
    for backend in ("triton", "torch"):
        sets = column_set_attention(q, k, v, columns, visible=visible, backend=backend)
        ours = ranked_head_enhancement(sets, beta=beta, dtype=torch.float32, backend=backend)
        torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)


def test_bad_arguments_name_themselves():
    q, k, v, columns, visible = inputs(torch.float32)
    with pytest.raises(ValueError, match="query"):
        column_set_attention(q.expand(-1, -1, 2, -1), k, v, columns)
    with pytest.raises(TypeError, match="columns"):
        column_set_attention(q, k, v, columns.double())
    with pytest.raises(ValueError, match="columns"):
        column_set_attention(q, k, v, torch.zeros(2, k.shape[2] + 1, 3, device=DEVICE))
    with pytest.raises(ValueError, match="columns"):
        sink_redistribution_attention(q, k, v, columns[..., :2].contiguous(), share=0.5, rho=0.5, min_mass=0.2)
    with pytest.raises(ValueError, match="visible"):
        column_set_attention(q, k, v, columns, visible=visible.float())
    with pytest.raises(ValueError, match="sets"):
        ranked_head_enhancement(column_set_attention(q, k, v, columns[..., :2].contiguous()))
