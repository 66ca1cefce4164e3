"""Exact PyTorch implementations of every mmattn kernel: the CPU path, the fallback and the tests' oracle.

They are plain differentiable torch code (autograd gives the backward) and bound their memory: scores are
formed for a chunk of query rows at a time, never as a full `Lq x Lk` matrix for long sequences.
"""

from __future__ import annotations

import torch

from .mask import BlockSparseMask

__all__ = ["masked_attention", "block_sparse_attention"]

_SCORE_BUDGET = 1 << 24
"""Scores held at once per chunk of query rows (elements, over batch and heads)."""


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with a bool mask broadcastable to `(B, Hq, Lq, Lk)` (True = attend), GQA aware.

    Half-precision inputs are computed in float32. Returns `(out, lse)` with `lse` (float32 or float64) the
    natural-log sum of exponentials per query row. Rows that attend to no
    key give `out = 0` and `lse = -inf`, with zero gradients (no NaN).
    """
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    empty = total == 0
    out = torch.matmul(weights, v) / torch.where(empty, torch.ones_like(total), total)
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), row_max + torch.log(safe_total))
    return out.to(dtype), lse.squeeze(-1)


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention (reference): `masked_attention` with the mask expanded to tokens chunk by chunk.

    Returns `(out, lse)`; see `masked_attention`.
    """
    batch, heads, q_len, _ = q.shape
    q_block = mask.block_size[0]
    rows_per_chunk = max(1, _SCORE_BUDGET // (batch * heads * k.shape[2]))
    rows_per_chunk = max(q_block, rows_per_chunk // q_block * q_block)
    outs, lses = [], []
    for start in range(0, q_len, rows_per_chunk):
        end = min(q_len, start + rows_per_chunk)
        token_mask = mask.to_token_mask(start, end)
        out, lse = masked_attention(q[:, :, start:end], k, v, token_mask, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
