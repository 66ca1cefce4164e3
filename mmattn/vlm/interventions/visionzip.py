"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025):
text-agnostic token reduction inside the vision tower, before the LLM.

Dominant tokens: the image tokens that receive the most attention in the ViT layer whose output feeds the projector
(CLIP layer -2 for LLaVA-1.5): the [CLS] query row summed over heads, or, for an encoder without [CLS] (SigLIP), the
attention each token receives averaged over the query rows. Contextual tokens: of the remaining tokens, `contextual`
targets are taken at a uniform stride; every other remaining token is assigned to its most similar target (cosine of
that layer's keys, averaged over heads); each target becomes target feature + mean of its assigned features. The
merge happens on the vision features before the projector; the engine then keeps the dominant and contextual tokens
at their image positions and drops the rest from the decoder's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import ModelContext, check_number
from .pruning import PruneStage, PruningPlan, _PruningIntervention, _PruningRuntime
from .vision_importance import vit_attention_and_keys

__all__ = ["VisionZip", "visionzip_select"]


def visionzip_select(
    received: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on one batch of images: `received` [I, N] attention score per image token, `keys` [I, N, d] the
    merging metric, `features` [I, N, D] the projector's input. Returns (keep [I, N] bool, features with each
    contextual target replaced by target + mean of its assigned tokens)."""
    images, tokens = received.shape
    top = received.topk(dominant, dim=1).indices
    keep = torch.zeros(images, tokens, dtype=torch.bool, device=received.device).scatter_(1, top, True)
    features = features.clone()
    if contextual == 0:
        return keep, features
    rest = (~keep).to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, : tokens - dominant]  # ascending
    step = max(1, (tokens - dominant) // contextual)
    target_rank = torch.arange(0, tokens - dominant, step, device=received.device)[:contextual]
    is_target = torch.zeros(tokens - dominant, dtype=torch.bool, device=received.device)
    is_target[target_rank] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]
    unit = nn.functional.normalize(keys.float(), dim=-1)

    def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))

    similarity = take(unit, others) @ take(unit, targets).transpose(1, 2)  # [I, others, contextual]
    assigned = nn.functional.one_hot(similarity.argmax(-1), contextual).to(features.dtype)
    counts = assigned.sum(1).clamp_min(1)[..., None]
    merged = take(features, targets) + assigned.transpose(1, 2) @ take(features, others) / counts
    features.scatter_(1, targets[..., None].expand(-1, -1, features.shape[-1]), merged)
    keep.scatter_(1, targets, True)
    return keep, features


class _VisionZipRuntime(_PruningRuntime):
    def __init__(self, plan: PruningPlan, context: ModelContext, settings: VisionZip) -> None:
        super().__init__(plan, context, settings)
        model = context.model
        vision = model.model.vision_tower
        layers = vision.vision_model.encoder.layers if hasattr(vision, "vision_model") else vision.encoder.layers
        feature_layer = model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise TypeError(f"vision_feature_layer: VisionZip needs a single feature layer, got {feature_layer}")
        index = len(layers) + feature_layer if feature_layer < 0 else feature_layer - 1
        self.has_cls = model.config.vision_feature_select_strategy == "default"
        self.scored: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kept_tokens: torch.Tensor | None = None
        context.hooks.append(layers[index].register_forward_pre_hook(self._score_hook))
        context.hooks.append(model.model.multi_modal_projector.register_forward_pre_hook(self._merge_hook))

    def _score_hook(self, module: nn.Module, args: tuple) -> None:
        attention, keys = vit_attention_and_keys(module, args[0])
        if self.has_cls:  # the [CLS] row over the patches; [CLS] itself is not an image token
            self.scored = (attention[:, 0, 1:], keys[:, 1:])
        else:  # attention received, averaged over the query rows
            self.scored = (attention.mean(1), keys)

    def _merge_hook(self, module: nn.Module, args: tuple) -> tuple:
        features = args[0]
        if self.scored is None or features.dim() != 3:
            return args
        received, keys = self.scored
        self.scored = None
        settings = self.settings
        if received.shape[1] != features.shape[1]:
            raise ValueError(f"pixel_values: {received.shape[1]} ViT tokens do not match {features.shape[1]} features")
        if settings.dominant + settings.contextual > features.shape[1]:
            raise ValueError(
                f"dominant: dominant + contextual = {settings.dominant + settings.contextual} exceeds the "
                f"{features.shape[1]} tokens of an image"
            )
        keep, merged = visionzip_select(received, keys, features, settings.dominant, settings.contextual)
        self.kept_tokens = keep.flatten().detach()
        return (merged.to(features.dtype), *args[1:])

    def choose(self, layer: int, hidden: torch.Tensor, image: torch.Tensor, kept: int) -> torch.Tensor:
        """The dominant and contextual tokens, at their image positions (images fill them in order)."""
        kept_tokens, self.kept_tokens = self.kept_tokens, None
        if kept_tokens is None:
            raise ValueError("pixel_values: VisionZip selects inside the vision tower, which did not run for this "
                             "prompt since apply() (image features computed before it?)")
        total = int(image.sum())
        repeats = total // kept_tokens.numel()
        if kept_tokens.numel() * repeats != total:
            raise ValueError(f"pixel_values: {kept_tokens.numel()} ViT tokens do not match {total} image tokens")
        per_prompt = kept_tokens.view(image.shape[0] // repeats, -1).repeat_interleave(repeats, 0)
        return torch.zeros_like(image).masked_scatter(image, per_prompt)


@dataclass(frozen=True)
class VisionZip(_PruningIntervention):
    """VisionZip: per image, `dominant` tokens by the attention they receive in the ViT plus `contextual` merged
    tokens remain (LLaVA-1.5 at 64 tokens: 54 + 10 of 576; at 128: 108 + 20; at 192: 162 + 30).

    Supported: LlavaForConditionalGeneration (one CLIP crop per image, [CLS] row score; SigLIP encoders without
    [CLS], as llava-interleave, score by the mean attention received). The kept tokens keep their order in the
    image and take contiguous positions (the official code hands the LLM a shorter image sequence).
    """

    dominant: int = 54
    contextual: int = 10
    layers_argument: ClassVar[str] = "dominant"
    runtime_class: ClassVar[type] = _VisionZipRuntime

    def plan(self) -> PruningPlan:
        check_number("dominant", self.dominant, 1, what="the dominant token count", integer=True)
        check_number("contextual", self.contextual, 0, what="the contextual token count", integer=True)
        return PruningPlan(stages=(PruneStage(0, 0.0),), score="custom", input_positions="reindex")

    def bind(self, context: ModelContext):
        if context.family.name != "llava":
            raise ValueError(
                "model: VisionZip selects and merges tokens of one ViT crop per image, as in "
                f"LlavaForConditionalGeneration (model_type 'llava'); got {type(context.model).__name__} "
                f"(model_type {context.family.name!r})"
            )
        return super().bind(context)
