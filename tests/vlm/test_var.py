"""VAR against the paper's rules on synthetic attention rows, and sink detection on a tiny LLaVA."""

import pytest
import torch

from mmattn import vlm
from mmattn.vlm.attention import AttentionRows
from mmattn.vlm.interventions.base import CallState
from mmattn.vlm.interventions.var import sink_scores
from mmattn.vlm.layout import FAMILIES, TokenLayout

from ..kernels.column_set_oracle import redistribute_sinks
from .tiny_models import llava_inputs, tiny_llava

P, IMAGE = 10, slice(2, 7)  # prompt of 10 tokens, image tokens 2..6, BOS at 0


def runtime_with_sinks(p, rho=0.5, planted=((0, 3),), min_visual_mass=0.2):
    """VAR's runtime after detecting sinks at layer 2 on hidden states with the `planted` sinks per prompt (by
    default one prompt: BOS (0), a text sink, and image token 3, a visual sink)."""
    model = tiny_llava()
    handle = vlm.apply(model, vlm.VAR(p=p, rho=rho, min_visual_mass=min_visual_mass, tau=2.0, sink_dims=(0,)))
    runtime = handle.runtimes[0]
    image = torch.zeros(len(planted), P, dtype=torch.bool)
    image[:, IMAGE] = True
    layout = TokenLayout(image=image, query=torch.zeros_like(image), valid=torch.ones_like(image),
                         input_ids=torch.zeros(len(planted), P, dtype=torch.long))
    call = CallState(layout=layout, lm_positions=torch.arange(P).expand(len(planted), -1))
    runtime.start_call(call)
    hidden = torch.ones(len(planted), P, 32)
    sinks = torch.zeros(len(planted), P, dtype=torch.bool)
    for row, tokens in enumerate(planted):
        hidden[row, list(tokens), 0] = 100.0  # phi = 100 / RMS > tau
        sinks[row, list(tokens)] = True
    runtime.before_layer(2, hidden, call)
    assert torch.equal(runtime.sinks[2], sinks)
    return handle, runtime


def test_redistribution_is_the_var_edit_of_the_explicit_rows():
    """Head 0 is image-centric, head 1's image mass sits on the visual sink (3), head 2 barely sees the image; the
    BOS (0) is a text sink, whose attention is reduced too."""
    handle, runtime = runtime_with_sinks(p=0.6)
    torch.manual_seed(0)
    probs = torch.rand(1, 4, 2, P).softmax(-1)
    probs[0, 0, :, IMAGE] *= 10
    probs[0, 1, :, 3] *= 50
    probs[0, 2, :, IMAGE] *= 0.01
    probs = probs / probs.sum(-1, keepdim=True)
    before = probs.clone()
    image, sinks = torch.zeros(2, 1, P, dtype=torch.bool)
    image[:, IMAGE], sinks[:, [0, 3]] = True, True
    expected, centric = redistribute_sinks(probs.double(), image, sinks, share=0.6, rho=0.5, min_mass=0.2)
    assert centric[0, 0].all() and not centric[0, 1:3].any()
    runtime.on_attention(AttentionRows(2, probs, torch.ones(1, 2, dtype=torch.bool), P))
    torch.testing.assert_close(probs, expected.float())
    assert torch.equal(probs[~centric], before[~centric])  # rows left alone keep their bits
    handle.remove()


def test_a_prompt_without_a_visual_sink_in_a_layer_keeps_its_attention():
    """The official head selection needs a visual sink: where a prompt has text sinks only (BOS), its rows keep
    their attention in that layer (every bit), while the other prompt of the batch is edited; so do all rows of a
    layer without visual sinks in any prompt (decided on the device: the prefill reads nothing back per layer)."""
    handle, runtime = runtime_with_sinks(p=0.6, rho=0.0, planted=((0, 3), (0,)), min_visual_mass=0.0)
    torch.manual_seed(0)
    probs = torch.rand(2, 4, 2, P).softmax(-1)
    before = probs.clone()
    runtime.on_attention(AttentionRows(2, probs, None, P))
    assert not torch.equal(probs[0], before[0])
    assert torch.equal(probs[1], before[1])
    handle.remove()
    handle, runtime = runtime_with_sinks(p=0.6, planted=((0,), (0, 8)))
    probs = torch.rand(2, 4, 2, P).softmax(-1)
    before = probs.clone()
    runtime.on_attention(AttentionRows(2, probs, None, P))
    assert torch.equal(probs, before)
    handle.remove()


def test_sink_score_is_weightless_rms_ratio():
    hidden = torch.tensor([[[30.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]])
    rms = torch.sqrt((hidden**2).mean(-1) + 1e-6)
    torch.testing.assert_close(sink_scores(hidden, [0]), hidden[..., 0].abs() / rms)


@pytest.mark.parametrize(("except_last_layer", "layers"), [(False, [2, 3, 4]), (True, [2, 3])])
def test_detection_runs_from_layer_two_in_prefill_only_and_flags_planted_dims(except_last_layer, layers):
    """Layers 2..L-1 by default, as the released code runs (its flag to spare the last layer is dead)."""
    model = tiny_llava(layers=5)
    inputs = llava_inputs(model)
    with vlm.apply(model, vlm.VAR(tau=0.0, sink_dims=(5,), except_last_layer=except_last_layer)) as handle:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        sinks = handle.runtimes[0].sinks
        assert sorted(sinks) == layers
        assert all(mask[inputs["attention_mask"].bool()].all() for mask in sinks.values())  # tau 0: all tokens


def test_find_sink_dims_finds_a_planted_massive_dimension():
    model = tiny_llava(layers=4)
    inputs = llava_inputs(model)
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(32))
        model.model.language_model.layers[1].mlp.down_proj.bias[17] = 500.0
    assert vlm.find_sink_dims(model, inputs, top=1) == [17]


def test_family_table_covers_the_issue_models():
    assert {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"} <= set(FAMILIES)
