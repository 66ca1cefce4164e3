"""Each intervention against an independent transcription of its official code (tests/vlm/official.py) on tiny
random models in fp32, over a prefill and three decoding steps: the decisions (sink sets, saliency multipliers,
kept tokens), the edited attention of the prefill (eager models: every edited (head, row) pair and its values), the
logits (within 1e-5; they agree to ~4e-7) and the greedy tokens.

The `gpu` tests run VAR and GIFT once through the fused decoding kernel on a CUDA GPU in bf16 (MMATTN_TEST_GPU=1).
"""

import copy
import inspect
import os

import pytest
import torch

from mmattn import vlm

from .official import FastVOfficial, GIFTOfficial, Official, PyramidDropOfficial, VAROfficial, VFlowOptOfficial
from .tiny_models import tiny_inputs, tiny_model, with_question

STEPS = 4  # the prefill and three decoding steps


def generate(model, inputs, intervention, read=None, backend="torch", use_cache=True):
    """mmattn's greedy run: (generate output, read(handle) after it, the prefill's attentions on eager models)."""
    with vlm.apply(model, intervention, backend=backend) as handle:
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, use_cache=use_cache)
        state = read(handle) if read else None
        eager = model.config.get_text_config()._attn_implementation == "eager"
        attentions = model(**inputs, output_attentions=True).attentions if eager else None
    return out, state, attentions


def assert_same_run(out, official: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    tokens, logits = official
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for step, (ours, theirs) in enumerate(zip(out.logits, logits)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=lambda text: f"step {step}: {text}")


def assert_same_attention(model, inputs, attentions, official: Official) -> None:
    """The prefill's probabilities after the edits, layer by layer, and which (head, row) pairs the edits touched
    (by more than rounding: GIFT's LLaMA code divides every row by its sum)."""
    if attentions is None:
        return
    plain = model(**inputs, output_attentions=True).attentions
    for layer, theirs in official.attentions.items():
        ours = attentions[layer]

        def edited(probs):
            return (probs - plain[layer]).abs().amax(-1) > 1e-6

        assert torch.equal(edited(ours), edited(theirs)), f"layer {layer}"
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def one_prompt(family, layers, impl, seed=0, question=False):
    model = tiny_model(family, layers, impl)
    inputs = tiny_inputs(model, prompts=1, seed=seed)
    return model, with_question(inputs) if question else inputs


# -- VAR ---------------------------------------------------------------------------------------------------------
#: Per tiny model (5 layers): sink dims and tau for which layer 3 has text sinks only, layers 2 and 4 visual ones.
VAR_SINKS = {"llava": ((29,), 1.179), "qwen2_vl": ((0,), 1.563)}
#: mmattn's settings (the paper's conventions) and the official code's (p kept, rho bounding the visual-sink share).
VAR_CASES = {
    "released": ({}, {}),  # VAR() vs A_exps/lv1.5_7b.yml as the code runs it: the last layer is edited too
    "p0.8-rho0.3": ({"p": 0.8, "rho": 0.3, "min_visual_mass": 0.1}, {"p": 0.2, "rho": 0.7, "summ": 0.1}),
    "last-layer-spared": ({"p": 0.5, "rho": 0.6, "min_visual_mass": 0.05, "except_last_layer": True},
                          {"p": 0.5, "rho": 0.4, "summ": 0.05, "except_last_layer": True}),
}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(VAR_SINKS))
@pytest.mark.parametrize("case", sorted(VAR_CASES))
def test_var_matches_the_official_code(case, family, impl):
    """Including a layer with text sinks but no visual sink, which the official head selection leaves alone."""
    ours, theirs = VAR_CASES[case]
    dims, tau = VAR_SINKS[family]
    model, inputs = one_prompt(family, 5, impl)
    official = VAROfficial(model, inputs, dims, tau=tau, **theirs)
    run = official.greedy(STEPS)
    text_only = official.sinks[3]
    assert len(text_only) and not torch.isin(text_only, official.image).any()
    out, sinks, attentions = generate(model, inputs, vlm.VAR(tau=tau, sink_dims=dims, **ours),
                                      read=lambda handle: handle.runtimes[0].sinks)
    for layer, found in sinks.items():
        assert torch.equal(found[0].nonzero().flatten(), official.sinks[layer]), f"layer {layer}"
    assert_same_attention(model, inputs, attentions, official)
    assert_same_run(out, run)


# -- GIFT --------------------------------------------------------------------------------------------------------
class _Tokenizer:
    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


def _odd_ids(tokens):
    """A word selector: the tokens of odd id are the informative ones."""
    return [int(token) % 2 == 1 for token in tokens]


#: (model, prompt seed, settings, whether the 3σ clamp is active, informative words picked by _odd_ids).
GIFT_CASES = {
    "llava-clamp": ("llava", 0, {"alpha": 3.0, "saliency_layers": (0,), "enhance_layers": (1, 2, 3)}, True, False),
    "llava-extra-pass": ("llava", 1, {"alpha": 5.0, "saliency_layers": (2,), "enhance_layers": (1, 3)}, True, False),
    "qwen-two-layers": ("qwen2_vl", 1, {"alpha": 4.0, "saliency_layers": (0, 1), "enhance_layers": (2, 3)}, True,
                        False),
    "llava-words": ("llava", 2, {"alpha": 2.0, "saliency_layers": (1,), "enhance_layers": (2, 3)}, False, True),
}


def _gift_multiplier_in_float64(model, inputs, settings, selected) -> torch.Tensor:
    """The official code's image multiplier on a float64 copy of the model: float32 runs are judged by their distance
    to it (the FlashAttention criterion's form: at most twice the official float32 run's, plus 1e-6)."""
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    official = GIFTOfficial(copy.deepcopy(model).double(), inputs, settings["saliency_layers"],
                            settings["enhance_layers"], settings["alpha"], selected)
    official.greedy(STEPS)
    return official.multiplier.double()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(GIFT_CASES))
def test_gift_matches_the_official_code(case, impl):
    family, seed, settings, clamped, words = GIFT_CASES[case]
    model, inputs = one_prompt(family, 4, impl, seed, question=True)
    selected, extra = None, {}
    if words:
        ids = inputs["input_ids"][0]
        last_image = int((ids == model.config.image_token_id).nonzero()[-1])
        query = ids[last_image + 3 : len(ids) - 5]  # the code's span [qs, qe] on LLaVA
        selected = (query % 2 == 1).nonzero().flatten().tolist()
        extra = {"tokenizer": _Tokenizer(), "word_selector": _odd_ids}
    official = GIFTOfficial(model, inputs, settings["saliency_layers"], settings["enhance_layers"], settings["alpha"],
                            selected)
    run = official.greedy(STEPS)
    assert official.clamped == clamped
    out, multiplier, attentions = generate(model, inputs, vlm.GIFT(**settings, **extra),
                                           read=lambda handle: handle.runtimes[0].multiplier[0, official.image])
    if impl == "eager":  # the official code's own route to the attention masses: the same float32 numbers
        torch.testing.assert_close(multiplier, official.multiplier, atol=0, rtol=1e-6)
    else:  # SDPA: the masses come by another float32 route; judged against the official code on a float64 model
        exact = _gift_multiplier_in_float64(model, inputs, settings, selected)
        err, official_err = (
            (m.double() - exact).abs().div(exact).max().item() for m in (multiplier, official.multiplier)
        )
        assert err <= 2 * official_err + 1e-6, f"multiplier: relative error {err:.3g}, official {official_err:.3g}"
    assert_same_attention(model, inputs, attentions, official)
    assert_same_run(out, run)


# -- token pruning -----------------------------------------------------------------------------------------------
def held(handle, layers) -> dict[int, torch.Tensor]:
    """The prompt positions each of `layers` holds (0: the decoder's input)."""
    call = handle.call
    return {layer: (call.lm_positions if layer == 0 else call.prompt_positions(layer))[0].clone() for layer in layers}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize(("k", "r", "cache"), [(1, 0.25, True), (2, 0.5, True), (3, 0.75, True), (2, 0.75, False)])
def test_fastv_matches_the_official_code(k, r, cache, family, impl):
    """The llava-hf fork: the KV-cache variant, and without a cache the inplace one (ranked again at every step)."""
    model, inputs = one_prompt(family, 4, impl)
    official = FastVOfficial(model, inputs, k, r, cache)
    run = official.greedy(STEPS)
    out, kept, _ = generate(model, inputs, vlm.FastV(k=k, ratio=r), read=lambda h: held(h, [k]), use_cache=cache)
    assert torch.equal(kept[k], official.kept)
    assert_same_run(out, run)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(("layers", "ratio", "ratio_list"), [
    ((1, 2, 3), 0.5, [0.5, 0.25, 0.125]),
    ((1, 2, 3), 0.7, [0.7, 0.49, 0.343]),  # 16 · 0.49 = 7.84 tokens: the code keeps 7
    ((2, 3), 0.6, [0.6, 0.36]),  # 9.6 and 5.76: 9 and 5
])
def test_pyramiddrop_matches_the_official_code(layers, ratio, ratio_list, impl):
    model, inputs = one_prompt("llava", 4, impl)
    official = PyramidDropOfficial(model, inputs, layers, ratio_list)
    run = official.greedy(STEPS)
    out, kept, _ = generate(model, inputs, vlm.PyramidDrop(layers=layers, ratio=ratio), read=lambda h: held(h, layers))
    for layer in layers:
        assert torch.equal(kept[layer], official.kept[layer]), f"layer {layer}"
    assert_same_run(out, run)


#: VFlowOpt settings (keep preset, cell m, entropy weight α_v, threshold t) and the preset's r_v and LLM ratios as
#: released, on the 4×4 grid of the tiny LLaVA, whose random ViT attends almost uniformly (received / mean in
#: [0.97, 1.04]), hence t near 1.
VFLOWOPT_CASES = {
    "cells-2.56": (0.5, 2.5, 0.0, 1.0, 0.7233, (0.7487, 0.487)),  # int(16 / 2.5²) = 2 tokens make way, not 3
    "entropy": (0.25, 2.0, 0.5, 1.01, 0.2651, (0.9833, 0.8773)),  # pixels < 0 quantised as the code's uint8 cast
    "negative-weights": (0.1, 1.5, -1.0, 0.99, 0.1166, (1.0, 0.6011)),  # importance < 0: weights over their sum
}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(VFLOWOPT_CASES))
def test_vflowopt_matches_the_official_code(case, impl):
    keep, cell, alpha_v, t, r_v, llm_r = VFLOWOPT_CASES[case]
    model, inputs = one_prompt("llava", 4, impl)
    intervention = vlm.VFlowOpt(keep=keep, cell=cell, entropy_weight=alpha_v, threshold=t, llm_layers=(2, 3))
    official = VFlowOptOfficial(model, inputs, 1, t, alpha_v, cell, r_v, (2, 3), llm_r)
    run = official.greedy(STEPS)
    out, (importance, kept), _ = generate(model, inputs, intervention, read=lambda h: (
        h.runtimes[0].importance[0, official.image].clone(), held(h, [0, 2, 3])))
    torch.testing.assert_close(importance, official.importance, atol=1e-7, rtol=1e-5)
    for layer, positions in kept.items():
        assert torch.equal(positions, official.kept[layer]), f"layer {layer}"
    assert_same_run(out, run)


# -- the fused decoding kernel on the GPU --------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("MMATTN_TEST_GPU") != "1",
                         reason="needs a CUDA GPU and MMATTN_TEST_GPU=1 (compiled Triton, bf16)")
#: bf16 tolerance on logits, as for the kernels: the error of mmattn's bf16 run (fused decoding rows) from the
#: official code in fp32 stays within twice that of the official code itself run in bf16, plus 2e-3.
BF16_SLACK = 2e-3


def sharpened(model, std: float):
    """`model` with q/k projections of std `std` (not 0.02): peaked attention, so that the heads GIFT ranks differ
    by more than bf16 can blur (the random tiny models attend almost uniformly)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.copy_(torch.randn(projection.weight.shape, generator=generator) * std)
    return model


def forced_logits(model, inputs, tokens, intervention, backend) -> list[torch.Tensor]:
    """mmattn's logits of the prefill and of each decoding step, decoding the given `tokens` [1, STEPS] by hand."""
    from transformers import DynamicCache

    keyword = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    cache, step_inputs, logits = DynamicCache(config=model.config.get_text_config()), inputs, []
    with torch.no_grad(), vlm.apply(model, intervention, backend=backend):
        for step in range(STEPS):
            logits.append(model(**step_inputs, **{keyword: cache}, use_cache=True).logits[:, -1].float())
            step_inputs = {"input_ids": tokens[:, step : step + 1]}
    return logits


def check_bf16(model, inputs, official, intervention, backend="triton", device="cuda") -> None:
    """mmattn in bf16 against `official(model, inputs)` in fp32 on the same (bf16-rounded) weights, every step
    decoding the reference's greedy tokens. The reference's decisions lie >= 2 % from their thresholds (a margin
    bf16 does not cross), and its edits move the logits by more than the tolerance (a no-op fails)."""
    low = copy.deepcopy(model).to(device, torch.bfloat16)
    model = copy.deepcopy(low).float()
    inputs = {name: value.to(device) for name, value in inputs.items()}
    low_inputs = {name: value.to(torch.bfloat16) if value.is_floating_point() else value
                  for name, value in inputs.items()}
    reference = official(model, inputs)
    tokens, expected = reference.greedy(STEPS)
    assert reference.margin > 0.02, f"a decision within {reference.margin:.2%} of its threshold"
    naive = official(low, low_inputs).greedy(STEPS, tokens)[1]
    plain = Official(model, inputs).greedy(STEPS, tokens)[1]
    ours = forced_logits(low, low_inputs, tokens, intervention, backend)

    def error(logits):
        return max(float((step - reference_step).abs().max()) for step, reference_step in zip(logits, expected))

    tolerance = 2 * error(naive) + BF16_SLACK
    assert error(ours) <= tolerance
    assert error(plain) > tolerance


#: GPU cases, on sharpened tiny models (q/k std 0.3) where the bf16 noise is a third or less of the edits' effect:
#: VAR "p0.8-rho0.3" with sink dims and tau found for them (phi >= 8 % from tau), GIFT with (model, prompt seed,
#: settings); the "llava-clamp" case has an active 3σ clamp.
VAR_GPU_SINKS = {"llava": ((10,), 1.717), "qwen2_vl": ((2,), 2.785)}
GIFT_GPU_CASES = {
    "llava-clamp": ("llava", 3, {"alpha": 4.0, "saliency_layers": (0,), "enhance_layers": (1, 2, 3)}),
    "llava-extra-pass": ("llava", 1, {"alpha": 4.0, "saliency_layers": (2,), "enhance_layers": (1, 3)}),
    "qwen": ("qwen2_vl", 0, {"alpha": 4.0, "saliency_layers": (1,), "enhance_layers": (2, 3)}),
}


@gpu
@pytest.mark.parametrize("family", sorted(VAR_GPU_SINKS))
def test_var_gpu_fused_bf16_matches_the_official_code(family, fused_launches):
    ours, theirs = VAR_CASES["p0.8-rho0.3"]
    dims, tau = VAR_GPU_SINKS[family]
    model, inputs = one_prompt(family, 5, "sdpa")
    check_bf16(sharpened(model, 0.3), inputs, lambda model, inputs: VAROfficial(model, inputs, dims, tau=tau, **theirs),
               vlm.VAR(tau=tau, sink_dims=dims, **ours))
    assert fused_launches


@gpu
@pytest.mark.parametrize("case", sorted(GIFT_GPU_CASES))
def test_gift_gpu_fused_bf16_matches_the_official_code(case, fused_launches):
    family, seed, settings = GIFT_GPU_CASES[case]
    model, inputs = one_prompt(family, 4, "sdpa", seed, question=True)
    check_bf16(sharpened(model, 0.3), inputs, lambda model, inputs: GIFTOfficial(
        model, inputs, settings["saliency_layers"], settings["enhance_layers"], settings["alpha"]),
        vlm.GIFT(**settings))
    assert fused_launches
