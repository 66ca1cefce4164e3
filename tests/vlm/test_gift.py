"""GIFT: saliency from stored attentions, enhancement rules, word selection."""

import pytest
import torch

from mmattn import vlm

from ..kernels.column_set_oracle import enhance_ranked_heads
from .tiny_models import llava_inputs, tiny_llava


def long_prompt(model, seed):
    """An image followed by a 15-token question, so the query span (after 2 template tokens, before 5) is not empty."""
    inputs = llava_inputs(model, seed=seed)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.randint(1, 90, (1, 10))], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def spans(ids):
    """LLaVA's image tokens and GIFT's query span [ve + 3, len - 6] (every query token informative), bool [1, L]."""
    image = (ids == 99)[None]
    query = torch.zeros_like(image)
    query[0, int(image.nonzero()[-1, 1]) + 3 : ids.numel() - 5] = True
    return image, query


def saliency_multiplier(attention, ids, alpha):
    """M = exp(alpha Ŝ) from one layer's plain attention [H, L, L] (spec vlm.md 2.1), 1 off the image: [L]."""
    image, query = (s[0].nonzero().flatten() for s in spans(ids))
    shifts = torch.stack([(attention[:, i, image] - attention[:, i - 1, image]).clamp_min(0) for i in query], 1)
    heads = shifts.sum((1, 2)).topk(attention.shape[0] // 2).indices
    saliency = shifts[heads].mean((0, 1))
    mean, std = saliency.mean(), saliency.std()  # N - 1, as the official torch.std
    saliency = saliency.clamp(mean - 3 * std, mean + 3 * std)
    multiplier = torch.ones(ids.numel())
    multiplier[image] = torch.exp(alpha * (saliency - saliency.min()) / (saliency.max() - saliency.min()))
    return multiplier


def test_saliency_matches_a_reference_from_output_attentions():
    """On this prompt the 3σ clamp is active."""
    model = tiny_llava(layers=4, image_tokens=16)
    inputs = long_prompt(model, 3)
    attention = model(**inputs, output_attentions=True).attentions[1][0].float()  # [H, L, L]
    expected = saliency_multiplier(attention, inputs["input_ids"][0], 2.0)
    with vlm.apply(model, vlm.GIFT(alpha=2.0, saliency_layers=(1,), enhance_layers=(2, 3))) as handle:
        model(**inputs)
        torch.testing.assert_close(handle.runtimes[0].multiplier[0], expected)


def test_enhancement_is_the_gift_edit_of_the_explicit_last_row():
    """Layer 2, the first enhanced one, sees the plain hidden states: its last row must be the plain one with the
    vision heads' image columns times M, the query heads' query columns times r, rescaled to its mass."""
    model = tiny_llava(layers=4, image_tokens=16)
    inputs = long_prompt(model, 4)
    ids = inputs["input_ids"][0]
    image, query = spans(ids)
    plain = model(**inputs, output_attentions=True).attentions
    multiplier = saliency_multiplier(plain[1][0], ids, 3.0)
    expected = enhance_ranked_heads(plain[2][:, :, -1:].double(), image, multiplier[None], query)
    with vlm.apply(model, vlm.GIFT(alpha=3.0, saliency_layers=(1,), enhance_layers=(2,))):
        edited = model(**inputs, output_attentions=True).attentions
    assert torch.equal(edited[1], plain[1])
    assert torch.equal(edited[2][:, :, :-1], plain[2][:, :, :-1])
    torch.testing.assert_close(edited[2][:, :, -1:], expected.float())


def test_extra_pass_when_saliency_layer_follows_enhancement_layers():
    """Layer 0 is enhanced with the map of layer 1: the map comes from an extra plain prefill up to layer 1."""
    model = tiny_llava(layers=4, image_tokens=16)
    inputs = long_prompt(model, 9)
    attention = model(**inputs, output_attentions=True).attentions[1][0]
    expected = saliency_multiplier(attention, inputs["input_ids"][0], 3.0)
    with vlm.apply(model, vlm.GIFT(alpha=3.0, saliency_layers=(1,), enhance_layers=(0, 3))) as handle:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        torch.testing.assert_close(handle.runtimes[0].multiplier[0], expected)


def test_default_word_selector_keeps_content_words():
    tokens = ["▁Is", "▁there", "▁a", "▁red", "▁bi", "cycle", "▁in", "▁the", "▁image", "?"]
    assert vlm.content_words(tokens) == [False, False, False, True, True, True, False, False, False, False]


@pytest.mark.parametrize("gift_first", [True, False])
@pytest.mark.parametrize("saliency_layer", [1, 3], ids=["in-pass", "extra-pass"])
def test_gift_with_fastv_in_one_apply(saliency_layer, gift_first):
    """GIFT's extra saliency prefill used to run FastV's hooks too: FastV pruned inside it and kept that state, so the
    real prefill skipped its prune and then gathered its layer inputs with the kept indices of the extra pass (a
    shape error). The extra pass now runs the plain decoder with GIFT alone. GIFT edits layer 3 only, after FastV's
    layers 1 (scores) and 2 (prune): the map must be GIFT's alone, the kept tokens FastV's alone, in either order."""
    model = tiny_llava(layers=4, image_tokens=16)
    inputs = long_prompt(model, 5)
    gift = vlm.GIFT(alpha=3.0, saliency_layers=(saliency_layer,), enhance_layers=(3,))
    fastv = vlm.FastV(k=2, ratio=0.5)
    with vlm.apply(model, gift) as handle:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        multiplier = handle.runtimes[0].multiplier
    with vlm.apply(model, fastv) as handle:
        model(**inputs)
        kept = handle.call.keep[2]
    with vlm.apply(model, *((gift, fastv) if gift_first else (fastv, gift))) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        assert torch.equal(handle.call.keep[2], kept)
        torch.testing.assert_close(handle.runtimes[0 if gift_first else 1].multiplier, multiplier)
