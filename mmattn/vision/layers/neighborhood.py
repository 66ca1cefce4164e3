"""Neighborhood attention (NAT, Hassani et al. CVPR 2023) and dilated neighborhood attention (DiNAT), 1D/2D/3D.

Each token attends to its ``kernel_size`` nearest neighbours per axis (the window shifts inward at borders); with
a dilation ``d`` the neighbours are taken on the token's own ``d``-strided sub-grid. The relative position bias
(RPB) ``rpb[h, dy + k - 1, dx + k - 1]`` is added to the logits. Attention runs through
``mmattn.kernels.neighborhood_attention``; tokens are channels-last ``(B, *spatial, C)`` at the module's edge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn
from torch.nn.init import trunc_normal_

from mmattn.kernels import Neighborhood, neighborhood_attention
from mmattn.kernels.backends import backend_choices

from .checked_backend import CheckedBackend

__all__ = ["NeighborhoodAttention", "padded_neighborhood_bias"]


def _per_axis(value: int | tuple[int, ...], name: str, ndim: int) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or {ndim} positive ints, got {value!r}")
    return values


def padded_neighborhood_bias(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    rpb: torch.Tensor | None,
    num_heads: int,
) -> torch.Tensor:
    """Dense logit bias ``(heads, n, n)`` of NA on a grid smaller than ``kernel_size x dilation``.

    The grid is padded (right/bottom) up to ``kernel_size x dilation`` as NAT/DiNAT's NATTEN (<= 0.15) does, so
    every query keeps the window it would have on the padded grid; padded keys are masked (``-inf``), never
    attended. Allowed pairs carry their RPB value (0 without ``rpb``).
    """
    ndim = len(spatial)
    padded = tuple(max(extent, k * d) for extent, k, d in zip(spatial, kernel_size, dilation))
    nbhd = Neighborhood.create(padded, kernel_size, dilation, 1, is_causal)
    device = rpb.device if rpb is not None else "cpu"
    allowed = torch.ones((), dtype=torch.bool, device=device)
    indices = []
    for axis, extent in enumerate(spatial):
        coords, valid, rpb_index = (t[:extent] for t in nbhd.axis_keys(axis, device))
        keep = valid & (coords < extent)
        axis_allowed = torch.zeros(extent, extent, dtype=torch.bool, device=device)
        axis_index = torch.zeros(extent, extent, dtype=torch.long, device=device)
        rows = torch.arange(extent, device=device)[:, None].expand_as(coords)
        axis_allowed[rows[keep], coords[keep]] = True
        axis_index[rows[keep], coords[keep]] = rpb_index[keep]
        shape = [1] * (2 * ndim)
        shape[axis], shape[ndim + axis] = extent, extent
        allowed = allowed & axis_allowed.reshape(shape)
        indices.append(axis_index.reshape(shape))
    n = math.prod(spatial)
    if rpb is None:
        bias = torch.zeros(num_heads, n, n, device=device)
    else:
        bias = rpb[(slice(None), *indices)].reshape(num_heads, n, n)
    return bias.masked_fill(~allowed.reshape(1, n, n), float("-inf"))


@register_notrace_module  # torch.fx: the kernel and the small-grid path depend on the grid size
class NeighborhoodAttention(nn.Module):
    """NA / DiNA module as in NAT and DiNAT: ``qkv`` Linear, heads, neighborhood attention (+ RPB), ``proj``.

    Input and output are channels-last ``(B, *spatial, C)`` with ``spatial_dims`` (1, 2 or 3) axes. Grids smaller
    than ``kernel_size x dilation`` on some axis are handled like NAT/DiNAT's NATTEN (<= 0.15) by padding up to it,
    with the padded tokens masked rather than attended (a dense masked path; such grids are small). ``backend`` is
    passed to ``neighborhood_attention``: "auto" | "triton" | "flex" | "torch" (the unfused reference).
    Parameter names (``qkv``, ``rpb``, ``proj``) are NATTEN's, so official NAT/DiNAT weights load unchanged.
    """

    backend = CheckedBackend(backend_choices("na"))

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | tuple[int, ...],
        *,
        dilation: int | tuple[int, ...] = 1,
        is_causal: bool | tuple[bool, ...] = False,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        spatial_dims: int = 2,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads={num_heads}, got {dim}")
        self.num_heads, self.spatial_dims = num_heads, spatial_dims
        self.kernel_size = _per_axis(kernel_size, "kernel_size", spatial_dims)
        self.dilation = _per_axis(dilation, "dilation", spatial_dims)
        causal = tuple(is_causal) if isinstance(is_causal, (tuple, list)) else (is_causal,) * spatial_dims
        if len(causal) != spatial_dims or not all(isinstance(c, bool) for c in causal):
            raise TypeError(f"is_causal must be a bool or {spatial_dims} bools, got {is_causal!r}")
        if rel_pos_bias and any(causal):
            raise ValueError("rel_pos_bias: NATTEN defines no relative position bias for causal axes; got both")
        self.is_causal = causal
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size), **dd))
            trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(
                f"x must be (batch, {self.spatial_dims} spatial axes, {self.qkv.in_features}), got {tuple(x.shape)}"
            )
        batch, *spatial, channels = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(batch, *spatial, 3, heads, channels // heads)
        q, k, v = qkv.movedim((-3, -2), (0, 2)).unbind(0)  # (B, heads, *spatial, head_dim)
        fits = all(extent >= kk * d for extent, kk, d in zip(spatial, self.kernel_size, self.dilation))
        if fits:
            out = neighborhood_attention(
                q, k, v, self.kernel_size, dilation=self.dilation, is_causal=self.is_causal, rpb=self.rpb,
                backend=self.backend,
            )  # fmt: skip
        else:
            bias = padded_neighborhood_bias(
                tuple(spatial), self.kernel_size, self.dilation, self.is_causal, self.rpb, heads
            ).to(device=q.device, dtype=q.dtype)
            flat = [t.flatten(2, -2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*flat, attn_mask=bias).unflatten(2, spatial)
        out = out.movedim(1, -2).reshape(batch, *spatial, channels)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"is_causal={self.is_causal}, backend={self.backend!r}"
        )
