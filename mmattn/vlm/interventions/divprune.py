"""DivPrune (Alvar, Singh, Akbari, Zhang; "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025): keep the subset of visual tokens that maximises diversity.

Pruning is cast as a Max-Min Diversity Problem over the visual token embeddings at the LLM input (after the
projector), with cosine distance d(i, j) = 1 - cos(e_i, e_j), solved greedily: the first token is the one whose
nearest other token is farthest; each next one is the token whose distance to the selected set, min_{s in S} d(i, s),
is largest, until round(N·r) tokens are selected (r: the retained ratio, 0.098 in the released scripts for
LLaVA-1.5-7B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .chosen import ChosenTokensPruning
from .pruning import _PruningRuntime, _true_indices

__all__ = ["DivPrune", "max_min_diverse_subset"]


def max_min_diverse_subset(features: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy Max-Min diversity selection on cosine distance: [B, count] indices into the N tokens of `features`
    [B, N, D], in the order selected (fp32)."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [B, N, N]
    batch, tokens = distance.shape[:2]
    eye = torch.eye(tokens, dtype=torch.bool, device=distance.device)
    nearest_other = distance.masked_fill(eye, float("inf")).amin(-1)
    chosen = torch.zeros(batch, tokens, dtype=torch.bool, device=distance.device)
    rows = torch.arange(batch, device=distance.device)
    picks = [nearest_other.argmax(-1)]
    to_set = distance[rows, picks[0]]  # [B, N]: distance of every token to the selected set
    chosen[rows, picks[0]] = True
    for _ in range(1, count):
        pick = to_set.masked_fill(chosen, float("-inf")).argmax(-1)
        picks.append(pick)
        chosen[rows, pick] = True
        to_set = torch.minimum(to_set, distance[rows, pick])
    return torch.stack(picks[:count], 1)


class _DivPruneRuntime(_PruningRuntime):
    def choose(self, layer: int, hidden: torch.Tensor, image: torch.Tensor, kept: int) -> torch.Tensor:
        """The `kept` most diverse image tokens of each prompt, from the hidden states entering `layer` (layer 0:
        the projected visual embeddings); all images of a prompt form one candidate set, as the paper's code."""
        count = int(image[0].sum())
        positions = _true_indices(image, count)
        features = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        picked = positions.gather(1, max_min_diverse_subset(features, kept))
        return torch.zeros_like(image).scatter_(1, picked, True)


@dataclass(frozen=True)
class DivPrune(ChosenTokensPruning):
    """DivPrune: the diverse round(N·keep) of the N image tokens remain.

    Args:
        keep: the retained ratio r (the paper's "SUBSET_RATIO"; 0.098 in its released LLaVA-1.5 runs).
        layer: 0 prunes at the LLM input, as the paper; K >= 1 selects from the hidden states entering layer K.
        positions: see ChosenTokensPruning (the paper's pruned input sequence is numbered contiguously).
    """

    keep: float = 0.098
    runtime_class: ClassVar[type] = _DivPruneRuntime
