"""The shared settings of pruning methods that choose the kept image tokens themselves (score="custom"): one stage at
decoder layer `layer` (0: the decoder's input embeddings, before the LLM) keeping a fraction of the image tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .base import ModelContext, check_number
from .pruning import POSITION_POLICIES, PruneStage, PruningPlan, _PruningIntervention

__all__ = ["ChosenTokensPruning"]


@dataclass(frozen=True)
class ChosenTokensPruning(_PruningIntervention):
    """keep: the kept fraction of the prompt's N image tokens (round(N·keep) remain); layer: the first decoder layer
    that runs on them (0: pruned before the LLM); positions: rotary positions of the kept tokens, "reindex"
    (contiguous, as a shorter input sequence) or "keep" (original, gaps allowed); None takes "reindex" at layer 0 on
    one-axis rotary models and "keep" otherwise (multi-axis positions are always gathered)."""

    keep: float = 0.1
    layer: int = 0
    positions: str | None = None
    layers_argument: ClassVar[str] = "layer"

    def stage(self) -> PruneStage:
        check_number("keep", self.keep, 0.0, 1.0, what="the kept fraction of the image tokens", open_low=True)
        check_number("layer", self.layer, 0, what="a decoder layer index", integer=True)
        if self.positions is not None and self.positions not in POSITION_POLICIES:
            raise ValueError(f"positions: expected None or one of {POSITION_POLICIES}, got {self.positions!r}")
        return PruneStage(self.layer, self.keep)

    def plan(self) -> PruningPlan:
        positions = self.positions or ("reindex" if self.layer == 0 else "keep")
        return PruningPlan(stages=(self.stage(),), score="custom", count="round", positions=positions,
                           input_positions=positions)

    def plan_for(self, context: ModelContext) -> PruningPlan:
        plan = self.plan()
        if self.positions is None and context.family.multi_axis_rope:
            plan = dataclasses.replace(plan, positions="keep", input_positions="keep")
        return plan
