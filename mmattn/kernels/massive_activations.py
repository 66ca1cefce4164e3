"""Massive activations: the tokens whose hidden state has a few dimensions far above its RMS (Sun et al., "Massive
Activations in Large Language Models", 2024), as VAR finds the visual sink tokens in each decoder layer of a prefill.

About ten small torch ops per layer (upcast, RMS, gather, max, threshold) cost a launch each where the prefill is
host-bound; the Triton kernel (`triton/massive_activations.py`) reads each hidden state once for its RMS and its
named dimensions. Backends (`backends.REGISTRY["massive_activations"]`): `"triton"`, `"torch"` (the reference,
`reference.massive_activation_scores`) or `"auto"` (Triton on CUDA). Inference only (no autograd).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from .backends import resolve_backend
from .validation import check_number

__all__ = ["massive_activation_tokens"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _dims_index(dims: Sequence[int] | torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`dims` as an index tensor on hidden's device; a sequence is checked against the width, a tensor (already
    on the device, as a caller that checked it once passes it at every layer) only for its dtype, shape and device."""
    width = hidden.shape[-1]
    if isinstance(dims, torch.Tensor):
        if dims.dtype not in _INDEX_DTYPES or dims.dim() != 1 or not len(dims) or dims.device != hidden.device:
            raise ValueError(f"dims: expected a non-empty 1-D int32/int64 tensor on {hidden.device}, got "
                             f"{dims.dtype} {tuple(dims.shape)} on {dims.device}")
        return dims
    dims = list(dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < width for d in dims):
        raise ValueError(f"dims: expected hidden dimensions in [0, {width}), got {dims}")
    return torch.tensor(dims, device=hidden.device)


def massive_activation_tokens(
    hidden: torch.Tensor, dims: Sequence[int] | torch.Tensor, *, threshold: float, backend: str = "auto"
) -> torch.Tensor:
    """The tokens with a massive activation in `dims`: phi(h) = max_{d in dims} |h_d| / RMS(h) > threshold, bool
    `(...)` for hidden states `(..., width)` (RMS without weight, eps 1e-6, in float32; VAR's sink tokens for
    threshold tau and dims D_sink).

    dims: hidden dimension indices, a sequence or a 1-D integer tensor on hidden's device (not range-checked: a
    tensor is how a caller that checked its dims once passes them at every layer).
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        got = f"{hidden.dtype} {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise TypeError(f"hidden: expected a floating-point (..., width) tensor, got {got}")
    index = _dims_index(dims, hidden)
    threshold = check_number("threshold", threshold)
    if resolve_backend("massive_activations", backend, hidden) == "triton":
        from .triton.massive_activations import massive_activations_op

        return massive_activations_op(hidden, index, threshold)
    return reference.massive_activation_scores(hidden, index) > threshold
