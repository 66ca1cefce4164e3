"""VFlowOpt's visual-token importance map, computed inside the ViT (Yang et al., ICCV 2025).

From the head-mean attention Ā (N×N) of one ViT layer: received_j = mean_i Ā[i,j]; "global" (context) tokens
G = {i : received_i > t · mean(received)}; context relevance c_j = mean_{i in G} Ā[i,j]; plus the patch-entropy term
I_j = c_j + α_v · softmax(E)_j, E = Shannon entropy (bits) of a 256-bin histogram of the patch's gray values.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["context_relevance", "patch_entropy", "vit_attention_and_keys", "vit_attention_map"]


def _heads_qk(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-head float32 queries and keys [images, heads, T, head_dim] of a CLIP / SigLIP encoder layer, from the
    layer's input, and its softmax scale."""
    attention = layer.self_attn
    x = layer.layer_norm1(hidden)
    images, tokens, _ = x.shape

    def split(projection: nn.Linear) -> torch.Tensor:
        return projection(x).view(images, tokens, attention.num_heads, -1).transpose(1, 2).float()

    return split(attention.q_proj), split(attention.k_proj), attention.scale


def vit_attention_map(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax attention [images, T, T] of a CLIP / SigLIP encoder layer, from the layer's input."""
    queries, keys, scale = _heads_qk(layer, hidden)
    return (queries @ keys.transpose(-1, -2) * scale).softmax(-1).mean(1)


def context_relevance(attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """c_j = mean over global tokens i of Ā[i, j]: [images, T]. With no token above the threshold, every token
    counts as global (the official code leaves this case undefined)."""
    received = attention.mean(1)
    is_global = received > threshold * received.mean(-1, keepdim=True)
    is_global |= ~is_global.any(-1, keepdim=True)
    weights = is_global.to(attention.dtype)
    return (weights[..., None] * attention).sum(1) / weights.sum(-1, keepdim=True)


def patch_entropy(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Shannon entropy (bits) per patch [images, patches] of a 256-bin histogram of the gray values, as the official
    code computes them: pixel_values·255 cast to uint8 (truncated toward zero, modulo 256: the normalised pixels are
    negative too), gray = round(0.3333 (R + G + B))."""
    quantised = torch.remainder(torch.trunc((pixel_values * 255).float()), 256)
    gray = (quantised * 0.3333).sum(1).round().long()
    patches = nn.functional.unfold(gray[:, None].float(), patch_size, stride=patch_size).long()
    counts = torch.zeros(patches.shape[0], 256, patches.shape[2], device=patches.device)
    counts.scatter_add_(1, patches, torch.ones_like(patches, dtype=counts.dtype))
    probabilities = counts / patches.shape[1]
    return -(probabilities * torch.log2(probabilities.clamp_min(1e-12))).sum(1)


def vit_attention_and_keys(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(head-summed softmax attention [images, T, T], head-mean keys [images, T, head_dim]) of a CLIP / SigLIP
    encoder layer, from the layer's input: VisionZip's dominance score and merging metric."""
    queries, keys, scale = _heads_qk(layer, hidden)
    return (queries @ keys.transpose(-1, -2) * scale).softmax(-1).sum(1), keys.mean(1)
