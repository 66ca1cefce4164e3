"""Random visual-token pruning: the baseline every pruning method is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import check_number
from .chosen import ChosenTokensPruning
from .pruning import _PruningRuntime, _true_indices

__all__ = ["RandomPrune"]


class _RandomRuntime(_PruningRuntime):
    def choose(self, layer: int, hidden: torch.Tensor, image: torch.Tensor, kept: int) -> torch.Tensor:
        """Each prompt keeps `kept` of its image tokens drawn uniformly without replacement by a generator seeded with
        `seed`: the draw depends on the seed and the image-token count only, so batching does not change it."""
        count = int(image[0].sum())
        generator = torch.Generator().manual_seed(self.settings.seed)
        drawn = torch.randperm(count, generator=generator)[:kept].to(image.device)
        positions = _true_indices(image, count)
        return torch.zeros_like(image).scatter_(1, positions[:, drawn], True)


@dataclass(frozen=True)
class RandomPrune(ChosenTokensPruning):
    """Uniform random keep of round(N·keep) of the N image tokens, the same draw for every prompt with N image tokens.

    Args:
        keep: kept fraction; set it to the count of the method compared with (e.g. 64/576 for VisionZip's 64 tokens
            on LLaVA-1.5). Default 0.098, DivPrune's retained ratio.
        layer: 0 prunes the decoder's input (before the LLM, as VisionZip and DivPrune); K >= 1 from layer K on (as
            FastV's K).
        seed: seed of the draw (a torch.Generator on the CPU).
        positions: see ChosenTokensPruning.
    """

    keep: float = 0.098
    seed: int = 0
    runtime_class: ClassVar[type] = _RandomRuntime

    def plan(self):
        check_number("seed", self.seed, 0, what="a generator seed", integer=True)
        return super().plan()
