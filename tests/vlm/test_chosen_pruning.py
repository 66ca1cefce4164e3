"""VisionZip, DivPrune and random pruning on the pruning engine: kept tokens against independent oracles."""

import itertools

import pytest
import torch

from mmattn import vlm
from mmattn.vlm.interventions.divprune import DivPrune
from mmattn.vlm.interventions.random_prune import RandomPrune
from mmattn.vlm.interventions.visionzip import VisionZip
from mmattn.vlm.presets import load_preset

from .test_pruning import cache_lengths, recorder
from .tiny_models import assert_llava_rows_equal_single_prompts, llava_inputs, tiny_llava, tiny_model

LAYERS = 4


def decoder_input(model):
    store = {}
    hook = model.model.language_model.register_forward_pre_hook(
        recorder(store, "embeds", lambda a, kw: kw["inputs_embeds"].clone()), with_kwargs=True, prepend=True)
    return store, hook


def greedy_max_min(features, count):
    """DivPrune's greedy Max-Min selection, written out with Python loops over cosine distances."""
    n = features.shape[0]
    unit = [f / f.norm() for f in features.double()]
    d = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda i: min(d[i][j] for j in range(n) if j != i))
    chosen = [first]
    while len(chosen) < count:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(d[i][s] for s in chosen)))
    return chosen, d


def test_divprune_keeps_the_greedy_max_min_subset_of_the_llm_input():
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model, prompts=2, pad=(1,))
    with torch.no_grad(), vlm.apply(model, DivPrune(keep=0.25)) as handle:
        store, hook = decoder_input(model)
        model(**inputs)
        hook.remove()
        kept = handle.call.lm_positions
    image = inputs["input_ids"] == 99
    for row in range(2):
        positions = image[row].nonzero().flatten()
        chosen, d = greedy_max_min(store["embeds"][row, positions], round(16 * 0.25))
        kept_image = kept[row][image[row, kept[row]]]
        assert kept_image.tolist() == sorted(positions[chosen].tolist())
        # the greedy subset is within a factor 2 of the best max-min dispersion (brute force over all subsets)
        spread = min(d[a][b] for a, b in itertools.combinations(chosen, 2))
        best = max(min(d[a][b] for a, b in itertools.combinations(s, 2)) for s in itertools.combinations(range(16), 4))
        assert best / 2 <= spread <= best + 1e-12


def test_divprune_keeps_contiguous_positions_and_shortens_every_layer():
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model)
    full, _ = cache_lengths(model, inputs)
    seen = {}
    with vlm.apply(model, DivPrune()):  # paper default: 0.098 retained
        hook = model.model.language_model.layers[0].register_forward_pre_hook(
            recorder(seen, "ids", lambda a, kw: kw["position_ids"]), with_kwargs=True)
        pruned, _ = cache_lengths(model, inputs)
        hook.remove()
    assert [f - p for f, p in zip(full, pruned)] == [16 - round(16 * 0.098)] * LAYERS
    assert torch.equal(seen["ids"][0], torch.arange(inputs["input_ids"].shape[1] - 16 + round(16 * 0.098)))


def test_random_keeps_a_seeded_uniform_draw_the_same_in_every_row():
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model, prompts=2, pad=(3,))
    with torch.no_grad(), vlm.apply(model, RandomPrune(keep=0.25, seed=7)) as handle:
        model(**inputs)
        kept = handle.call.lm_positions
    image = inputs["input_ids"] == 99
    ranks = torch.randperm(16, generator=torch.Generator().manual_seed(7))[:4].sort().values
    for row in range(2):
        assert torch.equal(kept[row][image[row, kept[row]]], image[row].nonzero().flatten()[ranks])


def test_random_draws_are_uniform_over_seeds():
    """Over 400 seeds every one of 16 tokens is kept about 400 * 4/16 = 100 times (binomial sd 8.7)."""
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    counts = torch.zeros(16)
    image = torch.zeros(1, 20, dtype=torch.bool)
    image[0, 2:18] = True
    for seed in range(400):
        handle = vlm.apply(model, RandomPrune(keep=0.25, seed=seed))
        counts += handle.runtimes[0].choose(0, torch.zeros(1, 20, 32), image, 4)[0, 2:18].float()
        handle.remove()
    assert counts.sum() == 1600
    assert (counts - 100).abs().max() < 4.5 * 8.7


def visionzip_oracle(model, pixel_values, dominant, contextual):
    """Kept token indices and the projector input at contextual targets, from output_attentions of the vision tower
    and Python loops (one image; tiny LLaVA: feature layer -1, [CLS] dropped)."""
    vision = model.model.vision_tower
    with torch.no_grad():
        out = vision(pixel_values, output_attentions=True, output_hidden_states=True)
        layer = vision.encoder.layers[-1]
        before = out.hidden_states[-2]
        keys = layer.self_attn.k_proj(layer.layer_norm1(before))[0]  # [T, heads * d]
    heads = model.config.vision_config.num_attention_heads
    keys = keys.view(keys.shape[0], heads, -1).mean(1)[1:]
    cls_row = out.attentions[-1][0, :, 0, 1:].sum(0)
    features = out.hidden_states[-1][0, 1:]
    dominant_set = cls_row.topk(dominant).indices.tolist()
    rest = [i for i in range(features.shape[0]) if i not in dominant_set]
    step = max(1, len(rest) // contextual)
    targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
    others = [i for i in rest if i not in targets]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    groups = {t: [] for t in targets}
    for i in others:
        groups[max(targets, key=lambda t: float(unit[i] @ unit[t]))].append(i)
    merged = {t: features[t] + (torch.stack([features[i] for i in g]).mean(0) if g else 0) for t, g in groups.items()}
    return sorted(dominant_set + targets), merged


def test_visionzip_keeps_dominant_and_merged_contextual_tokens():
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model, seed=2)
    kept_ids, merged = visionzip_oracle(model, inputs["pixel_values"], dominant=5, contextual=3)
    with torch.no_grad(), vlm.apply(model, VisionZip(dominant=5, contextual=3)) as handle:
        seen = {}
        hook = model.model.language_model.layers[0].register_forward_pre_hook(
            recorder(seen, "h", lambda a, kw: a[0]), with_kwargs=True)
        model(**inputs)
        hook.remove()
        kept = handle.call.lm_positions[0]
    image = (inputs["input_ids"][0] == 99).nonzero().flatten()
    kept_image = kept[(inputs["input_ids"][0, kept] == 99)]
    assert kept_image.tolist() == image[kept_ids].tolist()
    with torch.no_grad():
        for target, feature in merged.items():
            at = (kept == image[target]).nonzero().item()
            expected = model.model.multi_modal_projector(feature[None, None])[0, 0]
            torch.testing.assert_close(seen["h"][0, at], expected, rtol=1e-5, atol=1e-6)


def test_visionzip_shortens_the_cache_and_batches_like_single_prompts():
    model = tiny_llava(layers=LAYERS, image_tokens=16)
    inputs = llava_inputs(model, prompts=2, pad=(1,))
    full, _ = cache_lengths(model, inputs)
    with vlm.apply(model, VisionZip(dominant=4, contextual=2)):
        pruned, out = cache_lengths(model, inputs)
        assert [f - p for f, p in zip(full, pruned)] == [16 - 6] * LAYERS
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert_llava_rows_equal_single_prompts(model, inputs, batched)


def test_visionzip_names_the_supported_class():
    with pytest.raises(ValueError, match=r"LlavaForConditionalGeneration .*got Qwen3VLForConditionalGeneration"):
        vlm.apply(tiny_model("qwen3_vl"), VisionZip())
    model = tiny_llava(image_tokens=16)
    with vlm.apply(model, VisionZip()), pytest.raises(ValueError, match="dominant: dominant \\+ contextual = 64"):
        model(**llava_inputs(model))


BAD = [
    (DivPrune, {"keep": 0.0}, ValueError, r"keep: expected the kept fraction .* in \(0.0, 1.0\], got 0.0"),
    (DivPrune, {"keep": "all"}, TypeError, r"keep: expected .*, got 'all'"),
    (DivPrune, {"layer": -1}, ValueError, r"layer: expected a decoder layer index in \[0, inf\), got -1"),
    (DivPrune, {"positions": "shift"}, ValueError, r"positions: expected None or one of"),
    (RandomPrune, {"seed": -3}, ValueError, r"seed: expected a generator seed in \[0, inf\), got -3"),
    (RandomPrune, {"seed": 1.5}, TypeError, r"seed: expected a generator seed .*, got 1.5"),
    (VisionZip, {"dominant": 0}, ValueError, r"dominant: expected the dominant token count in \[1, inf\), got 0"),
    (VisionZip, {"contextual": -1}, ValueError, r"contextual: expected .* in \[0, inf\), got -1"),
]


@pytest.mark.parametrize(("settings", "arguments", "error", "message"), BAD,
                         ids=[f"{cls.__name__}-{'-'.join(args)}" for cls, args, *_ in BAD])
def test_settings_are_checked_when_made(settings, arguments, error, message):
    with pytest.raises(error, match=message):
        settings(**arguments)


def test_presets_carry_the_paper_defaults():
    assert load_preset("llava-1.5-7b", "visionzip") == VisionZip(dominant=54, contextual=10)
    assert load_preset("llava-1.5-7b", "divprune") == DivPrune(keep=0.098)
    assert load_preset("llava-1.5-7b", "random", keep=64 / 576).keep == 64 / 576
    assert load_preset("qwen3-vl-8b", "pyramiddrop").positions == "keep"
    with pytest.raises(ValueError, match="layer: layer 40 >= the model's 4 layers"):
        vlm.apply(tiny_model("gemma3"), DivPrune(layer=40))


def test_visionzip_without_cls_ranks_by_the_mean_attention_received():
    """A SigLIP LLaVA (llava-interleave style, no [CLS], strategy "full"): dominant tokens by the attention each
    token receives, summed over heads and averaged over the query rows."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 37,
              "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 14, "image_size": 56}
    text = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 256, "num_hidden_layers": 2}
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=99, image_seq_length=16, vision_feature_layer=-1,
        vision_feature_select_strategy="full")).eval()
    model.set_attn_implementation("eager")
    inputs = llava_inputs(model, seed=4)
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    dominant = attentions[-1][0].sum(0).mean(0).topk(3).indices
    with torch.no_grad(), vlm.apply(model, VisionZip(dominant=3, contextual=0)) as handle:
        model(**inputs)
        kept = handle.call.lm_positions[0]
    image = (inputs["input_ids"][0] == 99).nonzero().flatten()
    assert kept[inputs["input_ids"][0, kept] == 99].tolist() == sorted(image[dominant].tolist())
