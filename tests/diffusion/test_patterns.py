"""STA and NABLA masks against brute-force token-level oracles written from the papers' definitions."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmattn.diffusion.layout import VideoGrid
from mmattn.diffusion.patterns import (
    NABLAConfig,
    NABLAMaskCache,
    STAConfig,
    nabla_block_mask,
    sta_block_mask,
    tile_order,
)
from mmattn.kernels import block_sparse_attention


def _oracle_order(grid, tile):
    """Tiles in (t, h, w) raster order, tokens inside each tile in raster order (frame-major indices)."""
    F_, H, W = grid
    order = []
    for a in range(0, F_, tile[0]):
        for b in range(0, H, tile[1]):
            for c in range(0, W, tile[2]):
                for t in range(a, min(a + tile[0], F_)):
                    for h in range(b, min(b + tile[1], H)):
                        for w in range(c, min(c + tile[2], W)):
                            order.append((t * H + h) * W + w)
    return torch.tensor(order)


def _in_window(q_tile, k_tile, tiles, window, clamp):
    """STA's rule on one axis: the paper's clamped window centre, or the plain |distance| <= window // 2."""
    half = window // 2
    if not clamp:
        return abs(k_tile - q_tile) <= half
    if window >= tiles:
        return True
    centre = min(max(q_tile, half), tiles - 1 - half)
    return abs(centre - k_tile) <= half


def _oracle_sta_tokens(grid, tile, window, clamp, text):
    """Token-level STA mask in the model's frame-major order, [video | text], text dense (loops over tile pairs)."""
    F_, H, W = grid
    video = F_ * H * W
    tiles = [math.ceil(n / s) for n, s in zip(grid, tile)]
    all_tiles = list(itertools.product(*(range(n) for n in tiles)))
    allowed = torch.zeros(len(all_tiles), len(all_tiles), dtype=torch.bool)
    for i, qt in enumerate(all_tiles):
        for j, kt in enumerate(all_tiles):
            allowed[i, j] = all(_in_window(qt[a], kt[a], tiles[a], window[a], clamp) for a in range(3))
    tile_index = {t: i for i, t in enumerate(all_tiles)}
    of_token = torch.tensor(
        [tile_index[((i // (H * W)) // tile[0], ((i // W) % H) // tile[1], (i % W) // tile[2])] for i in range(video)]
    )
    mask = torch.ones(video + text, video + text, dtype=torch.bool)
    mask[:video, :video] = allowed[of_token][:, of_token]
    return mask


def _block_or(token_mask, block):
    n = math.ceil(token_mask.shape[0] / block)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = token_mask[i * block : (i + 1) * block, j * block : (j + 1) * block].any()
    return out


def _permuted(mask, order):
    return mask[order][:, order]


STA_CASES = [
    # grid, tile, window, clamp, text, block
    ((4, 8, 8), (2, 4, 4), (1, 1, 1), True, 0, None),  # exact multiple: block = tile
    ((6, 8, 12), (2, 4, 4), (3, 1, 3), True, 0, None),
    ((6, 8, 12), (2, 4, 4), (3, 3, 1), False, 5, None),
    ((5, 6, 10), (2, 4, 4), (3, 1, 3), True, 0, None),  # edge tiles on every axis
    ((5, 7, 9), (1, 4, 4), (3, 1, 1), True, 11, 16),
    ((3, 9, 10), (2, 4, 4), (1, 3, 3), False, 0, 32),
]


@pytest.mark.parametrize("grid,tile,window,clamp,text,block", STA_CASES)
def test_sta_mask_against_token_level_oracle(grid, tile, window, clamp, text, block):
    video = math.prod(grid)
    order = _oracle_order(grid, tile)
    full_order = torch.cat([order, torch.arange(video, video + text)])
    assert torch.equal(tile_order(grid, tile, text).order, full_order)

    mask = sta_block_mask(grid, tile, window, clamp=clamp, text_tokens=text, block_size=block)
    block = block or math.prod(tile)
    assert mask.block_size == (block, block) and mask.q_len == mask.kv_len == video + text
    oracle = _permuted(_oracle_sta_tokens(grid, tile, window, clamp, text), full_order)
    expected = _block_or(oracle, block)
    if text:
        border = video // block
        expected[border:] = True
        expected[:, border:] = True
    assert torch.equal(mask.to_dense()[0, 0], expected)
    token = mask.to_token_mask()[0, 0]
    assert bool((token | ~oracle).all())  # never drops a pair the rule keeps
    exact = all(n % s == 0 for n, s in zip(grid, tile)) and block == math.prod(tile) and not text
    if exact:
        assert torch.equal(token, oracle)
        assert mask.density() < 1


def test_sta_cached_and_grid_types():
    a = sta_block_mask(VideoGrid(4, 8, 8), (2, 4, 4), (1, 3, 3))
    assert sta_block_mask((4, 8, 8), (2, 4, 4), (1, 3, 3)) is a


def test_sta_attention_in_tile_order_equals_masked_sdpa_in_model_order():
    grid, tile, window, text = (5, 6, 10), (2, 4, 4), (3, 1, 3), 9
    n = math.prod(grid) + text
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for _ in range(3))
    mask = sta_block_mask(grid, tile, window, text_tokens=text, block_size=16)
    order = tile_order(grid, tile, text)
    out = order.unpermute(block_sparse_attention(*(order.permute(t, dim=2) for t in (q, k, v)), mask, backend="torch"), dim=2)
    token = order.unpermute(order.unpermute(mask.to_token_mask()[0, 0], 0), 1)  # back to the model's order
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=token)
    torch.testing.assert_close(out, ref)
    assert torch.equal(order.unpermute(order.permute(q, 2), 2), q)


def _oracle_nabla(q, k, grid, cfg, text):
    """Explicit per-block mean pooling, softmax, ascending sort and cumulative mass per query block."""
    video = math.prod(grid)
    block = cfg.block_size or math.prod(cfg.tile)
    order = torch.cat([_oracle_order(grid, cfg.tile), torch.arange(video, video + text)])
    qs, ks = q[:, :, order], k[:, :, order]
    n = math.ceil((video + text) / block)
    B, H, _, D = q.shape
    out = torch.zeros(B, H, n, n, dtype=torch.bool)
    for b, h in itertools.product(range(B), range(H)):
        pq = [qs[b, h, i * block : (i + 1) * block].mean(0) for i in range(n)]
        pk = [ks[b, h, i * block : (i + 1) * block].mean(0) for i in range(n)]
        for i in range(n):
            logits = [float(pq[i] @ pk[j]) / math.sqrt(D) for j in range(n)]
            top = max(logits)
            expo = [math.exp(x - top) for x in logits]
            probs = [e / sum(expo) for e in expo]
            ranked = sorted(range(n), key=lambda j: probs[j])
            total = 0.0
            for j in ranked:
                total += probs[j]
                out[b, h, i, j] = total >= 1 - cfg.threshold
    if cfg.window is not None:
        sta = _permuted(_oracle_sta_tokens(grid, cfg.tile, cfg.window, cfg.clamp, 0), order[:video])
        padded = torch.zeros(video + text, video + text, dtype=torch.bool)
        padded[:video, :video] = sta
        out |= _block_or(padded, block)
    if text:
        out[..., video // block :, :] = True
        out[..., video // block :] = True
    return out


NABLA_CASES = [
    # grid, config, text
    ((4, 8, 8), NABLAConfig(threshold=0.7, tile=(1, 4, 4), window=None), 0),
    ((4, 8, 8), NABLAConfig(threshold=0.9, tile=(1, 4, 4), window=(1, 1, 1)), 0),  # Kandinsky's unclamped window
    ((3, 6, 10), NABLAConfig(threshold=0.5, tile=(1, 4, 4), window=(3, 1, 1), clamp=True), 0),  # edge tiles
    ((3, 5, 8), NABLAConfig(threshold=0.8, tile=(1, 4, 4), window=None), 6),
    ((2, 8, 8), NABLAConfig(threshold=1.0, tile=(1, 4, 4), window=None), 0),
]


@pytest.mark.parametrize("grid,cfg,text", NABLA_CASES)
def test_nabla_mask_against_explicit_softmax_and_cumulative_mass(grid, cfg, text):
    torch.manual_seed(0)
    n = math.prod(grid) + text
    q, k = torch.randn(2, 2, n, 8, dtype=torch.float64) * 3, torch.randn(2, 2, n, 8, dtype=torch.float64) * 3
    mask = nabla_block_mask(q, k, grid, cfg, text_tokens=text)
    expected = _oracle_nabla(q, k, grid, cfg, text)
    assert torch.equal(mask.to_dense(), expected)
    if cfg.threshold == 1.0:
        assert mask.to_dense().all()
    elif not text:
        assert not mask.to_dense().all()


def test_nabla_cache_builds_once_per_step_and_key():
    grid, cfg = (2, 8, 8), NABLAConfig(threshold=0.6, tile=(1, 4, 4), window=None)
    q, k = torch.randn(1, 2, 128, 8), torch.randn(1, 2, 128, 8)
    cache = NABLAMaskCache(cfg)
    first = cache.mask(q, k, grid, step=0, key=0)
    assert cache.builds == 1
    assert torch.equal(first.to_dense(), nabla_block_mask(q, k, grid, cfg).to_dense())
    assert cache.mask(q.clone(), k.clone(), grid, step=0, key=0) is first  # same inputs: the same object
    assert cache.builds == 1
    other = cache.mask(q, k, grid, step=0, key=1)  # another layer
    assert other is not first and cache.builds == 2
    assert cache.mask(q, k, grid, step=0, key=0) is first
    new_step = cache.mask(q, k, grid, step=1, key=0)  # a new step rebuilds
    assert new_step is not first and cache.builds == 3
    changed = cache.mask(q * 2 + 1, k, grid, step=1, key=0)  # new inputs in the same step rebuild too
    assert changed is not new_step and cache.builds == 4


@pytest.mark.parametrize(
    "factory,kwargs,match",
    [
        (STAConfig, {"tile": (2, 4)}, "tile"),
        (STAConfig, {"window": (0, 1, 1)}, "window"),
        (STAConfig, {"tile": (1, 3, 3)}, "block_size"),
        (STAConfig, {"block_size": 24}, "block_size"),
        (STAConfig, {"backend": "cuda"}, "backend"),
        (NABLAConfig, {"threshold": 0.0}, "threshold"),
        (NABLAConfig, {"threshold": 1.5}, "threshold"),
        (NABLAConfig, {"window": (1, 1)}, "window"),
        (NABLAConfig, {"clamp": 1}, "clamp"),
        (STAConfig, {"dense_layers": -1}, "dense_layers"),
        (NABLAConfig, {"dense_last_steps": 1.5}, "dense_last_steps"),
    ],
)
def test_invalid_configs(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="grid"):
        sta_block_mask((4, 8), (1, 4, 4), (1, 1, 1))
    with pytest.raises(ValueError, match="text_tokens"):
        sta_block_mask((4, 8, 8), (1, 4, 4), (1, 1, 1), text_tokens=-1)
    q = torch.randn(1, 2, 100, 8)
    with pytest.raises(ValueError, match="q: expected 128 tokens"):
        nabla_block_mask(q, q, (2, 8, 8), NABLAConfig(tile=(1, 4, 4)))
    with pytest.raises(ValueError, match="valid_text_tokens"):
        sta_block_mask((4, 8, 8), (1, 4, 4), (1, 1, 1), text_tokens=5, valid_text_tokens=6)


@pytest.mark.parametrize("valid", [0, 3, 21])
def test_valid_text_cuts_the_keys_of_sta_and_nabla(valid):
    """Padded text keys (after `valid`) are cut, as `radial_mask` does: same rows, keys up to video + valid."""
    grid, text = (2, 8, 8), 21
    video = 128
    full = sta_block_mask(grid, (1, 4, 4), (1, 1, 1), text_tokens=text)
    cut = sta_block_mask(grid, (1, 4, 4), (1, 1, 1), text_tokens=text, valid_text_tokens=valid)
    assert (cut.q_len, cut.kv_len) == (video + text, video + valid)
    columns = -(-(video + valid) // 16)
    assert torch.equal(cut.to_dense(), full.to_dense()[..., :columns])
    assert cut is sta_block_mask(grid, (1, 4, 4), (1, 1, 1), text_tokens=text, valid_text_tokens=valid)  # cached
    q, k = torch.randn(2, 2, video + text, 8), torch.randn(2, 2, video + text, 8)
    cfg = NABLAConfig(threshold=0.5, tile=(1, 4, 4), window=None)
    full = nabla_block_mask(q, k, grid, cfg, text_tokens=text)
    cut = nabla_block_mask(q, k, grid, cfg, text_tokens=text, valid_text_tokens=valid)
    assert cut.kv_len == video + valid and torch.equal(cut.to_dense(), full.to_dense()[..., :columns])
    cache = NABLAMaskCache(cfg)
    assert torch.equal(cache.mask(q, k, grid, step=0, text_tokens=text, valid_text_tokens=valid).to_dense(), cut.to_dense())
