"""VFlowOpt's presets and plan for the pruning engine (`pruning.py`): ViT-derived importance, recycling of the pruned
tokens, LLM-stage prunes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .base import check_indices, check_number
from .pruning import PruneStage, PruningPlan, VisionImportance, _PruningIntervention

__all__ = ["VFLOWOPT_PRESETS", "VFlowOpt"]

#: Released VFlowOpt presets (keep = kept fraction): (t, α_v, m, r_v, llm ratios: the share of the image tokens
#: present that each of layers 9 and 18 keeps).
VFLOWOPT_PRESETS: dict[float, tuple[float, float, float, float, tuple[float, float]]] = {
    0.1: (39.26, 0.0, 17.39, 0.1166, (1.0, 0.6011)),
    0.25: (34.76, 0.0, 15.58, 0.2651, (0.9833, 0.8773)),
    0.5: (28.68, 0.0, 11.76, 0.7233, (0.7487, 0.487)),
}


@dataclass(frozen=True)
class VFlowOpt(_PruningIntervention):
    """VFlowOpt (Yang et al., ICCV 2025): ViT-derived importance (context relevance + patch entropy) prunes the image
    tokens before the LLM, recycling the pruned ones into one token per m×m cell, then again at LLM layers 9 and 18
    with the same importance. `keep` picks a released preset (0.1, 0.25, 0.5); explicit fields override it.

    Counts as the official code: the ViT-output prune keeps N - round(N·(1-r_v)) tokens, of which int(N/m²) make way
    for the recycled cells, and each LLM stage removes round(n·(1-r)) of the n image tokens then present (r: its
    `llm_ratios` entry). The prune is applied to the decoder's input embeddings, and the kept tokens take contiguous
    rotary positions, as the official decoder input that never held the pruned ones; LLM stages keep positions.
    Models: LlavaForConditionalGeneration (one ViT patch per image token) and Gemma3ForConditionalGeneration (the map
    averaged over the k x k patches each image token pools; each image's token grid is recycled on its own).
    """

    keep: float = 0.1
    threshold: float | None = None
    entropy_weight: float | None = None
    cell: float | None = None
    vit_ratio: float | None = None
    llm_ratios: tuple[float, ...] | None = None
    llm_layers: Sequence[int] = (9, 18)
    vit_layer: int | None = None
    layers_argument: ClassVar[str] = "llm_layers"

    def plan(self) -> PruningPlan:
        if not isinstance(self.keep, float) or self.keep not in VFLOWOPT_PRESETS:
            raise ValueError(f"keep: expected a preset in {sorted(VFLOWOPT_PRESETS)}, got {self.keep!r}")
        threshold, entropy_weight, cell, vit_ratio, llm_ratios = VFLOWOPT_PRESETS[self.keep]
        threshold = threshold if self.threshold is None else self.threshold
        entropy_weight = entropy_weight if self.entropy_weight is None else self.entropy_weight
        cell = cell if self.cell is None else self.cell
        vit_ratio = vit_ratio if self.vit_ratio is None else self.vit_ratio
        llm_ratios = llm_ratios if self.llm_ratios is None else tuple(self.llm_ratios)
        check_number("threshold", threshold, 0.0, what="the global-token threshold t")
        check_number("entropy_weight", entropy_weight, -math.inf, what="α_v")
        check_number("cell", cell, 1.0, what="the recycling cell side m")
        check_number("vit_ratio", vit_ratio, 0.0, 1.0, what="the kept fraction r_v", open_low=True)
        check_indices("llm_layers", self.llm_layers, minimum=1)
        if self.vit_layer is not None:
            check_number("vit_layer", self.vit_layer, 0, what="a ViT layer index", integer=True)
        if len(llm_ratios) != len(self.llm_layers):
            raise ValueError(f"llm_ratios: expected one ratio per llm layer {tuple(self.llm_layers)}, got {llm_ratios}")
        for ratio in llm_ratios:
            check_number("llm_ratios", ratio, 0.0, 1.0, what="kept fractions")
        stages = (PruneStage(0, vit_ratio), *(PruneStage(layer, r) for layer, r in zip(self.llm_layers, llm_ratios)))
        importance = VisionImportance(self.vit_layer, threshold, entropy_weight)
        return PruningPlan(stages, score="vision", recycle_cell=cell, importance=importance, count="relative")
