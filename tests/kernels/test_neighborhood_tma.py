"""The Hopper neighborhood forward (TMA descriptors, triton/neighborhood_tma.py) under the Triton interpreter against
a dense float64 oracle, and the dispatch of `triton.neighborhood.forward` between it and the pointer-load kernel.

Undilated grids with odd extents, windows wider than a tile, causal axes, strides, GQA and a non-contiguous layout,
float16 and float32; on an sm90 GPU its tiles are checked by test_gpu_tiles.py.
"""

import math
from unittest import mock

import pytest
import torch

from mmattn.kernels import Neighborhood
from mmattn.kernels.backends import INTERPRETED
from mmattn.kernels.triton import neighborhood as fna
from mmattn.kernels.triton import neighborhood_tma as na_tma

from .na_oracle import dense_na

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="the Triton interpreter runs only with TRITON_INTERPRET=1")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}

CASES = [  # windows of at least MIN_WINDOW (128) keys
    # shape, kernel_size, stride, causal, heads, kv_heads
    ((12, 14), (11, 13), (1, 1), (False, False), 2, 2),
    ((10, 17), (8, 16), (2, 3), (True, False), 2, 1),
    ((4, 6, 9), (3, 6, 8), (1, 1, 2), (True, False, False), 2, 2),
    ((5, 6, 7), (4, 6, 6), (1, 1, 1), (False, False, True), 4, 2),
]


def tokens(batch, heads, shape, head_dim, dtype, g, layout="bhnd"):
    """`(B, H, N, D)` tokens; "bnhd": a non-contiguous view of `(B, N, H, D)` storage."""
    n = math.prod(shape)
    if layout == "bnhd":
        return torch.randn(batch, n, heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(batch, heads, n, head_dim, generator=g).to(dtype)


def forward(q, k, v, nbhd, switch=True):
    """`neighborhood.forward` with MMATTN_TRITON_NA_TMA taken as `switch`: `(out, lse, whether it ran)`."""
    with mock.patch.object(na_tma, "SWITCH", switch), mock.patch.object(na_tma, "forward", wraps=na_tma.forward) as spy:
        out, lse = fna.forward(q, k, v, None, list(fna.pattern_ints(nbhd)), q.shape[-1] ** -0.5)
    return out, lse, spy.called


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape, kernel_size, stride, causal, heads, kv_heads", CASES)
def test_matches_the_dense_oracle(shape, kernel_size, stride, causal, heads, kv_heads, dtype):
    g = torch.Generator().manual_seed(len(shape) + heads)
    layout = "bnhd" if heads == 4 else "bhnd"
    q = tokens(1, heads, shape, 64, dtype, g, layout)
    k, v = (tokens(1, kv_heads, shape, 64, dtype, g, layout) for _ in range(2))
    nbhd = Neighborhood.create(shape, kernel_size, 1, stride, causal)
    out, lse, used = forward(q, k, v, nbhd)
    assert used, na_tma.eligible(q, k, v, False, list(fna.pattern_ints(nbhd)))[1]
    want = dense_na(q, k, v, shape, kernel_size, (1,) * len(shape), causal, stride=stride)
    err = (out.double() - want).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(1.0, want.abs().max().item()), f"out: max error {err:.3g}"
    pointer_out, pointer_lse, _ = forward(q, k, v, nbhd, switch=False)
    assert torch.allclose(lse.double(), pointer_lse.double(), atol=TOLERANCE[dtype], rtol=0), "lse"


def test_dispatch_keeps_the_pointer_kernel_where_the_tma_kernel_does_not_apply():
    g = torch.Generator().manual_seed(0)
    q, k, v = (tokens(1, 2, (12, 14), 64, torch.float16, g) for _ in range(3))
    plain = Neighborhood.create((12, 14), (11, 12), 1, 1, False)
    assert forward(q, k, v, plain)[2]
    assert not forward(q, k, v, plain, switch=False)[2], "MMATTN_TRITON_NA_TMA=0 keeps the pointer kernel"
    ineligible = {
        "dilation": (q, k, v, False, Neighborhood.create((12, 14), (5, 6), 2, 1, False)),
        "bias": (q, k, v, True, plain),
        "head dim": (q[..., :32], k[..., :32], v[..., :32], False, plain),
        "windows of 9 keys": (q, k, v, False, Neighborhood.create((12, 14), 3, 1, 1, False)),
        "no tile": (q, k, v, False, Neighborhood.create((168,), 129, 1, 1, False)),
    }
    for reason, (q2, k2, v2, has_rpb, nbhd) in ineligible.items():
        with mock.patch.object(na_tma, "SWITCH", True):
            ok, why = na_tma.eligible(q2, k2, v2, has_rpb, list(fna.pattern_ints(nbhd)))
        assert not ok and reason in why, why
        if not has_rpb:
            assert not forward(q2, k2, v2, nbhd)[2], reason
