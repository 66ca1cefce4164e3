"""Every tile the autotuner may pick, forward and backward, against the float64 reference.

For each launch the autotuner times the tiles `prune` keeps and runs the fastest; MMATTN_AUTOTUNE=0 (and so every
other GPU test) runs only the first. Here each kept tile of each tuned kernel (block-sparse, neighborhood and routed
attention; forward, dQ and dK/dV; the block-sparse backward that adds dQ atomically) is pinned in turn with
`TunedKernel.pinned`, the family's other kernels pinned to their first tile, on a few representative problems that together keep every listed tile. The output, lse, dq, dk,
dv (and drpb) are each held to the FlashAttention criterion of test_gpu.py: error against float64 at most twice the
error of the same-dtype torch path, plus a small slack. Tests are named by problem, kernel and tile; a tile that
prune drops for a problem is skipped there, and `test_every_listed_tile_is_kept_by_some_problem` checks that none is
left unchecked.

On a GPU (MMATTN_TEST_GPU=1) the problems run compiled in bf16; on the CPU (TRITON_INTERPRET=1) tiny versions of
some of them run the interpreter's tiles in float16 (the interpreter has no bf16).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from triton.runtime.errors import OutOfResources

from mmattn.kernels import backends, block_sparse_attention, neighborhood_attention, routed_attention
from mmattn.kernels.triton import block_sparse as bs
from mmattn.kernels.triton import block_sparse_tma as bs_tma
from mmattn.kernels.triton import neighborhood as fna
from mmattn.kernels.triton import neighborhood_tma as na_tma
from mmattn.kernels.triton import routed
from mmattn.kernels.backends import INTERPRETED

from .helpers import random_mask, random_qkv

COMPILED = torch.cuda.is_available() and not INTERPRETED
HOPPER = COMPILED and torch.cuda.get_device_capability()[0] == 9
DEVICE, DTYPE = ("cuda", torch.bfloat16) if COMPILED else ("cpu", torch.float16)
SLACK = 2e-3  # times max(1, max |exact|)
PARTS = ("fwd", "dq", "dkdv")
KERNELS = {
    "block_sparse": dict(zip(PARTS, (bs.fwd_kernel, bs.dq_kernel, bs.dkdv_kernel))),
    # Hopper: the kernels with tensor descriptors and warp specialization (block_sparse_tma.py)
    "block_sparse_tma": dict(zip(PARTS, (bs_tma.fwd_kernel, bs_tma.dq_kernel, bs_tma.dkdv_kernel))),
    # the backward that adds dQ atomically in its dK/dV kernel (MMATTN_TRITON_ATOMIC_DQ): no dQ kernel runs
    "block_sparse_atomic_dq": {"fwd": bs.fwd_kernel, "dkdv": bs.dkdvq_kernel},
    "neighborhood": dict(zip(PARTS, (fna.fwd_kernel, fna.dq_kernel, fna.dkdv_kernel))),
    # Hopper: the undilated forward with tensor descriptors, software-pipelined (neighborhood_tma.py); its
    # backward kernels are the family above's, whose problems keep their tiles
    "neighborhood_tma": {"fwd": na_tma.fwd_kernel},
    "routed": dict(zip(PARTS, (routed.fwd_kernel, routed.dq_kernel, routed.dkdv_kernel))),
}

pytestmark = pytest.mark.skipif(not (COMPILED or INTERPRETED),
                                reason="needs a CUDA GPU (MMATTN_TEST_GPU=1) or TRITON_INTERPRET=1")


@dataclass
class Problem:
    """Float32 CPU masters of the differentiable inputs (q, k, v are cast to the tested dtype, a bias stays float32
    as in NAT's autocast training) and `attend(backend, **inputs) -> (out, lse)`."""

    inputs: dict[str, torch.Tensor]
    attend: Callable[..., tuple[torch.Tensor, torch.Tensor]]


def block_sparse(batch, heads, kv_heads, q_len, kv_len, head_dim, block, layout="bhld", seed=0) -> Problem:
    """A random block mask shared by the batch, with an empty query block and the partial corner block."""
    q, k, v = random_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, torch.float32, seed, layout)
    mask = random_mask(1, heads, q_len, kv_len, block, density=0.5, seed=seed)

    def attend(backend, q, k, v):
        return block_sparse_attention(q, k, v, mask.to(q.device), backend=backend, return_lse=True)

    return Problem({"q": q, "k": k, "v": v}, attend)


def neighborhood(batch, heads, kv_heads, shape, head_dim, with_rpb=False, seed=0, **pattern) -> Problem:
    g = torch.Generator().manual_seed(seed)
    inputs = {"q": torch.randn(batch, heads, *shape, head_dim, generator=g)}
    inputs.update({name: torch.randn(batch, kv_heads, *shape, head_dim, generator=g) for name in ("k", "v")})
    if with_rpb:
        kernel = pattern["kernel_size"]
        kernel = kernel if isinstance(kernel, tuple) else (kernel,) * len(shape)
        inputs["rpb"] = torch.randn(heads, *(2 * x - 1 for x in kernel), generator=g)

    def attend(backend, q, k, v, rpb=None):
        return neighborhood_attention(q, k, v, rpb=rpb, backend=backend, return_lse=True, **pattern)

    return Problem(inputs, attend)


def routed_regions(batch, heads, kv_heads, n_regions, region, topk, head_dim, padded=False, seed=0) -> Problem:
    """Distinct routed regions per query region and head (top-k of random affinities); `padded`: random invalid keys."""
    length = n_regions * region
    q, k, v = random_qkv(batch, heads, kv_heads, length, length, head_dim, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(batch, heads, n_regions, n_regions, generator=g).topk(topk, dim=-1).indices
    kv_valid = torch.rand(batch, length, generator=g) > 0.1 if padded else None

    def attend(backend, q, k, v):
        valid = kv_valid.to(q.device) if kv_valid is not None else None
        return routed_attention(q, k, v, indices.to(q.device), q_region_size=region, kv_valid=valid, backend=backend,
                                return_lse=True)

    return Problem({"q": q, "k": k, "v": v}, attend)


@dataclass(frozen=True)
class Case:
    family: str
    compiled: Callable[[], Problem] | None  # on the GPU, bf16; None: not on this GPU
    interpreted: Callable[[], Problem] | None = None  # tiny, on the CPU; None: GPU only


# Together the compiled problems keep every tile of every list (checked below): the block-sparse D128 problem all
# but (32, 128, 5 stages) for dK/dV, which fits shared memory at D64 only; the neighborhood problems the narrow
# (D <= 64) and wide head-dim classes in 1D rows, 2D and 3D boxes; the routed problem with 144-token regions the
# 128-row forward tile.
CASES = {
    "bs-gqa-partial": Case(  # D128, GQA 4, query and key lengths past a whole block
        "block_sparse", lambda: block_sparse(2, 8, 2, 1000, 1100, 128, (128, 128), seed=1),
        lambda: block_sparse(1, 4, 2, 40, 70, 16, (32, 32), seed=1)),
    "bs-tma-gqa-partial": Case(  # the same problem on the Hopper kernels (sm90 only; head dim 64 or 128)
        "block_sparse_tma", (lambda: block_sparse(2, 8, 2, 1000, 1100, 128, (128, 128), seed=1)) if HOPPER else None,
        lambda: block_sparse(1, 4, 2, 40, 70, 64, (32, 32), seed=1)),
    "bs-atomic-dq-gqa-partial": Case(  # the same problem with dQ added atomically
        "block_sparse_atomic_dq", lambda: block_sparse(2, 8, 2, 1000, 1100, 128, (128, 128), seed=1),
        lambda: block_sparse(1, 4, 2, 40, 70, 16, (32, 32), seed=1)),
    "bs-strided-d64": Case(  # D64, (B, L, H, D) storage, 64x128 blocks
        "block_sparse", lambda: block_sparse(1, 4, 4, 777, 1555, 64, (64, 128), layout="blhd", seed=2)),
    "na2d-rpb-dilated": Case(  # NAT/DiNAT: D32, 7x7 with the relative position bias, odd extents, dilation
        "neighborhood", lambda: neighborhood(2, 4, 4, (29, 43), 32, True, kernel_size=7, dilation=(2, 1)),
        lambda: neighborhood(1, 2, 2, (7, 9), 16, True, kernel_size=3, dilation=(1, 2))),
    "na3d-stride": Case(  # video: D128, GQA 2, strided (GNA) 3x8x8 windows
        "neighborhood", lambda: neighborhood(1, 4, 2, (6, 20, 24), 128, kernel_size=(3, 8, 8), stride=(1, 4, 4))),
    "na3d-causal": Case(  # D64, causal in time, dilated
        "neighborhood",
        lambda: neighborhood(1, 2, 2, (8, 12, 20), 64, kernel_size=(3, 5, 7), dilation=(1, 2, 1),
                             is_causal=(True, False, False)),
        lambda: neighborhood(1, 1, 1, (3, 4, 5), 16, kernel_size=3, is_causal=(True, False, False))),
    "na2d-tma-gqa": Case(  # image grid: D128, GQA 2, odd extents, a window past a tile (Hopper forward)
        "neighborhood_tma", (lambda: neighborhood(1, 4, 2, (37, 45), 128, kernel_size=(13, 21))) if HOPPER else None),
    "na3d-tma-causal": Case(  # video: D128, causal in time, strided windows (Hopper forward)
        "neighborhood_tma",
        (lambda: neighborhood(1, 2, 2, (7, 20, 24), 128, kernel_size=(3, 9, 8), stride=(1, 2, 2),
                              is_causal=(True, False, False))) if HOPPER else None,
        lambda: neighborhood(1, 2, 1, (4, 6, 9), 64, kernel_size=(3, 6, 8), is_causal=(True, False, False))),
    "na1d-causal": Case(  # D64, GQA 2, a long causal window
        "neighborhood", lambda: neighborhood(1, 4, 2, (3000,), 64, kernel_size=257, is_causal=True),
        lambda: neighborhood(1, 2, 1, (40,), 16, kernel_size=7, is_causal=True)),
    "na1d-rpb": Case(  # D128 rows with a 1D bias and dilation
        "neighborhood", lambda: neighborhood(2, 2, 2, (1000,), 128, True, kernel_size=63, dilation=3)),
    "routed-gqa": Case(  # BiFormer stage 2: 7x7 regions of 4x4 tokens, top-4, per-head routing, GQA 2
        "routed", lambda: routed_regions(2, 4, 2, 49, 16, 4, 32),
        lambda: routed_regions(1, 2, 1, 4, 20, 2, 16)),
    "routed-padded": Case(  # 12x12-token regions, top-2, padding keys
        "routed", lambda: routed_regions(1, 2, 2, 16, 144, 2, 64, padded=True)),
}


def tile_name(tile) -> str:
    sizes = tile.kwargs
    if "BLOCK_M" in sizes:
        shape = f"{sizes['BLOCK_M']}x{sizes['BLOCK_N']}"
    else:
        shape = "q{}x{}x{}-k{}x{}x{}".format(*(sizes[f"T{s}{a}"] for s in "QK" for a in range(3)))
    return f"{shape}-w{tile.num_warps}s{tile.num_stages}"


def _active(case: Case) -> Callable[[], Problem] | None:
    return case.compiled if COMPILED else case.interpreted


@contextlib.contextmanager
def hopper_kernels(on: bool):
    """The block-sparse Hopper forward and backward switched on (also for calls small enough to be host-bound, which
    keep the pointer kernels otherwise) or off (`block_sparse_tma.SWITCH` and `BWD_SWITCH`,
    `backends.HOST_BOUND_WORK`)."""
    before = bs_tma.SWITCH, bs_tma.BWD_SWITCH, backends.HOST_BOUND_WORK
    bs_tma.SWITCH = bs_tma.BWD_SWITCH = on
    if on:
        backends.HOST_BOUND_WORK = 0.0
    try:
        yield
    finally:
        bs_tma.SWITCH, bs_tma.BWD_SWITCH, backends.HOST_BOUND_WORK = before


@contextlib.contextmanager
def pinned(family: str, choices: dict):
    with contextlib.ExitStack() as stack:
        if family.startswith("block_sparse"):
            stack.enter_context(hopper_kernels(family == "block_sparse_tma"))
            stack.enter_context(mock.patch.object(bs, "ATOMIC_DQ_SWITCH", family == "block_sparse_atomic_dq"))
            stack.enter_context(mock.patch.object(bs, "hopper_backward_pays", lambda q: True))  # any head dim
        if family.startswith("neighborhood"):
            stack.enter_context(mock.patch.object(na_tma, "SWITCH", family == "neighborhood_tma"))
        for part, choose in choices.items():
            stack.enter_context(KERNELS[family][part].pinned(choose))
        yield


def run(problem: Problem, backend: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """out, lse and the gradients of every input for a fixed float64 upstream gradient."""
    def leaf(name, t):
        cast = name in ("q", "k", "v") or dtype == torch.float64
        return t.to(DEVICE, dtype if cast else t.dtype, copy=True).requires_grad_()

    leaves = {name: leaf(name, t) for name, t in problem.inputs.items()}
    out, lse = problem.attend(backend, **leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    (out.double() * grad).sum().backward()
    return {"out": out.detach(), "lse": lse.detach(), **{f"d{name}": t.grad for name, t in leaves.items()}}


@dataclass
class Prepared:
    problem: Problem
    kept: dict[str, list]  # per kernel, the tiles prune keeps for this problem
    naive: dict[str, torch.Tensor]
    exact: dict[str, torch.Tensor]


@functools.cache
def prepared(name: str) -> Prepared:
    """The problem, the tiles each kernel may run on it (recorded while running the first ones) and the naive and
    float64 results."""
    case = CASES[name]
    problem = _active(case)()
    kept = {}

    def first(part):
        def choose(tiles):
            kept.setdefault(part, tiles)
            return tiles[0]

        return choose

    parts = KERNELS[case.family]
    with pinned(case.family, {part: first(part) for part in parts}):
        run(problem, "triton", DTYPE)
    assert set(kept) == set(parts), f"{name}: launched {sorted(kept)}"
    return Prepared(problem, kept, run(problem, "torch", DTYPE), run(problem, "torch", torch.float64))


def assert_matches(ours: dict, naive: dict, exact: dict, what: str) -> None:
    failures = []
    for name, e in exact.items():
        a, n = ours[name].double(), naive[name].double()
        finite = torch.isfinite(e)
        if a.isnan().any() or not torch.equal(torch.isfinite(a), finite):
            failures.append(f"{name}: NaN or a different -inf pattern")
            continue
        if not finite.any():
            continue
        err, naive_err = ((x - e)[finite].abs().max().item() for x in (a, n))
        bound = 2 * naive_err + SLACK * max(1.0, e[finite].abs().max().item())
        if err > bound:
            failures.append(f"{name}: error {err:.3g} > {bound:.3g} (naive {naive_err:.3g})")
    assert not failures, f"{what}: " + "; ".join(failures)


def _params():
    for name, case in CASES.items():
        for part, kernel in KERNELS[case.family].items():
            for index, tile in enumerate(kernel.configs):
                yield pytest.param(name, part, index, id=f"{name}-{part}-{tile_name(tile)}")


@pytest.mark.parametrize("name, part, index", list(_params()))
def test_tile_matches_the_float64_reference(name, part, index):
    case = CASES[name]
    if _active(case) is None:
        pytest.skip("a GPU problem (the interpreter runs tiny versions of some problems only)")
    tile = KERNELS[case.family][part].configs[index]
    state = prepared(name)
    kept = state.kept[part]
    if tile not in kept:
        pytest.skip("prune drops this tile for this problem: the autotuner never runs it here")
    choices = {p: state.kept[p][0] for p in KERNELS[case.family]}
    choices[part] = tile
    try:
        with pinned(case.family, choices):
            ours = run(state.problem, "triton", DTYPE)
    except OutOfResources as error:
        if tile == kept[0]:  # the tile taken without autotuning must always launch
            raise
        pytest.skip(f"{tile_name(tile)} does not fit this GPU, so the autotuner drops it: {error}")
    assert_matches(ours, state.naive, state.exact, f"{name} {part} tile {tile_name(tile)}")


def test_every_listed_tile_is_kept_by_some_problem():
    for family, kernels in KERNELS.items():
        names = [name for name, case in CASES.items() if case.family == family and _active(case) is not None]
        if not names:
            continue  # a family this device does not run (the Hopper forward off sm90 and in the interpreter)
        for part, kernel in kernels.items():
            kept = [tile for name in names for tile in prepared(name).kept[part]]
            missing = [tile_name(tile) for tile in kernel.configs if tile not in kept]
            assert not missing, f"{family} {part}: no problem keeps {missing}; add one that does"
