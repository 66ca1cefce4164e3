"""The video tab's tiny random pipelines: Wan 2.1 T2V and Wan 2.2 TI2V-5B through diffusers' `WanPipeline` (no
VAE, no text encoder), and HunyuanVideo 1.5, LTX-2 and Kandinsky 5 transformers (diffusers' test-sized configs)
in a flow-matching loop of the demo's own (their pipelines need text encoders, VAEs and, for LTX-2, audio
models). Each runs dense or with a sparse attention pattern (Radial, STA, NABLA) through
`mmattn.diffusion.apply_sparse_attention`, with classifier-free guidance (cond / uncond calls)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

from .weights import random_weights

__all__ = ["PATTERNS", "TINY_MODELS", "latent_frames_as_video", "run_tiny", "run_tiny_wan", "sparse_config"]

TINY_MODELS = {
    "wan2.1": "Wan 2.1 T2V",
    "wan2.2-ti2v": "Wan 2.2 TI2V-5B",
    "hunyuanvideo-1.5": "HunyuanVideo 1.5",
    "ltx-2": "LTX-2",
    "kandinsky-5": "Kandinsky 5",
}
"""Model key -> its name in the notes."""
PATTERNS = ("dense", "radial", "sta", "nabla")
_LATENT = (8, 16)  # 64 x 128 pixels through an 8x VAE
_GUIDANCE = 2.0


def sparse_config(pattern: str):
    """The tab's settings of `pattern` at the tiny grids: 16-token blocks (1 x 4 x 4 tiles), the first step dense."""
    from mmattn.diffusion import NABLAConfig, RadialConfig, STAConfig

    if pattern == "radial":
        return RadialConfig(block_size=16, decay_factor=0.1, dense_steps=1)
    if pattern == "sta":
        return STAConfig(tile=(1, 4, 4), window=(3, 1, 1), dense_steps=1)
    if pattern == "nabla":
        return NABLAConfig(threshold=0.7, tile=(1, 4, 4), window=(1, 1, 1), dense_steps=1)
    raise ValueError(f"pattern must be one of {PATTERNS[1:]}, got {pattern!r}")


def _tiny_wan_pipeline(ti2v: bool = False):
    import diffusers

    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=random_weights(transformer).eval(),
                                 vae=None, scheduler=scheduler, expand_timesteps=ti2v)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_frames(num_frames: int) -> None:
    if not isinstance(num_frames, int) or num_frames < 5 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 >= 5 (the VAEs compress time 4x), got {num_frames!r}")


def _attention(target, pattern: str, step_source=None):
    from mmattn.diffusion import apply_sparse_attention

    if pattern == "dense":
        return nullcontext()
    return apply_sparse_attention(target, pattern, sparse_config(pattern), step_source=step_source)


@torch.no_grad()
def run_tiny_wan(num_frames: int, steps: int, radial: bool, *, seed: int = 0,
                 on_step: Callable[[int, int], None] = lambda step, total: None) -> torch.Tensor:
    """Latents `(C, F, H, W)` of a tiny Wan 2.1 run (64x128 pixels, `num_frames` = 4k+1), with Radial attention
    (block 16, decay 0.1, first step dense) or the stock attention."""
    return run_tiny("wan2.1", num_frames, steps, "radial" if radial else "dense", seed=seed, on_step=on_step)


def _wan_run(ti2v: bool, num_frames, steps, pattern, seed, on_step) -> torch.Tensor:
    pipe = _tiny_wan_pipeline(ti2v)
    generator = torch.Generator().manual_seed(seed)
    text, negative = torch.randn(1, 12, 16, generator=generator), torch.randn(1, 12, 16, generator=generator)

    def step_end(pipeline, step, timestep, tensors):
        on_step(step + 1, steps)
        return tensors

    with _attention(pipe, pattern):
        return pipe(prompt_embeds=text, negative_prompt_embeds=negative, height=64, width=128, num_frames=num_frames,
                    num_inference_steps=steps, guidance_scale=_GUIDANCE, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), callback_on_step_end=step_end).frames[0]


def _hunyuan15(frames: int, generator: torch.Generator):
    import diffusers

    transformer = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    )
    latents = torch.randn(1, 4, frames, *_LATENT, generator=generator)

    def prompt():
        return {"encoder_hidden_states": torch.randn(1, 6, 16, generator=generator),
                "encoder_hidden_states_2": torch.randn(1, 4, 8, generator=generator),
                "encoder_attention_mask": torch.ones(1, 6, dtype=torch.long),
                "encoder_attention_mask_2": torch.ones(1, 4, dtype=torch.long),
                "image_embeds": torch.zeros(1, 3, 12)}

    def call(model, x, t, text):
        return model(hidden_states=x, timestep=t.expand(1).float(), **text, return_dict=False)[0]

    return transformer, latents, (prompt(), prompt()), call, lambda x: x[0]


def _ltx2(frames: int, generator: torch.Generator):
    import diffusers

    transformer = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=16, rope_double_precision=False,
    )
    height, width = _LATENT
    latents = torch.randn(1, frames * height * width, 4, generator=generator)  # packed (B, S, C)
    audio = torch.randn(1, 9, 4, generator=generator)  # the audio latents stay noise: the tab shows the video

    def prompt():
        return {"encoder_hidden_states": torch.randn(1, 16, 16, generator=generator),
                "audio_encoder_hidden_states": torch.randn(1, 16, 16, generator=generator),
                "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool)}

    def call(model, x, t, text):
        return model(hidden_states=x, audio_hidden_states=audio, timestep=t.expand(1).float(), num_frames=frames,
                     height=height, width=width, audio_num_frames=9, fps=25.0, **text, return_dict=False)[0]

    def video(x):  # (B, F*H*W, C) -> (C, F, H, W)
        return x[0].unflatten(0, (frames, height, width)).permute(3, 0, 1, 2)

    return transformer, latents, (prompt(), prompt()), call, video


def _kandinsky5(frames: int, generator: torch.Generator):
    import diffusers

    transformer = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=32, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=48, ff_dim=128, num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 8, 8), visual_cond=False,
    )
    height, width = _LATENT
    latents = torch.randn(1, frames, height, width, 4, generator=generator)  # (B, F, H, W, C)
    rope = [torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2)]

    def prompt():
        return {"encoder_hidden_states": torch.randn(1, 4, 16, generator=generator),
                "pooled_projections": torch.randn(1, 32, generator=generator)}

    def call(model, x, t, text):
        return model(hidden_states=x, timestep=t.expand(1).float(), visual_rope_pos=rope, text_rope_pos=torch.arange(4),
                     **text, return_dict=False)[0]

    return transformer, latents, (prompt(), prompt()), call, lambda x: x[0].permute(3, 0, 1, 2)


_TRANSFORMER_RUNS = {"hunyuanvideo-1.5": _hunyuan15, "ltx-2": _ltx2, "kandinsky-5": _kandinsky5}


@torch.no_grad()
def _randomize_modulations(transformer: torch.nn.Module, seed: int) -> None:
    """Kandinsky 5's modulations are zero as built (every attention output gated off): draw them too."""
    generator = torch.Generator().manual_seed(seed + 1)
    for module in transformer.modules():
        if type(module).__name__ == "Kandinsky5Modulation":
            module.out_layer.weight.copy_(torch.randn(module.out_layer.weight.shape, generator=generator) * 0.05)
            module.out_layer.bias.copy_(torch.randn(module.out_layer.bias.shape, generator=generator) * 0.5)


def _transformer_run(model, num_frames, steps, pattern, seed, on_step) -> torch.Tensor:
    import diffusers

    from mmattn.diffusion.radial import pipeline_step

    generator = torch.Generator().manual_seed(seed)
    transformer, latents, (text, negative), call, video = _TRANSFORMER_RUNS[model]((num_frames - 1) // 4 + 1, generator)
    transformer = random_weights(transformer, seed).eval()
    _randomize_modulations(transformer, seed)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    source = SimpleNamespace(scheduler=scheduler)
    with _attention(transformer, pattern, step_source=lambda: pipeline_step(source)):
        for index, t in enumerate(scheduler.timesteps):
            with transformer.cache_context("cond"):
                cond = call(transformer, latents, t, text)
            with transformer.cache_context("uncond"):
                uncond = call(transformer, latents, t, negative)
            latents = scheduler.step(uncond + _GUIDANCE * (cond - uncond), t, latents).prev_sample
            on_step(index + 1, steps)
    return video(latents)


@torch.no_grad()
def run_tiny(model: str, num_frames: int, steps: int, pattern: str, *, seed: int = 0,
             on_step: Callable[[int, int], None] = lambda step, total: None) -> torch.Tensor:
    """Latents `(C, F, H, W)` of a tiny random `model` run (a `TINY_MODELS` key; 64x128 pixels, `num_frames` = 4k+1,
    (num_frames - 1) // 4 + 1 latent frames of 8x16 latents) with `pattern` attention (`PATTERNS`; the sparse ones
    as `sparse_config` sets them) and guidance 2."""
    _check_frames(num_frames)
    if model not in TINY_MODELS:
        raise ValueError(f"model must be one of {list(TINY_MODELS)}, got {model!r}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if model.startswith("wan"):
        return _wan_run(model == "wan2.2-ti2v", num_frames, steps, pattern, seed, on_step)
    return _transformer_run(model, num_frames, steps, pattern, seed, on_step)


def latent_frames_as_video(latents: torch.Tensor, scale: int = 8) -> np.ndarray:
    """Latent channels 0-2 as RGB frames `(F, H*scale, W*scale, 3)` uint8, normalized over the whole clip."""
    rgb = latents[:3].float().permute(1, 2, 3, 0)  # (F, H, W, 3)
    low, high = rgb.amin(), rgb.amax()
    rgb = (rgb - low) / (high - low).clamp_min(1e-6)
    rgb = rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (rgb * 255).round().to(torch.uint8).numpy()
