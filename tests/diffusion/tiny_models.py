"""Tiny random diffusers video transformers (configs of diffusers' own tests, spec section 4.6) and their inputs.

Grids are chosen so that one model call is a few hundred tokens; `frames`/`size` let tests change them.
"""

import torch

diffusers = __import__("pytest").importorskip("diffusers")


def wan(frames=2, height=16, width=32, batch=1, head_dim=12):
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, height, width),
        "encoder_hidden_states": torch.randn(batch, 12, 16),
        "timestep": torch.randint(0, 1000, (batch,)),
        "return_dict": False,
    }
    return model, inputs


def hunyuan(frames=2, size=16, batch=1, valid_text=12):
    """`valid_text`: the valid (left-aligned) prompt tokens of 12, one count for all samples or one per sample."""
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()
    mask = (torch.arange(12) < torch.as_tensor(valid_text).expand(batch)[:, None]).long()
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, size, size),
        "timestep": torch.randint(0, 1000, (batch,)),
        "encoder_hidden_states": torch.randn(batch, 12, 16),
        "pooled_projections": torch.randn(batch, 8),
        "encoder_attention_mask": mask,
        "guidance": torch.randint(0, 1000, (batch,)).float(),
        "return_dict": False,
    }
    return model, inputs


def cogvideox(frames=1, size=8, batch=2, rotary=False, patch_t=None, sample_frames=8):
    """`sample_frames` (pixel frames) sets a pipeline's clip: (sample_frames - 1) // 4 + 1 latent frames."""
    torch.manual_seed(0)
    head_dim = 16 if rotary else 8  # the 3-axis rotary split needs even parts
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=size, sample_height=size, sample_frames=sample_frames, patch_size=2,
        patch_size_t=patch_t, temporal_compression_ratio=4, max_text_seq_length=8,
        use_rotary_positional_embeddings=rotary,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(batch, frames, 4, size, size),
        "encoder_hidden_states": torch.randn(batch, 8, 8),
        "timestep": torch.randint(0, 1000, (batch,)),
        "return_dict": False,
    }
    if rotary:
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        side = size // 2
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=head_dim, crops_coords=((0, 0), (side, side)), grid_size=(side, side), temporal_size=frames
        )
    return model, inputs


def mochi(frames=2, size=32, batch=2, rotary=False):
    """`rotary`: random RoPE frequencies (the model learns them from zeros, which rotate nothing)."""
    torch.manual_seed(0)
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    ).eval()
    if rotary:
        torch.nn.init.normal_(model.pos_frequencies, std=0.5)
    mask = torch.ones(batch, 16, dtype=torch.bool)
    mask[0, 11:] = False  # sample 0 has a padded prompt
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, size, size),
        "encoder_hidden_states": torch.randn(batch, 16, 16),
        "timestep": torch.randint(0, 1000, (batch,)),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }
    return model, inputs


def ltx(frames=2, size=16, batch=2, num_layers=1):
    torch.manual_seed(0)
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=num_layers, caption_channels=16, qk_norm="rms_norm_across_heads",
    ).eval()
    inputs = {
        "hidden_states": torch.randn(batch, frames * size * size, 4),
        "encoder_hidden_states": torch.randn(batch, 16, 16),
        "timestep": torch.randint(0, 1000, (batch,)),
        "encoder_attention_mask": torch.ones(batch, 16).bool(),
        "num_frames": frames, "height": size, "width": size,
        "return_dict": False,
    }
    return model, inputs


def _wan_config(num_layers=2, **extra):
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **extra,
    )


def wan_ti2v(frames=2, height=16, width=32, batch=1):
    """Wan 2.2 TI2V-5B's transformer call: the same class, one timestep per video token (`expand_timesteps`)."""
    model, inputs = wan(frames, height, width, batch)
    tokens = frames * (height // 2) * (width // 2)
    inputs["timestep"] = torch.randint(0, 1000, (batch, 1)).repeat(1, tokens)
    inputs["timestep"][:, : tokens // frames] = 0  # TI2V: the conditioning first frame is clean
    return model, inputs


def wan_i2v(frames=2, height=16, width=32, batch=1, image_tokens=5):
    """Wan 2.1 I2V: CLIP image tokens through `attn2`'s `add_k_proj`/`add_v_proj`; the stock processor takes the
    last 512 context tokens as text, so the prompt has 512 tokens."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**_wan_config(image_dim=4, added_kv_proj_dim=24)).eval()
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, height, width),
        "encoder_hidden_states": torch.randn(batch, 512, 16),
        "encoder_hidden_states_image": torch.randn(batch, image_tokens, 4),
        "timestep": torch.randint(0, 1000, (batch,)),
        "return_dict": False,
    }
    return model, inputs


def wan_vace(frames=2, height=16, width=32, batch=1):
    torch.manual_seed(0)
    model = diffusers.WanVACETransformer3DModel(**_wan_config(num_layers=3, vace_layers=[0, 2], vace_in_channels=12)).eval()
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, height, width),
        "encoder_hidden_states": torch.randn(batch, 12, 16),
        "control_hidden_states": torch.randn(batch, 12, frames, height, width),
        "timestep": torch.randint(0, 1000, (batch,)),
        "return_dict": False,
    }
    return model, inputs


def hunyuan15(frames=2, size=8, batch=1, valid_text=6, valid_text_2=4, image=False):
    """HunyuanVideo 1.5: T2V (zero image embeds, so the 3 image tokens are padding) or, with `image`, I2V (3
    valid image tokens). `valid_text` / `valid_text_2`: the valid Qwen (of 6) / ByT5 (of 4) tokens, one count
    for all samples or one per sample."""
    torch.manual_seed(0)
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ).eval()
    mask = (torch.arange(6) < torch.as_tensor(valid_text).expand(batch)[:, None]).long()
    mask_2 = (torch.arange(4) < torch.as_tensor(valid_text_2).expand(batch)[:, None]).long()
    inputs = {
        "hidden_states": torch.randn(batch, 4, frames, size, size),
        "timestep": torch.randint(0, 1000, (batch,)).float(),
        "encoder_hidden_states": torch.randn(batch, 6, 16),
        "encoder_hidden_states_2": torch.randn(batch, 4, 8),
        "encoder_attention_mask": mask,
        "encoder_attention_mask_2": mask_2,
        "image_embeds": torch.randn(batch, 3, 12) if image else torch.zeros(batch, 3, 12),
        "return_dict": False,
    }
    return model, inputs


def ltx2(frames=2, size=16, batch=2, **config):
    """LTX-2 audio-video transformer; `config` adds e.g. `gated_attn`, `rope_type="split"`, `perturbed_attn`."""
    torch.manual_seed(0)
    model = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=16, rope_double_precision=False, **config,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(batch, frames * size * size, 4),
        "audio_hidden_states": torch.randn(batch, 9, 4),
        "encoder_hidden_states": torch.randn(batch, 16, 16),
        "audio_encoder_hidden_states": torch.randn(batch, 16, 16),
        "timestep": torch.rand(batch) * 1000,
        "encoder_attention_mask": torch.ones(batch, 16).bool(),
        "num_frames": frames, "height": size, "width": size, "audio_num_frames": 9, "fps": 25.0,
        "return_dict": False,
    }
    return model, inputs


def kandinsky5(frames=2, size=16, batch=1, text=4):
    """Kandinsky 5 (regular attention) on (B, F, H, W, C) latents; its forward returns a `Transformer2DModelOutput`.

    Its modulation layers are zero at initialisation (attention outputs gated to zero); here they are random."""
    torch.manual_seed(0)
    model = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=32, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=48, ff_dim=128, num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 8, 8), visual_cond=False,
    ).eval()
    for module in model.modules():  # the modulations start at zero, which would gate every attention output off
        if type(module).__name__ == "Kandinsky5Modulation":
            torch.nn.init.normal_(module.out_layer.weight, std=0.05)
            torch.nn.init.normal_(module.out_layer.bias, std=0.5)
    inputs = {
        "hidden_states": torch.randn(batch, frames, size, size, 4),
        "encoder_hidden_states": torch.randn(batch, text, 16),
        "timestep": torch.rand(batch) * 1000,
        "pooled_projections": torch.randn(batch, 32),
        "visual_rope_pos": [torch.arange(frames), torch.arange(size // 2), torch.arange(size // 2)],
        "text_rope_pos": torch.arange(text),
        "return_dict": True,
    }
    return model, inputs
