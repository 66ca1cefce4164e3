"""Variable-length attention for the vision towers that pack their images (and windows) by `cu_seqlens`: Qwen2-VL,
Qwen2.5-VL, Qwen3-VL.

Without FlashAttention transformers runs such a tower one SDPA call per window (Qwen2.5-VL: 64-patch windows, ~512
of them for eight 1,024-token images, in each windowed block) after a host read of the lengths in every block. Here
every segment of a block runs in one batched SDPA call: the packed tokens are scattered into a `(segments, longest
segment)` batch, the padding keys masked out, and the result gathered back; equal segments are a view of the packed
tokens and need no mask, which lets SDPA take its fastest kernels (with a mask it takes the memory-efficient one,
114 of the 272 ms of kernel time of Qwen2.5-VL's tower on eight 1,024-token images on the H200). The attention function is registered in
transformers' `AttentionInterface` under a name with "flash" in it, which is what makes the towers hand it their
`cu_seqlens`; `use_varlen_vision_attention(model)` switches a model's vision tower to it, removably.

    with mmattn.vlm.use_varlen_vision_attention(model):
        model.generate(**inputs)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

__all__ = ["VARLEN_ATTENTION", "VarlenVisionAttention", "packs_by_cu_seqlens", "use_varlen_vision_attention",
           "varlen_attention"]

VARLEN_ATTENTION = "mmattn_flash_varlen"
"""The registered name: "flash" in it makes transformers pass `cu_seq_lens_q/k` and `max_length_q/k`."""


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    cu_seq_lens_q: torch.Tensor,
    cu_seq_lens_k: torch.Tensor,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention within each packed segment: `query`/`key`/`value` `(1, heads, tokens, head_dim)`, segments
    `[cu_seq_lens[i], cu_seq_lens[i + 1])` (the same for queries and keys) -> `(1, tokens, heads, head_dim)`, as
    transformers' attention functions return it."""
    same = cu_seq_lens_k is cu_seq_lens_q or torch.equal(cu_seq_lens_q, cu_seq_lens_k)  # the towers pass one tensor
    if attention_mask is not None or is_causal or not same:
        raise ValueError("varlen_attention takes non-causal self-attention within packed segments, no attention_mask")
    bounds = cu_seq_lens_q.long()
    lengths = bounds[1:] - bounds[:-1]
    longest = int(lengths.max()) if max_length_q is None else int(max_length_q)
    segments, tokens = lengths.numel(), query.shape[2]
    if segments * longest == tokens:  # equal segments (Qwen2.5-VL's windows of a 1,024-token image): a view, no mask
        out = F.scaled_dot_product_attention(*(_as_segments(t, segments) for t in (query, key, value)),
                                             dropout_p=dropout, scale=scaling)
        return out.transpose(0, 1).reshape(query.shape[1], tokens, -1).transpose(0, 1).unsqueeze(0), None
    position = torch.arange(tokens, device=query.device)
    segment = torch.bucketize(position, bounds[1:], right=True)
    slot = segment * longest + position - bounds[segment]  # the token's place in the padded batch

    def padded(t: torch.Tensor) -> torch.Tensor:  # (1, H, T, D) -> (segments, H, longest, D)
        rows = t[0].transpose(0, 1)
        batch = rows.new_zeros(segments * longest, *rows.shape[1:]).index_copy_(0, slot, rows)
        return batch.view(segments, longest, *rows.shape[1:]).transpose(1, 2)

    keep = (torch.arange(longest, device=query.device) < lengths[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=keep,
                                         dropout_p=dropout, scale=scaling)
    out = out.transpose(1, 2).reshape(segments * longest, -1, out.shape[-1])[slot]
    return out.unsqueeze(0), None


def _as_segments(t: torch.Tensor, segments: int) -> torch.Tensor:
    """(1, H, T, D) packed in equal segments -> (segments, H, T / segments, D), a view."""
    heads, tokens, dim = t.shape[1:]
    return t[0].view(heads, segments, tokens // segments, dim).transpose(0, 1)


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)


class VarlenVisionAttention:
    """The switch made by `use_varlen_vision_attention`: `remove()` (or leaving the `with` block) restores the tower's
    attention implementation."""

    def __init__(self, model: PreTrainedModel) -> None:
        if not packs_by_cu_seqlens(model):
            raise ValueError(f"model: {type(model).__name__} has no vision tower that packs images by cu_seqlens "
                             "(Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
        vision = model.config.vision_config
        self.config, self.previous = vision, vision._attn_implementation
        vision._attn_implementation = VARLEN_ATTENTION

    def remove(self) -> None:
        self.config._attn_implementation = self.previous

    def __enter__(self) -> VarlenVisionAttention:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def packs_by_cu_seqlens(model: PreTrainedModel) -> bool:
    """Whether `model`'s vision tower packs its images (and windows) by `cu_seqlens`, so that
    `use_varlen_vision_attention` applies."""
    return model.config.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def use_varlen_vision_attention(model: PreTrainedModel) -> VarlenVisionAttention:
    """Runs `model`'s vision tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with `varlen_attention`: one attention call per
    block instead of one per window or image. Returns the handle that undoes it (also a context manager)."""
    return VarlenVisionAttention(model)
