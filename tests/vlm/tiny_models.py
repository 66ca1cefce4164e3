"""Tiny random models of every supported family (spec vlm.md section 5.4) and their inputs: LLaVA, LLaVA-NeXT and
LLaVA-OneVision (anyres), Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE, with DeepStack), InternVL3 and Gemma 3."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

LLAVA_IMAGE_ID = 99
QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_VISION_START, QWEN_VISION_END = 190, 191, 192, 193
#: Image tokens of a 28x56 image in the tiny anyres models (28-pixel crops of 2x2 patches): the 2x2 base crop, the
#: 1x2 tiles as a 2x4 grid, and one newline token per grid row.
ANYRES_TOKENS = 4 + 8 + 2

_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
           "patch_size": 14}
_CLIP = {"model_type": "clip_vision_model", **_VISION, "image_size": 28, "projection_dim": 32}
_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 256, "pad_token_id": 0}
_ANYRES = {"image_token_index": LLAVA_IMAGE_ID, "image_grid_pinpoints": [[28, 56], [56, 28]],
           "vision_feature_layer": -1}


def _built(model_class: type[PreTrainedModel], config, attn_implementation: str) -> PreTrainedModel:
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def tiny_llava(layers: int = 4, attn_implementation: str = "eager", image_tokens: int = 4) -> LlavaForConditionalGeneration:
    """4 image tokens per 28x28 image at patch 14 (or 16 at image_size 56)."""
    image_size = 28 if image_tokens == 4 else 56
    config = LlavaConfig(
        vision_config={**_CLIP, "image_size": image_size},
        text_config={**_LLAMA, "num_hidden_layers": layers},
        image_token_index=LLAVA_IMAGE_ID, image_seq_length=image_tokens, vision_feature_layer=-1,
    )
    return _built(LlavaForConditionalGeneration, config, attn_implementation)


def tiny_llava_next(layers: int = 4, attn_implementation: str = "eager") -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT (CLIP, LLaMA) with anyres tiles: ANYRES_TOKENS image tokens per 28x56 image."""
    config = LlavaNextConfig(vision_config=_CLIP, text_config={**_LLAMA, "num_hidden_layers": layers}, **_ANYRES)
    return _built(LlavaNextForConditionalGeneration, config, attn_implementation)


def tiny_llava_onevision(layers: int = 4, attn_implementation: str = "eager") -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision (SigLIP, Qwen2) with anyres tiles: ANYRES_TOKENS image tokens per 28x56 image."""
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", **_VISION, "image_size": 28},
        text_config={**_LLAMA, "model_type": "qwen2", "num_hidden_layers": layers},
        vision_feature_select_strategy="full", video_token_index=LLAVA_IMAGE_ID - 1, **_ANYRES,
    )
    return _built(LlavaOnevisionForConditionalGeneration, config, attn_implementation)


def left_padded(rows: list[torch.Tensor], pad: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows padded on the left with id 0 to one width; `pad[i]`: extra padding
    of row i beyond what the longest row needs."""
    pads = list(pad) + [0] * (len(rows) - len(pad))
    width = max(len(r) + p for r, p in zip(rows, pads))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def llava_inputs(model: PreTrainedModel, prompts: int = 1, seed: int = 0, pad: tuple[int, ...] = ()) -> dict:
    """`prompts` rows of [text, image x N, text]; row i gets pad[i] left-padding tokens (id 0). One 28x28 image per
    prompt for LLaVA, one 28x56 image (base crop and two tiles) for LLaVA-NeXT / OneVision."""
    generator = torch.Generator().manual_seed(seed)
    anyres = model.config.model_type != "llava"
    n_image = ANYRES_TOKENS if anyres else model.config.image_seq_length
    size = model.config.vision_config.image_size
    rows = []
    for row in range(prompts):
        before = torch.randint(1, 90, (3,), generator=generator)
        after = torch.randint(1, 90, (5 + row,), generator=generator)
        rows.append(torch.cat([before, torch.full((n_image,), LLAVA_IMAGE_ID), after]))
    ids, mask = left_padded(rows, pad)
    if not anyres:
        pixel_values = torch.randn(prompts, 3, size, size, generator=generator)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}
    pixel_values = torch.randn(prompts, 3, 3, size, size, generator=generator)  # the base crop and two tiles
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
            "image_sizes": torch.tensor([[size, 2 * size]] * prompts)}


_QWEN_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 200, "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 199,
              "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4}}
_QWEN_IDS = {"image_token_id": QWEN_IMAGE_ID, "video_token_id": QWEN_VIDEO_ID,
             "vision_start_token_id": QWEN_VISION_START, "vision_end_token_id": QWEN_VISION_END}
_QWEN_PATCHES = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}


def assert_llava_rows_equal_single_prompts(model: PreTrainedModel, inputs: dict, batched: torch.Tensor,
                                           new_tokens: int = 4) -> None:
    """Each row of a left-padded LLaVA batch's greedy `generate` output equals that prompt generated alone."""
    for row in range(batched.shape[0]):
        keep = inputs["attention_mask"][row].bool()
        single = {"input_ids": inputs["input_ids"][row : row + 1, keep],
                  "attention_mask": inputs["attention_mask"][row : row + 1, keep],
                  "pixel_values": inputs["pixel_values"][row : row + 1]}
        alone = model.generate(**single, max_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(alone[0, -new_tokens:], batched[row, -new_tokens:])


def tiny_qwen2vl(layers: int = 3, attn_implementation: str = "eager") -> Qwen2VLForConditionalGeneration:
    config = Qwen2VLConfig(
        text_config={**_QWEN_TEXT, "num_hidden_layers": layers},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 4,
                       **_QWEN_PATCHES},
        **_QWEN_IDS,
    )
    return _built(Qwen2VLForConditionalGeneration, config, attn_implementation)


def tiny_qwen2_5_vl(layers: int = 3, attn_implementation: str = "eager") -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: vision block 0 attends within 4x4-patch windows, block 1 globally; token ids as tiny_qwen2vl."""
    config = Qwen2_5_VLConfig(
        text_config={**_QWEN_TEXT, "num_hidden_layers": layers},
        vision_config={"depth": 2, "hidden_size": 32, "out_hidden_size": 32, "intermediate_size": 37, "num_heads": 4,
                       "window_size": 56, "fullatt_block_indexes": [1], **_QWEN_PATCHES},
        **_QWEN_IDS,
    )
    return _built(Qwen2_5_VLForConditionalGeneration, config, attn_implementation)


_QWEN3_TEXT = {**_QWEN_TEXT, "head_dim": 8,
               "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                   "rope_theta": 1e4}}
#: DeepStack: the features of vision blocks 0 and 1 are added to the outputs of decoder layers 0 and 1.
_QWEN3_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 37, "num_heads": 4, "out_hidden_size": 32,
                 "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1], **_QWEN_PATCHES}


def tiny_qwen3_vl(layers: int = 3, attn_implementation: str = "eager") -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL: q/k norms, interleaved multi-axis rotary positions, DeepStack features into layers 0 and 1."""
    config = Qwen3VLConfig(text_config={**_QWEN3_TEXT, "num_hidden_layers": layers}, vision_config=_QWEN3_VISION,
                           **_QWEN_IDS)
    return _built(Qwen3VLForConditionalGeneration, config, attn_implementation)


def tiny_qwen3_vl_moe(layers: int = 3, attn_implementation: str = "eager") -> Qwen3VLMoeForConditionalGeneration:
    """Qwen3-VL-MoE: as tiny_qwen3_vl with 4 experts of which 2 route each token."""
    text = {**_QWEN3_TEXT, "num_hidden_layers": layers, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16, "decoder_sparse_step": 1}
    config = Qwen3VLMoeConfig(text_config=text, vision_config=_QWEN3_VISION, **_QWEN_IDS)
    return _built(Qwen3VLMoeForConditionalGeneration, config, attn_implementation)


INTERNVL_IMAGE_ID, INTERNVL_IMAGE_START, INTERNVL_IMAGE_END = 95, 96, 97


def tiny_internvl(layers: int = 4, attn_implementation: str = "eager") -> InternVLForConditionalGeneration:
    """InternVL3: a 56x56 tile of 14-pixel patches (4x4) pixel-shuffled into 2x2 = 4 <IMG_CONTEXT> tokens; Qwen2."""
    config = InternVLConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": [56, 56], "patch_size": [14, 14]},
        text_config={**_LLAMA, "model_type": "qwen2", "num_hidden_layers": layers},
        image_token_id=INTERNVL_IMAGE_ID, image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1,
    )
    return _built(InternVLForConditionalGeneration, config, attn_implementation)


GEMMA_IMAGE_ID, GEMMA_IMAGE_START, GEMMA_IMAGE_END = 95, 96, 97


def tiny_gemma3(
    layers: int = 4, attn_implementation: str = "eager", sliding_window: int = 256
) -> Gemma3ForConditionalGeneration:
    """Gemma 3: a 56x56 SigLIP image (4x4 patches) average-pooled into 2x2 = 4 image tokens; layers alternate
    sliding-window (window `sliding_window`) and global attention; image tokens attend each other both ways."""
    config = Gemma3Config(
        vision_config={"model_type": "siglip_vision_model", **_VISION, "image_size": 56},
        text_config={**_LLAMA, "model_type": "gemma3_text", "head_dim": 8, "num_hidden_layers": layers,
                     "sliding_window": sliding_window,
                     "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]},
        mm_tokens_per_image=4, image_token_index=GEMMA_IMAGE_ID, boi_token_index=GEMMA_IMAGE_START,
        eoi_token_index=GEMMA_IMAGE_END,
    )
    return _built(Gemma3ForConditionalGeneration, config, attn_implementation)


def bracketed_inputs(
    model: PreTrainedModel, prompts: int = 1, seed: int = 0, pad: tuple[int, ...] = (), images: int = 1
) -> dict:
    """InternVL / Gemma 3 prompts: [text, (<start> image tokens x n <end> text) x images, text], left-padded; Gemma 3
    gets token_type_ids (1 on image tokens) for its bidirectional image mask."""
    gemma = model.config.model_type == "gemma3"
    image_id, start, end = (GEMMA_IMAGE_ID, GEMMA_IMAGE_START, GEMMA_IMAGE_END) if gemma else (
        INTERNVL_IMAGE_ID, INTERNVL_IMAGE_START, INTERNVL_IMAGE_END)
    n_image = model.config.mm_tokens_per_image if gemma else model.config.image_seq_length
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(prompts):
        parts = [torch.randint(1, 90, (3,), generator=generator)]
        for _ in range(images):
            parts += [torch.tensor([start]), torch.full((n_image,), image_id), torch.tensor([end]),
                      torch.randint(1, 90, (2,), generator=generator)]
        parts.append(torch.randint(1, 90, (3 + row,), generator=generator))
        rows.append(torch.cat(parts))
    ids, mask = left_padded(rows, pad)
    size = model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    inputs = {"input_ids": ids, "attention_mask": mask,
              "pixel_values": torch.randn(prompts * images, 3, size, size, generator=generator)}
    if gemma:
        inputs["token_type_ids"] = (ids == image_id).long()
    return inputs


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


_BUILDERS = {
    "llava": lambda layers, attn: tiny_llava(layers, attn, image_tokens=16),
    "llava_next": tiny_llava_next,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_vl_moe": tiny_qwen3_vl_moe,
    "internvl": tiny_internvl,
    "gemma3": tiny_gemma3,
}
#: The model types `mmattn.vlm.apply` supports, one tiny model each.
MODEL_TYPES = tuple(_BUILDERS)


def tiny_model(model_type: str, layers: int = 4, attn_implementation: str = "eager") -> PreTrainedModel:
    """The tiny model of `model_type` (LLaVA with 16 image tokens)."""
    return _BUILDERS[model_type](layers, attn_implementation)


def tiny_inputs(model: PreTrainedModel, prompts: int = 1, seed: int = 0, pad: tuple[int, ...] = ()) -> dict:
    """Left-padded prompts for `model`: llava_inputs, or qwen_inputs with 16 image tokens (where rows differ in
    length by one text token, so `pad` does not apply)."""
    if model.config.model_type.startswith("qwen"):
        return qwen_inputs(prompts, seed, grid=(1, 8, 8))
    if model.config.model_type in ("internvl", "gemma3"):
        return bracketed_inputs(model, prompts, seed, pad, images=2)
    return llava_inputs(model, prompts, seed, pad)


def with_question(inputs: dict, tokens: int = 10) -> dict:
    """`inputs` with `tokens` more text tokens after each prompt, so GIFT's query span is not empty."""
    batch = inputs["input_ids"].shape[0]
    extra = torch.randint(1, 90, (batch, tokens), generator=torch.Generator().manual_seed(1))
    grown = {**inputs, "input_ids": torch.cat([inputs["input_ids"], extra], 1),
             "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)}
    for name in ("mm_token_type_ids", "token_type_ids"):
        if name in inputs:
            grown[name] = torch.cat([inputs[name], torch.zeros_like(extra)], 1)
    return grown
