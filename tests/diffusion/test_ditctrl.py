"""DiTCtrl: segment plan, blending weights, KV-sharing attention and a tiny CogVideoX pipeline end to end."""

import pytest
import torch
import torch.nn.functional as F

from mmattn.diffusion import VideoGrid
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


def _triangular(length):
    """Spec 2.2: w_f = min(2(f + 1/2)/L, 2 - 2(f + 1/2)/L), f = 0..L-1, in float64."""
    return torch.tensor([min(2 * (f + 0.5) / length, 2 - 2 * (f + 0.5) / length) for f in range(length)], dtype=torch.float64)


@pytest.mark.parametrize("length", [1, 2, 5, 8, 13])
def test_blend_weights_are_triangular(length):
    torch.testing.assert_close(blend_weights(length).double(), _triangular(length), atol=1e-7, rtol=0)  # float32


def test_blend_weights_of_the_official_clip():
    """13 latent frames: [1, 3, 5, ..., 13, ..., 3, 1] / 13 (spec 7.3)."""
    torch.testing.assert_close(blend_weights(13), torch.tensor([1, 3, 5, 7, 9, 11, 13, 11, 9, 7, 5, 3, 1]) / 13)


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


def _tiny_pipe(scheduler="dpm", rotary=False, sample_frames=8):
    transformer, _ = tiny_models.cogvideox(rotary=rotary, sample_frames=sample_frames)
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


def test_latent_blending_weights_each_segment_prediction_triangularly():
    """Every step predicts the long latent as sum(w_f * prediction) / sum(w_f) over the CFG-guided predictions of
    the segments covering each frame, each pair [s, t] contributing both its segments (spec 2.2)."""
    length, overlap, guidance = 5, 3, 6.0  # 17 pixel frames -> 5 latent frames, stride 2
    pipe = _tiny_pipe("ddim", sample_frames=17)
    outputs, blended = [], []
    pipe.transformer.register_forward_hook(lambda module, args, out: outputs.append(out[0].double()))
    scheduler_step = pipe.scheduler.step

    def step(pred, *args, **kwargs):
        blended.append(pred[0].double())
        return scheduler_step(pred, *args, **kwargs)

    pipe.scheduler.step = step
    embeds, negative = _embeds(2)
    generate_multi_prompt(
        pipe, prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, overlap=overlap,
        transitions=1, guidance_scale=guidance, kv_sharing=KVSharingConfig(end_step=0),
        generator=torch.Generator().manual_seed(0),
    )
    pairs, stride, weights = 2, length - overlap, _triangular(length).view(-1, 1, 1, 1)  # 3 segments over 9 frames
    assert len(outputs) == pairs * len(blended) == pairs * 2
    for i, pred in enumerate(blended):
        weighted, total = torch.zeros_like(pred), torch.zeros(pred.shape[0], 1, 1, 1, dtype=torch.float64)
        for pair in range(pairs):
            uncond, cond = outputs[i * pairs + pair].chunk(2)  # [u_s, u_t, c_s, c_t]
            for segment, prediction in zip((pair, pair + 1), uncond + guidance * (cond - uncond)):
                window = slice(segment * stride, segment * stride + length)
                weighted[window] += weights * prediction
                total[window] += weights
        torch.testing.assert_close(pred, weighted / total, atol=1e-6, rtol=1e-6)  # the pipeline sums in float32


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


def _attention(q, k, v, allowed=None):
    """softmax(q k^T / sqrt(d)) v per head of (S, H, D) tensors; `allowed` (S, S) restricts each query's keys."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_mask_guided_kv_sharing_reads_foreground_and_background_keys_apart():
    """Spec 2.4 on tiny tensors: masks from the layer-averaged, head-averaged video->text attention of c_s (ref
    tokens) and c_t (cur tokens), min-max normalised per frame, >= threshold; a target video query in the target's
    foreground reads the source's foreground video keys (plus all text keys), one in the background its background."""
    text, grid = 4, VideoGrid(2, 2, 3)
    tokens = text + grid.tokens
    config = KVSharingConfig(
        start_step=0, end_step=1, start_layer=2, end_layer=3, mask_guided=True, threshold=0.3, ref_token_idx=(0, 1), cur_token_idx=(2,)
    )
    state = _KVSharingState(config, step=0, grid=grid)
    torch.manual_seed(0)
    layers = [[torch.randn(4, tokens, 2, 8, dtype=torch.float64) for _ in range(3)] for _ in range(3)]  # [u_s, u_t, c_s, c_t]
    for layer, (q, k, v) in enumerate(layers):
        dense = lambda q=q, k=k, v=v: torch.stack([_attention(*qkv) for qkv in zip(q, k, v)])
        out = state.attend(q, k, v, layer_index=layer, dense=dense, text_tokens=text)

    scores = [torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5 for q, k, _ in layers]
    maps = sum(s.softmax(-1).mean(1) for s in scores) / len(layers)  # (batch, query, key)

    def foreground(sample, token_idx):
        per_frame = maps[sample, text:, list(token_idx)].sum(-1).view(grid.frames, -1)
        low, high = per_frame.min(-1, keepdim=True).values, per_frame.max(-1, keepdim=True).values
        return ((per_frame - low) / (high - low + 1e-6) >= config.threshold).flatten()

    fg_source, fg_target = foreground(2, config.ref_token_idx), foreground(3, config.cur_token_idx)
    assert 0 < fg_source.sum() < grid.tokens and 0 < fg_target.sum() < grid.tokens and not torch.equal(fg_source, fg_target)
    allowed = torch.ones(tokens, tokens, dtype=torch.bool)
    allowed[text:, text:] = fg_target[:, None] == fg_source[None, :]
    q, k, v = layers[-1]
    for source, target in ((0, 1), (2, 3)):  # both CFG halves use the conditional branch's masks
        torch.testing.assert_close(out[source], _attention(q[source], k[source], v[source]), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(out[target], _attention(q[target], k[source], v[source], allowed), atol=1e-12, rtol=1e-12)


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
