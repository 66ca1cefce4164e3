"""Agent Attention (Han et al., ECCV 2024): softmax attention routed through a few agent tokens.

Agent tokens ``A`` are pooled from the projected queries. Agent aggregation ``V_A = softmax(A K^T s + PB) V`` and
agent broadcast ``O = softmax(Q A^T s + AB) V_A`` cost O(n * N_a * d); a depthwise conv on V (the paper's
diversity restoration, "DWC") is added before the output projection. PB (agent->key) and AB (query->agent) are the
agent bias: a 7x7 block bias bilinearly resized to the token grid plus row and column terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_module
from torch import nn
from torch.nn.init import trunc_normal_

from .checked_backend import CheckedBackend
from .inference_cache import InferenceCache

__all__ = ["AGENT_BACKENDS", "AgentAttention", "AgentBlock", "resize_grid_bias"]

AGENT_BACKENDS = ("auto", "torch")
_BLOCK_BIAS_SIZE = 7
# row/column agent biases: name -> (tensor axis that runs along the grid, grid axis 0 = rows / 1 = columns)
_GRID_BIAS_AXES = {"ah_bias": (3, 0), "aw_bias": (4, 1), "ha_bias": (2, 0), "wa_bias": (3, 1)}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout: float) -> torch.Tensor:
    """softmax(q k^T + bias) v; the softmax scale is already in q or k."""
    attn = torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1)
    return F.dropout(attn, dropout) @ v


def _resize(bias: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of the two trailing axes, as the official downstream backbones do."""
    if tuple(bias.shape[-2:]) == size:
        return bias
    lead = bias.shape[:-2]
    flat = bias.reshape(1, -1, *bias.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


def resize_grid_bias(name: str, bias: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Linearly resize an official row/column agent bias (``ah/aw/ha/wa_bias``) to ``grid_size``, as the official
    fine-tune loader does when the resolution changes; other parameters are returned unchanged."""
    if name not in _GRID_BIAS_AXES:
        return bias
    axis, grid_axis = _GRID_BIAS_AXES[name]
    size = grid_size[grid_axis]
    if bias.shape[axis] == size:
        return bias
    moved = bias.movedim(axis, -1)
    flat = moved.reshape(1, -1, moved.shape[-1])
    resized = F.interpolate(flat.float(), size=size, mode="linear", align_corners=False).to(bias.dtype)
    return resized.reshape(*moved.shape[:-1], size).movedim(-1, axis)


@register_notrace_module  # torch.fx: the grid, the bias resizes and the cache depend on the token count
class AgentAttention(nn.Module):
    """Agent attention over tokens ``(B, P + h*w, C)``: P prefix (cls) tokens, then an ``h x w`` grid.

    ``agent_num`` must be a square (agents come from ``AdaptiveAvgPool2d(sqrt(agent_num))`` on Q). ``grid_size``
    is the trained grid: the row/column biases are learned at that size and bilinearly resized for other grids.
    Parameter names and shapes are the official ones (``qkv``, ``proj``, ``dwc``, ``an/na/ah/aw/ha/wa/ac/ca_bias``).
    ``backend``: "auto" (the softmax scale folded into the agent tokens once, and in inference at the trained grid
    the agent biases kept between forwards: fewer launches per layer, the same products) or "torch" (the official
    order: the scale applied to the n queries, the biases rebuilt every forward).
    """

    backend = CheckedBackend(AGENT_BACKENDS)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int,
        grid_size: tuple[int, int],
        *,
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads={num_heads}, got {dim}")
        pool = math.isqrt(agent_num) if agent_num > 0 else 0
        if pool * pool != agent_num:
            raise ValueError(f"agent_num must be a positive perfect square, got {agent_num}")
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f"num_prefix_tokens must be 0 or 1 (a cls token), got {num_prefix_tokens}")
        self.num_heads, self.agent_num, self.agent_pool = num_heads, agent_num, pool
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = (dim // num_heads) ** -0.5  # the official code ignores qk_scale
        self.attn_drop = attn_drop
        self.backend = backend
        self._bias_cache = InferenceCache()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        h, w = self.grid_size
        block = (num_heads, agent_num, _BLOCK_BIAS_SIZE, _BLOCK_BIAS_SIZE)
        self.an_bias = nn.Parameter(torch.zeros(block, **dd))
        self.na_bias = nn.Parameter(torch.zeros(block, **dd))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, h, 1, **dd))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, w, **dd))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, h, 1, agent_num, **dd))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, w, agent_num, **dd))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, num_prefix_tokens, **dd))
            self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, num_prefix_tokens, agent_num, **dd))
        for table in self._bias_tables():
            trunc_normal_(table, std=0.02)

    def _agent_biases(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """PB (heads, agents, P + h*w) and AB (heads, P + h*w, agents) for an h x w grid."""
        m, a = self.num_heads, self.agent_num
        ah = _resize(self.ah_bias.squeeze(0), (h, 1))  # (m, a, h, 1)
        aw = _resize(self.aw_bias.squeeze(0), (1, w))  # (m, a, 1, w)
        ha = _resize(self.ha_bias.squeeze(0).permute(0, 3, 1, 2), (h, 1))  # (m, a, h, 1)
        wa = _resize(self.wa_bias.squeeze(0).permute(0, 3, 1, 2), (1, w))  # (m, a, 1, w)
        agent_to_key = (_resize(self.an_bias, (h, w)) + ah + aw).reshape(m, a, h * w)
        query_to_agent = (_resize(self.na_bias, (h, w)) + ha + wa).reshape(m, a, h * w).transpose(1, 2)
        if self.num_prefix_tokens:
            agent_to_key = torch.cat([self.ac_bias[0], agent_to_key], dim=2)
            query_to_agent = torch.cat([self.ca_bias[0], query_to_agent], dim=1)
        return agent_to_key, query_to_agent

    def _bias_tables(self) -> list[nn.Parameter]:
        """The agent-bias parameters (``*_bias``), looked up each time: a load with ``assign=True`` replaces them."""
        return [p for name, p in self.named_parameters(recurse=False) if name.endswith("_bias")]

    def _biases(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The agent biases; "auto" caches them in inference at the trained grid (larger grids would hold m*a*h*w
        floats per layer, and run bound by the GPU rather than by launches)."""
        tables = self._bias_tables()
        if self.backend == "torch" or (h, w) != self.grid_size or not InferenceCache.applies(tables):
            return self._agent_biases(h, w)
        return self._bias_cache.get((h, w), tables, lambda: self._agent_biases(h, w))

    def _grid(self, num_tokens: int, hw: tuple[int, int] | None) -> tuple[int, int]:
        grid_tokens = num_tokens - self.num_prefix_tokens
        if hw is None:
            side = math.isqrt(max(grid_tokens, 0))
            if side * side != grid_tokens:
                raise ValueError(f"x: without hw, the {grid_tokens} grid tokens must form a square grid")
            return side, side
        if hw[0] * hw[1] != grid_tokens:
            raise ValueError(f"hw: expected h*w == {grid_tokens} grid tokens, got {tuple(hw)}")
        return tuple(hw)

    def forward(
        self,
        x: torch.Tensor,
        hw: tuple[int, int] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x ``(B, P + h*w, C)``; ``hw`` is the grid (default: square). ``attn_mask``/``is_causal`` (timm's Block
        passes them) must be unset: agent attention is neither masked nor causal."""
        if attn_mask is not None or is_causal:
            raise ValueError(
                f"agent attention takes no attn_mask/is_causal, got {type(attn_mask).__name__}/{is_causal}"
            )
        b, n, c = x.shape
        h, w = self._grid(n, hw)
        m, p = self.num_heads, self.num_prefix_tokens
        q, k, v = self.qkv(x).reshape(b, n, 3, m, c // m).permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # (b, m, n, d)
        grid_q = q[:, :, p:].transpose(-1, -2).reshape(b, c, h, w)
        agents = F.adaptive_avg_pool2d(grid_q, self.agent_pool).reshape(b, m, c // m, -1).transpose(-1, -2)
        agent_to_key, query_to_agent = self._biases(h, w)
        dropout = self.attn_drop if self.training else 0.0
        scaled_agents = agents * self.scale
        agent_v = _attend(scaled_agents, k, v, agent_to_key, dropout)  # agent aggregation
        if self.backend == "torch":  # agent broadcast in the official order: the n queries scaled
            out = _attend(q * self.scale, agents, agent_v, query_to_agent, dropout)
        else:  # the same product with the scale already in the agent tokens: one pass over the queries fewer
            out = _attend(q, scaled_agents, agent_v, query_to_agent, dropout)
        out = out.transpose(1, 2).reshape(b, n, c)
        grid_v = v[:, :, p:].transpose(-1, -2).reshape(b, c, h, w)
        restored = self.dwc(grid_v).flatten(2).transpose(1, 2)
        out = torch.cat([out[:, :p], out[:, p:] + restored], dim=1) if p else out + restored
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, agents={self.agent_num}, grid={self.grid_size}, backend={self.backend!r}"


class AgentBlock(nn.Module):
    """Pre-norm transformer block around agent attention: ``x += DropPath(AgentAttn(LN x)); x += DropPath(MLP(LN x))``.

    Keys ``norm1``, ``attn``, ``norm2``, ``mlp.fc1``, ``mlp.fc2`` as in the official Swin / PVT agent blocks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int,
        grid_size: tuple[int, int],
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = AgentAttention(dim, num_heads, agent_num, grid_size, qkv_bias=qkv_bias, backend=backend, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))
