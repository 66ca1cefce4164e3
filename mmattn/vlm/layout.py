"""Token layout of an LVLM prompt: where the image tokens and the user's query sit, per batch row.

Spans come from the config's image token id of each model family (spec vlm.md section 5.2), never from fixed offsets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FAMILIES", "FAMILY_CLASSES", "FamilySpec", "TokenLayout", "resolve_family"]


@dataclass(frozen=True)
class FamilySpec:
    """What an intervention needs to know about one model family.

    `query_skip` / `query_suffix`: tokens between the last image token and the query, and the chat-template tokens
    after it (assistant header); the GIFT reference code uses these template offsets (LLaVA qs = ve+3, Qwen qs = ve+2,
    qe = len-6). `video_token_attrs`: the config attributes naming the video token of families whose video frames
    enter the decoder as their own placeholder tokens (Qwen2-VL/2.5-VL/3-VL `<|video_pad|>`, 151656);
    `video_token_id` is that id as `resolve_family` reads it from a model's config (None: no video tokens).
    """

    name: str
    image_token_attrs: tuple[str, ...]
    default_image_token_id: int | None
    multi_axis_rope: bool
    query_skip: int
    query_suffix: int
    video_token_attrs: tuple[str, ...] = ()
    video_token_id: int | None = None


FAMILIES: dict[str, FamilySpec] = {
    "llava": FamilySpec("llava", ("image_token_id", "image_token_index"), 32000, False, 2, 5),
    "llava_next": FamilySpec("llava_next", ("image_token_id", "image_token_index"), 32000, False, 2, 5),
    "llava_onevision": FamilySpec("llava_onevision", ("image_token_id", "image_token_index"), 151646, False, 2, 5),
    "qwen2_vl": FamilySpec("qwen2_vl", ("image_token_id",), 151655, True, 1, 5, ("video_token_id",)),
    "qwen2_5_vl": FamilySpec("qwen2_5_vl", ("image_token_id",), 151655, True, 1, 5, ("video_token_id",)),
    # Qwen3-VL: <|vision_start|> <|image_pad|> x n <|vision_end|> per image, interleaved multi-axis rotary positions;
    # DeepStack adds vision features into the first decoder layers at the image positions (the pruning engine
    # prunes those feature lists with the tokens).
    "qwen3_vl": FamilySpec("qwen3_vl", ("image_token_id",), 151655, True, 1, 5, ("video_token_id",)),
    "qwen3_vl_moe": FamilySpec("qwen3_vl_moe", ("image_token_id",), 151655, True, 1, 5, ("video_token_id",)),
    # InternVL3 (hf format): <img> <IMG_CONTEXT> x 256 per 448-pixel tile (pixel-shuffled 32x32 patches) </img>\n;
    # all tiles of one image sit in one contiguous run, images are separate runs.
    "internvl": FamilySpec("internvl", ("image_token_id",), 151667, False, 2, 5),
    # Gemma 3: <start_of_image> <image_soft_token> x 256 (4x4-pooled SigLIP patches) <end_of_image> \n\n; the
    # prefill masks let image tokens of one image attend each other bidirectionally (token_type_ids), and
    # sliding-window layers alternate with global ones.
    "gemma3": FamilySpec("gemma3", ("image_token_id", "image_token_index"), 262144, False, 2, 5),
}

#: The transformers classes of each family, for error messages.
FAMILY_CLASSES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}


def resolve_family(model: nn.Module) -> tuple[FamilySpec, int]:
    """The family of a loaded `transformers` LVLM (with the video token id of its config, where the family has one)
    and its image token id; ValueError for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model: expected a transformers LVLM of type {sorted(FAMILIES)} ({', '.join(FAMILY_CLASSES.values())}), "
            f"got {type(model).__name__} (model_type={model_type!r})"
        )
    family = FAMILIES[model_type]
    video_ids = [getattr(config, attr, None) for attr in family.video_token_attrs]
    video_ids = [token_id for token_id in video_ids if isinstance(token_id, int)]
    if video_ids:
        family = dataclasses.replace(family, video_token_id=video_ids[0])
    for attr in family.image_token_attrs:
        token_id = getattr(config, attr, None)
        if isinstance(token_id, int):
            return family, token_id
    raise ValueError(f"model: config of type {model_type!r} has no image token id ({' / '.join(family.image_token_attrs)})")


@dataclass
class TokenLayout:
    """Per-row masks over the (left-padded) prompt of one generate call.

    image: [B, P] bool, the visual-token positions V: image tokens, and video tokens on families that have them (the
    interventions treat both as visual tokens); query: [B, P] bool, the user's query span after the last visual token;
    valid: [B, P] bool, non-padding tokens; input_ids: [B, P] the prompt; video: [B, P] bool, the video tokens among
    `image` (None: all false).
    """

    image: torch.Tensor
    query: torch.Tensor
    valid: torch.Tensor
    input_ids: torch.Tensor
    video: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return self.image.shape[1]

    @property
    def image_counts(self) -> torch.Tensor:
        return self.image.sum(1)

    def after_last_image(self) -> torch.Tensor:
        """[B, P] bool: valid tokens after the row's last image token (the text that reads the image)."""
        positions = torch.arange(self.prompt_len, device=self.image.device)
        last = torch.where(self.image, positions, -1).amax(1, keepdim=True)
        return (positions > last) & self.valid & (last >= 0)

    @classmethod
    def from_input_ids(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int, family: FamilySpec
    ) -> TokenLayout:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, tokens], got shape {tuple(input_ids.shape)}")
        video = None if family.video_token_id is None else input_ids == family.video_token_id
        image = input_ids == image_token_id if video is None else (input_ids == image_token_id) | video
        valid = torch.ones_like(image) if attention_mask is None else attention_mask.to(torch.bool)
        missing = (~image.any(1)).nonzero().flatten().tolist()
        if missing:
            videos = "" if video is None else f" or video token (id {family.video_token_id})"
            raise ValueError(
                f"input_ids: rows {missing} hold no image token (id {image_token_id}){videos}; the interventions need "
                "an image or a video"
            )
        positions = torch.arange(image.shape[1], device=image.device)
        last_image = torch.where(image, positions, -1).amax(1, keepdim=True)
        query = (positions > last_image + family.query_skip) & (positions < image.shape[1] - family.query_suffix)
        return cls(image=image, query=query & valid, valid=valid, input_ids=input_ids, video=video)
