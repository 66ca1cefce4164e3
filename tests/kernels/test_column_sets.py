"""Column-set attention (the decode rows of VAR and GIFT), both backends (Triton: the interpreter on the CPU, compiled
on a GPU), against the explicit float64 attention matrix of tests/kernels/column_set_oracle.py: masses summed over
each column set, and the VAR and GIFT edits applied to the matrix before it multiplies V."""

import pytest
import torch

from mmattn.kernels import backend_info, column_set_attention, ranked_head_attention, sink_redistribution_attention

from .column_set_oracle import (
    attention_output,
    attention_probs,
    column_set_statistics,
    enhance_ranked_heads,
    redistribute_sinks,
)
from .helpers import random_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not backend_info(DEVICE)["triton"][0], reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())  # the interpreter has no bf16
STATISTICS_ATOL = 2e-5  # float32 statistics of the same (rounded) inputs as the oracle's
OUTPUT_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # outputs rounded to the input dtype


def inputs(dtype, batch=2, heads=4, kv_heads=2, kv_len=45, head_dim=32, seed=0):
    """q (B, H, 1, D), k, v (B, H_kv, T, D) on DEVICE, and `visible` (B, T) on the CPU with batch row 0 seeing no
    key."""
    q, k, v = (t.to(DEVICE) for t in random_qkv(batch, heads, kv_heads, 1, kv_len, head_dim, dtype, seed))
    visible = torch.rand(batch, kv_len, generator=torch.Generator().manual_seed(seed)) > 0.2
    visible[0] = False
    return q, k, v, visible


def token_sets(batch, prompt, kv_len, seed, *densities):
    """Disjoint random bool masks (B, T) over the first `prompt` keys, one per density."""
    draw = torch.rand(batch, kv_len, generator=torch.Generator().manual_seed(seed))
    draw[:, prompt:] = 2.0
    bounds = torch.tensor((0.0, *densities)).cumsum(0)
    return [(draw >= low) & (draw < high) for low, high in zip(bounds[:-1], bounds[1:])]


def as_columns(prompt, *sets):
    """The API's float32 columns (B, C, N) of the first C = prompt keys, from (B, T) sets (masks or weights)."""
    return torch.stack([s[:, :prompt].float() for s in sets], -1).to(DEVICE)


def assert_close(ours, exact, atol):
    torch.testing.assert_close(ours.cpu().double(), exact, atol=atol, rtol=0)


# (head_dim, sets, kv_len, prompt, scale): one set and the first key tile only, keys past the columns, eight sets
STATISTICS_CASES = [(8, 1, 13, 13, None), (32, 3, 45, 40, None), (128, 8, 33, 20, 0.3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "sets", "kv_len", "prompt", "scale"), STATISTICS_CASES)
def test_statistics_are_the_masses_of_the_explicit_attention_matrix(head_dim, sets, kv_len, prompt, scale, dtype,
                                                                     backend):
    q, k, v, visible = inputs(dtype, kv_len=kv_len, head_dim=head_dim, seed=head_dim)
    weights = torch.rand(2, prompt, sets, generator=torch.Generator().manual_seed(1))
    weights = weights * (weights > 0.3)  # real-valued weights, some keys outside a set
    ours = column_set_attention(q, k, v, weights.to(DEVICE), visible=visible.to(DEVICE), scale=scale, backend=backend)
    probs = attention_probs(q, k, visible, scale or head_dim**-0.5)
    masses, weighted = column_set_statistics(probs, v, weights)
    assert all(t.dtype == torch.float32 for t in ours)
    assert_close(ours.output, attention_output(probs, v), STATISTICS_ATOL)
    assert_close(ours.masses, masses[:, :, 0], STATISTICS_ATOL)
    assert_close(ours.weighted, weighted[:, :, 0], STATISTICS_ATOL)
    assert torch.equal(ours.output[0], torch.zeros_like(ours.output[0]))  # no NaN on the row that sees no key


@pytest.mark.parametrize("dtype", DTYPES)
def test_sink_redistribution_is_the_var_edit_of_the_explicit_matrix(dtype):
    q, k, v, visible = inputs(dtype, heads=8, kv_heads=2, seed=3)
    prompt, kv_len = 40, k.shape[2]
    receivers, visual_sinks, text_sinks = token_sets(2, prompt, kv_len, 3, 0.3, 0.15, 0.08)
    image, sinks = receivers | visual_sinks, visual_sinks | text_sinks
    share, rho, min_mass = 0.6, 0.5, 0.2
    probs = attention_probs(q, k, visible, q.shape[-1] ** -0.5)
    edited, centric = redistribute_sinks(probs, image, sinks, share, rho, min_mass)
    assert centric.any() and not centric[1].all()
    torch.testing.assert_close(edited.sum(-1), probs.sum(-1))
    expected = attention_output(edited, v)
    columns = as_columns(prompt, image, image & ~sinks, sinks)
    for backend in BACKENDS:
        ours = sink_redistribution_attention(q, k, v, columns, share=share, rho=rho, min_mass=min_mass,
                                             visible=visible.to(DEVICE), backend=backend)
        assert ours.dtype == dtype
        assert_close(ours, expected, OUTPUT_ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layout", "rows"), [("bhld", 5), ("blhd", 5), ("bhld", 37)])
def test_sink_redistribution_of_several_causal_rows_edits_the_selected_ones(layout, rows, dtype):
    """A prompt's last rows at once (VAR's prompt rows, in a model's (B, L, H, D) layout too; 37 rows: several row
    blocks of a program, the last one partial): each row sees the keys up to its own position (batch row 1 is
    left-padded), and only the rows `selected` marks are edited."""
    kv_len = 45
    q, k, v = (t.to(DEVICE) for t in random_qkv(2, 8, 2, rows, kv_len, 32, dtype, seed=5, layout=layout))
    visible = (torch.arange(kv_len) <= torch.arange(kv_len - rows, kv_len)[:, None]).expand(2, -1, -1).clone()
    visible[1, :, :3] = False
    selected = torch.rand(2, rows, generator=torch.Generator().manual_seed(rows)) > 0.3
    selected[:, 0] = False
    receivers, visual_sinks, text_sinks = token_sets(2, kv_len, kv_len, 3, 0.3, 0.15, 0.08)
    image, sinks = receivers | visual_sinks, visual_sinks | text_sinks
    columns = as_columns(kv_len, image, image & ~sinks, sinks)
    for seen in (visible, visible[:, -1]):  # per row, or one (B, T) mask for every row
        probs = attention_probs(q, k, seen, q.shape[-1] ** -0.5)
        edited, centric = redistribute_sinks(probs, image, sinks, 0.6, 0.5, 0.2)
        edits = centric & selected[:, None]
        assert edits.any() and not (centric == edits).all()  # some image-centric rows are left out
        expected = torch.where(selected[:, None, :, None], attention_output(edited, v), attention_output(probs, v))
        for backend in BACKENDS:
            ours = sink_redistribution_attention(q, k, v, columns, share=0.6, rho=0.5, min_mass=0.2,
                                                 visible=seen.to(DEVICE), selected=selected.to(DEVICE),
                                                 backend=backend)
            assert_close(ours, expected, OUTPUT_ATOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_takes_the_rows_into_a_models_attention_output(backend):
    """`out`: the edited rows land in the last rows of a (B, L, H, D) attention output, as the same call returns
    them, and the rows before keep their values."""
    rows, kv_len = 5, 45
    q, k, v = (t.to(DEVICE) for t in random_qkv(2, 8, 2, rows, kv_len, 32, torch.float32, seed=9, layout="blhd"))
    receivers, visual_sinks, text_sinks = token_sets(2, kv_len, kv_len, 9, 0.3, 0.15, 0.08)
    image, sinks = receivers | visual_sinks, visual_sinks | text_sinks
    columns = as_columns(kv_len, image, image & ~sinks, sinks)
    calls = {
        "sink_redistribution": lambda **out: sink_redistribution_attention(q, k, v, columns, share=0.6, rho=0.5,
                                                                           min_mass=0.2, backend=backend, **out),
        "ranked_heads": lambda **out: ranked_head_attention(q[:, :, -1:], k, v, columns, beta=1.5, backend=backend,
                                                            **out),
    }
    for name, call in calls.items():
        output = torch.full((2, kv_len, 8, 32), 7.0, device=DEVICE)  # (B, L, H, D), the query rows last
        expected = call()
        written = output[:, kv_len - expected.shape[2]:].transpose(1, 2)
        assert call(out=written) is written, name
        assert torch.equal(written, expected), name
        assert (output[:, : kv_len - expected.shape[2]] == 7.0).all(), name


def test_out_under_torch_compile_receives_the_triton_custom_ops_rows():
    """Compiled (one graph), the custom op's new rows are copied into `out`: the same output as eagerly."""
    q, k, v = (t.to(DEVICE) for t in random_qkv(2, 8, 2, 5, 45, 32, torch.float32, seed=10, layout="blhd"))
    columns = as_columns(45, *token_sets(2, 45, 45, 10, 0.3, 0.15, 0.08))

    def layer(q, k, v, columns):
        output = torch.zeros(2, 45, 8, 32, device=DEVICE)
        sink_redistribution_attention(q, k, v, columns, share=0.6, rho=0.5, min_mass=0.2, backend="triton",
                                      out=output[:, 40:].transpose(1, 2))
        return output

    eager = layer(q, k, v, columns)
    assert eager[:, 40:].abs().amax() > 0
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(q, k, v, columns), eager, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "beta"), [(6, 3, 1.0), (5, 1, 1.5)])
def test_ranked_head_attention_is_the_gift_edit_of_the_explicit_matrix(heads, kv_heads, beta, dtype):
    q, k, v, visible = inputs(dtype, heads=heads, kv_heads=kv_heads, seed=heads)
    prompt, kv_len = 40, k.shape[2]
    image, query = token_sets(2, prompt, kv_len, 5, 0.4, 0.25)
    multiplier = torch.where(image, torch.exp(3 * torch.rand(2, kv_len, generator=torch.Generator().manual_seed(6))), 1.0)
    columns = as_columns(prompt, image, image * (multiplier - 1), query)
    for seen in (visible, torch.ones_like(visible)):  # batch row 0 sees no key, or every row sees every key
        probs = attention_probs(q, k, seen, q.shape[-1] ** -0.5)
        expected = attention_output(enhance_ranked_heads(probs, image, multiplier, query, beta), v)
        for backend in BACKENDS:
            ours = ranked_head_attention(q, k, v, columns, beta=beta, visible=seen.to(DEVICE), backend=backend)
            assert ours.dtype == dtype
            assert_close(ours, expected, OUTPUT_ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_split_into_chunks_combine_to_the_whole_row(dtype):
    """One (batch, head) pair per key head and a long row: the Triton path splits the keys into chunks (one of them
    sees no key) and combines them; statistics and the VAR and GIFT edits as over the whole row."""
    from mmattn.kernels.triton.column_sets import ONE_ROW, multiprocessors, key_splits

    q, k, v, visible = inputs(dtype, batch=1, heads=2, kv_heads=1, kv_len=300, head_dim=64, seed=7)
    visible = torch.ones_like(visible)
    visible[:, 96:200] = False
    chunk, splits = key_splits(2, 300, multiprocessors(q.device), ONE_ROW.programs_per_sm)
    assert splits >= 3 and chunk <= 96  # a chunk inside the invisible keys
    prompt = 260
    image, sinks = token_sets(1, prompt, 300, 7, 0.5, 0.1)
    columns = as_columns(prompt, image, image & ~sinks, sinks)
    probs = attention_probs(q, k, visible, q.shape[-1] ** -0.5)
    masses, weighted = column_set_statistics(probs, v, columns.cpu().double())
    ours = column_set_attention(q, k, v, columns, visible=visible.to(DEVICE), backend="triton")
    assert_close(ours.output, attention_output(probs, v), STATISTICS_ATOL)
    assert_close(ours.masses, masses[:, :, 0], STATISTICS_ATOL)
    assert_close(ours.weighted, weighted[:, :, 0], STATISTICS_ATOL)
    edited, centric = redistribute_sinks(probs, image, sinks, 0.6, 0.5, 0.2)
    assert centric.any()
    redistributed = sink_redistribution_attention(q, k, v, columns, share=0.6, rho=0.5, min_mass=0.2,
                                                  visible=visible.to(DEVICE), backend="triton")
    assert_close(redistributed, attention_output(edited, v), OUTPUT_ATOL[dtype])
    gains = torch.exp(3 * torch.rand(1, 300, generator=torch.Generator().manual_seed(8)))
    multiplier = torch.where(image, gains, 1.0)
    enhanced = ranked_head_attention(q, k, v, as_columns(prompt, image, image * (multiplier - 1), sinks),
                                     visible=visible.to(DEVICE), backend="triton")
    enhanced_probs = enhance_ranked_heads(probs, image, multiplier, sinks)
    assert_close(enhanced, attention_output(enhanced_probs, v), OUTPUT_ATOL[dtype])


def test_triton_custom_ops_pass_opcheck():
    """The custom ops that compiled decoding records: schemas, fakes (output shapes and dtypes) and dispatch."""
    from mmattn.kernels.triton.column_sets import column_sets_op, ranked_heads_op, sink_redistribution_op

    q, k, v, visible = inputs(torch.float32, seed=11)
    columns, visible = as_columns(40, *token_sets(2, 40, 45, 11, 0.3, 0.2, 0.1)), visible.to(DEVICE)
    torch.library.opcheck(column_sets_op.op, (q, k, v, columns, visible, 0.2))
    torch.library.opcheck(sink_redistribution_op.op, (q, k, v, columns, None, None, 0.2, 0.6, 0.5, 0.2))
    rows = q.expand(-1, -1, 3, -1).contiguous()
    torch.library.opcheck(sink_redistribution_op.op, (rows, k, v, columns, visible[:, None].expand(-1, 3, -1),
                                                      torch.ones(2, 3, dtype=torch.bool, device=DEVICE), 0.2, 0.6, 0.5,
                                                      0.2))
    torch.library.opcheck(ranked_heads_op.op, (q, k, v, columns, visible, 0.2, 1.5))


def test_bad_arguments_name_themselves():
    q, k, v, visible = inputs(torch.float32)
    columns, visible = as_columns(40, *token_sets(2, 40, 45, 0, 0.3, 0.3, 0.3)), visible.to(DEVICE)
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
    with pytest.raises(ValueError, match="out"):
        ranked_head_attention(q, k, v, columns, out=torch.empty_like(q, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        sink_redistribution_attention(q, k, v, columns, share=0.5, rho=0.5, min_mass=0.2, out=q.new_empty(2, 4, 2, 32))
    with pytest.raises(ValueError, match="columns"):
        ranked_head_attention(q, k, v, columns[..., :2].contiguous())
