"""Pruning methods that rank the image tokens by the LLM's own attention of the last prompt token: FastV and
PyramidDrop, each a plan for the pruning engine (`pruning.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import check_indices, check_number
from .pruning import PruneStage, PruningPlan, _PruningIntervention

__all__ = ["FastV", "PyramidDrop"]


@dataclass(frozen=True)
class FastV(_PruningIntervention):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024), KV-cache variant.

    After layer K-1 the image tokens are ranked by the head-mean attention of the last prompt token (the official
    code's score; the paper text says attention received from all tokens); from layer K on only round(N·(1-R))
    remain, at their original rotary positions.
    """

    k: int = 2
    ratio: float = 0.5
    layers_argument: ClassVar[str] = "k"

    def plan(self) -> PruningPlan:
        check_number("k", self.k, 1, what="the layer K (scores come from layer K-1)", integer=True)
        check_number("ratio", self.ratio, 0.0, 1.0, what="the pruned fraction R")
        return PruningPlan(stages=(PruneStage(self.k, 1.0 - self.ratio),), score="previous_layer")


@dataclass(frozen=True)
class PyramidDrop(_PruningIntervention):
    """PyramidDrop (Xing et al., CVPR 2025): at each stage boundary layer the image tokens are ranked by that layer's
    own attention of the last instruction token and cut to int(N·λ^s) of the original N, floored as the official code
    (image_token_ratio_list [0.5, 0.25, 0.125] at layers 8/16/24 for LLaVA-1.5-7B); positions are re-indexed
    contiguously after each drop."""

    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5
    positions: str = "reindex"
    layers_argument: ClassVar[str] = "layers"

    def plan(self) -> PruningPlan:
        check_indices("layers", self.layers, minimum=1)  # scores come from the stage layer's own attention
        if not self.layers:
            raise ValueError("layers: expected at least one stage layer, got none")
        check_number("ratio", self.ratio, 0.0, 1.0, what="λ", open_low=True)
        stages = tuple(PruneStage(layer, self.ratio ** (index + 1)) for index, layer in enumerate(self.layers))
        return PruningPlan(stages=stages, score="own_layer", positions=self.positions, count="floor")
