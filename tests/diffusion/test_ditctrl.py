"""DiTCtrl: segment plan, blending weights, KV-sharing attention and a tiny CogVideoX pipeline end to end."""

import pytest
import torch
import torch.nn.functional as F

from mmattn.diffusion.ditctrl import (
    KVSharingConfig,
    _KVSharingState,
    apply_kv_sharing,
    blend_weights,
    edit_video,
    generate_multi_prompt,
    segment_plan,
)

from . import tiny_models

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("prompts,overlap,transitions,mid,segments,frames", [(3, 9, 2, 0, 7, 37), (3, 6, 1, 0, 5, 41), (4, 9, 2, 1, 12, 57), (2, 4, 0, 0, 2, 22)])
def test_segment_plan_counts(prompts, overlap, transitions, mid, segments, frames):
    plan = segment_plan(prompts, overlap=overlap, transitions=transitions, mid_segments=mid)
    assert plan.num_segments == prompts + transitions * (prompts - 1) + mid * (prompts - 2) == segments
    assert plan.latent_frames == 13 + (segments - 1) * (13 - overlap) == frames
    assert plan.starts == tuple(k * (13 - overlap) for k in range(segments))


def test_transition_prompts_interpolate():
    plan = segment_plan(3, transitions=2)
    assert plan.conditions == ((0, 0, 0.0), (0, 1, 1 / 3), (0, 1, 2 / 3), (1, 1, 0.0), (1, 2, 1 / 3), (1, 2, 2 / 3), (2, 2, 0.0))


def test_blend_weights_are_triangular():
    w = blend_weights(13)
    expected = torch.tensor([min(2 * f + 1, 25 - 2 * f) for f in range(13)], dtype=torch.float32) / 13
    torch.testing.assert_close(w, expected)
    assert w[6] == 1 and w[0] == w[12]


@pytest.mark.parametrize("kwargs", [{"overlap": 13}, {"overlap": -1}, {"transitions": -1}])
def test_segment_plan_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        segment_plan(3, **kwargs)
    with pytest.raises(ValueError, match="num_prompts"):
        segment_plan(1)


def test_kv_sharing_target_reads_source_keys_and_values():
    state = _KVSharingState(KVSharingConfig(start_step=0, end_step=5, start_layer=1, end_layer=3), step=2)
    q, k, v = (torch.randn(4, 20, 2, 8, dtype=torch.float64) for _ in range(3))  # [u_s, u_t, c_s, c_t]
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    dense = lambda: sdpa(q, k, v)
    out = state.attend(q, k, v, layer_index=1, dense=dense, text_tokens=4)
    for source, target in ((0, 1), (2, 3)):
        torch.testing.assert_close(out[source], sdpa(q[source : source + 1], k[source : source + 1], v[source : source + 1])[0])
        torch.testing.assert_close(out[target], sdpa(q[target : target + 1], k[source : source + 1], v[source : source + 1])[0])
    assert torch.equal(state.attend(q, k, v, layer_index=3, dense=dense, text_tokens=4), dense())
    state.step = 5
    assert torch.equal(state.attend(q, k, v, layer_index=1, dense=dense, text_tokens=4), dense())


def _tiny_pipe(scheduler="dpm", rotary=False):
    transformer, _ = tiny_models.cogvideox(rotary=rotary)
    scheduler_cls = diffusers.CogVideoXDPMScheduler if scheduler == "dpm" else diffusers.CogVideoXDDIMScheduler
    pipe = diffusers.CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
        scheduler=scheduler_cls(timestep_spacing="trailing", prediction_type="v_prediction"),
    )
    return pipe


def _embeds(prompts):
    torch.manual_seed(1)
    return torch.randn(prompts, 8, 8), torch.zeros(prompts, 8, 8)


@pytest.mark.parametrize("scheduler,rotary", [("dpm", False), ("ddim", True)])
def test_multi_prompt_pipeline_end_to_end(scheduler, rotary):
    pipe = _tiny_pipe(scheduler, rotary)
    embeds, negative = _embeds(2)
    common = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "num_inference_steps": 3, "overlap": 1, "transitions": 1}
    stock_processors = [b.attn1.processor for b in pipe.transformer.transformer_blocks]
    plain = generate_multi_prompt(pipe, kv_sharing=KVSharingConfig(end_step=0), generator=torch.Generator().manual_seed(0), **common)
    shared = generate_multi_prompt(pipe, kv_sharing=KVSharingConfig(start_step=0, end_step=3, start_layer=0, end_layer=2), generator=torch.Generator().manual_seed(0), **common)
    plan = segment_plan(2, segment_frames=2, overlap=1, transitions=1)
    assert plain.shape == (1, plan.latent_frames, 4, 8, 8) == shared.shape
    assert torch.isfinite(shared).all()
    assert not torch.allclose(plain, shared)
    assert [b.attn1.processor for b in pipe.transformer.transformer_blocks] == stock_processors


def test_single_segment_pair_without_sharing_matches_stock_pipeline():
    """Without KV-sharing, each editing segment is denoised exactly like the stock pipeline from the same noise."""
    pipe = _tiny_pipe("ddim")
    embeds, negative = _embeds(1)
    generator = torch.Generator().manual_seed(0)
    ours = edit_video(pipe, embeds, embeds, negative_prompt_embeds=negative.repeat(2, 1, 1), num_inference_steps=2,
                      kv_sharing=KVSharingConfig(end_step=0), generator=generator)
    noise = torch.randn((1, 2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    stock = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, height=8, width=8, num_frames=5,
                 latents=noise.clone(), output_type="latent", return_dict=False)[0]
    torch.testing.assert_close(ours[0:1], stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1:2], stock, atol=1e-5, rtol=1e-5)


def test_mask_guided_editing_runs():
    pipe = _tiny_pipe("dpm")
    embeds, negative = _embeds(2)
    config = KVSharingConfig(start_step=0, end_step=2, start_layer=1, end_layer=2, mask_guided=True, ref_token_idx=(0, 1), cur_token_idx=(0, 1))
    out = edit_video(pipe, embeds[:1], embeds[1:], negative_prompt_embeds=negative, num_inference_steps=2, kv_sharing=config,
                     generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 4, 8, 8) and torch.isfinite(out).all()


def test_kv_sharing_config_errors_and_removal():
    with pytest.raises(ValueError, match="ref_token_idx"):
        KVSharingConfig(mask_guided=True)
    with pytest.raises(ValueError, match="threshold"):
        KVSharingConfig(threshold=2.0)
    transformer, inputs = tiny_models.cogvideox()
    with torch.no_grad():
        stock = transformer(**inputs)[0]
        with apply_kv_sharing(transformer):
            inside = transformer(**inputs)[0]
        after = transformer(**inputs)[0]
    torch.testing.assert_close(inside, stock)  # no step set: plain attention
    assert torch.equal(after, stock)
    with pytest.raises(TypeError, match="CogVideoXTransformer3DModel"):
        apply_kv_sharing(torch.nn.Linear(2, 2))
