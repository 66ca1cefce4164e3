"""An independent NA oracle: NATTEN's closed-form window start per axis, expanded to a dense float64 attention.

Generalized NA (GNA, arXiv 2504.16922): a stride makes every query of a stride group attend with the window of
the group's leader, per axis; the window itself is NATTEN's stride-1 window of the leader's position.
"""

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


def _leader(i: int, length: int, d: int, s: int, causal: bool) -> int:
    """Absolute position of query i's stride-group leader: the centre query of its group of `s` (the right one of
    the two centres for even `s`), the last one on a causal axis; the group's last position bounds it."""
    group, p = i % d, i // d
    last = len(range(group, length, d)) - 1
    offset = s - 1 if causal else s // 2
    return min(p - p % s + offset, last) * d + group


def axis_allowed(length: int, k: int, d: int, causal: bool, s: int = 1) -> torch.Tensor:
    """`(L, L)` bool: query i attends key j on one axis."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        leader = _leader(i, length, d, s, causal)
        if causal:  # the keys of i's group up to i itself that lie within k of the leader
            keys = [j for j in range(i % d, i + 1, d) if (leader - j) // d < k]
        elif k % 2:
            keys = [window_start(leader, length, k, d) + j * d for j in range(k)]
        else:
            keys = _even_keys(leader, length, k, d)
        allowed[i, keys] = True
    return allowed


def _even_keys(i: int, length: int, k: int, d: int) -> list[int]:
    """Even kernels (NATTEN >= 0.17.5): left k//2, right k//2 - 1, shifted inward, inside the dilation group."""
    g, p = i % d, i // d
    n = len(range(g, length, d))
    start = min(max(p - k // 2, 0), n - k)
    return [(start + j) * d + g for j in range(k)]


def dense_allowed(shape, kernel_size, dilation, causal, stride=None) -> torch.Tensor:
    """`(N, N)` bool over row-major tokens: the Cartesian product of the per-axis rules."""
    stride = stride or (1,) * len(shape)
    per_axis = [axis_allowed(*args) for args in zip(shape, kernel_size, dilation, causal, stride)]
    tokens = math.prod(shape)
    allowed = torch.zeros(tokens, tokens, dtype=torch.bool)
    coords = list(itertools.product(*(range(s) for s in shape)))
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            allowed[qi, ki] = all(a[x, y] for a, x, y in zip(per_axis, qc, kc))
    return allowed


def dense_na(q, k, v, shape, kernel_size, dilation, causal, rpb=None, scale=None, stride=None):
    """Float64 NA over `(B, H, N, D)` tokens through a dense mask; rpb added at (key - query) / dilation + k - 1.

    Differentiable in every input, `rpb` included."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    allowed = dense_allowed(shape, kernel_size, dilation, causal, stride)
    if rpb is not None:
        coords = torch.tensor(list(itertools.product(*(range(s) for s in shape))))
        delta = (coords[None, :, :] - coords[:, None, :]) // torch.tensor(dilation) + torch.tensor(kernel_size) - 1
        in_range = ((delta >= 0) & (delta <= 2 * torch.tensor(kernel_size) - 2)).all(-1)
        assert in_range[allowed].all(), "an attended key lies outside the bias table"
        index = [delta[..., a].clamp(0, 2 * kernel_size[a] - 2) for a in range(len(shape))]
        scores = scores + rpb.double()[(slice(None), *index)]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v
