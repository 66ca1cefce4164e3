"""Tiny random LLaVA and Qwen2-VL models (spec vlm.md section 5.4) and their inputs."""

from __future__ import annotations

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

LLAVA_IMAGE_ID = 99
QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_VISION_START, QWEN_VISION_END = 190, 191, 192, 193


def tiny_llava(layers: int = 4, attn_implementation: str = "eager", image_tokens: int = 4) -> LlavaForConditionalGeneration:
    """4 image tokens per 28x28 image at patch 14 (or 16 at image_size 56)."""
    image_size = 28 if image_tokens == 4 else 56
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": image_size, "patch_size": 14,
                       "projection_dim": 32},
        text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": layers,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                     "max_position_embeddings": 256, "pad_token_id": 0},
        image_token_index=LLAVA_IMAGE_ID, image_seq_length=image_tokens, vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def llava_inputs(model: LlavaForConditionalGeneration, prompts: int = 1, seed: int = 0, pad: tuple[int, ...] = ()) -> dict:
    """`prompts` rows of [text, image x N, text]; row i gets pad[i] left-padding tokens (id 0)."""
    generator = torch.Generator().manual_seed(seed)
    n_image = model.config.image_seq_length
    size = model.config.vision_config.image_size
    rows = []
    for row in range(prompts):
        before = torch.randint(1, 90, (3,), generator=generator)
        after = torch.randint(1, 90, (5 + row,), generator=generator)
        rows.append(torch.cat([before, torch.full((n_image,), LLAVA_IMAGE_ID), after]))
    pads = list(pad) + [0] * (prompts - len(pad))
    width = max(len(r) + p for r, p in zip(rows, pads))
    ids = torch.zeros(prompts, width, dtype=torch.long)
    mask = torch.zeros(prompts, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    pixel_values = torch.randn(prompts, 3, size, size, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}


def tiny_qwen2vl(layers: int = 3, attn_implementation: str = "eager") -> Qwen2VLForConditionalGeneration:
    config = Qwen2VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": layers, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 200, "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
                     "bos_token_id": 1, "eos_token_id": 199},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 4,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=QWEN_IMAGE_ID, video_token_id=QWEN_VIDEO_ID,
        vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def qwen_inputs(prompts: int = 1, seed: int = 0, grid: tuple[int, int, int] = (1, 4, 4)) -> dict:
    """Rows of [text, <vision_start>, image pads, <vision_end>, text] with left padding to equal length."""
    generator = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n_image = t * h * w // 4
    rows = []
    for row in range(prompts):
        before = torch.randint(1, 150, (2,), generator=generator)
        after = torch.randint(1, 150, (4 + row,), generator=generator)
        rows.append(torch.cat([before, torch.tensor([QWEN_VISION_START]), torch.full((n_image,), QWEN_IMAGE_ID),
                               torch.tensor([QWEN_VISION_END]), after]))
    width = max(len(r) for r in rows)
    ids = torch.zeros(prompts, width, dtype=torch.long)
    mask = torch.zeros(prompts, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    pixel_values = torch.randn(prompts * t * h * w, 3 * 14 * 14 * 2, generator=generator)
    grid_thw = torch.tensor([list(grid)] * prompts)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_grid_thw": grid_thw,
            "mm_token_type_ids": (ids == QWEN_IMAGE_ID).long()}
