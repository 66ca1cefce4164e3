"""Variable-length vision attention: one batched call per block equals attention within each packed segment (an
independent per-segment oracle), and a Qwen vision tower switched to it gives the stock logits; removal restores them."""

import pytest
import torch
from transformers import AttentionInterface

from mmattn.vlm import varlen
from mmattn.vlm.varlen import VARLEN_ATTENTION, use_varlen_vision_attention, varlen_attention

from .tiny_models import qwen_inputs, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2vl, tiny_qwen3_vl


def per_segment_oracle(q, k, v, bounds, scale):
    """Softmax attention of each segment's queries over its own keys, one segment at a time (float64)."""
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        scores = q[0, :, start:end] @ k[0, :, start:end].transpose(-1, -2) * scale
        out[0, :, start:end] = scores.softmax(-1) @ v[0, :, start:end]
    return out.transpose(1, 2)


def test_varlen_attention_attends_within_each_segment_only():
    bounds = [0, 3, 10, 11, 20, 32]  # uneven lengths, one of a single token
    q, k, v = (torch.randn(1, 3, 32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    cu = torch.tensor(bounds, dtype=torch.int32)
    out, weights = varlen_attention(None, q, k, v, None, 0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12,
                                    max_length_k=12)
    assert weights is None and out.shape == (1, 32, 3, 8)
    torch.testing.assert_close(out, per_segment_oracle(q, k, v, bounds, 0.3), rtol=1e-12, atol=1e-12)
    without_max = varlen_attention(None, q, k, v, None, 0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)[0]
    assert torch.equal(without_max, out)


def test_equal_segments_are_attended_without_a_mask(monkeypatch):
    """Equal segments (every window of an image whose grid the windows tile) need no padding: no mask reaches SDPA,
    so it may take its flash kernels."""
    bounds = [0, 8, 16, 24, 32]
    q, k, v = (torch.randn(1, 3, 32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(varlen.F, "scaled_dot_product_attention", spy)
    cu = torch.tensor(bounds, dtype=torch.int32)
    out, _ = varlen_attention(None, q, k, v, None, 0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8)
    torch.testing.assert_close(out, per_segment_oracle(q, k, v, bounds, 0.3), rtol=1e-12, atol=1e-12)
    assert masks == [None]


def test_varlen_attention_refuses_what_it_does_not_compute():
    q = torch.randn(1, 2, 6, 4)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="non-causal self-attention within packed segments"):
        varlen_attention(None, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, is_causal=True)
    with pytest.raises(ValueError, match="non-causal self-attention within packed segments"):
        varlen_attention(None, q, q, q, torch.ones(1, 1, 6, 6, dtype=torch.bool), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match="non-causal self-attention within packed segments"):
        varlen_attention(None, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 3, 6]))
    equal_copy = varlen_attention(None, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone())[0]
    assert torch.equal(equal_copy, varlen_attention(None, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)[0])


@pytest.mark.parametrize("build", [tiny_qwen2vl, tiny_qwen2_5_vl, tiny_qwen3_vl])
def test_a_qwen_vision_tower_on_varlen_attention_gives_the_stock_logits(build, monkeypatch):
    model = build(attn_implementation="sdpa").double()
    inputs = qwen_inputs(prompts=2, grid=(1, 6, 10))  # Qwen2.5-VL: 4x4-patch windows, partial at two borders
    inputs["pixel_values"] = inputs["pixel_values"].double()
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["cu_seq_lens_q"].numel() - 1)
        return varlen_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN_ATTENTION, counted)
    with torch.no_grad():
        stock = model(**inputs).logits
        with use_varlen_vision_attention(model) as handle:
            assert model.config.vision_config._attn_implementation == VARLEN_ATTENTION
            switched = model(**inputs).logits
        assert model.config.text_config._attn_implementation == "sdpa"
        restored = model(**inputs).logits
    assert calls and max(calls) > 1  # each call ran several images or windows at once
    if build is tiny_qwen2_5_vl:
        assert max(calls) == 12  # 2 images x 3 x 2 windows, in one call
    torch.testing.assert_close(switched, stock, rtol=1e-10, atol=1e-10)
    assert torch.equal(restored, stock)
    handle.remove()  # a second removal changes nothing
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_a_model_without_a_packed_vision_tower_is_refused():
    with pytest.raises(ValueError, match=r"^model: LlavaForConditionalGeneration has no vision tower that packs"):
        use_varlen_vision_attention(tiny_llava())
    assert varlen.VARLEN_ATTENTION in AttentionInterface._global_mapping
