"""The VLM tab's models: a tiny random LLaVA built in (byte-level "tokenizer", no download), or a local
Hugging Face LLaVA / Qwen2-VL directory with its processor. Both turn (prompt, image) into generate inputs."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .fields import InputError, Text
from .weights import random_weights

__all__ = ["MODEL", "TINY", "VLM", "load_vlm"]

logger = logging.getLogger(__name__)

TINY = "tiny built-in LLaVA (random weights)"
MODEL = Text("Model", max_chars=4096)  # PATH_MAX on Linux
_BYTE_OFFSET, _IMAGE_ID, _BOS = 2, 258, 1
_AROUND_QUERY = ("Q:", "\nAns:")
"""Bytes before and after the prompt: where LLaVA's chat template leaves its query for `mmattn.vlm.layout`
(2 tokens after the image, 5 before the end), so that GIFT reads the whole prompt."""
_CLIP_MEAN, _CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


@dataclass
class VLM:
    """A model with its way to build inputs and to read generated ids back as text."""

    model: torch.nn.Module
    processor: object | None
    image_size: int = 112

    @property
    def tokenizer(self) -> object | None:
        return getattr(self.processor, "tokenizer", None)

    @property
    def num_layers(self) -> int:
        return self.model.model.language_model.config.num_hidden_layers

    def inputs(self, prompt: str, image: Image.Image) -> dict[str, torch.Tensor]:
        if self.processor is None:
            text = [_BOS] + [_IMAGE_ID] * (self.image_size // 14) ** 2 + [
                b + _BYTE_OFFSET for b in prompt.join(_AROUND_QUERY).encode()]
            picture = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
            pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
            pixels = (pixels - torch.tensor(_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(_CLIP_STD).view(3, 1, 1)
            ids = torch.tensor([text])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels[None]}
        messages = [{"role": "user", "content": [{"type": "image", "image": image.convert("RGB")},
                                                 {"type": "text", "text": prompt}]}]
        return dict(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt"))

    def decode(self, ids: torch.Tensor) -> str:
        if self.processor is None:
            return "".join(chr(i - _BYTE_OFFSET) if 32 <= i - _BYTE_OFFSET < 127 else "·" for i in ids.tolist())
        return self.processor.batch_decode(ids[None], skip_special_tokens=True)[0]

    def image_grid(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(rows, cols) of the image tokens in prompt order (Qwen2-VL merges 2x2 patches per token)."""
        if "image_grid_thw" in inputs:
            _, height, width = inputs["image_grid_thw"][0].tolist()
            return height // 2, width // 2
        count = int((inputs["input_ids"][0] == self.model.config.image_token_id).sum())
        side = math.isqrt(count)
        if side * side != count:
            raise InputError(f"{MODEL.label}: expected a LLaVA-1.5 style model (a square grid of image tokens)")
        return side, side


def _tiny_llava(image_size: int = 112) -> torch.nn.Module:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": image_size, "patch_size": 14,
                       "projection_dim": 64},
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260,
                     "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": _BOS, "eos_token_id": 0},
        image_token_index=_IMAGE_ID, image_seq_length=(image_size // 14) ** 2, vision_feature_layer=-1,
    )
    model = random_weights(LlavaForConditionalGeneration(config)).eval()
    model.set_attn_implementation("eager")
    return model


def load_vlm(path: str) -> VLM:
    """`TINY` (or an empty path) builds the tiny model; otherwise a local model directory (no download)."""
    path = MODEL(path).strip()
    if path in ("", TINY):
        return VLM(_tiny_llava(), None)
    if not os.path.isdir(path):
        raise InputError(f"{MODEL.label}: expected {TINY!r} or the path of a model directory on the server "
                         "(none there)")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmattn.vlm.layout import FAMILIES

    message = f"{MODEL.label}: expected a Hugging Face model directory of type {', '.join(FAMILIES)}"
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    except Exception:
        logger.exception("loading the model directory %s failed", path)
        raise InputError(message) from None
    if model.config.model_type not in FAMILIES:
        raise InputError(message)
    return VLM(model.eval(), processor)
