"""VAR against the paper's rules on synthetic attention rows, and sink detection on a tiny LLaVA."""

import torch

from mmattn import vlm
from mmattn.vlm.attention import AttentionRows
from mmattn.vlm.interventions.base import CallState
from mmattn.vlm.interventions.var import sink_scores
from mmattn.vlm.layout import FAMILIES, TokenLayout

from .tiny_models import llava_inputs, tiny_llava

P, IMAGE = 10, slice(2, 7)  # prompt of 10 tokens, image tokens 2..6, BOS at 0


def runtime_with_sinks(p, rho=0.5):
    """VAR's runtime after detecting sinks at layer 2 on planted hidden states: BOS (0) and image token 3."""
    model = tiny_llava()
    handle = vlm.apply(model, vlm.VAR(p=p, rho=rho, tau=2.0, sink_dims=(0,)))
    runtime = handle.runtimes[0]
    image = torch.zeros(1, P, dtype=torch.bool)
    image[0, IMAGE] = True
    layout = TokenLayout(image=image, query=torch.zeros_like(image), valid=torch.ones_like(image),
                         input_ids=torch.zeros(1, P, dtype=torch.long))
    call = CallState(layout=layout, lm_positions=torch.arange(P)[None])
    runtime.start_call(call)
    hidden = torch.ones(1, P, 32)
    hidden[0, [0, 3], 0] = 100.0  # phi = 100 / RMS > tau: a text sink (BOS) and a visual sink
    runtime.before_layer(2, hidden, call)
    sinks = torch.zeros(1, P, dtype=torch.bool)
    sinks[0, [0, 3]] = True
    assert torch.equal(runtime.sinks[2], sinks)
    return handle, runtime


def test_redistribution_preserves_rows_and_moves_p_of_sink_mass_to_image_tokens():
    handle, runtime = runtime_with_sinks(p=0.6)
    torch.manual_seed(0)
    probs = torch.rand(1, 4, 2, P).softmax(-1)
    probs[0, 0, :, IMAGE] *= 10  # head 0: image-centric
    probs[0, 1, :, 3] *= 50  # head 1: the visual sink dominates the image mass
    probs[0, 2, :, IMAGE] *= 0.01  # head 2: too little attention on the image
    probs = probs / probs.sum(-1, keepdim=True)
    before = probs.clone()
    runtime.on_attention(AttentionRows(2, probs, torch.ones(1, 2, dtype=torch.bool), P))
    torch.testing.assert_close(probs.sum(-1), before.sum(-1))
    visual = before[..., IMAGE].sum(-1)
    receivers = visual - before[..., 3]
    chosen = (receivers >= 0.5 * visual) & (visual >= 0.2)
    assert chosen[0, 0].all() and not chosen.all()
    for head in range(4):
        for row in range(2):
            new, old = probs[0, head, row], before[0, head, row]
            if not chosen[0, head, row]:
                assert torch.equal(new, old)
                continue
            torch.testing.assert_close(new[[0, 3]], 0.4 * old[[0, 3]])
            assert torch.equal(new[[1, 7, 8, 9]], old[[1, 7, 8, 9]])  # text tokens gain nothing
            gain = new[[2, 4, 5, 6]] - old[[2, 4, 5, 6]]
            torch.testing.assert_close(gain.sum(), 0.6 * old[[0, 3]].sum())
            torch.testing.assert_close(gain / old[[2, 4, 5, 6]], gain[:1].expand(4) / old[2])  # ∝ a_j
    handle.remove()


def test_sink_score_is_weightless_rms_ratio():
    hidden = torch.tensor([[[30.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]])
    rms = torch.sqrt((hidden**2).mean(-1) + 1e-6)
    torch.testing.assert_close(sink_scores(hidden, [0]), hidden[..., 0].abs() / rms)


def test_detection_runs_from_layer_two_in_prefill_only_and_flags_planted_dims():
    model = tiny_llava(layers=5)
    inputs = llava_inputs(model)
    with vlm.apply(model, vlm.VAR(tau=0.0, sink_dims=(5,))) as handle:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        sinks = handle.runtimes[0].sinks
        assert sorted(sinks) == [2, 3]  # layers 2..L-2: the last layer is left alone
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
