import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmattn.kernels import BlockSparseMask

from .helpers import random_mask


def random_blocks(shape, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def test_from_dense_round_trip_and_transposed_index():
    blocks = random_blocks((2, 3, 5, 7))
    mask = BlockSparseMask.from_dense(blocks, (32, 64))
    assert mask.shape == (2, 3, 5, 7)
    assert (mask.q_len, mask.kv_len) == (160, 448)
    assert torch.equal(mask.to_dense(), blocks)
    # The transposed index lists, per key block, exactly the query blocks that attend to it, in order.
    for b, h, j in [(0, 0, 0), (1, 2, 6), (1, 1, 3)]:
        count = int(mask.q_num_blocks[b, h, j])
        assert mask.q_indices[b, h, j, :count].tolist() == torch.nonzero(blocks[b, h, :, j]).flatten().tolist()


def test_from_dense_accepts_2d_and_3d_blocks():
    blocks = random_blocks((4, 4))
    assert BlockSparseMask.from_dense(blocks, 16).shape == (1, 1, 4, 4)
    assert BlockSparseMask.from_dense(blocks[None].expand(2, 4, 4), 16).shape == (1, 2, 4, 4)


def test_density_counts_tokens_of_partial_blocks():
    blocks = torch.tensor([[True, False], [False, True]])
    mask = BlockSparseMask.from_dense(blocks, 64, q_len=100, kv_len=70)
    token_mask = mask.to_token_mask()
    assert token_mask.shape == (1, 1, 100, 70)
    expected = (64 * 64 + 36 * 6) / (100 * 70)
    assert math.isclose(mask.density(), expected)
    assert math.isclose(mask.density(), token_mask.double().mean().item())


def test_from_kv_blocks_ignores_entries_past_the_count():
    counts = torch.tensor([[[2, 0, 1]]], dtype=torch.int32)
    indices = torch.tensor([[[[0, 2, 99], [-5, 7, 1], [1, 1, 1]]]], dtype=torch.int32)
    mask = BlockSparseMask.from_kv_blocks(counts, indices, 32, q_len=96, kv_len=96)
    expected = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    assert torch.equal(mask.to_dense()[0, 0], expected)


def test_from_kv_blocks_pads_a_narrow_index():
    counts = torch.tensor([[[1, 1]]])
    indices = torch.tensor([[[[3], [0]]]])
    mask = BlockSparseMask.from_kv_blocks(counts, indices, 16, q_len=32, kv_len=64)
    assert mask.kv_indices.shape == (1, 1, 2, 4)
    assert mask.to_dense()[0, 0].nonzero().tolist() == [[0, 3], [1, 0]]


@pytest.mark.parametrize(
    "counts, indices, match",
    [
        ([[[2, 1]]], [[[[1, 0], [0, 0]]]], "sorted"),
        ([[[2, 1]]], [[[[1, 1], [0, 0]]]], "sorted"),
        ([[[1, 1]]], [[[[2, 0], [0, 0]]]], r"\[0, 2\)"),
        ([[[1, -1]]], [[[[0, 0], [0, 0]]]], "kv_num_blocks"),
        ([[[3, 1]]], [[[[0, 1], [0, 0]]]], "kv_num_blocks"),
        ([[[1, 1, 1]]], [[[[0, 0], [0, 0], [0, 0]]]], "kv_num_blocks"),
        ([[[1, 1]]], [[[[0, 0, 0], [0, 0, 0]]]], "kv_indices"),
    ],
)
def test_from_kv_blocks_rejects_bad_indices(counts, indices, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseMask.from_kv_blocks(torch.tensor(counts), torch.tensor(indices), 32, q_len=64, kv_len=64)


def test_from_kv_blocks_rejects_wrong_types():
    with pytest.raises(ValueError, match="kv_num_blocks"):
        BlockSparseMask.from_kv_blocks(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2, 2, dtype=torch.int32), 32, 64, 64)
    with pytest.raises(ValueError, match="kv_indices"):
        BlockSparseMask.from_kv_blocks(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 2, 2, dtype=torch.int32), 32, 64, 64)


@pytest.mark.parametrize("block_size", [8, 24, 0, (32, 40), (16,)])
def test_block_sizes_the_kernels_cannot_run_are_rejected(block_size):
    with pytest.raises((ValueError, TypeError), match="block_size"):
        BlockSparseMask.from_dense(random_blocks((2, 2)), block_size)


def test_from_dense_rejects_mismatched_lengths_and_non_bool():
    with pytest.raises(ValueError, match="blocks"):
        BlockSparseMask.from_dense(random_blocks((2, 2)), 32, q_len=65, kv_len=64)
    with pytest.raises(TypeError, match="blocks"):
        BlockSparseMask.from_dense(torch.ones(2, 2), 32)
    with pytest.raises(ValueError, match="q_len"):
        BlockSparseMask.from_dense(random_blocks((2, 2)), 32, q_len=0, kv_len=64)


def test_repr_shows_shape_block_size_and_density():
    text = repr(BlockSparseMask.from_dense(torch.eye(4, dtype=torch.bool), (16, 32)))
    assert "shape=(1, 1, 4, 4)" in text and "block_size=(16, 32)" in text and "density=0.250" in text


def test_flex_round_trip_keeps_blocks_and_lengths():
    mask = BlockSparseMask.from_dense(random_blocks((2, 3, 4, 5), seed=3), (32, 16), q_len=100, kv_len=75)
    block_mask = mask.to_flex()
    assert tuple(block_mask.BLOCK_SIZE) == (32, 16)
    back = BlockSparseMask.from_flex(block_mask)
    assert torch.equal(back.to_dense(), mask.to_dense())
    assert (back.q_len, back.kv_len, back.block_size) == (100, 75, (32, 16))


def test_from_flex_of_a_block_aligned_mask_mod():
    from torch.nn.attention.flex_attention import create_block_mask

    def block_causal(b, h, q_idx, kv_idx):
        return kv_idx // 32 <= q_idx // 32

    block_mask = create_block_mask(block_causal, None, None, 128, 128, device="cpu", BLOCK_SIZE=32)
    mask = BlockSparseMask.from_flex(block_mask)
    assert torch.equal(mask.to_dense()[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_from_flex_rejects_element_level_masks():
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    with pytest.raises(ValueError, match="mask_mod"):
        BlockSparseMask.from_flex(create_block_mask(causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=32))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    q_len=st.integers(1, 200),
    kv_len=st.integers(1, 200),
    q_block=st.sampled_from([16, 32, 64]),
    kv_block=st.sampled_from([16, 48, 64]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_csr_and_dense_views_agree(batch, heads, q_len, kv_len, q_block, kv_block, density, seed):
    n_q, n_kv = math.ceil(q_len / q_block), math.ceil(kv_len / kv_block)
    blocks = random_blocks((batch, heads, n_q, n_kv), density, seed)
    mask = BlockSparseMask.from_dense(blocks, (q_block, kv_block), q_len, kv_len)
    again = BlockSparseMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, (q_block, kv_block), q_len, kv_len)
    assert torch.equal(again.to_dense(), blocks)
    assert torch.equal(again.q_indices, mask.q_indices) and torch.equal(again.q_num_blocks, mask.q_num_blocks)
    transposed = BlockSparseMask.from_dense(blocks.transpose(-1, -2), (kv_block, q_block), kv_len, q_len)
    assert torch.equal(transposed.kv_num_blocks, mask.q_num_blocks)
    assert math.isclose(mask.density(), mask.to_token_mask().double().mean().item(), abs_tol=1e-12)


def test_crop_keeps_the_blocks_of_the_window():
    mask = random_mask(2, 3, 100, 90, (16, 32), density=0.5)
    part = mask.crop((32, 100), (64, 90), heads=(1, 3))
    assert (part.q_len, part.kv_len, part.shape) == (68, 26, (2, 2, 5, 1))
    torch.testing.assert_close(part.to_dense(), mask.to_dense()[:, 1:3, 2:, 2:])
    assert torch.equal(part.to_token_mask(), mask.to_token_mask(32, 100)[:, 1:3, :, 64:90])


def test_crop_rejects_unaligned_ranges():
    mask = random_mask(1, 1, 100, 90, (16, 32))
    with pytest.raises(ValueError, match="q_range: expected"):
        mask.crop((8, 100), (0, 90))
    with pytest.raises(ValueError, match="kv_range: expected"):
        mask.crop((0, 100), (0, 70))
    with pytest.raises(ValueError, match="heads: expected"):
        random_mask(1, 2, 100, 90, (16, 32)).crop((0, 100), (0, 90), heads=(1, 3))


def test_crop_of_the_whole_mask_is_the_mask():
    shared = random_mask(1, 1, 100, 90, (16, 32))
    assert shared.crop((0, 100), (0, 90)) is shared
    assert shared.crop((0, 100), (0, 90), heads=(2, 4)) is shared  # its one head serves every head
