"""The attention function mmattn registers with transformers' `AttentionInterface`.

Layers and rows that no intervention touches run the model's own implementation (eager or SDPA) unchanged. Rows an
intervention needs are recomputed as explicit post-softmax probabilities A (fp32 softmax, as transformers' eager),
handed to the interventions for reading or in-place editing, and multiplied with V.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AttentionRows", "additive_mask_rows", "eager_attention", "explicit_probabilities", "repeat_kv"]


@dataclass
class AttentionRows:
    """Post-softmax attention A[b, h, r, k] of the selected query rows of one layer call.

    row_positions / kv_positions: [B, R] / [B, kv] positions of the rows and keys in the original prompt (decode
    tokens continue after the prompt), so interventions can look up the token layout whatever was pruned.
    """

    layer: int
    probs: torch.Tensor
    row_positions: torch.Tensor
    kv_positions: torch.Tensor


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, H_kv * groups, T, D] for grouped-query attention."""
    if groups == 1:
        return states
    batch, heads, tokens, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, tokens, dim).reshape(batch, heads * groups, tokens, dim)


def additive_mask_rows(
    attention_mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, kv_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """The additive mask [B|1, 1, R, kv] of query `rows`, from transformers' float, bool or absent (causal) mask."""
    if attention_mask is None:
        absolute = rows + (kv_len - q_len)
        allowed = torch.arange(kv_len, device=rows.device)[None, :] <= absolute[:, None]
        return torch.zeros((), dtype=dtype, device=rows.device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
    mask = attention_mask[..., rows, :kv_len]
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def explicit_probabilities(
    query: torch.Tensor, key: torch.Tensor, mask_rows: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) in fp32, cast back to the query dtype (transformers' eager convention)."""
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling + mask_rows
    return nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    edit: Callable[[torch.Tensor], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention op for op (bit-identical when `edit` changes nothing), with `edit` applied to
    the probabilities [B, H, q, kv] in place before A·V."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    edit(weights)
    output = torch.matmul(weights, value)
    return output.transpose(1, 2).contiguous(), weights
