"""The video tab's tiny random Wan 2.1 pipeline (diffusers' test-sized transformer, no VAE, no text encoder)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .weights import random_weights

__all__ = ["latent_frames_as_video", "run_tiny_wan"]


def _tiny_wan_pipeline():
    import diffusers

    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=random_weights(transformer).eval(),
                                 vae=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run_tiny_wan(num_frames: int, steps: int, radial: bool, *, seed: int = 0,
                 on_step: Callable[[int, int], None] = lambda step, total: None) -> torch.Tensor:
    """Latents `(C, F, H, W)` of a tiny Wan run (64x128 pixels, `num_frames` = 4k+1), with Radial attention
    (block 16, decay 0.1, first step dense) or the stock attention."""
    from mmattn.diffusion import RadialConfig, apply_radial_attention

    if not isinstance(num_frames, int) or num_frames < 5 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 >= 5 (Wan's VAE compresses time 4x), got {num_frames!r}")
    pipe = _tiny_wan_pipeline()
    generator = torch.Generator().manual_seed(seed)
    text, negative = torch.randn(1, 12, 16, generator=generator), torch.randn(1, 12, 16, generator=generator)

    def step_end(pipeline, step, timestep, tensors):
        on_step(step + 1, steps)
        return tensors

    def generate() -> torch.Tensor:
        return pipe(prompt_embeds=text, negative_prompt_embeds=negative, height=64, width=128, num_frames=num_frames,
                    num_inference_steps=steps, guidance_scale=2.0, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), callback_on_step_end=step_end).frames[0]

    if not radial:
        return generate()
    with apply_radial_attention(pipe, RadialConfig(block_size=16, decay_factor=0.1, dense_steps=1)):
        return generate()


def latent_frames_as_video(latents: torch.Tensor, scale: int = 8) -> np.ndarray:
    """Latent channels 0-2 as RGB frames `(F, H*scale, W*scale, 3)` uint8, normalized over the whole clip."""
    rgb = latents[:3].float().permute(1, 2, 3, 0)  # (F, H, W, 3)
    low, high = rgb.amin(), rgb.amax()
    rgb = (rgb - low) / (high - low).clamp_min(1e-6)
    rgb = rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (rgb * 255).round().to(torch.uint8).numpy()
