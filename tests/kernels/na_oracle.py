"""An independent NA oracle: NATTEN's closed-form window start per axis, expanded to a dense float64 attention."""

import itertools
import math

import torch


def window_start(i: int, length: int, k: int, d: int) -> int:
    """NATTEN's `get_window_start` (non-causal, stride 1, odd or even k): first key of query i; keys are start + j*d."""
    r = k // 2
    if d == 1:
        return max(i - r, 0) + (length - i - r - 1 if i + r >= length else 0)
    if i - r * d < 0:
        return i % d
    if i + r * d >= length:
        a = length // d * d
        b = length - a
        g = i % d
        return a + g - 2 * r * d if g < b else a + g - k * d
    return i - r * d


def axis_allowed(length: int, k: int, d: int, causal: bool) -> torch.Tensor:
    """`(L, L)` bool: query i attends key j on one axis."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        if causal:
            keys = [j for j in range(i % d, i + 1, d) if (i - j) // d < k]
        else:
            start = window_start(i, length, k, d) if k % 2 else None
            keys = [start + j * d for j in range(k)] if start is not None else _even_keys(i, length, k, d)
        allowed[i, keys] = True
    return allowed


def _even_keys(i: int, length: int, k: int, d: int) -> list[int]:
    """Even kernels (NATTEN >= 0.17.5): left k//2, right k//2 - 1, shifted inward, inside the dilation group."""
    g, p = i % d, i // d
    n = len(range(g, length, d))
    start = min(max(p - k // 2, 0), n - k)
    return [(start + j) * d + g for j in range(k)]


def dense_allowed(shape, kernel_size, dilation, causal) -> torch.Tensor:
    """`(N, N)` bool over row-major tokens: the Cartesian product of the per-axis rules."""
    per_axis = [axis_allowed(*args) for args in zip(shape, kernel_size, dilation, causal)]
    tokens = math.prod(shape)
    allowed = torch.zeros(tokens, tokens, dtype=torch.bool)
    coords = list(itertools.product(*(range(s) for s in shape)))
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            allowed[qi, ki] = all(a[x, y] for a, x, y in zip(per_axis, qc, kc))
    return allowed


def dense_na(q, k, v, shape, kernel_size, dilation, causal, rpb=None, scale=None):
    """Float64 NA over `(B, H, N, D)` tokens through a dense mask; rpb added at (key - query) / dilation + k - 1."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if rpb is not None:
        coords = torch.tensor(list(itertools.product(*(range(s) for s in shape))))
        delta = (coords[None, :, :] - coords[:, None, :]) // torch.tensor(dilation) + torch.tensor(kernel_size) - 1
        index = [delta[..., a].clamp(0, 2 * kernel_size[a] - 2) for a in range(len(shape))]
        scores = scores + rpb.double()[(slice(None), *index)]
    scores = scores.masked_fill(~dense_allowed(shape, kernel_size, dilation, causal), float("-inf"))
    return torch.softmax(scores, -1) @ v
