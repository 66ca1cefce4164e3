"""Tiny pipelines end to end: Radial on WanPipeline and CogVideoXPipeline, step index from the scheduler, removal."""

import pytest
import torch

from mmattn.diffusion import RadialConfig, apply_radial_attention
from mmattn.diffusion.radial import pipeline_step

from . import tiny_models

diffusers = pytest.importorskip("diffusers")


def _wan_pipe():
    transformer, _ = tiny_models.wan()
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
                                 scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))


def _cog_pipe():
    transformer, _ = tiny_models.cogvideox(size=16)
    return diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                       scheduler=diffusers.CogVideoXDDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction"))


def _run_wan(pipe, steps=3):
    torch.manual_seed(0)
    text, negative = torch.randn(1, 12, 16), torch.randn(1, 12, 16)
    return pipe(prompt_embeds=text, negative_prompt_embeds=negative, height=64, width=128, num_frames=13,
                num_inference_steps=steps, guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(0)).frames


def _run_cog(pipe, steps=3):
    torch.manual_seed(0)
    text, negative = torch.randn(1, 8, 8), torch.randn(1, 8, 8)
    return pipe(prompt_embeds=text, negative_prompt_embeds=negative, height=16, width=16, num_frames=5,
                num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0)).frames


def test_wan_pipeline_radial_steps_from_scheduler():
    pipe = _wan_pipe()
    stock = _run_wan(pipe)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: seen.append(pipeline_step(pipe)))
    with apply_radial_attention(pipe, RadialConfig(block_size=16, decay_factor=0.1, dense_steps=3)) as handle:
        assert torch.equal(_run_wan(pipe), stock)  # every step dense: exactly the stock pipeline
    hook.remove()
    assert seen == [(0, 3), (0, 3), (1, 3), (1, 3), (2, 3), (2, 3)]  # both CFG calls of each step
    with apply_radial_attention(pipe, RadialConfig(block_size=16, decay_factor=0.1, dense_steps=1)) as handle:
        radial = _run_wan(pipe)
        assert handle.radial[0].grid.frames == 4
    assert torch.isfinite(radial).all() and not torch.allclose(radial, stock)
    assert torch.equal(_run_wan(pipe), stock)


def test_cogvideox_pipeline_radial_and_removal():
    pipe = _cog_pipe()
    stock = _run_cog(pipe)
    with apply_radial_attention(pipe, "cogvideox") as handle:
        assert handle.radial[0].config.dense_steps == 12
        assert torch.equal(_run_cog(pipe), stock)  # 3 steps < 12 dense steps
    with apply_radial_attention(pipe, RadialConfig(block_size=16, decay_factor=0.1)):
        radial = _run_cog(pipe)
    assert torch.isfinite(radial).all() and not torch.allclose(radial, stock)
    assert torch.equal(_run_cog(pipe), stock)
