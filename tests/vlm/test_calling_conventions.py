"""The hooks under every calling convention of the supported transformers releases (5.17 to the newest): the KV cache
passed as `past_key_values` (before 5.24; a deprecated alias after) or as `cache` (5.24 on), by keyword or by
position, and images encoded by `generate` before the prefill (5.24 on) or inside it."""

import copy
import inspect

import pytest
import torch
from transformers import DynamicCache, LlavaForConditionalGeneration

from mmattn import vlm

from .tiny_models import MODEL_TYPES, tiny_inputs, tiny_llava, tiny_model

#: Each keyword the installed transformers takes for the cache; `cache` from 5.24 on.
CACHE_KEYWORDS = [
    "past_key_values",
    pytest.param("cache", marks=pytest.mark.skipif(
        "cache" not in inspect.signature(LlavaForConditionalGeneration.forward).parameters,
        reason="transformers < 5.24 has no `cache` keyword")),
]
STEPS = 4


def edits(family: str) -> tuple[vlm.Intervention, ...]:
    """Interventions that change the output at every step: VAR edits the decoded rows, PyramidDrop the cache."""
    positions = "keep" if family.startswith("qwen") else "reindex"
    return (vlm.VAR(p=0.9, tau=0.5, rho=0.0, min_visual_mass=0.0, sink_dims=(0, 1)),
            vlm.PyramidDrop(layers=(1, 2), ratio=0.5, positions=positions))


def greedy_by_hand(model, inputs: dict, keyword: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding through one model(...) call per token, the cache passed as `keyword`: (tokens, logits)."""
    cache = DynamicCache(config=model.config.get_text_config())
    step_inputs, tokens, logits = inputs, [], []
    for _ in range(STEPS):
        last = model(**step_inputs, **{keyword: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        logits.append(last)
        tokens.append(last.argmax(-1, keepdim=True))
        step_inputs = {"input_ids": tokens[-1]}  # no padding: positions and mask follow from the cache
    return torch.cat(tokens, 1), logits


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
@pytest.mark.parametrize("family", MODEL_TYPES)
def test_decoding_by_hand_with_either_cache_keyword_equals_generate(family, keyword):
    """Decoding steps are told from prompts by the cache, under either keyword: a step taken for a new prompt would
    fail (no image token) or prune again. One prompt without padding, so generate's positions are the default ones."""
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    with vlm.apply(model, *edits(family)):
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        tokens, logits = greedy_by_hand(model, inputs, keyword)
    assert torch.equal(tokens, out.sequences[:, -STEPS:])
    for by_hand, generated in zip(logits, out.logits):
        assert torch.equal(by_hand, generated)
    plain = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    assert all(not torch.equal(edited, unedited) for edited, unedited in zip(out.logits, plain.logits))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_a_cache_passed_by_position_is_a_decoding_step(keyword):
    """The inner model called positionally (input_ids, pixel_values, attention_mask, position_ids, cache) decodes as
    when the cache comes by keyword."""
    model = tiny_llava(image_tokens=16)
    inputs = tiny_inputs(model)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad(), vlm.apply(model, *edits("llava")):
        token = model(**inputs, **{keyword: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        by_keyword = model.model(input_ids=token, attention_mask=mask, **{keyword: copy.deepcopy(cache)})
        by_position = model.model(token, None, mask, None, cache)
    assert torch.equal(by_position.last_hidden_state, by_keyword.last_hidden_state)


def test_vflowopt_with_expanded_generation_equals_one_sequence():
    """num_return_sequences repeats each prompt; the ViT importance follows, whether generate encodes the images
    before repeating them (transformers 5.24 on) or the model encodes the repeated pixels."""
    model = tiny_llava(layers=4, image_tokens=16)
    inputs = tiny_inputs(model, prompts=2, pad=(1,))
    with vlm.apply(model, vlm.VFlowOpt(keep=0.25, llm_layers=(2, 3), cell=2.0)):
        single = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        repeated = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=1, num_return_sequences=2)
    assert torch.equal(repeated, single.repeat_interleave(2, 0))
