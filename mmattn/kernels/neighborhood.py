"""Neighborhood attention (NA) windows with NATTEN's semantics, per spatial axis.

Per axis of extent `L`, a dilation `d` splits the positions into `d` interleaved groups (`i mod d`); NA runs
inside each group on the coordinate `p = i // d`. A non-causal query sees exactly `kernel_size` keys: its
window is centred on it and shifts inward at the borders (no zero padding). A stride makes the queries of
one stride block share the window of the block's centre (generalized NA; `stride == kernel_size` is
blocked, Swin-style attention). A causal axis lets a query see itself and the `kernel_size - 1` preceding
keys of its group. In several dimensions the neighborhood is the Cartesian product of the per-axis windows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Integral

import torch

__all__ = ["Neighborhood", "axis_window", "eager_cache"]


def eager_cache(fn):
    """`functools.lru_cache` (typed) for eager calls; under torch.compile `fn` itself runs, since Dynamo cannot trace
    the cache wrapper before torch 2.14 (later ones trace around it, with a warning). Unhashable arguments run
    uncached, so that `fn`'s checks, not the cache, report them."""
    cached = functools.lru_cache(maxsize=512, typed=True)(fn)

    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        try:
            hash(args)
        except TypeError:
            return fn(*args)
        return cached(*args)

    return call


def axis_window(p: torch.Tensor, n: torch.Tensor, kernel_size: int, stride: int, is_causal: bool):
    """Inclusive window `[lo, hi]` of the query at group coordinate `p` on a group of `n` positions.

    `p` and `n` are integer tensors of one shape (the same code serves the reference and FlexAttention's
    `mask_mod`). Non-causal windows always hold exactly `kernel_size` positions; causal ones may hold fewer
    near the start of the axis.
    """
    if is_causal:
        leader = torch.minimum(p // stride * stride + stride - 1, n - 1)
        return (leader - kernel_size + 1).clamp(min=0), p
    left = kernel_size // 2
    right = kernel_size // 2 + kernel_size % 2 - 1
    leader = torch.minimum(p // stride * stride + stride // 2, n - 1)
    center = torch.minimum(leader, n - 1 - right).clamp(min=left)
    return center - left, center + right


def _per_axis(value, name: str, ndim: int, kind: type) -> tuple:
    """`value` (one or one per axis) as a tuple of `ndim` ints (any integer type) or bools."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} must be one {kind.__name__} or {ndim} (one per spatial axis), got {value!r}")
    for v in values:
        if kind is bool and not isinstance(v, bool) or kind is int and (isinstance(v, bool) or not isinstance(v, Integral)):
            raise TypeError(f"{name} must hold {kind.__name__} values, got {value!r}")
    return tuple(kind(v) for v in values)


@dataclass(frozen=True)
class Neighborhood:
    """The NA pattern of a spatial grid: extents, and per axis kernel size, dilation, stride and causality."""

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @classmethod
    def create(cls, shape, kernel_size, dilation=1, stride=1, is_causal=False) -> Neighborhood:
        """Validate and broadcast the arguments (an int/bool applies to every axis); errors name the argument.

        Eager calls are cached by their arguments: a model calls this with the same ones at every layer."""
        def frozen(value):
            return tuple(value) if isinstance(value, (list, tuple)) else value

        return cls._create(tuple(int(s) for s in shape), *map(frozen, (kernel_size, dilation, stride, is_causal)))

    @classmethod
    @eager_cache
    def _create(cls, shape, kernel_size, dilation, stride, is_causal) -> Neighborhood:
        ndim = len(shape)
        if ndim not in (1, 2, 3):
            raise ValueError(f"neighborhood attention takes 1, 2 or 3 spatial axes, got {ndim} (shape {shape})")
        kernel_size = _per_axis(kernel_size, "kernel_size", ndim, int)
        dilation = _per_axis(dilation, "dilation", ndim, int)
        stride = _per_axis(stride, "stride", ndim, int)
        is_causal = _per_axis(is_causal, "is_causal", ndim, bool)
        for axis, (extent, k, d, s) in enumerate(zip(shape, kernel_size, dilation, stride)):
            if k < 1:
                raise ValueError(f"kernel_size must be >= 1 on every axis, got {kernel_size}")
            if d < 1:
                raise ValueError(f"dilation must be >= 1 on every axis, got {dilation}")
            if not 1 <= s <= k:
                raise ValueError(f"stride must be in [1, kernel_size] on every axis, got stride {stride} for kernel_size {kernel_size}")
            if k * d > extent:
                raise ValueError(
                    f"kernel_size x dilation must not exceed the extent on every axis: axis {axis} has extent {extent}, "
                    f"kernel_size {k} x dilation {d} = {k * d}"
                )
        return cls(shape, kernel_size, dilation, stride, is_causal)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def num_keys(self) -> int:
        """Keys per query: exactly this many on non-causal axes."""
        return math.prod(self.kernel_size)

    @property
    def rpb_shape(self) -> tuple[int, ...]:
        """Spatial shape of the relative position bias (NAT/DiNAT's `rpb`): `2k - 1` per axis."""
        return tuple(2 * k - 1 for k in self.kernel_size)

    def density(self) -> float:
        """Share of the `N x N` attention matrix that the neighborhood keeps (non-causal: exact)."""
        return self.num_keys / self.num_tokens

    def axis_keys(self, axis: int, device: torch.device | str = "cpu"):
        """For every position of `axis`: its `kernel_size` key slots as `(coords, valid, rpb_index)`, each `(L, k)`.

        `coords` are absolute positions (clamped into the axis where `valid` is False), `rpb_index` the bias
        index `(key - query) / dilation + kernel_size - 1` in `[0, 2 kernel_size - 2]`.
        """
        extent, k, d = self.shape[axis], self.kernel_size[axis], self.dilation[axis]
        i = torch.arange(extent, device=device)
        group, p = i % d, i // d
        lo, hi = axis_window(p, (extent - group + d - 1) // d, k, self.stride[axis], self.is_causal[axis])
        key_p = lo[:, None] + torch.arange(k, device=device)
        valid = key_p <= hi[:, None]
        key_p = torch.minimum(key_p, hi[:, None])
        return key_p * d + group[:, None], valid, key_p - p[:, None] + k - 1

    def neighbors(self, start: int, end: int, device: torch.device | str = "cpu"):
        """For flat queries `[start, end)`: key indices `(C, K)`, validity `(C, K)` and per-axis bias indices
        (broadcastable to `(C, k0, k1, ...)`), with the `K = prod(kernel_size)` slots in row-major window order."""
        coords = torch.unravel_index(torch.arange(start, end, device=device), self.shape)
        ndim = len(self.shape)
        key_index, valid, rpb_index = 0, True, []
        token_stride = 1
        for axis in reversed(range(ndim)):
            keys, ok, bias = (t[coords[axis]] for t in self.axis_keys(axis, device))
            view = [-1] + [1] * ndim
            view[axis + 1] = self.kernel_size[axis]
            key_index = key_index + keys.view(view) * token_stride
            valid = ok.view(view) & valid
            rpb_index.insert(0, bias.view(view))
            token_stride *= self.shape[axis]
        count = end - start
        return key_index.reshape(count, -1), valid.reshape(count, -1), rpb_index

    def allowed(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Whether flat query `q_idx` attends flat key `kv_idx` (row-major token order): a FlexAttention `mask_mod` body."""
        allowed = torch.ones_like(q_idx, dtype=torch.bool)
        for axis in reversed(range(len(self.shape))):
            extent, d = self.shape[axis], self.dilation[axis]
            q_pos, k_pos = q_idx % extent, kv_idx % extent
            q_idx, kv_idx = q_idx // extent, kv_idx // extent
            group = q_pos % d
            lo, hi = axis_window(q_pos // d, (extent - group + d - 1) // d, self.kernel_size[axis], self.stride[axis], self.is_causal[axis])
            allowed = allowed & (k_pos % d == group) & (k_pos // d >= lo) & (k_pos // d <= hi)
        return allowed

    def rpb_index(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-axis bias indices of the pair (query, key), valid where `allowed` holds: a `score_mod` helper."""
        index = []
        for axis in reversed(range(len(self.shape))):
            extent, d, k = self.shape[axis], self.dilation[axis], self.kernel_size[axis]
            index.append((kv_idx % extent) // d - (q_idx % extent) // d + k - 1)
            q_idx, kv_idx = q_idx // extent, kv_idx // extent
        return tuple(reversed(index))
