"""The FlashAttention-4 adapter: its conversion of a BlockSparseMask into FA4's block-sparse tensors (CPU, checked
against an oracle built here from the bool block matrix), its capability predicate, and, on a Hopper/Blackwell GPU
with flash_attn.cute installed, its results against mmattn's float64 reference (tests named `gpu`)."""

import math

import pytest
import torch

from mmattn.kernels import BlockSparseMask, backends, block_sparse_attention, reference, supported_backends
from mmattn.kernels.fa4 import (
    _sparse_tensors,
    dq_write_order,
    fa4_available,
    fa4_block_sparse_attention,
    fa4_supports,
    fa4_tiles,
    split_kv_blocks,
)

from .helpers import random_qkv


def random_blocks(batch, heads, n_q, n_kv, seed, density=0.4):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand((batch, heads, n_q, n_kv), generator=g) < density
    blocks[..., -1, -1] = True  # the partial corner block
    if n_q > 1:
        blocks[..., 0, :] = False  # a query block with no key block
    return blocks


CASES = [
    # (mask batch, mask heads, q_len, kv_len, block_size)
    (1, 1, 512, 512, (128, 128)),
    (2, 3, 1000, 700, (128, 128)),  # both lengths partial
    (1, 4, 300, 200, (64, 128)),  # rectangular blocks, partial
    (2, 1, 100, 90, (128, 128)),  # a single partial block each way
    (1, 2, 640, 1024, (192, 64)),
]


@pytest.mark.parametrize("batch,heads,q_len,kv_len,block_size", CASES)
def test_dq_write_order_is_rank_among_writers(batch, heads, q_len, kv_len, block_size):
    """Oracle: for entry i of kv-block n's list (q-block m), the number of kv-blocks before n that m attends,
    counted on the bool block matrix; 0 past the list."""
    n_q, n_kv = math.ceil(q_len / block_size[0]), math.ceil(kv_len / block_size[1])
    blocks = random_blocks(batch, heads, n_q, n_kv, seed=7 * q_len + kv_len, density=0.6)
    mask = BlockSparseMask.from_dense(blocks, block_size, q_len, kv_len)
    order = dq_write_order(mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)
    assert order.shape == mask.q_indices.shape and order.dtype == torch.int32 and order.is_contiguous()
    for b in range(batch):
        for h in range(heads):
            for n in range(n_kv):
                listed = int(mask.q_num_blocks[b, h, n])
                for i in range(n_q):
                    want = int(blocks[b, h, int(mask.q_indices[b, h, n, i]), :n].sum()) if i < listed else 0
                    assert int(order[b, h, n, i]) == want, (b, h, n, i)


def test_sparse_tensors_fields(monkeypatch):
    """FA4's NamedTuple is filled by field name: a stand-in with 4.0.0b36's fields catches a misspelling. Every
    kept block is a "full" block (the mask's own tensors); the "mask" lists are there but empty."""
    import sys
    import types
    from typing import NamedTuple

    class BlockSparseTensorsTorch(NamedTuple):  # the field list of flash_attn/cute/block_sparsity.py, 4.0.0b36
        mask_block_cnt: object
        mask_block_idx: object
        full_block_cnt: object = None
        full_block_idx: object = None
        cu_total_m_blocks: object = None
        cu_block_idx_offsets: object = None
        block_size: object = None
        dq_write_order: object = None
        dq_write_order_full: object = None
        spt: object = None

    module = types.ModuleType("flash_attn.cute.block_sparsity")
    module.BlockSparseTensorsTorch = BlockSparseTensorsTorch
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.block_sparsity", module)
    mask = BlockSparseMask.from_dense(random_blocks(1, 2, 3, 3, seed=3), 128)
    order = dq_write_order(mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)
    flash = _sparse_tensors(mask.q_num_blocks, mask.q_indices, mask.block_size, order)
    assert flash.full_block_cnt is mask.q_num_blocks and flash.full_block_idx is mask.q_indices
    assert flash.dq_write_order_full is order and flash.spt is False and flash.block_size == (128, 128)
    assert int(flash.mask_block_cnt.abs().sum()) == 0 and flash.mask_block_cnt.shape == mask.q_num_blocks.shape
    assert flash.mask_block_idx.dtype == torch.int32 and flash.cu_total_m_blocks is None
    plain = _sparse_tensors(mask.kv_num_blocks, mask.kv_indices, mask.block_size)
    assert plain.dq_write_order is None and plain.dq_write_order_full is None and plain.spt is None


def token_mask(counts, indices, row_block, col_block, n_rows, n_cols):
    """Oracle: the token-level mask `[.., n_rows, n_cols]` that CSR lists of blocks give, entry by entry, checking that
    each row's entries ascend and that its last entry is the block holding column n_cols - 1 whenever that block is
    listed (FA4 masks columns past n_cols in the last entry only)."""
    last_block = (n_cols - 1) // col_block
    out = torch.zeros(*counts.shape[:-1], n_rows, n_cols, dtype=torch.bool)
    for pos in torch.cartesian_prod(*(torch.arange(s) for s in counts.shape)).view(-1, counts.dim()).tolist():
        row = indices[tuple(pos)][: int(counts[tuple(pos)])].tolist()
        assert row == sorted(set(row)) and all(c * col_block < n_cols for c in row), f"row {pos}: {row}"
        assert last_block not in row or row[-1] == last_block, f"row {pos}: {row}"
        r = pos[-1]
        for c in row:
            out[(*pos[:-1], slice(r * row_block, (r + 1) * row_block), slice(c * col_block, (c + 1) * col_block))] = True
    return out


@pytest.mark.parametrize("q_len,kv_len,block,tile_n", [(700, 1000, (128, 384), 128), (300, 384, (64, 256), 128),
                                                      (1000, 130, (128, 256), 64), (512, 512, (128, 128), 128)])
def test_split_kv_blocks_lists_the_same_keys_in_whole_tiles(q_len, kv_len, block, tile_n):
    n_q, n_kv = math.ceil(q_len / block[0]), math.ceil(kv_len / block[1])
    blocks = random_blocks(2, 3, n_q, n_kv, seed=kv_len, density=0.5)
    mask = BlockSparseMask.from_dense(blocks, block, q_len, kv_len)
    counts, lists, q_counts, q_lists = split_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks,
                                                       mask.q_indices, block[1], tile_n, kv_len)
    for t in (counts, lists, q_counts, q_lists):
        assert t.dtype == torch.int32 and t.is_contiguous()
    assert lists.shape[-1] == math.ceil(kv_len / tile_n)  # FA4 wants one index column per kv tile, no more
    want = mask.to_token_mask()
    assert torch.equal(token_mask(counts, lists, block[0], tile_n, q_len, kv_len), want)
    transposed = token_mask(q_counts, q_lists, tile_n, block[0], kv_len, q_len)
    assert q_counts.shape[-1] == math.ceil(kv_len / tile_n) and torch.equal(transposed, want.transpose(-1, -2))


def test_partial_last_block_is_last_entry():
    """FA4 applies the key-length mask to the last entry of a row only: a kept partial block must sit there."""
    blocks = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask = BlockSparseMask.from_dense(blocks, (64, 64), q_len=150, kv_len=200)
    assert mask.kv_num_blocks.tolist() == [[[4, 4, 4]]]
    assert mask.kv_indices[0, 0, :, 3].tolist() == [3, 3, 3]


# --------------------------------------------------------------------------------------------------
# capability


def qkv_mask(heads=4, kv_heads=4, q_len=1024, kv_len=1024, head_dim=128, block=(128, 128), dtype=torch.bfloat16):
    q, k, v = random_qkv(1, heads, kv_heads, q_len, kv_len, head_dim, dtype)
    blocks = torch.ones(math.ceil(q_len / block[0]), math.ceil(kv_len / block[1]), dtype=torch.bool)
    return q, k, v, BlockSparseMask.from_dense(blocks, block, q_len, kv_len)


def test_supports_needs_cuda():
    ok, reason = fa4_supports(*qkv_mask())
    assert not ok and "CUDA" in reason


@pytest.mark.parametrize("arch", [90, 100])
def test_supports_reasons(arch):
    q_block = 128 if arch == 90 else 256  # sm100 runs two 128-row Q stages
    ok, reason = fa4_supports(*qkv_mask(block=(q_block, 128)), arch=arch, backward=True)
    assert ok and f"sm{arch}" in reason, reason
    ok, reason = fa4_supports(*qkv_mask(block=(q_block, 128), dtype=torch.float32), arch=arch)
    assert not ok and "dtype" in reason
    ok, reason = fa4_supports(*qkv_mask(block=(q_block, 128), head_dim=512), arch=arch)
    assert not ok and "head_dim 512" in reason
    ok, reason = fa4_supports(*qkv_mask(block=(q_block, 128), heads=6, kv_heads=4), arch=arch)
    assert not ok and "multiple of k/v heads" in reason
    q, k, v, mask = qkv_mask(block=(q_block, 128))
    ok, reason = fa4_supports(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, mask, arch=arch)
    assert not ok and "last dim" in reason
    ok, reason = fa4_supports(*qkv_mask(block=(96, 128)), arch=arch, backward=False)
    assert not ok and "q block 96" in reason
    ok, reason = fa4_supports(*qkv_mask(block=(q_block, 48)), arch=arch, backward=True)
    assert not ok and "kv block 48" in reason
    ok, reason = fa4_supports(*qkv_mask(block=(q_block, 128), heads=8, kv_heads=2), arch=arch, backward=True)
    assert ok, f"GQA: {reason}"


def test_supports_sm90_specifics():
    # forward shrinks tile_n to a 64 kv block, the backward keeps 128
    assert fa4_supports(*qkv_mask(block=(128, 64)), arch=90, backward=False)[0]
    ok, reason = fa4_supports(*qkv_mask(block=(128, 64)), arch=90, backward=True)
    assert not ok and "backward" in reason and "tile_n=128" in reason
    # head_dim <= 64: the backward's tile_m is 128
    assert fa4_supports(*qkv_mask(head_dim=64, block=(64, 128)), arch=90, backward=False)[0]
    ok, reason = fa4_supports(*qkv_mask(head_dim=64, block=(64, 128)), arch=90, backward=True)
    assert not ok and "tile_m=128" in reason
    ok, reason = fa4_supports(*qkv_mask(), arch=90, backward=True, deterministic=True)
    assert not ok and "deterministic" in reason
    assert fa4_supports(*qkv_mask(head_dim=256, block=(128, 64)), arch=90, backward=True)[0]
    assert fa4_supports(*qkv_mask(head_dim=192, block=(128, 96)), arch=90, backward=True)[0]
    ok, reason = fa4_supports(*qkv_mask(block=(128, 32)), arch=90, backward=False)
    assert not ok and "unmeasured" in reason
    # a kv block of several tiles (STA's 384-token tiles) is cut into tiles by the adapter
    assert fa4_supports(*qkv_mask(q_len=1536, kv_len=1536, block=(384, 384)), arch=90, backward=True)[0]
    ok, reason = fa4_supports(*qkv_mask(block=(128, 192)), arch=90, backward=False)
    assert not ok and "multiple of tile_n=128" in reason


def test_supports_sm100_specifics():
    # two 128-row Q stages once q_len * groups > 128: the q block must hold both
    ok, reason = fa4_supports(*qkv_mask(block=(128, 128)), arch=100, backward=False)
    assert not ok and "tile_m=256" in reason
    assert fa4_supports(*qkv_mask(q_len=128, block=(128, 128)), arch=100, backward=True)[0]
    assert fa4_supports(*qkv_mask(block=(256, 384)), arch=100, backward=True, deterministic=True)[0]
    ok, reason = fa4_supports(*qkv_mask(head_dim=256, block=(256, 128)), arch=100)
    assert not ok and "head_dim 256" in reason


@pytest.mark.parametrize(
    "head_dim,block,forward,backward",
    [
        (64, (128, 128), (128, 128), (128, 128)),
        (64, (192, 128), (192, 128), (128, 128)),
        (96, (192, 128), (192, 128), (64, 128)),
        (128, (128, 128), (128, 128), (64, 128)),
        (128, (320, 128), (64, 128), (80, 128)),
        (128, (256, 64), (128, 64), (64, 128)),
        (192, (128, 96), (128, 96), (64, 96)),
        (256, (128, 64), (128, 64), (64, 64)),
    ],
)
def test_sm90_tiles(head_dim, block, forward, backward):
    tiles = fa4_tiles(90, head_dim, block, 4096, 1)
    assert (tiles.forward, tiles.backward, tiles.kv_multiple) == (forward, backward, False)


# --------------------------------------------------------------------------------------------------
# GPU: against the float64 reference


def gpu_ready():
    ok, reason = fa4_available() if torch.cuda.is_available() else (False, "no CUDA")
    return ok, reason


def band_mask(heads, q_len, kv_len, block, width=1):
    n_q, n_kv = math.ceil(q_len / block[0]), math.ceil(kv_len / block[1])
    rows = torch.arange(n_q)[:, None] * n_kv // n_q
    blocks = (torch.arange(n_kv)[None, :] - rows).abs() <= width
    blocks[0] = False  # a fully masked query block
    return BlockSparseMask.from_dense(blocks.expand(heads, -1, -1).clone(), block, q_len, kv_len)


def run(fn, q, k, v, grad_out, grad_lse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    finite = torch.isfinite(lse)
    loss = (out.double() * grad_out).sum() + (torch.where(finite, lse, 0).double() * grad_lse).sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def gpu_case(mask, heads, kv_heads, q_len, kv_len, head_dim, seed, layout="bhld"):
    arch = torch.cuda.get_device_capability()
    q, k, v = (t.cuda() for t in random_qkv(2, heads, kv_heads, q_len, kv_len, head_dim, torch.bfloat16, seed=seed,
                                            layout=layout))
    mask = mask.to("cuda")
    ok, reason = fa4_supports(q.requires_grad_(), k, v, mask)
    assert ok, reason
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).cuda()
    grad_lse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64).cuda()
    scale = head_dim**-0.5
    ours = run(lambda *t: fa4_block_sparse_attention(*t, mask, scale), q, k, v, grad_out, grad_lse)
    assert [t.stride() for t in ours[:1] + ours[2:]] == [q.stride(), q.stride(), k.stride(), v.stride()], \
        "out and the gradients are laid out like the inputs"
    naive = run(lambda *t: reference.block_sparse_attention(*t, mask, scale), q, k, v, grad_out, grad_lse)
    exact = run(lambda *t: reference.block_sparse_attention(*t, mask, scale), q.double(), k.double(), v.double(),
                grad_out, grad_lse)
    empty = ~torch.isfinite(exact[1])
    assert torch.equal(~torch.isfinite(ours[1]), empty), f"lse -inf rows differ (arch {arch})"
    assert (ours[1][empty] == float("-inf")).all()
    assert (ours[0][empty] == 0).all(), "empty rows give out = 0"
    for name, a, n, e in zip(("out", "lse", "dq", "dk", "dv"), ours, naive, exact):
        a, n, e = (torch.where(torch.isfinite(t), t, 0).double() for t in (a, n, e))
        assert torch.isfinite(a).all(), name
        err, naive_err = (a - e).abs().max().item(), (n - e).abs().max().item()
        assert err <= 2 * naive_err + 2e-3, f"{name}: {err:.3g} vs naive bf16 {naive_err:.3g}"


def gpu_block():
    """Blocks both passes of FA4 take for head_dim 128: (128, 128) on sm90; two Q stages on sm100."""
    return (256, 128) if torch.cuda.get_device_capability()[0] >= 10 else (128, 128)


@pytest.mark.parametrize("q_len,kv_len", [(1024, 1024), (1000, 1100), (777, 300)])
def test_fa4_gpu_band(q_len, kv_len):
    ok, reason = gpu_ready()
    if not ok:
        pytest.skip(reason)
    block = gpu_block()
    gpu_case(band_mask(4, q_len, kv_len, block), 4, 4, q_len, kv_len, 128, seed=q_len)


@pytest.mark.parametrize("mask_heads,kv_heads", [(8, 8), (1, 2), (8, 2)])
def test_fa4_gpu_random_gqa(mask_heads, kv_heads):
    ok, reason = gpu_ready()
    if not ok:
        pytest.skip(reason)
    block, q_len, kv_len = gpu_block(), 1500, 1300
    blocks = random_blocks(1, mask_heads, math.ceil(q_len / block[0]), math.ceil(kv_len / block[1]), seed=kv_heads)
    mask = BlockSparseMask.from_dense(blocks, block, q_len, kv_len)
    gpu_case(mask, 8, kv_heads, q_len, kv_len, 128, seed=mask_heads, layout="blhd")


def test_fa4_gpu_forward_only_small_kv_block():
    ok, reason = gpu_ready()
    if not ok or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(reason if not ok else "sm90 forward tile shrink")
    q, k, v = (t.cuda() for t in random_qkv(1, 4, 4, 1000, 1000, 128, torch.bfloat16))
    mask = band_mask(4, 1000, 1000, (128, 64)).to("cuda")
    with torch.no_grad():
        assert fa4_supports(q, k, v, mask)[0]
        out, lse = fa4_block_sparse_attention(q, k, v, mask, 128**-0.5)
    exact_out, exact_lse = reference.block_sparse_attention(q.double(), k.double(), v.double(), mask, 128**-0.5)
    assert (out.double() - exact_out).abs().max() < 2e-2
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[finite].double() - exact_lse[finite]).abs().max() < 1e-2


def test_fa4_gpu_auto_compile_and_fallbacks(monkeypatch):
    """`block_sparse_attention(backend="auto")` runs FA4 where it runs the case (the same values as the adapter),
    one opaque call in a full graph under torch.compile, and our Triton kernels where FA4 cannot (a kv block FA4's
    backward does not take; a deterministic backward on sm90) or where the call is host-bound in eager mode."""
    ok, reason = gpu_ready()
    if not ok:
        pytest.skip(reason)
    block = gpu_block()
    q, k, v = (t.cuda() for t in random_qkv(2, 4, 2, 1000, 900, 128, torch.bfloat16, seed=5))
    mask = band_mask(4, 1000, 900, block).to("cuda")
    q.requires_grad_()
    assert supported_backends("block_sparse", q, k=k, v=v, mask=mask)[0] == "triton", "this small case is host-bound"
    monkeypatch.setattr(backends, "HOST_BOUND_WORK", 0)  # as compiled code, which never asks, sees it
    assert supported_backends("block_sparse", q, k=k, v=v, mask=mask)[0] == "fa4"
    out = block_sparse_attention(q, k, v, mask)
    assert torch.equal(out, fa4_block_sparse_attention(q, k, v, mask, 128**-0.5)[0])
    compiled = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, mask), fullgraph=True)
    assert torch.equal(compiled(q, k, v), out)
    (grad_compiled,) = torch.autograd.grad(compiled(q, k, v).float().square().sum(), q)
    (grad_eager,) = torch.autograd.grad(out.float().square().sum(), q)
    assert (grad_compiled.float() - grad_eager.float()).abs().max() <= 1e-2 * grad_eager.float().abs().max()
    small_kv = band_mask(4, 1000, 900, (block[0], 64)).to("cuda")
    assert supported_backends("block_sparse", q, k=k, v=v, mask=small_kv)[0] == "triton"
    if torch.cuda.get_device_capability()[0] == 9:
        deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            torch.use_deterministic_algorithms(True)
            assert supported_backends("block_sparse", q, k=k, v=v, mask=mask)[0] == "triton"
        finally:
            torch.use_deterministic_algorithms(deterministic)


def test_fa4_gpu_custom_ops_pass_opcheck():
    """FA4's custom ops: schema, fake tensors (shapes and strides of the outputs) and autograd registration."""
    ok, reason = gpu_ready()
    if not ok:
        pytest.skip(reason)
    from mmattn.kernels.fa4 import fa4_block_sparse_op

    q, k, v = (t.cuda() for t in random_qkv(1, 4, 2, 700, 600, 128, torch.bfloat16, seed=9, layout="blhd"))
    mask = band_mask(4, 700, 600, gpu_block()).to("cuda")
    tensors = (mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)
    args = (q.requires_grad_(), k, v, *tensors, *mask.block_size, 128**-0.5, False)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(fa4_block_sparse_op.forward_op, args, test_utils=checks)
    out, lse = fa4_block_sparse_op.forward_op(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    torch.library.opcheck(fa4_block_sparse_op.backward_op,
                          (torch.randn_like(out), None, out, lse, q.detach(), k, v, *tensors, *mask.block_size,
                           128**-0.5, False), test_utils=("test_schema", "test_faketensor"))


def test_fa4_gpu_kv_blocks_of_several_tiles():
    """STA-sized kv blocks (384 keys): cut into tiles on sm90, walked by FA4 itself on sm100; forward and backward
    against float64, with a partial last kv block."""
    ok, reason = gpu_ready()
    if not ok:
        pytest.skip(reason)
    block = (gpu_block()[0], 384)
    gpu_case(band_mask(4, 1500, 1700, block), 4, 2, 1500, 1700, 128, seed=11)
