"""Exact PyTorch implementations of every mmattn kernel: the CPU path, the fallback and the tests' oracle.

They are plain differentiable torch code (autograd gives the backward) and bound their memory: scores are
formed for a chunk of query rows at a time, never as a full `Lq x Lk` matrix for long sequences, and the backward
recomputes them chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from .mask import BlockSparseMask
from .neighborhood import Neighborhood

__all__ = [
    "block_sparse_attention",
    "column_set_attention",
    "gather_attention",
    "masked_attention",
    "massive_activation_scores",
    "neighborhood_attention",
    "ranked_head_enhancement",
    "rotary_embedding",
    "routed_attention",
    "sink_redistribution",
    "top_half_heads",
]

_SCORE_BUDGET = 1 << 24
"""Scores held at once per chunk of query rows (elements, over batch and heads)."""


def _safe_softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last axis and its log-sum-exp; rows of `-inf` give zero weights, `lse = -inf`, no NaN."""
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), row_max + torch.log(safe_total))
    return weights / safe_total, lse.squeeze(-1)


def _upcast_and_share_heads(q, k, v):
    """Half precision computes in float32; k/v heads repeat to the query heads (grouped-query attention)."""
    if q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with a bool mask broadcastable to `(B, Hq, Lq, Lk)` (True = attend), GQA aware.

    Half-precision inputs are computed in float32. Returns `(out, lse)` with `lse` (float32 or float64) the
    natural-log sum of exponentials per query row. Rows that attend to no
    key give `out = 0` and `lse = -inf`, with zero gradients (no NaN).
    """
    dtype = q.dtype
    q, k, v = _upcast_and_share_heads(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights, lse = _safe_softmax(scores)
    return torch.matmul(weights, v).to(dtype), lse


def _rows_per_chunk(scores_per_row: int) -> int:
    """Query rows whose scores (or gathered keys) fit the budget; at least one (and no division by an empty batch)."""
    return max(1, _SCORE_BUDGET // max(1, scores_per_row))


def _in_chunks(attend, rows: int, chunk: int, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend(start, end, *args) -> (out, lse)` over query rows `[start, end)`, `chunk` rows at a time, concatenated.

    With autograd on and several chunks, each chunk is recomputed in the backward (activation checkpointing): no
    more than one chunk's scores are held at once in training either.
    """
    checkpointed = torch.is_grad_enabled() and chunk < rows
    outs, lses = [], []
    for start in range(0, rows, chunk):
        bounds = (start, min(rows, start + chunk))
        if checkpointed:
            out, lse = torch.utils.checkpoint.checkpoint(attend, *bounds, *args, use_reentrant=False)
        else:
            out, lse = attend(*bounds, *args)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _block_sparse_chunk(start, end, q, k, v, mask: BlockSparseMask, scale):
    return masked_attention(q[:, :, start:end], k, v, mask.to_token_mask(start, end), scale)


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention (reference): `masked_attention` with the mask expanded to tokens chunk by chunk
    (whole query blocks at a time). Returns `(out, lse)`; see `masked_attention`."""
    batch, heads, q_len, _ = q.shape
    q_block = mask.block_size[0]
    rows = max(q_block, _rows_per_chunk(batch * heads * k.shape[2]) // q_block * q_block)
    return _in_chunks(_block_sparse_chunk, q_len, rows, q, k, v, mask, scale)


def _neighborhood_chunk(start, end, q, k, v, rpb, nbhd: Neighborhood, scale):
    key_index, valid, rpb_index = nbhd.neighbors(start, end, q.device)
    keys, values = k[:, :, key_index], v[:, :, key_index]  # (B, H, C, K, D)
    scores = torch.einsum("bhcd,bhckd->bhck", q[:, :, start:end], keys) * scale
    if rpb is not None:
        scores = scores + rpb[(slice(None), *rpb_index)].flatten(2).to(scores.dtype)
    weights, lse = _safe_softmax(scores.masked_fill(~valid, float("-inf")))
    return torch.einsum("bhck,bhckd->bhcd", weights, values), lse


def neighborhood_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nbhd: Neighborhood, rpb: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighborhood attention (reference) on flattened tokens `(B, H, N, D)`: gathers each query's keys, for a
    chunk of queries at a time (the gathered keys stay within a fixed budget). Returns `(out, lse)`; see
    `masked_attention`."""
    dtype = q.dtype
    q, k, v = _upcast_and_share_heads(q, k, v)
    batch, heads, tokens, head_dim = q.shape
    rows = _rows_per_chunk(batch * heads * nbhd.num_keys * head_dim)
    out, lse = _in_chunks(_neighborhood_chunk, tokens, rows, q, k, v, rpb, nbhd, scale)
    return out.to(dtype), lse


def _routed_chunk(start, end, q, k, v, region_indices, kv_valid, q_region: int, kv_region: int, scale):
    n_kv_regions = k.shape[2] // kv_region
    routed = region_indices[:, :, torch.arange(start, end, device=q.device) // q_region]  # (B|1, H|1, C, topk)
    allowed = (routed[..., None] == torch.arange(n_kv_regions, device=q.device)).any(-2)  # (B|1, H|1, C, regions)
    allowed = allowed.repeat_interleave(kv_region, dim=-1)  # (B|1, H|1, C, Lk)
    if kv_valid is not None:
        allowed = allowed & kv_valid[:, None, None, :]
    return masked_attention(q[:, :, start:end], k, v, allowed, scale)


def routed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_indices: torch.Tensor, kv_valid: torch.Tensor | None,
    q_region: int, kv_region: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention (reference): dense attention with every non-routed key region (and every key with
    `kv_valid` False) masked out, chunk by chunk of query rows; out-of-range region indices route nowhere.
    `region_indices` `(B|1, H|1, n_q_regions, topk)`; `kv_valid` bool `(B|1, Lk)` or None. Returns `(out, lse)`;
    see `masked_attention`."""
    batch, heads, q_len, _ = q.shape
    rows = _rows_per_chunk(batch * heads * k.shape[2])
    return _in_chunks(_routed_chunk, q_len, rows, q, k, v, region_indices, kv_valid, q_region, kv_region, scale)


def gather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, kv_valid: torch.Tensor | None,
    q_region: int, kv_region: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention as the official BRA token attention computes it (the `"torch"` backend of
    `mmattn.kernels.routed_attention`): gather the routed regions' keys and values (a `topk`-fold copy), then
    softmax attention region by region. Indices must lie in range. `(out, lse)`; see `routed_attention`."""
    batch, heads, q_len, head_dim = q.shape
    n_q_regions, topk = q_len // q_region, indices.shape[-1]
    if indices.shape[1] != 1 and k.shape[1] != heads:  # per-head routing over shared (GQA) keys
        groups = heads // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    gather_heads = k.shape[1] if indices.shape[1] == 1 else heads
    flat = indices.long().expand(batch, gather_heads, n_q_regions, topk).flatten(2)
    select = flat[..., None, None].expand(-1, -1, -1, kv_region, head_dim)

    def gather(t: torch.Tensor) -> torch.Tensor:
        regions = t.unflatten(2, (-1, kv_region)).expand(batch, gather_heads, -1, -1, -1)
        return regions.gather(2, select).reshape(batch, gather_heads, n_q_regions, topk * kv_region, head_dim)

    mask = None
    if kv_valid is not None:
        valid = kv_valid.unflatten(1, (-1, kv_region))[:, None].expand(batch, flat.shape[1], -1, -1)
        mask = valid.gather(2, flat[..., None].expand(-1, -1, -1, kv_region))
        mask = mask.reshape(batch, flat.shape[1], n_q_regions, 1, topk * kv_region)
    out, lse = masked_attention(q.unflatten(2, (n_q_regions, q_region)), gather(k), gather(v), mask, scale)
    return out.flatten(2, 3), lse.flatten(2, 3)

def column_set_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor, visible: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of a few query rows split by column sets (reference): with A = softmax(q k^T scale) over the
    `visible` keys, `(out = A v, masses = A[:C] S, weighted[n] = (A[:C] * S[:, n]) v[:C])` for `columns` S
    `(B, C, N)` weighting the first C keys: `(B, H, R, D)`, `(B, H, R, N)`, `(B, H, R, N, D)` for q `(B, H, R, D)`;
    `visible` `(B, T)` (every row) or `(B, R, T)`; computed in float32 for half precision; empty rows give zeros."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = _upcast_and_share_heads(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if visible is not None:
        rows = visible[:, None, None] if visible.dim() == 2 else visible[:, None]
        scores = scores.masked_fill(~rows, float("-inf"))
    probs = _safe_softmax(scores)[0].to(dtype)
    prompt, weights = probs[..., : columns.shape[1]], columns.to(dtype)
    weighted = torch.einsum("bhrc,bcn,bhcd->bhrnd", prompt, weights, v[:, :, : columns.shape[1]].to(dtype))
    return torch.matmul(probs, v.to(dtype)), torch.einsum("bhrc,bcn->bhrn", prompt, weights), weighted


def sink_redistribution(
    out: torch.Tensor, masses: torch.Tensor, weighted: torch.Tensor, share: float, rho: float, min_mass: float,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Visual attention sink redistribution of `column_set_attention` statistics over the sets (image, receivers,
    sinks): in rows with receivers >= rho * image, image >= min_mass and receivers > 0 (and `selected` [B, R], if
    given), the sinks keep 1 - share of their attention and the receivers gain share * sum_sinks A in proportion to
    their own."""
    image, receivers, sinks = masses.unbind(-1)
    tiny = torch.finfo(torch.float32).smallest_normal
    centric = (receivers - rho * image >= 0) & (image >= min_mass) & (receivers >= tiny)
    if selected is not None:
        centric &= selected[:, None]
    gain = torch.where(centric, sinks / torch.where(centric, receivers, 1.0), 0.0)
    moved = gain[..., None] * weighted[..., 1, :] - centric[..., None] * weighted[..., 2, :]
    return out + share * moved


def massive_activation_scores(hidden: torch.Tensor, dims) -> torch.Tensor:
    """phi(h) = max_{d in dims} |h_d| / RMS(h) of each hidden state h of `hidden` (..., width), RMS without weight
    and eps 1e-6, in float32: (...). `dims`: a sequence or an index tensor on hidden's device."""
    hidden = hidden.float()
    rms = hidden.pow(2).mean(-1).add(1e-6).sqrt()
    index = dims if isinstance(dims, torch.Tensor) else list(dims)
    return hidden[..., index].abs().amax(-1) / rms


def rotary_embedding(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, pairing: str = "interleaved"
) -> torch.Tensor:
    """Rotary embedding as complex products, in float32 (float64 for float64 x), returned in x's dtype. Interleaved:
    channels (2i, 2i+1) of x are the number x[2i] + j x[2i+1], multiplied by cos[..., 2i] + j sin[..., 2i+1] (tables
    broadcastable to x), or by cos[..., i] + j sin[..., i] (tables of head_dim / 2 entries). `pairing="halves"`:
    the number x[i] + j x[i + head_dim / 2], multiplied by cos[..., i] + j sin[..., i]."""
    real = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = x.shape[-1] // 2
    if pairing == "halves":
        pairs = torch.view_as_complex(torch.stack(x.to(real).split(half, dim=-1), dim=-1).contiguous())
        cos, sin = (t[..., :half] for t in (cos, sin))
    else:
        pairs = torch.view_as_complex(x.to(real).unflatten(-1, (-1, 2)).contiguous())
        cos, sin = (t if t.shape[-1] == half else t[..., start::2] for t, start in ((cos, 0), (sin, 1)))
    turned = torch.view_as_real(pairs * torch.complex(cos.to(real), sin.to(real)))
    return (turned.transpose(-1, -2) if pairing == "halves" else turned).flatten(-2).to(x.dtype)


def top_half_heads(mass: torch.Tensor) -> torch.Tensor:
    """1.0 on the top H//2 heads (dim 1, at least one) of `mass` [B, H, ...], 0.0 elsewhere."""
    indices = mass.topk(max(mass.shape[1] // 2, 1), dim=1).indices
    return torch.zeros_like(mass).scatter_(1, indices, 1.0)


def ranked_head_enhancement(
    out: torch.Tensor, masses: torch.Tensor, weighted: torch.Tensor, beta: float
) -> torch.Tensor:
    """Head-ranked enhancement of `column_set_attention` statistics over the sets (image, boost, query), per query
    row: the top half of heads by image mass (vision heads) add W_boost, the top half by query mass add
    (beta r - 1) W_query with r the vision heads' image-mass gain, and each row is rescaled to its original mass."""
    image, boost, query = masses.unbind(-1)
    vision, query_heads = top_half_heads(image), top_half_heads(query)
    tiny = torch.finfo(torch.float32).smallest_normal
    gain = (vision * boost).sum(1, keepdim=True) / (vision * image).sum(1, keepdim=True).clamp_min(tiny)
    query_gain = query_heads * (beta * (1 + gain) - 1)
    edited = out + vision[..., None] * weighted[..., 1, :] + query_gain[..., None] * weighted[..., 2, :]
    return edited / (1 + vision * boost + query_gain * query)[..., None]
