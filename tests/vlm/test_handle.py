"""apply/remove on tiny random models of every supported family: identity settings, bit-identical removal, batching,
errors."""

import pytest
import torch

from mmattn import vlm
from mmattn.vlm.interventions.divprune import DivPrune
from mmattn.vlm.interventions.random_prune import RandomPrune

from .tiny_models import MODEL_TYPES, llava_inputs, tiny_inputs, tiny_llava, tiny_model, tiny_qwen2vl, with_question

IDENTITY = {
    "VAR": vlm.VAR(p=0.0, tau=0.5, rho=0.0, min_visual_mass=0.0, sink_dims=(0, 1), except_last_layer=False),
    "GIFT": vlm.GIFT(alpha=0.0, beta=1.0, saliency_layers=(1,), enhance_layers=(2, 3)),
    # the saliency layer follows an enhancement layer: an extra prefill of the decoder, which leaves the cache alone
    "GIFT-extra-pass": vlm.GIFT(alpha=0.0, beta=1.0, saliency_layers=(2,), enhance_layers=(1, 3)),
    "FastV": vlm.FastV(k=2, ratio=0.0),
    # keeping every image token before the LLM: the decoder input passes through the engine (and, on Qwen3-VL,
    # DeepStack's additions through its own copy of them) unchanged
    "DivPrune": DivPrune(keep=1.0),
    "Random": RandomPrune(keep=1.0, layer=1),
}


def generate(model, inputs, **kwargs):
    kwargs.setdefault("do_sample", False)
    return model.generate(**inputs, max_new_tokens=6, **kwargs)


def split(inputs, row, family):
    if family.startswith("qwen") or family in ("internvl", "gemma3"):  # several patch rows / images per prompt
        per_image = inputs["pixel_values"].shape[0] // inputs["input_ids"].shape[0]
        rows = {k: v[row : row + 1] for k, v in inputs.items() if k != "pixel_values"}
        rows["pixel_values"] = inputs["pixel_values"][row * per_image : (row + 1) * per_image]
    else:
        rows = {k: v[row : row + 1] for k, v in inputs.items()}
    keep = rows["attention_mask"][0].bool()
    return {k: (v[:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids") else v) for k, v in rows.items()}


def edited_batch(family: str, attn_implementation: str = "eager", layers: int = 4):
    """A tiny model and two left-padded prompts on which every intervention of INTERVENTIONS edits something: 14 or
    16 image tokens (4 give GIFT a constant saliency map, M = 1) and a 10-token question after each image."""
    model = tiny_model(family, layers, attn_implementation)
    return model, with_question(tiny_inputs(model, prompts=2, pad=(2,)))


@pytest.mark.parametrize("family", MODEL_TYPES)
@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_identity_settings_match_no_hook_bit_for_bit(name, family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, prompts=2, pad=(2,))
    logits, tokens = model(**inputs).logits, generate(model, inputs)
    with vlm.apply(model, IDENTITY[name]):
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(generate(model, inputs), tokens)


def test_no_edit_sdpa_matches_within_float_tolerance():
    model = tiny_llava(attn_implementation="sdpa")
    inputs = llava_inputs(model, prompts=2, pad=(2,))
    logits = model(**inputs).logits
    with vlm.apply(model, IDENTITY["VAR"]):
        torch.testing.assert_close(model(**inputs).logits, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_remove_restores_bit_identical_outputs(impl):
    model = tiny_llava(attn_implementation=impl)
    inputs = llava_inputs(model, prompts=2, pad=(1,))
    logits = model(**inputs).logits
    handle = vlm.apply(model, vlm.VAR(p=0.9, tau=0.5, rho=0.0, min_visual_mass=0.0, sink_dims=(0,)), vlm.FastV(k=1))
    assert not torch.equal(model(**inputs).logits[:, -1], logits[:, -1])
    handle.remove()
    assert model.config.text_config._attn_implementation == impl
    assert torch.equal(model(**inputs).logits, logits)
    from transformers import AttentionInterface

    assert handle.attention_name not in AttentionInterface._global_mapping


INTERVENTIONS = {
    "VAR": lambda: vlm.VAR(p=0.6, tau=1.0, rho=0.0, min_visual_mass=0.0, sink_dims=(0, 1)),
    "GIFT": lambda: vlm.GIFT(alpha=4.0, saliency_layers=(1,), enhance_layers=(0, 2)),
    "FastV": lambda: vlm.FastV(k=1, ratio=0.5),
    "PyramidDrop": lambda: vlm.PyramidDrop(layers=(1, 2), ratio=0.5, positions="keep"),
    "DivPrune": lambda: DivPrune(keep=0.5),
    "Random": lambda: RandomPrune(keep=0.5, seed=1),
}


@pytest.mark.parametrize("family", MODEL_TYPES)
@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_batched_generation_equals_per_prompt_generation(family, name):
    model, inputs = edited_batch(family)
    with vlm.apply(model, INTERVENTIONS[name]()):
        batched = generate(model, inputs)[:, inputs["input_ids"].shape[1] :]
        for row in range(2):
            prompt = split(inputs, row, family)
            single = generate(model, prompt)[0, prompt["input_ids"].shape[1] :]
            # a prompt that ends at EOS stops; its batched row is padded after that
            assert torch.equal(single, batched[row, : len(single)])


def test_sampling_and_state_reset_between_calls():
    model = tiny_llava()
    first, second = llava_inputs(model, seed=1), llava_inputs(model, seed=2)
    with vlm.apply(model, INTERVENTIONS["GIFT"]()) as handle:
        torch.manual_seed(0)
        sampled = generate(model, first, do_sample=True, top_k=5)
        generate(model, second)
        layout_second = handle.call.layout.input_ids.clone()
        torch.manual_seed(0)
        assert torch.equal(generate(model, first, do_sample=True, top_k=5), sampled)
    assert torch.equal(layout_second, second["input_ids"])


def test_unsupported_family_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type='llama'"):
        vlm.apply(text_only, vlm.FastV())


def test_prompt_without_image_tokens_is_rejected():
    model = tiny_llava()
    inputs = llava_inputs(model)
    no_image = {"input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == 99, 5),
                "attention_mask": inputs["attention_mask"]}
    with vlm.apply(model, vlm.FastV(k=1)), pytest.raises(ValueError, match="no image token"):
        model(**no_image)


BAD_SETTINGS = [  # (settings class, arguments, error, message)
    (vlm.FastV, {"k": -1}, ValueError, r"k: expected the layer K .* in \[1, inf\), got -1"),
    (vlm.FastV, {"k": 2.5}, TypeError, r"k: expected the layer K .*, got 2.5"),
    (vlm.FastV, {"ratio": 1.5}, ValueError, r"ratio: expected the pruned fraction R in \[0.0, 1.0\], got 1.5"),
    (vlm.FastV, {"ratio": "half"}, TypeError, r"ratio: expected .*, got 'half'"),
    (vlm.PyramidDrop, {"layers": (16, 8)}, ValueError,
     r"layers: expected a sequence of strictly ascending layer indices >= 1, got \[16, 8\]"),
    (vlm.PyramidDrop, {"layers": ()}, ValueError, "layers: expected at least one stage layer, got none"),
    (vlm.PyramidDrop, {"ratio": 0.0}, ValueError, r"ratio: expected λ in \(0.0, 1.0\], got 0.0"),
    (vlm.PyramidDrop, {"positions": "shift"}, ValueError, r"positions: expected one of \('keep', 'reindex'\), got"),
    (vlm.VFlowOpt, {"keep": 0.3}, ValueError, r"keep: expected a preset in \[0.1, 0.25, 0.5\], got 0.3"),
    (vlm.VFlowOpt, {"vit_ratio": 1.5}, ValueError, r"vit_ratio: expected .*, got 1.5"),
    (vlm.VFlowOpt, {"llm_ratios": (0.5, 2.0)}, ValueError, r"llm_ratios: expected .*, got 2.0"),
    (vlm.VFlowOpt, {"llm_ratios": (0.5,)}, ValueError, r"llm_ratios: expected one ratio per llm layer \(9, 18\)"),
    (vlm.VFlowOpt, {"cell": 0.5}, ValueError, r"cell: expected .* in \[1.0, inf\), got 0.5"),
    (vlm.VFlowOpt, {"llm_layers": (0, 9)}, ValueError, r"llm_layers: .* >= 1, got \[0, 9\]"),
    (vlm.VAR, {"p": 1.5}, ValueError, r"p: expected a number in \[0.0, 1.0\], got 1.5"),
    (vlm.VAR, {"min_visual_mass": -0.1}, ValueError, r"min_visual_mass: .*, got -0.1"),
    (vlm.VAR, {"tau": -1.0}, ValueError, r"tau: expected .* in \[0.0, inf\), got -1.0"),
    (vlm.VAR, {"sink_dims": (3, -1)}, ValueError, r"sink_dims: .* >= 0, got \[3, -1\]"),
    (vlm.GIFT, {"alpha": -1.0}, ValueError, r"alpha: expected .* in \[0.0, inf\), got -1.0"),
    (vlm.GIFT, {"beta": "1"}, TypeError, r"beta: expected .*, got '1'"),
    (vlm.GIFT, {"saliency_layers": ()}, ValueError, "saliency_layers: expected at least one layer, got none"),
    (vlm.GIFT, {"enhance_layers": (2, -1)}, ValueError, r"enhance_layers: .* >= 0, got \[2, -1\]"),
]


@pytest.mark.parametrize(("settings", "arguments", "error", "message"), BAD_SETTINGS,
                         ids=[f"{cls.__name__}-{'-'.join(args)}" for cls, args, *_ in BAD_SETTINGS])
def test_settings_are_checked_when_made(settings, arguments, error, message):
    """Not at apply(): the error names the argument, the expected and the received value."""
    with pytest.raises(error, match=message):
        settings(**arguments)


def test_bad_arguments_name_themselves():
    model = tiny_llava()
    with pytest.raises(ValueError, match="sink_dims"):
        vlm.apply(model, vlm.VAR())  # a 32-wide llama has no known sink dims
    with pytest.raises(ValueError, match="k: layer 9 >= the model's 4 layers"):
        vlm.apply(model, vlm.FastV(k=9))
    with pytest.raises(ValueError, match=r"saliency_layers: expected layers in \[0, 4\), got \[4\]"):
        vlm.apply(model, vlm.GIFT(saliency_layers=(4,), enhance_layers=(1,)))
    with pytest.raises(TypeError, match="interventions"):
        vlm.apply(model, "FastV")
    with pytest.raises(ValueError, match="backend"):
        vlm.apply(model, vlm.FastV(k=1), backend="cuda")
    with pytest.raises(ValueError, match="positions"):
        vlm.apply(tiny_qwen2vl(), vlm.PyramidDrop(layers=(1,), positions="reindex"))


@pytest.mark.parametrize("family", [family for family in MODEL_TYPES if family not in ("llava", "gemma3")])
def test_vflowopt_names_the_models_it_supports(family):
    with pytest.raises(ValueError, match=f"model: .* model_type 'llava' .*; got model_type '{family}'"):
        vlm.apply(tiny_model(family), vlm.VFlowOpt(llm_layers=(1, 2)))


def test_a_second_apply_is_refused_until_the_first_handle_is_removed():
    """Two live handles would restore each other's attention function out of order."""
    model, inputs = edited_batch("llava")
    logits = model(**inputs).logits
    first = vlm.apply(model, INTERVENTIONS["FastV"]())
    pruned = model(**inputs).logits
    with pytest.raises(ValueError, match=r"model: already has mmattn interventions applied; remove\(\) their"):
        vlm.apply(model, INTERVENTIONS["VAR"]())
    assert torch.equal(model(**inputs).logits, pruned)  # the refused apply left the first handle as it was
    first.remove()
    with vlm.apply(model, INTERVENTIONS["VAR"]()):
        assert not torch.equal(model(**inputs).logits[:, -1], logits[:, -1])
    assert torch.equal(model(**inputs).logits, logits)


@pytest.mark.parametrize(("name", "hooked"), [("GIFT", False), ("GIFT-extra-pass", True), ("VAR", True),
                                              ("FastV", True)])
def test_decoder_layers_are_hooked_only_where_an_intervention_observes_them(name, hooked):
    """A module hook costs every decoder layer call of every decoding step: GIFT without its extra saliency pass reads
    no layer input, VAR (its sinks) and pruning (the shortened sequence) do."""
    model, _ = edited_batch("llava")
    layers = model.model.language_model.layers
    with vlm.apply(model, IDENTITY[name]):
        assert all(bool(layer._forward_pre_hooks) == hooked for layer in layers)
    assert not any(layer._forward_pre_hooks for layer in layers)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", ["VAR", "GIFT"])
def test_sdpa_models_edit_the_same_rows_as_eager_ones(name, family):
    """Over SDPA the edited rows are recomputed explicitly (decode rows without SDPA, keys shared by their query
    heads): generation and logits agree with the eager path, with left padding and grouped-query attention."""
    results = []
    for impl in ("eager", "sdpa"):
        model, inputs = edited_batch(family, impl)
        with vlm.apply(model, INTERVENTIONS[name]()):
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        results.append(out)
    eager, sdpa = results
    assert torch.equal(eager.sequences, sdpa.sequences)
    for step_eager, step_sdpa in zip(eager.logits, sdpa.logits):
        torch.testing.assert_close(step_sdpa, step_eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", ["VAR", "GIFT"])
def test_fused_rows_match_the_explicit_path(name, family, fused_launches):
    """The edited rows' column-set kernels (Triton; interpreted on the CPU) generate what the explicit fp32
    probabilities do, with left padding and grouped-query attention: every decode row, and VAR's prompt rows after
    the image (causal, selected per batch row) in the prefill."""
    model, inputs = edited_batch(family, "sdpa")

    def generate_logits():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)

    plain = generate_logits()
    results = []
    for backend in ("torch", "triton"):
        with vlm.apply(model, INTERVENTIONS[name](), backend=backend):
            results.append(generate_logits())
    # VAR edits layers 2 and 3 of 4 (by default the last one too, as the released code) in the prefill's prompt rows
    # and the 3 decode steps; GIFT layers 0 and 2 there and at the last prompt row
    assert len(fused_launches) == 8
    explicit, fused = results
    assert max((f - p).abs().max() for f, p in zip(fused.logits[1:], plain.logits[1:])) > 1e-3  # decode rows edited
    assert torch.equal(explicit.sequences, fused.sequences)
    for step_explicit, step_fused in zip(explicit.logits, fused.logits):
        torch.testing.assert_close(step_fused, step_explicit, atol=1e-5, rtol=0)
