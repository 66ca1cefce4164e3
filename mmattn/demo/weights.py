"""Random weights of the demo's own, drawn from a private generator (torch's global one is never seeded)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["random_weights"]

_INIT_STD = 0.02  # transformers' initializer_range


@torch.no_grad()
def random_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    """`module` with every parameter that is not constant as built (norm scales and zero biases are) redrawn from
    N(0, 0.02) by a generator of its own: the same weights whatever else used torch's global generator meanwhile."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        if parameter.is_floating_point() and (parameter != parameter.flatten()[0]).any():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * _INIT_STD)
    return module
