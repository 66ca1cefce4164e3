"""Qwen3-VL (dense, MoE), InternVL3 and Gemma 3: token layouts, KV lengths under pruning, DeepStack features that
follow the pruned tokens, Gemma 3's bidirectional and sliding-window masks."""

import pytest
import torch

from mmattn import vlm
from mmattn.vlm.interventions.divprune import DivPrune
from mmattn.vlm.interventions.random_prune import RandomPrune
from mmattn.vlm.layout import resolve_family

from .test_pruning import cache_lengths, recorder
from .tiny_models import (
    GEMMA_IMAGE_ID,
    INTERNVL_IMAGE_ID,
    QWEN_IMAGE_ID,
    bracketed_inputs,
    tiny_gemma3,
    tiny_inputs,
    tiny_model,
)

NEW = ("qwen3_vl", "qwen3_vl_moe", "internvl", "gemma3")
#: Image tokens per prompt, by hand: Qwen3-VL an 8x8 patch grid merged 2x2 -> 16; InternVL a 4x4-patch tile
#: pixel-shuffled 2x2 -> 4, Gemma 3 4x4 patches pooled 2x2 -> 4, two images per prompt each.
IMAGE_TOKENS = {"qwen3_vl": 16, "qwen3_vl_moe": 16, "internvl": 8, "gemma3": 8}
IMAGE_IDS = {"qwen3_vl": QWEN_IMAGE_ID, "qwen3_vl_moe": QWEN_IMAGE_ID, "internvl": INTERNVL_IMAGE_ID,
             "gemma3": GEMMA_IMAGE_ID}


@pytest.mark.parametrize("family", NEW)
def test_layout_finds_every_image_span_by_the_configs_image_token(family):
    model = tiny_model(family)
    spec, token_id = resolve_family(model)
    assert token_id == IMAGE_IDS[family]
    inputs = tiny_inputs(model, prompts=2, pad=(2,))
    layout = vlm.TokenLayout.from_input_ids(inputs["input_ids"], inputs["attention_mask"], token_id, spec)
    assert layout.image_counts.tolist() == [IMAGE_TOKENS[family]] * 2
    runs = torch.diff(layout.image[0].int()).eq(1).sum().item()  # image runs starting in row 0
    assert runs == (1 if family.startswith("qwen") else 2)


def _dropped(family, intervention_name):
    n = IMAGE_TOKENS[family]
    return {
        "FastV": [0] + [n - round(n * 0.5)] * 3,  # k = 1
        "PyramidDrop": [0, n - int(n * 0.5), n - int(n * 0.25), n - int(n * 0.25)],  # layers 1, 2
        "DivPrune": [n - round(n * 0.5)] * 4,  # before the LLM
        "Random": [0, 0] + [n - round(n * 0.25)] * 2,  # from layer 2
    }[intervention_name]


PRUNERS = {
    "FastV": lambda: vlm.FastV(k=1, ratio=0.5),
    "PyramidDrop": lambda: vlm.PyramidDrop(layers=(1, 2), ratio=0.5, positions="keep"),
    "DivPrune": lambda: DivPrune(keep=0.5),
    "Random": lambda: RandomPrune(keep=0.25, layer=2, seed=5),
}


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_pruning_shortens_every_later_layers_kv_cache(family, name):
    model = tiny_model(family)
    inputs = tiny_inputs(model, prompts=2, pad=(2,))
    full, plain = cache_lengths(model, inputs)
    with vlm.apply(model, PRUNERS[name]()):
        pruned, out = cache_lengths(model, inputs)
    assert [f - p for f, p in zip(full, pruned)] == _dropped(family, name)
    assert out.sequences.shape == plain.sequences.shape


def _recording_decoder_input(model, store):
    return model.model.language_model.register_forward_pre_hook(
        recorder(store, "kwargs", lambda a, kw: dict(kw)), with_kwargs=True, prepend=True)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_deepstack_features_follow_the_tokens_kept_before_the_llm(family):
    """Oracle: transformers' own decoder run on the kept tokens by hand, with their positions, the DeepStack
    positions and feature rows of the kept image tokens."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, prompts=2, pad=(2,))
    seen = {}
    with torch.no_grad(), vlm.apply(model, DivPrune(keep=0.25)) as handle:
        hook = _recording_decoder_input(model, seen)
        logits = model(**inputs).logits
        hook.remove()
        kept = handle.call.lm_positions
    given = seen["kwargs"]
    image = inputs["input_ids"] == QWEN_IMAGE_ID
    assert len(given["deepstack_visual_embeds"]) == 2  # vision blocks 0 and 1 feed decoder layers 0 and 1
    kept_image = image.gather(1, kept)
    assert kept_image.sum(1).tolist() == [4, 4]
    flags = torch.zeros_like(image).scatter_(1, kept, True)[image]  # which rows of the feature lists remain
    positions = given["position_ids"]
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=given["inputs_embeds"].gather(1, kept[..., None].expand(-1, -1, 32)),
            attention_mask=given["attention_mask"].gather(1, kept),
            position_ids=positions.gather(-1, kept.expand(positions.shape[0], -1, -1)),
            visual_pos_masks=kept_image,
            deepstack_visual_embeds=[features[flags] for features in given["deepstack_visual_embeds"]],
            use_cache=False,
        ).last_hidden_state
        expected = model.lm_head(hidden)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_deepstack_features_follow_the_tokens_pruned_inside_the_decoder(family):
    """FastV at layer 1 prunes between DeepStack's additions after layers 0 and 1: the second one lands on the kept
    image tokens only (the decoder would fail on a full-length mask otherwise), and agrees with adding it by hand."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, prompts=2, pad=(2,))
    seen, layer2 = {}, {}
    with torch.no_grad(), vlm.apply(model, vlm.FastV(k=1, ratio=0.5)) as handle:
        hook = _recording_decoder_input(model, seen)
        entering = model.model.language_model.layers[1].register_forward_hook(
            lambda module, args, output: layer2.setdefault("out", output))
        after = model.model.language_model.layers[2].register_forward_pre_hook(
            recorder(layer2, "in", lambda a, kw: a[0]), with_kwargs=True)
        model(**inputs)
        for h in (hook, entering, after):
            h.remove()
        keep = handle.call.keep[1]
    image = (inputs["input_ids"] == QWEN_IMAGE_ID).gather(1, keep)
    flags = torch.zeros_like(inputs["input_ids"], dtype=torch.bool).scatter_(1, keep, True)[
        inputs["input_ids"] == QWEN_IMAGE_ID]
    expected = layer2["out"].clone()
    expected[image] += seen["kwargs"]["deepstack_visual_embeds"][1][flags]
    assert torch.equal(layer2["in"], expected)


@pytest.mark.parametrize("pruner", ["FastV", "DivPrune"])
def test_gemma3_pruned_layers_see_the_plain_masks_at_the_kept_tokens(pruner):
    """A sliding window (5) shorter than the prompt and the bidirectional image blocks: the masks a pruned layer
    receives (sliding layers 0 and 2, global layer 3) are the plain ones restricted to its kept rows and columns
    (FastV from layer 2 on, DivPrune before the LLM)."""
    model = tiny_gemma3(layers=4, sliding_window=5)
    inputs = bracketed_inputs(model, prompts=2, pad=(2,), images=2)
    plain, pruned = {}, {}
    layers = (2, 3) if pruner == "FastV" else (0, 2, 3)

    def record(store):
        return [model.model.language_model.layers[i].register_forward_pre_hook(
            recorder(store, i, lambda a, kw: kw["attention_mask"]), with_kwargs=True) for i in layers]

    hooks = record(plain)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    for h in hooks:
        h.remove()
    image = inputs["input_ids"] == GEMMA_IMAGE_ID
    first = image[0].nonzero()[0].item()
    assert plain[3][0, 0, first, first + 1] == 0  # an image token sees the next one: bidirectional
    assert plain[2][0, 0, -1, 0] < 0 and plain[3][0, 0, -1, 2] == 0  # the window hides far keys in layer 2 only
    intervention = vlm.FastV(k=2, ratio=0.5) if pruner == "FastV" else DivPrune(keep=0.5)
    with torch.no_grad(), vlm.apply(model, intervention) as handle:
        hooks = record(pruned)
        model(**inputs, use_cache=False)
        for h in hooks:
            h.remove()
        keep = handle.call.keep[2] if pruner == "FastV" else handle.call.lm_positions
    assert keep.shape[1] < inputs["input_ids"].shape[1]
    for layer in layers:
        rows = plain[layer].gather(2, keep[:, None, :, None].expand(-1, 1, -1, plain[layer].shape[-1]))
        assert torch.equal(pruned[layer], rows.gather(3, keep[:, None, None, :].expand(-1, 1, keep.shape[1], -1)))


@pytest.mark.parametrize("pruner", ["FastV", "DivPrune"])
def test_gemma3_pruned_decoding_past_the_sliding_window_is_refused(pruner):
    """Gemma 3's sliding cache drops keys beyond the window, which the kept-token bookkeeping cannot follow."""
    model = tiny_gemma3(layers=4, sliding_window=30)
    inputs = bracketed_inputs(model, images=2)  # 22 tokens
    with vlm.apply(model, PRUNERS[pruner]()):
        model.generate(**inputs, max_new_tokens=4, do_sample=False)  # 26 <= 30
        with pytest.raises(ValueError, match=r"exceed the sliding window \(30\)"):
            model.generate(**inputs, max_new_tokens=12, do_sample=False)


def test_unsupported_class_names_the_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"Qwen3VLForConditionalGeneration.*InternVLForConditionalGeneration.*"
                                         r"Gemma3ForConditionalGeneration.*got LlamaForCausalLM"):
        vlm.apply(text_only, vlm.FastV())


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_vl"])
def test_multi_axis_positions_are_never_renumbered_before_the_llm(family):
    with pytest.raises(ValueError, match="input_positions: .* use input_positions='keep'|positions"):
        vlm.apply(tiny_model(family), DivPrune(positions="reindex"))


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl", "gemma3"])
def test_pyramiddrop_ranks_by_the_stage_layers_own_attention(family):
    """Its first stage scores the image tokens by the stage layer's attention of the last prompt row, recomputed
    from the layer's input (with Qwen3's and Gemma 3's q/k norms): the plain model's output_attentions."""
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    n = IMAGE_TOKENS[family]
    with torch.no_grad():
        attention = model(**inputs, output_attentions=True).attentions[1][0, :, -1].float().mean(0)
    image = (inputs["input_ids"][0] == IMAGE_IDS[family]).nonzero().flatten()
    expected = image[attention[image].topk(int(n * 0.5)).indices].sort().values
    with torch.no_grad(), vlm.apply(model, vlm.PyramidDrop(layers=(1,), ratio=0.5, positions="keep")) as handle:
        model(**inputs)
        keep = handle.call.keep[1][0]
    assert torch.equal(keep[inputs["input_ids"][0, keep] == IMAGE_IDS[family]], expected)


def test_gemma3_vflowopt_importance_is_the_pooled_context_relevance():
    """Gemma 3 average-pools k x k SigLIP patches into one image token (k = 2 here): VFlowOpt's importance of a
    token is the mean context relevance c_j of its patches, from the last ViT layer's attention (output_attentions)."""
    model = tiny_gemma3(layers=4)
    inputs = bracketed_inputs(model, prompts=2, pad=(1,), images=2)
    threshold = 1.0
    with torch.no_grad():
        attention = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1].mean(1)
    received = attention.mean(1)  # [images, 16]
    relevance = []
    for image in range(attention.shape[0]):
        chosen = received[image] > threshold * received[image].mean()
        relevance.append(attention[image][chosen].mean(0).view(4, 4))
    pooled = torch.stack([r.view(2, 2, 2, 2).mean((1, 3)).flatten() for r in relevance]).view(2, -1)  # per prompt
    vflowopt = vlm.VFlowOpt(keep=0.5, threshold=threshold, llm_layers=(2, 3), cell=2.0)
    full, _ = cache_lengths(model, inputs)
    with vlm.apply(model, vflowopt) as handle:
        pruned, _ = cache_lengths(model, inputs)
        importance = handle.runtimes[0].importance
    image = inputs["input_ids"] == GEMMA_IMAGE_ID
    torch.testing.assert_close(importance[image].view(2, -1), pooled, rtol=1e-5, atol=1e-7)
    assert all(p < f for p, f in zip(pruned, full))
    assert pruned[3] < pruned[0]  # the LLM stages prune again


def test_gemma3_vflowopt_batched_generation_equals_per_prompt():
    from .test_handle import generate, split

    model = tiny_gemma3(layers=4)
    inputs = bracketed_inputs(model, prompts=2, pad=(2,), images=2)
    with vlm.apply(model, vlm.VFlowOpt(keep=0.5, llm_layers=(2, 3), cell=2.0)):
        batched = generate(model, inputs)[:, inputs["input_ids"].shape[1] :]
        for row in range(2):
            prompt = split(inputs, row, "gemma3")
            single = generate(model, prompt)[0, prompt["input_ids"].shape[1] :]
            assert torch.equal(single, batched[row, : len(single)])


def test_gemma3_edited_rows_see_each_layers_own_mask():
    """Explicit rows in a sliding-window layer (2) and a global one (3) of one forward, whose masks have one shape:
    with p = 0 (nothing moves) the logits are the plain SDPA model's, so each layer's rows had its own mask."""
    model = tiny_gemma3(layers=4, attn_implementation="sdpa", sliding_window=5)
    inputs = bracketed_inputs(model, images=2)
    with torch.no_grad():
        plain = model(**inputs).logits
        with vlm.apply(model, vlm.VAR(p=0.0, sink_dims=(0,))) as handle:
            edited = model(**inputs).logits
            assert set(handle.runtimes[0].columns) == {2, 3}
    torch.testing.assert_close(edited, plain, rtol=1e-5, atol=1e-5)
