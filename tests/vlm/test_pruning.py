"""The pruning engine: kept indices, KV lengths per layer, positions, recycling."""

import math

import pytest
import torch

from mmattn import vlm

from .tiny_models import assert_llava_rows_equal_single_prompts, llava_inputs, tiny_llava

LAYERS = 4


def recorder(store, name, pick):
    def hook(module, args, kwargs):
        store.setdefault(name, pick(args, kwargs))

    return hook


def cache_lengths(model, inputs):
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.24
    return [layer.keys.shape[2] for layer in cache.layers], out


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(("k", "ratio"), [(1, 0.5), (2, 0.75)])
def test_fastv_kv_lengths_per_layer(impl, k, ratio):
    model = tiny_llava(layers=LAYERS, attn_implementation=impl, image_tokens=16)
    inputs = llava_inputs(model, prompts=2, pad=(2,))
    full, _ = cache_lengths(model, inputs)
    with vlm.apply(model, vlm.FastV(k=k, ratio=ratio)):
        pruned, _ = cache_lengths(model, inputs)
    dropped = 16 - round(16 * (1 - ratio))
    assert pruned == [length - (dropped if layer >= k else 0) for layer, length in enumerate(full)]


def test_fastv_keeps_official_topk_of_last_row_attention_at_original_positions():
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model)
    attentions = model(**inputs, output_attentions=True).attentions
    image = (inputs["input_ids"][0] == 99).nonzero().flatten()
    scores = attentions[0][0, :, -1].float().mean(0)[image]
    expected = image[scores.topk(8).indices].sort().values
    with vlm.apply(model, vlm.FastV(k=1, ratio=0.5)) as handle:
        model(**inputs)
        keep = handle.call.keep[1][0]
        kept_image = keep[(inputs["input_ids"][0, keep] == 99)]
        assert torch.equal(kept_image, expected)
        positions = handle.call.kv_positions(3, keep.numel())[0]
        assert torch.equal(positions, keep)  # original positions, gaps allowed


def test_pyramiddrop_schedule_and_reindexed_positions():
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model)
    full, _ = cache_lengths(model, inputs)
    seen = {}
    layer = model.model.language_model.layers[3]
    with vlm.apply(model, vlm.PyramidDrop(layers=(1, 2, 3), ratio=0.5)):
        hook = layer.register_forward_pre_hook(recorder(seen, "ids", lambda a, kw: kw["position_ids"]), with_kwargs=True)
        pruned, _ = cache_lengths(model, inputs)
    hook.remove()
    assert [f - p for f, p in zip(full, pruned)] == [0, 8, 12, 14]
    assert torch.equal(seen["ids"][0], torch.arange(seen["ids"].shape[1]))  # contiguous after each drop


def test_vflowopt_preset_keeps_the_official_counts_and_recycles_into_the_cell_argmax():
    """The official counts: the ViT stage keeps N - round(N(1-r_v)) - int(N/m²) tokens outright plus one per cell of
    the rest; each LLM stage removes round(n(1-r)) of the n image tokens present (not a fraction of N)."""
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model)
    full, _ = cache_lengths(model, inputs)
    iv = vlm.VFlowOpt(keep=0.5, llm_layers=(2, 3), cell=2.0)
    with vlm.apply(model, iv) as handle:
        pruned, _ = cache_lengths(model, inputs)
        runtime = handle.runtimes[0]
        kept_first = runtime.call.lm_positions[0]
    vit_ratio, llm = 0.7233, (0.7487, 0.487)
    outright = 16 - round(16 * (1 - vit_ratio)) - 16 // 4
    kept_image = int((inputs["input_ids"][0, kept_first] == 99).sum())
    assert outright < kept_image <= outright + 4  # one recycled token per non-empty 2x2 cell
    assert full[0] - pruned[0] == 16 - kept_image
    present = kept_image
    for layer, ratio in zip((2, 3), llm):
        present -= round(present * (1 - ratio))
        assert full[layer] - pruned[layer] == 16 - present


def test_vflowopt_needs_no_attention_mask_or_cache():
    """Without a mask or a cache the tokens kept before the decoder still form one sequence."""
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model)
    with torch.no_grad(), vlm.apply(model, vlm.VFlowOpt(keep=0.25, llm_layers=(2, 3), cell=2.0)):
        logits = model(**inputs).logits
        bare = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], use_cache=False).logits
    assert torch.equal(bare, logits)


def test_recycled_token_is_the_importance_weighted_mean():
    model = tiny_llava(layers=2, image_tokens=16)
    inputs = llava_inputs(model)
    captured = {}
    layer0 = model.model.language_model.layers[0]
    with vlm.apply(model, vlm.VFlowOpt(keep=0.1, llm_layers=(), llm_ratios=(), cell=4.0)) as handle:
        hook = layer0.register_forward_pre_hook(recorder(captured, "h", lambda a, kw: a[0]), with_kwargs=True)
        embeds = {}
        # registered after the handle's hook: sees the recycled, shortened embeddings; record the input instead
        first = model.model.language_model.register_forward_pre_hook(
            recorder(embeds, "e", lambda a, kw: kw["inputs_embeds"].clone()), with_kwargs=True, prepend=True)
        model(**inputs)
        hook.remove()
        first.remove()
        importance = handle.runtimes[0].importance[0]
        kept = handle.call.lm_positions[0]
    image = (inputs["input_ids"][0] == 99).nonzero().flatten()
    outright = 16 - round(16 * (1 - 0.1166)) - 16 // 16
    order = importance[image].argsort(descending=True)
    rest = image[order[outright:]]
    weights = importance[rest] / importance[rest].sum()
    merged = (weights[:, None] * embeds["e"][0, rest]).sum(0)
    target = rest[importance[rest].argmax()]
    assert target in kept
    torch.testing.assert_close(captured["h"][0, (kept == target).nonzero().item()], merged)
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-6)


def test_two_pruners_and_ragged_image_counts_are_rejected():
    model = tiny_llava()
    with pytest.raises(ValueError, match="at most one"):
        vlm.apply(model, vlm.FastV(k=1), vlm.PyramidDrop(layers=(2,)))
    with pytest.raises(ValueError, match="stages"):
        vlm.PruneStage  # noqa: B018
        vlm.PruningPlan(stages=(vlm.PruneStage(2, 0.5), vlm.PruneStage(1, 0.25)))


def test_rows_after_the_image_keep_their_distance_from_the_end_in_pruned_layers():
    """VAR edits the last rows of every layer call: pruning removes image tokens only, so the selected ones (after
    each row's last image token) stay the prompt's last tokens (left padding and a FastV cut included)."""
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model, prompts=2, pad=(3,))
    var = vlm.VAR(p=0.5, tau=1.0, rho=0.0, min_visual_mass=0.0, sink_dims=(0,))
    with vlm.apply(model, var, vlm.FastV(k=1, ratio=0.75)) as handle:
        model(**inputs)
        rows = handle.runtimes[0].prompt_rows
        prompt = inputs["input_ids"].shape[1]
        image = inputs["input_ids"] == 99
        last_image = torch.where(image, torch.arange(prompt), -1).amax(1, keepdim=True)
        tail = torch.arange(prompt - rows.tail, prompt).expand(2, -1)
        assert torch.equal(rows.selected, tail > last_image)
        assert not rows.selected.all()  # the rows differ: row 0 has a shorter text after its image
        for layer in range(1, LAYERS):
            length = handle.call.prompt_len(layer)
            positions = handle.call.kv_positions(layer, length)[:, -rows.tail:]
            assert torch.equal(positions[rows.selected], tail[rows.selected])


def test_batched_vflowopt_recycling_equals_per_prompt():
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model, prompts=2, pad=(1,))
    with vlm.apply(model, vlm.VFlowOpt(keep=0.25, llm_layers=(2, 3), cell=2.0)):
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert_llava_rows_equal_single_prompts(model, inputs, batched)


def _two_image_inputs(model, separator: int) -> dict:
    """One prompt with two images: [text, image, `separator` text tokens, image, text]."""
    one = llava_inputs(model)
    ids = one["input_ids"][0]
    image = ids == 99
    text_before, text_after = ids[: int(image.nonzero()[0])], ids[int(image.nonzero()[-1]) + 1 :]
    tokens = ids[image]
    ids = torch.cat([text_before, tokens, torch.arange(1, separator + 1), tokens, text_after])[None]
    pixels = torch.cat([one["pixel_values"], one["pixel_values"].flip(-1)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def test_vflowopt_recycles_each_image_on_its_own_grid():
    model = tiny_llava(layers=2, image_tokens=16)
    inputs = _two_image_inputs(model, separator=2)
    with vlm.apply(model, vlm.VFlowOpt(keep=0.1, llm_layers=(), llm_ratios=(), cell=4.0)) as handle:
        model(**inputs)
        kept = handle.call.lm_positions[0]
    image = (inputs["input_ids"][0] == 99).nonzero().flatten()
    first, second = image[:16], image[16:]
    outright = 32 - round(32 * (1 - 0.1166)) - 32 // 16
    kept_first, kept_second = int(torch.isin(kept, first).sum()), int(torch.isin(kept, second).sum())
    assert kept_first + kept_second == outright + 2  # one recycled token per image: a 4x4 cell never spans both
    assert kept_first >= 1 and kept_second >= 1


def test_vflowopt_recycling_rejects_images_it_cannot_split():
    model = tiny_llava(layers=2, image_tokens=16)
    inputs = _two_image_inputs(model, separator=0)  # two adjacent images read as one 32-token run
    recycling = vlm.VFlowOpt(keep=0.1, llm_layers=(), llm_ratios=(), cell=4.0)
    with vlm.apply(model, recycling), pytest.raises(ValueError, match=r"recycle_cell: needs every image.*\[32\]"):
        model(**inputs)
