"""Tiny random diffusers video transformers (configs of diffusers' own tests, spec section 4.6) and their inputs.

Grids are chosen so that one model call is a few hundred tokens; `frames`/`size` let tests change them.
"""

import torch

diffusers = __import__("pytest").importorskip("diffusers")


def wan(frames=2, height=16, width=32, batch=1):
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
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


def mochi(frames=2, size=32, batch=2):
    torch.manual_seed(0)
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    ).eval()
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


def ltx(frames=2, size=16, batch=2):
    torch.manual_seed(0)
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, caption_channels=16, qk_norm="rms_norm_across_heads",
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
