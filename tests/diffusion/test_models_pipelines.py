"""Radial on a tiny Wan 2.2 A14B pipeline: both experts, both CFG calls per step, equal to the masked stock one."""

import pytest
import torch
import torch.nn.functional as F

from mmattn.diffusion import RadialConfig, VideoGrid, apply_radial_attention, radial_block_mask
from mmattn.diffusion.processors import WanRadialAttnProcessor

from . import tiny_models
from .test_radial import _token_mask

diffusers = pytest.importorskip("diffusers")

FRAMES, HEIGHT, WIDTH = 4, 10, 12  # latent grid after patchify: 13 pixel frames, 80 x 96 pixels


def _wan22_pipe():
    high_noise, _ = tiny_models.wan()
    torch.manual_seed(1)
    low_noise = diffusers.WanTransformer3DModel(**tiny_models._wan_config()).eval()
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=high_noise.double(),
        transformer_2=low_noise.double(), boundary_ratio=0.8,  # timesteps 999, 900 | 750, 500
    )
    return pipe


def _run(pipe):
    torch.manual_seed(0)
    text, negative = torch.randn(1, 12, 16), torch.randn(1, 12, 16)
    return pipe(
        prompt_embeds=text, negative_prompt_embeds=negative, height=8 * 2 * HEIGHT, width=8 * 2 * WIDTH, num_frames=13,
        num_inference_steps=4, guidance_scale=2.0, guidance_scale_2=3.0, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


def test_wan22_a14b_both_experts_equal_the_masked_stock_pipeline(monkeypatch):
    pipe = _wan22_pipe()
    stock = _run(pipe)
    config = RadialConfig(block_size=16, decay_factor=0.3, dense_steps=1)
    calls = {id(pipe.transformer): 0, id(pipe.transformer_2): 0}
    count = lambda module, *_: calls.__setitem__(id(module), calls[id(module)] + 1)  # noqa: E731
    hooks = [t.register_forward_pre_hook(count) for t in (pipe.transformer, pipe.transformer_2)]
    with apply_radial_attention(pipe, config) as handle:
        for transformer in (pipe.transformer, pipe.transformer_2):
            assert all(isinstance(block.attn1.processor, WanRadialAttnProcessor) for block in transformer.blocks)
        radial = _run(pipe)
        assert [r.grid for r in handle.radial] == [VideoGrid(FRAMES, HEIGHT, WIDTH)] * 2  # each expert's hook ran
    for hook in hooks:
        hook.remove()
    assert list(calls.values()) == [4, 4]  # 2 steps per expert, a cond and an uncond call each
    assert torch.equal(_run(pipe), stock)  # removal

    video = FRAMES * HEIGHT * WIDTH
    blocks = radial_block_mask(FRAMES, HEIGHT * WIDTH, block_size=16, decay_factor=0.3, model="wan")
    assert blocks.float().mean() < 0.9
    mask, sdpa, sparse_calls = _token_mask(blocks, 16, video, video), F.scaled_dot_product_attention, []

    def masked_sdpa(query, key, value, attn_mask=None, **kwargs):
        if key.shape[-2] == query.shape[-2] == video and pipe.scheduler.step_index not in (None, 0):
            attn_mask = mask  # sparse from the second step on (dense_steps=1)
            sparse_calls.append(pipe.scheduler.step_index)
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", masked_sdpa)
    expected = _run(pipe)
    assert sparse_calls == [1] * 4 + [2] * 4 + [3] * 4  # per sparse step: 2 CFG calls x 2 layers
    torch.testing.assert_close(radial, expected, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(radial, stock, atol=1e-6)
