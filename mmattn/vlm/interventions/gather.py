"""Gathering the kept tokens out of the tensors a decoder layer receives (hidden states, masks, rotary tables)."""

from __future__ import annotations

import torch

__all__ = ["take_mask", "take_tokens"]


def take_tokens(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """tensor[..., b, index[b], ...] along token dim `dim`, whose batch dim is `dim - 1` (broadcast batch 1 ok).

    Serves hidden states [B, L, D] (dim 1), position ids [B, L] / [3|4, B, L] (dim -1) and rotary cos/sin
    [B, L, D] / [3, B, L, D] (dim -2).
    """
    dim = dim % tensor.dim()
    batch_dim = dim - 1
    batch, count = index.shape
    shape = list(tensor.shape)
    shape[batch_dim] = batch
    tensor = tensor.expand(shape)
    view = [1] * tensor.dim()
    view[batch_dim], view[dim] = batch, count
    shape[dim] = count
    return tensor.gather(dim, index.view(view).expand(shape))


def take_mask(mask: torch.Tensor | None, rows: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor | None:
    """A 2D padding mask [B, kv] or a 4D attention mask [B|1, 1, q, kv] restricted to query `rows` ([B, n] or None
    for all) and key `columns` ([B, m]); None (causal, no padding) stays None."""
    if mask is None:
        return None
    batch = columns.shape[0]
    if mask.dim() == 2:
        return mask.expand(batch, -1).gather(1, columns)
    mask = mask.expand(batch, *mask.shape[1:])
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(batch, mask.shape[1], rows.shape[1], mask.shape[3]))
    return mask.gather(3, columns[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], columns.shape[1]))
