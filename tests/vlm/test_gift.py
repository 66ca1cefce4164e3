"""GIFT: saliency from stored attentions, enhancement rules, word selection."""

import torch

from mmattn import vlm

from .tiny_models import llava_inputs, tiny_llava


def long_prompt(model, seed):
    """An image followed by a 15-token question, so the query span (after 2 template tokens, before 5) is not empty."""
    inputs = llava_inputs(model, seed=seed)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.randint(1, 90, (1, 10))], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def test_saliency_matches_a_reference_from_output_attentions():
    model = tiny_llava(layers=4, image_tokens=16)
    inputs = long_prompt(model, 3)
    attention = model(**inputs, output_attentions=True).attentions[1][0].float()  # [H, L, L]
    ids = inputs["input_ids"][0]
    image = (ids == 99).nonzero().flatten()
    length = ids.numel()
    query_rows = range(image[-1] + 3, length - 5)
    shifts = torch.stack([(attention[:, i, image] - attention[:, i - 1, image]).clamp_min(0) for i in query_rows], 1)
    heads = shifts.sum((1, 2)).topk(2).indices
    saliency = shifts[heads].mean((0, 1))
    mean, std = saliency.mean(), saliency.std()  # N - 1, as the official torch.std (the clamp is active here)
    saliency = saliency.clamp(mean - 3 * std, mean + 3 * std)
    expected = torch.exp(2.0 * (saliency - saliency.min()) / (saliency.max() - saliency.min()))
    with vlm.apply(model, vlm.GIFT(alpha=2.0, saliency_layers=(1,), enhance_layers=(2, 3))) as handle:
        model(**inputs)
        torch.testing.assert_close(handle.runtimes[0].multiplier[0, image], expected)


def test_enhancement_edits_only_the_last_row_and_keeps_its_mass():
    model = tiny_llava(layers=4, image_tokens=16)
    inputs = long_prompt(model, 4)
    plain = model(**inputs, output_attentions=True).attentions
    with vlm.apply(model, vlm.GIFT(alpha=3.0, saliency_layers=(1,), enhance_layers=(2,))):
        edited = model(**inputs, output_attentions=True).attentions
    assert torch.equal(edited[1], plain[1])
    assert not torch.equal(edited[2][:, :, -1], plain[2][:, :, -1])
    torch.testing.assert_close(edited[2][:, :, -1].sum(-1), plain[2][:, :, -1].sum(-1))


def test_extra_pass_when_saliency_layer_follows_enhancement_layers():
    model = tiny_llava(layers=4, image_tokens=16)
    inputs = long_prompt(model, 5)
    with vlm.apply(model, vlm.GIFT(alpha=3.0, saliency_layers=(2,), enhance_layers=(1, 3))) as handle:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert handle.runtimes[0].multiplier is not None


def test_default_word_selector_keeps_content_words():
    tokens = ["▁Is", "▁there", "▁a", "▁red", "▁bi", "cycle", "▁in", "▁the", "▁image", "?"]
    assert vlm.content_words(tokens) == [False, False, False, True, True, True, False, False, False, False]
