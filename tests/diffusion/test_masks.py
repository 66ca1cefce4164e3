"""Radial mask: the analytic builder against a token-level construction of the paper's rule, and the spec's counts."""

import math

import pytest
import torch

from mmattn.diffusion import radial_block_mask, radial_mask
from mmattn.kernels import BlockSparseMask


def _token_level_pair(i, j, S, B, decay, model):
    """The official per-pair rule, built token by token (spec section 1.2)."""
    d = abs(i - j)
    if model == "wan" and j == 0:
        return torch.ones(S, S, dtype=torch.bool)
    if d <= 1:
        w = S
    else:
        w = 2 ** S.bit_length() / 2 ** d.bit_length() * decay
        w = max(w, B)
    idx = torch.arange(S)
    band = (idx[None, :] - idx[:, None]).abs() <= w
    base = 2 ** S.bit_length() / 2 ** d.bit_length()
    if base < 128 and d % int(128 / base) != 0:
        band = torch.zeros_like(band)
    return band


def _shrink(canvas, B, rows):
    """shrinkMaskStrict: B x B tiles (floor of the row count), kept iff > 60 % of non-empty columns are > 1/3 full.

    `rows[a]`: the density denominator of tile row a (B, or the real rows of the sequence's partial last block).
    """
    n = canvas.shape[0] // B
    tiles = canvas[: n * B, : n * B].reshape(n, B, n, B).permute(0, 2, 1, 3).float()
    col_density = tiles.sum(2) / rows.view(n, 1, 1)
    frac = (col_density > 1 / 3).sum(-1) / ((col_density > 0).sum(-1) + 1e-9)
    return frac > 0.6


def _token_level_mask(F, S, B, decay, model, text, size):
    """gen_log_mask_shrinked semantics on a `size` x `size` block grid (tiles past the grid are cut)."""
    out = torch.zeros(size, size, dtype=torch.bool)
    n = -(-S // B)
    for i in range(F):
        for j in range(F):
            ro, co = (i * S) % B, (j * S) % B
            canvas = torch.zeros(ro + n * B, co + n * B, dtype=torch.bool)
            canvas[ro : ro + S, co : co + S] = _token_level_pair(i, j, S, B, decay, model)
            r, c = i * S // B, j * S // B
            rows = torch.tensor([float(min(max(F * S - (r + a) * B, 1), B)) for a in range(n)])
            tiles = _shrink(canvas, B, rows)
            h, w = min(n, size - r), min(n, size - c)
            out[r : r + h, c : c + w] |= tiles[:h, :w]
    if text:
        out[F * S // B :] = True
        out[:, F * S // B :] = True
    return out


CASES = [
    # frames, tokens/frame, block, decay, model, text
    (6, 48, 16, 1.0, "wan", 0),
    (5, 40, 16, 0.5, "hunyuan", 0),
    (9, 100, 32, 1.0, "wan", 0),
    (7, 64, 16, 0.3, "hunyuan", 24),
    (12, 130, 64, 0.8, "wan", 0),
    (10, 256, 128, 1.0, "hunyuan", 40),
    (40, 24, 16, 1.0, "wan", 0),
    (33, 300, 128, 0.95, "hunyuan", 0),
]


@pytest.mark.parametrize("F,S,B,decay,model,text", CASES)
def test_leading_blocks_match_official_rule(F, S, B, decay, model, text):
    """The official mask is floor(N / B) blocks square; ours has the same leading blocks."""
    mask = radial_block_mask(F, S, block_size=B, decay_factor=decay, model=model, text_tokens=text)
    n_total = F * S + text
    assert mask.shape == (math.ceil(n_total / B),) * 2
    floor = n_total // B
    assert torch.equal(mask[:floor, :floor], _token_level_mask(F, S, B, decay, model, text, floor))


@pytest.mark.parametrize("F,S,B,decay,model,text", [c for c in CASES if (c[0] * c[1] + c[5]) % c[2]])
def test_trailing_partial_block_follows_the_rule(F, S, B, decay, model, text):
    """The partial last block row/column is the same shrink rule applied on a ceil-sized grid."""
    mask = radial_block_mask(F, S, block_size=B, decay_factor=decay, model=model, text_tokens=text)
    assert torch.equal(mask, _token_level_mask(F, S, B, decay, model, text, mask.shape[0]))
    assert mask[-1, -1]


@pytest.mark.parametrize(
    "S,F,B,decay,model,text,nnz_video",
    [
        (3840, 18, 128, 0.2, "wan", 0, 83_728),
        (1560, 21, 128, 0.2, "wan", 0, 22_023),
        (2700, 21, 128, 0.2, "wan", 0, 55_341),
        (3840, 20, 64, 0.8, "wan", 0, 502_720),
        (3840, 30, 128, 0.95, "hunyuan", 256, 222_452),
        (3840, 30, 128, 1.0, "hunyuan", 256, 237_484),
    ],
)
def test_spec_fidelity_counts(S, F, B, decay, model, text, nnz_video):
    """Non-zero counts of the official mask's video part at full-size shapes (spec section 7.1)."""
    mask = radial_block_mask(F, S, block_size=B, decay_factor=decay, model=model, text_tokens=text)
    v = F * S // B
    assert int(mask[:v, :v].sum()) == nnz_video


def test_per_pair_counts_and_thinning():
    """Spec 1.2 table, S = 3840 (30 x 30 blocks per pair, no offsets), delta = 1.0, hunyuan rule."""
    S, F, B = 3840, 70, 128
    mask = radial_block_mask(F, S, block_size=B, decay_factor=1.0, model="hunyuan")
    pair = lambda i, j: int(mask[30 * i : 30 * i + 30, 30 * j : 30 * j + 30].sum())
    expected = {0: 900, 1: 900, 2: 438, 3: 438, 4: 250, 7: 250, 8: 144, 15: 144, 16: 88, 31: 88, 32: 88, 34: 88, 33: 0, 35: 0}
    for d, count in expected.items():
        assert pair(d, 0) == count, d


def test_wan_sink_on_frame_zero_only():
    F, S, B = 40, 64, 16
    wan = radial_block_mask(F, S, block_size=B, model="wan")
    hunyuan = radial_block_mask(F, S, block_size=B, model="hunyuan")
    per = S // B
    assert wan[:, :per].all()
    assert not hunyuan[:, :per].all()
    assert torch.equal(wan[:, per:], hunyuan[:, per:])


def test_block_sparse_mask_and_cache():
    mask = radial_mask(4, 64, block_size=16, text_tokens=20, valid_text_tokens=7)
    assert isinstance(mask, BlockSparseMask)
    assert (mask.q_len, mask.kv_len) == (276, 263)
    assert radial_mask(4, 64, block_size=16, text_tokens=20, valid_text_tokens=7) is mask
    dense = radial_block_mask(4, 64, block_size=16, text_tokens=20)
    assert torch.equal(mask.to_dense()[0, 0], dense[:, :17])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"decay_factor": 0.0}, ValueError, "decay_factor"),
        ({"decay_factor": -1.0}, ValueError, "decay_factor"),
        ({"block_size": 24}, ValueError, "block_size"),
        ({"block_size": 8}, ValueError, "block_size"),
        ({"model": "sora"}, ValueError, "model"),
        ({"text_tokens": -1}, ValueError, "text_tokens"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        radial_block_mask(4, 64, **kwargs)
