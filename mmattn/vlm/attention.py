"""The attention function mmattn registers with transformers' `AttentionInterface`.

Layers and rows that no intervention touches run the model's own implementation (eager or SDPA) unchanged. The last
rows an intervention needs are recomputed as explicit post-softmax probabilities A in fp32 (transformers' eager
softmax), handed to the interventions for reading or in-place editing, cast to the model dtype and multiplied with V.

Edits are column scalings of A: every intervention here multiplies the probabilities of a few sets of prompt columns
(image tokens, sinks, query tokens) by per-row factors. So one batched matmul of A with the 0/1 column sets gives each
row's masses over them, and one more applies `A_j <- A_j (1 + sum_k c_k S_kj)`, whatever the number of columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "AttentionRows",
    "LayerColumns",
    "column_masses",
    "eager_attention",
    "explicit_probabilities",
    "repeat_kv",
    "rows_attention",
    "scale_columns",
    "tail_mask",
    "tail_visibility",
]


@dataclass
class AttentionRows:
    """Post-softmax attention A[b, h, r, k] (fp32, contiguous) of the last R query rows of one layer call.

    selected: [B, R] bool, the rows the intervention asked for per batch row (None: all of them). prompt_len: the
    first `prompt_len` keys are the prompt tokens this layer holds (the rest are decoded tokens).
    """

    layer: int
    probs: torch.Tensor
    selected: torch.Tensor | None
    prompt_len: int

    def prompt(self) -> torch.Tensor:
        """[B, H*R, prompt_len] view of the probabilities of the prompt columns."""
        batch, heads, rows, _ = self.probs.shape
        return self.probs[..., : self.prompt_len].reshape(batch, heads * rows, self.prompt_len)


class LayerColumns:
    """The column sets [B, n, N] of the n prompt tokens each edited layer holds, kept in one [layers, B, P, N] buffer.

    A compiled decoding step takes the buffer as one graph input instead of one tensor per edited layer: CUDA graphs
    copy every input that is not a parameter at each replay, one launch each (30 per token for VAR on LLaVA-1.5-7B).
    """

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.buffer: torch.Tensor | None = None
        self.widths: dict[int, int] = {}
        self.views: dict[int, torch.Tensor] = {}  # eager reads: a view per layer, made once (three view ops each)

    def put(self, layer: int, columns: torch.Tensor, prompt_len: int) -> None:
        """Store layer `layer`'s columns [B, n, N], n <= `prompt_len` (the prompt tokens entering the decoder)."""
        if self.buffer is None:
            batch, _, sets = columns.shape
            self.buffer = columns.new_zeros((self.layers, batch, prompt_len, sets))
        view = self.buffer[layer, :, : columns.shape[1]]
        view.copy_(columns)
        self.widths[layer], self.views[layer] = columns.shape[1], view

    def __getitem__(self, layer: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.buffer[layer, :, : self.widths[layer]]
        return self.views[layer]

    def __contains__(self, layer: int) -> bool:
        """Whether layer `layer`'s columns are stored. A compiled decoding step guards this on the widths (ints),
        where a dict of tensors per layer would cost a tensor check per layer at every step."""
        return layer in self.widths


def column_masses(rows: AttentionRows, columns: torch.Tensor) -> torch.Tensor:
    """sum_j A[b, h, r, j] S[b, j, k] over the prompt columns, for column sets `columns` [B, P, K]: [B, H, R, K]."""
    batch, heads, count, _ = rows.probs.shape
    return torch.bmm(rows.prompt(), columns).view(batch, heads, count, -1)


def scale_columns(rows: AttentionRows, coefficients: torch.Tensor, columns: torch.Tensor) -> None:
    """A[b, h, r, j] *= 1 + sum_k c[b, h, r, k] S[b, k, j] in place, for column sets `columns` [B, K, P]; all-zero
    coefficients leave A bit for bit unchanged."""
    prompt = rows.prompt()
    batch, heads, count, kinds = coefficients.shape
    prompt.addcmul_(prompt, torch.bmm(coefficients.reshape(batch, heads * count, kinds), columns))


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, H_kv * groups, T, D] for grouped-query attention."""
    if groups == 1:
        return states
    batch, heads, tokens, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, tokens, dim).reshape(batch, heads * groups, tokens, dim)


def _grouped(states: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, R, X] -> [B, H_kv, (H / H_kv) R, X]: the query heads of one kv head side by side (no key copies)."""
    batch, heads, rows, width = states.shape
    return states.reshape(batch, kv_heads, heads // kv_heads * rows, width)


def tail_visibility(
    attention_mask: torch.Tensor | None, tail: int, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """The keys bool [B|1, tail, kv] that the last `tail` query rows see under a boolean `attention_mask` (or none;
    None when they see every key).

    Without a mask, several query rows attend causally with SDPA's upper-left alignment (`is_causal`): row i sees
    keys 0..i. transformers skips the mask so when the keys are the queries, or when a prefill fills an empty static
    cache, whose keys past the prompt are unwritten slots."""
    if attention_mask is not None:
        return attention_mask[:, 0, q_len - tail : q_len, :kv_len]
    if q_len == 1 or (tail == 1 and kv_len == q_len):
        return None
    rows = torch.arange(q_len - tail, q_len, device=device)
    return (torch.arange(kv_len, device=device) <= rows[:, None])[None]


def tail_mask(
    attention_mask: torch.Tensor | None, tail: int, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """The additive fp32 mask [B|1, 1, tail, kv] of the last `tail` query rows (None when they see every key), from
    a boolean or additive `attention_mask` (see `tail_visibility`)."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask[..., q_len - tail : q_len, :kv_len].float()
    visible = tail_visibility(attention_mask, tail, q_len, kv_len, device)
    return None if visible is None else torch.where(visible[:, None], 0.0, torch.finfo(torch.float32).min)


def explicit_probabilities(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) in fp32: [B, H, R, kv], keys [B, H_kv, kv, D] shared by their query heads."""
    batch, heads, count, _ = query.shape
    logits = torch.matmul(_grouped(query, key.shape[1]), key.transpose(2, 3)).view(batch, heads, count, -1)
    logits = logits * scaling if mask is None else torch.add(mask, logits, alpha=scaling)
    return nn.functional.softmax(logits, dim=-1, dtype=torch.float32)


def rows_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    tail: int,
    edit: Callable[[torch.Tensor], None],
) -> torch.Tensor:
    """The attention output [B, tail, H, D] of the last `tail` query rows, with `edit` applied to their fp32
    probabilities [B, H, tail, kv] in place before A·V. `mask`: `tail_mask` of the layer's attention mask."""
    probs = explicit_probabilities(query[:, :, query.shape[2] - tail :], key, mask, scaling)
    edit(probs)
    batch, heads = probs.shape[:2]
    output = torch.matmul(_grouped(probs.to(value.dtype), value.shape[1]), value)
    return output.view(batch, heads, tail, -1).transpose(1, 2)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    tail: int = 0,
    edit: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention op for op (bit-identical when `edit` changes nothing), with `edit` applied in
    place to the fp32 probabilities [B, H, tail, kv] of the last `tail` rows before the cast and A·V."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32)
    if edit is not None:
        _edit_last_rows(weights, tail, edit)
    weights = weights.to(query.dtype)
    output = torch.matmul(weights, value)
    return output.transpose(1, 2).contiguous(), weights


def _edit_last_rows(weights: torch.Tensor, tail: int, edit: Callable[[torch.Tensor], None]) -> None:
    if tail == weights.shape[2]:
        edit(weights)
        return
    rows = weights[:, :, -tail:].contiguous()
    edit(rows)
    weights[:, :, -tail:] = rows
