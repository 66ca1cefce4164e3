"""The Hopper block-sparse kernels (TMA descriptors + warp specialization, triton/block_sparse_tma.py) against the
float64 reference, and the dispatch of `triton.block_sparse.forward` and `backward` between them and the pointer-load
kernels.

On the CPU the kernels run under TRITON_INTERPRET=1, switched on (MMATTN_TRITON_TMA unset or 1; the backward's
MMATTN_TRITON_TMA_BWD patched on), in float16 and float32: the output, lse and the gradients through both must lie
within a few units of the dtype's rounding of the float64 reference, empty query rows give out 0 and lse -inf. On an sm90 GPU (MMATTN_TEST_GPU=1), switched on, each of its tiles, pinned in
turn, is held in bfloat16 to the FlashAttention criterion of test_gpu_tiles.py (Triton 3.6 miscompiles some
warp-specialized tiles to NaN there: specs/kernels.md section 5) and must give the same bits on a second run.
"""

import contextlib
from unittest import mock

import pytest
import torch

from mmattn.kernels import BlockSparseMask, backends, block_sparse_attention, reference
from mmattn.kernels.backends import INTERPRETED
from mmattn.kernels.triton import block_sparse as bs
from mmattn.kernels.triton import block_sparse_tma as tma

from .helpers import block_sparse_run, check_against_reference, random_mask, random_qkv

HOPPER = not INTERPRETED and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
interpreted = pytest.mark.skipif(not INTERPRETED, reason="the Triton interpreter runs only with TRITON_INTERPRET=1")


def dispatch(q, k, v, mask, switch=True, host_bound=False):
    """`block_sparse.forward` with MMATTN_TRITON_TMA taken as `switch`: `(out, lse, whether the TMA kernel ran)`."""
    with mock.patch.object(tma, "SWITCH", switch), mock.patch.object(tma, "forward", wraps=tma.forward) as spy:
        out, lse = bs.forward(q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices,
                              *mask.block_size, q.shape[-1] ** -0.5, host_bound)
    return out, lse, spy.called


def exact(q, k, v, mask):
    return reference.block_sparse_attention(q.double(), k.double(), v.double(), mask, q.shape[-1] ** -0.5)


def naive(q, k, v, mask):
    """The reference in the inputs' dtype: how far that dtype's own arithmetic lands from `exact` on this machine."""
    return reference.block_sparse_attention(q, k, v, mask, q.shape[-1] ** -0.5)


def assert_close(name, got, low, want, dtype):
    """FlashAttention's accuracy criterion (specs/kernels.md section 8) with a floor of one epsilon: |got - want| at
    most twice |low - want| (the same-dtype reference) plus one epsilon of `dtype` times the largest |want|, over the
    finite entries of `want`."""
    finite = torch.isfinite(want)
    err, low_err = ((x.double() - want).where(finite, 0.0).abs().max().item() for x in (got, low))
    tol = 2 * low_err + torch.finfo(dtype).eps * max(1.0, want.where(finite, 0.0).abs().max().item())
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (same-dtype reference {low_err:.3g})"


def check_tma(q, k, v, mask):
    """Runs the forced TMA path and checks it against float64: values, and out 0 / lse -inf on empty rows."""
    out, lse, used = dispatch(q, k, v, mask)
    assert used, "the TMA kernel did not run"
    (want_out, want_lse), (low_out, low_lse) = exact(q, k, v, mask), naive(q, k, v, mask)
    assert not out.isnan().any() and not lse.isnan().any()
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse), empty), "-inf lse pattern differs"
    assert (lse[empty] == float("-inf")).all() and (out[empty] == 0).all(), "empty rows must give out 0, lse -inf"
    assert_close("out", out, low_out, want_out, q.dtype)
    assert_close("lse", lse, low_lse, want_lse, q.dtype)
    return out, lse


@contextlib.contextmanager
def hopper_backward(switch=True, atomic=False, host_bound=False):
    """`block_sparse.backward` with MMATTN_TRITON_TMA_BWD taken as `switch` and MMATTN_TRITON_ATOMIC_DQ as `atomic` at
    every head dim (`hopper_backward_pays`), every call host-bound or none: yields a spy on the Hopper backward."""
    with mock.patch.object(tma, "BWD_SWITCH", switch), mock.patch.object(bs, "ATOMIC_DQ_SWITCH", atomic), \
            mock.patch.object(bs, "hopper_backward_pays", lambda q: True), \
            mock.patch.object(backends, "HOST_BOUND_WORK", float("inf") if host_bound else 0.0), \
            mock.patch.object(tma, "backward", wraps=tma.backward) as spy:
        yield spy


def check_tma_backward(q, k, v, mask):
    """out, lse, dq, dk, dv (through out and lse) to the FlashAttention criterion, the Hopper backward running."""
    with hopper_backward() as spy:
        check_against_reference(q, k, v, mask, with_lse_grad=True)
    assert spy.called, "the TMA backward did not run"


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_len, kv_len, block", [(100, 130, (32, 32)), (70, 200, (64, 64)), (128, 256, (32, 64))])
def test_partial_last_blocks(dtype, head_dim, q_len, kv_len, block):
    """Lengths past a whole block (and whole ones), one or two key tiles per block (the interpreter's tile is 32), an
    empty query block (its rows give no gradient): the forward, then the backward."""
    mask = random_mask(1, 2, q_len, kv_len, block, density=0.5, seed=q_len + head_dim)
    q, k, v = random_qkv(1, 2, 2, q_len, kv_len, head_dim, dtype, seed=kv_len)
    check_tma(q, k, v, mask)
    check_tma_backward(q, k, v, mask)


@interpreted
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1)])
def test_grouped_query_attention(heads, kv_heads):
    mask = random_mask(2, heads, 90, 110, (32, 32), seed=heads + kv_heads)
    check_tma(*random_qkv(2, heads, kv_heads, 90, 110, 64, torch.float32, seed=kv_heads), mask)


@interpreted
@pytest.mark.parametrize("seed, density", [(0, 0.1), (1, 0.3), (2, 0.7), (3, 1.0)])
def test_random_masks_strided_layout_and_broadcast(seed, density):
    """Masks shared over the batch and per head, over (B, L, H, D) storage (16-byte aligned strides: TMA applies)."""
    mask = random_mask(1, 4, 160, 144, (32, 16), density=density, seed=seed, empty_row=False)
    check_tma(*random_qkv(2, 4, 2, 160, 144, 64, torch.float16, seed=seed, layout="blhd"), mask)


@interpreted
def test_empty_query_rows_and_an_empty_mask():
    mask = random_mask(1, 2, 96, 80, (32, 32), seed=4)  # query block 0 lists no key block
    out, _ = check_tma(*random_qkv(1, 2, 1, 96, 80, 64, torch.float32), mask)
    assert (out[:, :, :32] == 0).all()
    nothing = BlockSparseMask.from_dense(torch.zeros(1, 1, 3, 3, dtype=torch.bool), (32, 32), 70, 70)
    out, lse = check_tma(*random_qkv(1, 1, 1, 70, 70, 128, torch.float16), nothing)
    assert (out == 0).all() and (lse == float("-inf")).all()


@interpreted
def test_dispatch_takes_the_tma_kernel_only_when_switched_on_eligible_and_not_host_bound():
    mask = random_mask(1, 2, 64, 64, (32, 32), seed=5)
    q, k, v = random_qkv(1, 2, 2, 64, 64, 64, torch.float16)
    assert dispatch(q, k, v, mask, switch=True)[2]
    assert not dispatch(q, k, v, mask, switch=False)[2], "MMATTN_TRITON_TMA=0 keeps the pointer kernel"
    assert not dispatch(q, k, v, mask, host_bound=True)[2], "a host-bound call keeps the pointer kernel"

    padded = torch.randn(1, 2, 64, 68).half()[..., :64]  # rows 136 bytes apart: TMA needs 16-byte multiples
    ineligible = {
        "head dim": random_qkv(1, 2, 2, 64, 64, 96, torch.float16),
        "aligned": (padded, k, v),
    }
    for reason, (q2, k2, v2) in ineligible.items():
        with mock.patch.object(tma, "SWITCH", True):
            ok, why = tma.eligible(q2, k2, v2, 32, 32)
        assert not ok and reason in why, why
        out, _, used = dispatch(q2, k2, v2, mask)
        assert not used
        assert_close("out", out, naive(q2, k2, v2, mask)[0], exact(q2, k2, v2, mask)[0], torch.float16)


@pytest.mark.skipif(not HOPPER, reason="needs an sm90 GPU and MMATTN_TEST_GPU=1 (compiled Triton)")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("index", range(len(tma.FWD_CONFIGS)))
def test_gpu_every_tma_tile_matches_float64(head_dim, index):
    """bf16, GQA 2, lengths past a whole 128-block, density 0.3 with an empty query block: each listed tile pinned."""
    mask = random_mask(2, 4, 2000, 2000, (128, 128), density=0.3, seed=head_dim).to("cuda")
    q, k, v = (t.cuda() for t in random_qkv(2, 4, 2, 2000, 2000, head_dim, torch.bfloat16, seed=index))
    with tma.fwd_kernel.pinned(tma.FWD_CONFIGS[index]):
        out, lse, used = dispatch(q, k, v, mask)
        again = dispatch(q, k, v, mask)
    with mock.patch.object(tma, "SWITCH", True):
        assert used, tma.eligible(q, k, v, 128, 128)[1]
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1]), "two runs differ"
    for name, ours, low, want in zip(("out", "lse"), (out, lse), naive(q, k, v, mask), exact(q, k, v, mask)):
        finite = torch.isfinite(want)
        assert not ours.isnan().any() and torch.equal(torch.isfinite(ours), finite), f"{name}: NaN or -inf pattern"
        err, naive_err = ((x.double() - want)[finite].abs().max().item() for x in (ours, low))
        bound = 2 * naive_err + 2e-3 * max(1.0, want[finite].abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (naive {naive_err:.3g})"


@interpreted
@pytest.mark.parametrize("work_limit, expect_tma", [(2.0e6, False), (0.0, True)])
def test_block_sparse_attention_keeps_the_pointer_kernel_where_the_call_is_host_bound(work_limit, expect_tma):
    """`block_sparse_attention(backend="triton")` hands `backends.host_bound` down: a tiny call stays on the
    pointer kernel, the same call with the work threshold at 0 takes the TMA kernel."""
    mask = random_mask(1, 2, 64, 64, (32, 32), seed=6)
    q, k, v = random_qkv(1, 2, 2, 64, 64, 64, torch.float16)
    with mock.patch.object(tma, "SWITCH", True), mock.patch.object(tma, "forward", wraps=tma.forward) as spy, \
            mock.patch.object(backends, "HOST_BOUND_WORK", work_limit):
        out = block_sparse_attention(q, k, v, mask, backend="triton")
    assert spy.called == expect_tma
    assert_close("out", out, naive(q, k, v, mask)[0], exact(q, k, v, mask)[0], torch.float16)


@interpreted
def test_block_sparse_attention_reads_no_block_count_where_the_tma_kernels_are_off():
    """With the TMA forward and backward switched off the host-bound question, a device read, is never asked."""
    mask = random_mask(1, 2, 64, 64, (32, 32), seed=7)
    q, k, v = random_qkv(1, 2, 2, 64, 64, 64, torch.float16)
    with mock.patch.object(tma, "SWITCH", False), mock.patch.object(tma, "BWD_SWITCH", False), \
            mock.patch.object(backends, "host_bound", wraps=backends.host_bound) as spy:
        block_sparse_attention(q, k, v, mask, backend="triton")
    assert not spy.called
    with mock.patch.object(tma, "SWITCH", True), \
            mock.patch.object(backends, "host_bound", wraps=backends.host_bound) as spy:
        block_sparse_attention(q, k, v, mask, backend="triton")
    assert spy.called


@interpreted
@pytest.mark.parametrize("heads, kv_heads, layout", [(4, 2, "bhld"), (4, 1, "blhd"), (2, 2, "blhd")])
def test_backward_grouped_query_heads_and_strided_layout(heads, kv_heads, layout):
    """A GQA group's dK/dV summed over its query heads; (B, L, H, D) views get gradients laid out like them."""
    mask = random_mask(2, heads, 90, 110, (32, 32), density=0.6, seed=heads + kv_heads)
    q, k, v = random_qkv(2, heads, kv_heads, 90, 110, 64, torch.float32, seed=kv_heads, layout=layout)
    check_tma_backward(q, k, v, mask)
    with hopper_backward():
        _, _, dq, dk, dv = block_sparse_run(q, k, v, mask, "triton", torch.ones(q.shape))
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()


@interpreted
def test_backward_dispatch_takes_the_tma_kernels_only_when_switched_on_eligible_and_not_host_bound():
    mask = random_mask(1, 2, 64, 64, (32, 32), seed=8)
    q, k, v = random_qkv(1, 2, 2, 64, 64, 64, torch.float16)
    for settings, expected in (({}, True), ({"switch": False}, False), ({"host_bound": True}, False),
                               ({"atomic": True}, False)):
        with hopper_backward(**settings) as spy:
            block_sparse_run(q, k, v, mask, "triton", torch.ones(q.shape))
        assert spy.called == expected, settings

    padded = torch.randn(1, 2, 64, 68).half()[..., :64]  # rows 136 bytes apart: TMA needs 16-byte multiples
    with mock.patch.object(tma, "BWD_SWITCH", True):
        assert tma.backward_eligible(q, k, v, q, 32, 32) == (True, "")
        ok, why = tma.backward_eligible(q, k, v, padded, 32, 32)
        assert not ok and why.startswith("grad_out: TMA needs a 16-byte aligned"), why
        ok, why = tma.backward_eligible(q, k, v, q, 40, 32)
        assert not ok and "divides the blocks (40, 32)" in why, why
    with mock.patch.object(tma, "BWD_SWITCH", False):
        assert tma.backward_eligible(q, k, v, q, 32, 32) == (False, "off (MMATTN_TRITON_TMA_BWD=0)")


@interpreted
def test_default_backward_by_head_dim_and_determinism():
    """Unpatched switches: at head dim 128 dQ is added atomically (no dQ kernel runs), or, when torch asks for
    deterministic algorithms, the TMA kernels run; at head dim 64 the pointer kernels run. Gradients to the
    FlashAttention criterion each time."""
    mask = random_mask(1, 2, 64, 96, (32, 32), density=0.7, seed=10)
    deterministic = torch.are_deterministic_algorithms_enabled()
    for head_dim, strict, tma_runs, dq_kernel_runs in ((128, False, False, False), (128, True, True, False),
                                                     (64, False, False, True), (64, True, False, True)):
        q, k, v = random_qkv(1, 2, 2, 64, 96, head_dim, torch.float32, seed=head_dim)
        try:
            torch.use_deterministic_algorithms(strict)
            with mock.patch.object(backends, "HOST_BOUND_WORK", 0.0), \
                    mock.patch.object(tma, "backward", wraps=tma.backward) as tma_spy, \
                    mock.patch.object(bs.dq_kernel, "launch", wraps=bs.dq_kernel.launch) as dq_spy:
                check_against_reference(q, k, v, mask, with_lse_grad=True)
        finally:
            torch.use_deterministic_algorithms(deterministic)
        assert (tma_spy.called, dq_spy.called) == (tma_runs, dq_kernel_runs), (head_dim, strict)


@pytest.mark.skipif(not HOPPER, reason="needs an sm90 GPU and MMATTN_TEST_GPU=1 (compiled Triton)")
def test_gpu_tma_backward_is_deterministic():
    """No atomics: two backward runs give the same bits (GQA 2, partial blocks, bf16); each tile is checked against
    float64 in test_gpu_tiles.py (family block_sparse_tma)."""
    mask = random_mask(2, 4, 2000, 2000, (128, 128), density=0.3, seed=9).to("cuda")
    q, k, v = (t.cuda() for t in random_qkv(2, 4, 2, 2000, 2000, 128, torch.bfloat16, seed=9))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).cuda()
    with hopper_backward() as spy:
        first, second = (block_sparse_run(q, k, v, mask, "triton", grad)[2:] for _ in range(2))
    assert spy.called and all(torch.equal(a, b) for a, b in zip(first, second))
