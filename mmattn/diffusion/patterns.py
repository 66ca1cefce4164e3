"""Sliding-tile attention (STA) and NABLA masks for video DiTs, as `BlockSparseMask` over tile-ordered tokens.

STA ("Fast Video Generation with Sliding Tile Attention", Zhang et al. 2025) cuts the latent token grid
(frames, height, width) into 3D tiles of `tile = (t, h, w)` tokens; a query tile attends to the key tiles of a
window of `window = (wt, wh, ww)` tiles around it. The flash kernel's block must be one tile, so tokens are
reordered: tiles in (t, h, w) raster order, tokens inside a tile in (t, h, w) raster order (`tile_order`).
`sta_block_mask` is the block mask over that order; `TileOrder.permute` / `unpermute` move Q, K, V and the
output between the model's frame-major order and the tile order. Text tokens stay after the video, unpermuted,
and attend / are attended densely (the Radial convention of `masks.py`).

NABLA ("Neighborhood Adaptive Block-Level Attention", Kandinsky 5) keeps, per (batch, head, query block), the
key blocks that hold a cumulative mass `threshold` of the softmax of the block-pooled scores (mean-pooled Q
and K per block), ORed with an STA window. Its mask depends on the data: `NABLAMaskCache` builds it once per
denoising step and key (e.g. layer) and hands back the same object while the pooled inputs are unchanged.

Edge tiles: when the grid is not a multiple of the tile, the last tile along an axis is smaller and the tile
order is compact (no padding), so a block can straddle tiles; a block pair is kept when any token pair in it
is inside the window (a superset of the token-level rule on those blocks only). When every extent is a
multiple of the tile and `block_size` is the tile volume (the default), the mask is exactly the paper's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmattn.kernels import BACKENDS, BlockSparseMask

from .layout import VideoGrid

__all__ = [
    "NABLAConfig",
    "NABLAMaskCache",
    "STAConfig",
    "TileOrder",
    "nabla_block_mask",
    "sta_block_mask",
    "sta_tile_mask",
    "tile_order",
]


def _triple(name: str, value) -> tuple[int, int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"{name} must be three ints >= 1 (frames, height, width), got {value!r}")
    return tuple(int(v) for v in value)


def _grid(grid) -> tuple[int, int, int]:
    if isinstance(grid, VideoGrid):
        return grid.frames, grid.height, grid.width
    return _triple("grid", grid)


def _text(text_tokens) -> int:
    if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < 0:
        raise ValueError(f"text_tokens must be an int >= 0, got {text_tokens!r}")
    return text_tokens


def _block(block_size, tile: tuple[int, int, int]) -> int:
    block = math.prod(tile) if block_size is None else block_size
    if not isinstance(block, int) or isinstance(block, bool) or block < 16 or block % 16:
        source = f"the tile volume {tile}" if block_size is None else "block_size"
        raise ValueError(f"block_size: {source} must be a multiple of 16 (>= 16), got {block!r}")
    return block


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_dense_policy(config) -> None:
    """The dense fallback schedule every pattern config shares with `RadialConfig` (ints >= 0)."""
    for name in ("dense_steps", "dense_layers", "dense_last_steps"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _valid(valid_text_tokens, text: int) -> int:
    valid = text if valid_text_tokens is None else valid_text_tokens
    if not isinstance(valid, int) or isinstance(valid, bool) or not 0 <= valid <= text:
        raise ValueError(f"valid_text_tokens must be an int in [0, text_tokens={text}], got {valid_text_tokens!r}")
    return valid


def _cut_keys(blocks: torch.Tensor, block: int, tokens: int, kv_len: int) -> BlockSparseMask:
    """The mask of `[..., n_blocks, n_blocks]` over `tokens` queries with the keys cut at `kv_len` (padded text)."""
    return BlockSparseMask.from_dense(blocks[..., : -(-kv_len // block)], block, tokens, kv_len)


@dataclass(frozen=True)
class _TiledConfig:
    """What STA and NABLA share: `tile` tokens per 3D tile, `window` tiles per query tile and axis (None: no
    window), `clamp` (shift the window inward at the borders, or cut it there), `block_size` (default: the tile
    volume, block = tile), `backend`, and the dense fallback schedule of `RadialConfig` (`dense_steps`,
    `dense_layers`, `dense_last_steps`: stock attention at those denoising-loop indices and layers)."""

    tile: tuple[int, int, int] = (6, 8, 8)
    window: tuple[int, int, int] | None = (3, 3, 3)
    clamp: bool = True
    block_size: int | None = None
    backend: str = "auto"
    dense_steps: int = 0
    dense_layers: int = 0
    dense_last_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tile", _triple("tile", self.tile))
        if self.window is not None:
            object.__setattr__(self, "window", _triple("window", self.window))
        if not isinstance(self.clamp, bool):
            raise ValueError(f"clamp must be a bool, got {self.clamp!r}")
        _block(self.block_size, self.tile)
        _check_backend(self.backend)
        _check_dense_policy(self)


@dataclass(frozen=True)
class STAConfig(_TiledConfig):
    """Sliding-tile attention settings: a query tile attends to the `window` of key tiles around it (per axis).

    `clamp=True` is the paper's rule (the window is shifted inward at the borders, so every query tile sees
    `min(window, tiles)` tiles per axis); `False` cuts it at the borders. Other fields: `_TiledConfig`.
    """

    window: tuple[int, int, int] = (3, 3, 3)

    def __post_init__(self) -> None:
        if self.window is None:
            raise ValueError("window must be three positive ints (tiles per axis), got None")
        super().__post_init__()


@dataclass(frozen=True)
class NABLAConfig(_TiledConfig):
    """NABLA settings as in Kandinsky 5 (`attention_P`, `attention_w{T,H,W}`, 8x8 spatial tiles of 64 tokens).

    `threshold` (P) in (0, 1]: the cumulative softmax mass of the pooled scores each query block keeps.
    `window`: the STA window ORed in (None: no STA term); `clamp=False` as Kandinsky's window is cut at the
    borders. Other fields: `_TiledConfig`.
    """

    tile: tuple[int, int, int] = (1, 8, 8)
    clamp: bool = False
    threshold: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be a number in (0, 1], got {self.threshold!r}")
        super().__post_init__()


# ------------------------------------------------------------------------------------------------------
# token order


@dataclass(frozen=True, eq=False)
class TileOrder:
    """The permutation of a [video | text] sequence into tile order.

    `order[i]` is the frame-major index of the i-th token in tile order; `inverse` undoes it. `tile_of[i]`
    is the (t, h, w) tile coordinate of the i-th tile-ordered video token.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    tile_of: torch.Tensor
    tiles: tuple[int, int, int]

    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Frame-major -> tile order along `dim` (tokens)."""
        return x.index_select(dim, self._on("order", x.device))

    def unpermute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Tile order -> frame-major along `dim`."""
        return x.index_select(dim, self._on("inverse", x.device))

    def keeps_shards(self, shards: int) -> bool:
        """Whether each of `shards` equal contiguous shards of the sequence is mapped onto itself (then the tile
        order of the whole is every shard's own tile order, side by side: ring attention can run on it)."""
        kept = self.__dict__.setdefault("_kept", {})
        if shards not in kept:
            tokens = self.order.numel()
            size = max(tokens // shards, 1)
            kept[shards] = tokens % shards == 0 and torch.equal(self.order // size, torch.arange(tokens) // size)
        return kept[shards]

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        """`order` / `inverse` on `device`, copied there once (not at every attention call)."""
        copies = self.__dict__.setdefault("_copies", {})
        key = (name, str(device))
        if key not in copies:
            copies[key] = getattr(self, name).to(device)
        return copies[key]

    def _span(self, start: int, size: int, block: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
        """For the frame-major tokens `[start, start + size)`: their tile-order positions on `device`, and the
        token range `[low, high)` of the blocks of `block` tokens that hold them (cached)."""
        spans = self.__dict__.setdefault("_spans", {})
        key = (start, size, block, str(device))
        if key not in spans:
            positions = self.inverse[start : start + size]
            low = int(positions.min()) // block * block
            high = min(-(-(int(positions.max()) + 1) // block) * block, -(-self.order.numel() // block) * block)
            spans[key] = positions.to(device), low, high
        return spans[key]


@functools.lru_cache(maxsize=64)
def _tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int], text_tokens: int) -> TileOrder:
    frames, height, width = grid
    t = torch.arange(frames).view(-1, 1, 1).expand(grid).flatten()
    h = torch.arange(height).view(1, -1, 1).expand(grid).flatten()
    w = torch.arange(width).view(1, 1, -1).expand(grid).flatten()
    tiles = tuple(-(-n // s) for n, s in zip(grid, tile))
    tile_t, tile_h, tile_w = t // tile[0], h // tile[1], w // tile[2]
    tile_id = (tile_t * tiles[1] + tile_h) * tiles[2] + tile_w
    # inside a tile, frame-major raster order is the order of the frame-major index itself
    video = torch.sort(tile_id * (frames * height * width) + torch.arange(t.numel()), stable=True).indices
    order = torch.cat([video, torch.arange(video.numel(), video.numel() + text_tokens)])
    tile_of = torch.stack([tile_t, tile_h, tile_w], -1)[video]
    return TileOrder(order, torch.argsort(order), tile_of, tiles)


def tile_order(grid: VideoGrid | tuple[int, int, int], tile: tuple[int, int, int], text_tokens: int = 0) -> TileOrder:
    """STA's token reordering: tiles in (t, h, w) raster order, tokens inside each tile in raster order.

    Edge tiles of a grid that is not a multiple of `tile` hold fewer tokens (no padding). Cached.
    """
    return _tile_order(_grid(grid), _triple("tile", tile), _text(text_tokens))


# ------------------------------------------------------------------------------------------------------
# STA


def _axis_window(tiles: int, window: int, clamp: bool) -> torch.Tensor:
    """`[tiles, tiles]` bool: key tile j is in query tile i's window of `window` tiles along one axis."""
    i = torch.arange(tiles).view(-1, 1)
    j = torch.arange(tiles).view(1, -1)
    if clamp:  # the window of `window` tiles starting at clamp(i - window // 2, 0, tiles - window)
        start = torch.clamp(torch.minimum(i - window // 2, torch.tensor(tiles - window)), min=0)
        return (j >= start) & (j < start + window)
    return (j - i).abs() <= window // 2


def sta_tile_mask(
    tiles: tuple[int, int, int], window: tuple[int, int, int], *, clamp: bool = True
) -> torch.Tensor:
    """STA at tile level: `[n_tiles, n_tiles]` bool over tiles in (t, h, w) raster order (query, key)."""
    tiles, window = _triple("tiles", tiles), _triple("window", window)
    axes = [_axis_window(n, w, clamp) for n, w in zip(tiles, window)]
    mask = axes[0][:, None, None, :, None, None] & axes[1][None, :, None, None, :, None] & axes[2][None, None, :, None, None, :]
    n = math.prod(tiles)
    return mask.reshape(n, n)


def _blocks_of_tiles(tile_mask: torch.Tensor, order: TileOrder, video: int, text: int, block: int) -> torch.Tensor:
    """Block mask over the tile-ordered [video | text] sequence from a `[..., n_tiles, n_tiles]` tile mask.

    A block pair is kept iff one of its (query, key) video token pairs is; blocks from `video // block` on
    (those holding text) are dense rows and columns.
    """
    n_blocks = -(-(video + text) // block)
    tiles = order.tiles
    tile_id = (order.tile_of[:, 0] * tiles[1] + order.tile_of[:, 1]) * tiles[2] + order.tile_of[:, 2]
    incidence = torch.zeros(n_blocks, math.prod(tiles), dtype=tile_mask.dtype if tile_mask.is_floating_point() else torch.float32)
    incidence[torch.arange(video) // block, tile_id] = 1
    incidence = incidence.to(tile_mask.device)
    blocks = (incidence @ tile_mask.to(incidence.dtype) @ incidence.T) > 0
    if text:
        border = video // block
        blocks[..., border:, :] = True
        blocks[..., :, border:] = True
    return blocks


@functools.lru_cache(maxsize=64)
def _sta_blocks(grid, tile, window, clamp, text, block) -> torch.Tensor:
    order = _tile_order(grid, tile, text)
    return _blocks_of_tiles(sta_tile_mask(order.tiles, window, clamp=clamp), order, math.prod(grid), text, block)


@functools.lru_cache(maxsize=64)
def _sta_mask(grid, tile, window, clamp, text, block, device: str, valid: int) -> BlockSparseMask:
    tokens = math.prod(grid) + text
    blocks = _sta_blocks(grid, tile, window, clamp, text, block).to(device)
    return _cut_keys(blocks, block, tokens, math.prod(grid) + valid)


def sta_block_mask(
    grid: VideoGrid | tuple[int, int, int],
    tile: tuple[int, int, int] = (6, 8, 8),
    window: tuple[int, int, int] = (3, 3, 3),
    *,
    clamp: bool = True,
    text_tokens: int = 0,
    block_size: int | None = None,
    valid_text_tokens: int | None = None,
    device: str | torch.device = "cpu",
) -> BlockSparseMask:
    """Sliding-tile attention's mask over the tile-ordered [video | text] sequence (`tile_order`).

    A query in tile (a, b, c) attends to the keys in the tiles of its window: per axis the `window` tiles
    starting at `clamp(tile - window // 2, 0, tiles - window)` (the paper's clamped centre; `clamp=False`:
    `|key tile - query tile| <= window // 2`). Text tokens (after the video) are dense. `block_size`
    defaults to the tile volume. `valid_text_tokens` (default: all) cuts the keys after the valid
    (left-aligned) text tokens, as `radial_mask` does. Cached by its arguments: the same arguments return the
    same object.
    """
    grid, tile, window = _grid(grid), _triple("tile", tile), _triple("window", window)
    if not isinstance(clamp, bool):
        raise ValueError(f"clamp must be a bool, got {clamp!r}")
    text = _text(text_tokens)
    device = str(torch.device(device))
    return _sta_mask(grid, tile, window, clamp, text, _block(block_size, tile), device, _valid(valid_text_tokens, text))


# ------------------------------------------------------------------------------------------------------
# NABLA


def _block_counts(tokens: int, block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[ceil(tokens / block), 1]`: the tokens in each block (the last one may be short)."""
    n_blocks = -(-tokens // block)
    counts = torch.full((n_blocks, 1), float(block), dtype=dtype, device=device)
    counts[-1] = tokens - (n_blocks - 1) * block
    return counts


def _pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of `block` consecutive tokens of an (already tile-ordered) `(B, H, N, D)` tensor ->
    `(B, H, ceil(N / block), D)`, in float32 at least."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    tokens, n_blocks = x.shape[2], -(-x.shape[2] // block)
    pad = n_blocks * block - tokens
    sums = torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(2, (n_blocks, block)).sum(3)
    return sums / _block_counts(tokens, block, x.dtype, x.device)


def _pooled(x: torch.Tensor, order: TileOrder, block: int) -> torch.Tensor:
    """Mean of the tile-ordered tokens of each block of a frame-major `(B, H, N, D)`: `(B, H, ceil(N / B), D)`."""
    return _pool_blocks(order.permute(x, dim=2), block)


def _pooled_shard(x: torch.Tensor, order: TileOrder, block: int, start: int, groups=()) -> torch.Tensor:
    """`_pooled` of the whole sequence from one rank's shard under context parallelism.

    `x`: this rank's `(B, H, s, D)` frame-major tokens `[start, start + s)`. Each rank sums its tokens into the
    blocks (of the tile order) they fall in, `torch.distributed.all_reduce` over each process group of `groups`
    (None or size 1: skipped; Ulysses then ring: every rank of the mesh) adds the ranks' sums, so every rank
    gets the same block means; only the pooled `(B, H, n_blocks, D)` tensor travels. The shard's tokens are
    copied to their tile-order places in the span of blocks they touch (zeros elsewhere) and summed per block as
    `_pooled` does: deterministic, and bit-identical to it where no block straddles two shards.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    tokens = order.order.numel()
    positions, low, high = order._span(start, x.shape[2], block, x.device)
    span = x.new_zeros(*x.shape[:2], high - low, x.shape[3]).index_copy_(2, positions - low, x)
    sums = x.new_zeros(*x.shape[:2], -(-tokens // block), x.shape[3])
    sums[:, :, low // block : high // block] = span.unflatten(2, (-1, block)).sum(3)
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
    return sums / _block_counts(tokens, block, x.dtype, x.device)


def _mass_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row of softmax(scores): keep each entry whose mass plus that of all smaller entries is >= 1 - P.

    (sorted ascending with a stable sort; the dropped ones are the smallest entries whose total is < 1 - P).
    """
    probs = torch.softmax(scores, dim=-1)
    ranked, order = torch.sort(probs, dim=-1, stable=True)
    keep_sorted = ranked.cumsum(-1) >= 1 - threshold
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _nabla_blocks(pooled_q, pooled_k, scale, order, video, text, block, config_threshold, sta_blocks):
    blocks = _mass_threshold(pooled_q @ pooled_k.transpose(-1, -2) * scale, config_threshold)
    if sta_blocks is not None:
        blocks = blocks | sta_blocks.to(blocks.device)
    if text:
        border = video // block
        blocks[..., border:, :] = True
        blocks[..., :, border:] = True
    return blocks


def _check_qk(q, k, tokens: int) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating (batch, heads, tokens, head_dim) tensor, got {getattr(t, 'shape', t)}")
        if t.shape[2] != tokens:
            raise ValueError(f"{name}: expected {tokens} tokens (video grid + text), got {t.shape[2]}")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected batch, heads and head_dim of q {tuple(q.shape)}, got {tuple(k.shape)}")


def nabla_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: VideoGrid | tuple[int, int, int],
    config: NABLAConfig | None = None,
    *,
    text_tokens: int = 0,
    valid_text_tokens: int | None = None,
    scale: float | None = None,
) -> BlockSparseMask:
    """NABLA's data-dependent mask `[B, H, n_blocks, n_blocks]` over the tile-ordered [video | text] sequence.

    `q`, `k`: `(B, H, N, D)` in the model's frame-major order (N = grid tokens + text). Q and K are mean-pooled
    per block of the tile order; for each query block, the key blocks whose softmax(pooled_q · pooled_k *
    scale) mass, together with all smaller ones, reaches `1 - threshold` are kept (= the largest blocks
    holding mass `threshold`), then ORed with the STA window (`config.window`) and dense text rows/columns.
    `valid_text_tokens` (default: all) cuts the keys after the valid text tokens (the pooled scores still see
    every token). `scale` defaults to `D ** -0.5`. Builds every call; `NABLAMaskCache` caches per step.
    """
    config = NABLAConfig() if config is None else config
    grid, text = _grid(grid), _text(text_tokens)
    _check_qk(q, k, math.prod(grid) + text)
    block = _block(config.block_size, config.tile)
    order = _tile_order(grid, config.tile, text)
    pooled_q, pooled_k = _pooled(q, order, block), _pooled(k, order, block)
    return _nabla_mask(pooled_q, pooled_k, grid, config, text, scale, _valid(valid_text_tokens, text))


def _nabla_mask(pooled_q, pooled_k, grid, config: NABLAConfig, text: int, scale, valid: int | None = None) -> BlockSparseMask:
    block = _block(config.block_size, config.tile)
    order = _tile_order(grid, config.tile, text)
    scale = pooled_q.shape[-1] ** -0.5 if scale is None else scale
    sta = None if config.window is None else _sta_blocks(grid, config.tile, config.window, config.clamp, text, block)
    video = math.prod(grid)
    blocks = _nabla_blocks(pooled_q, pooled_k, scale, order, video, text, block, config.threshold, sta)
    return _cut_keys(blocks, block, video + text, video + (text if valid is None else valid))


@dataclass
class _Entry:
    pooled_q: torch.Tensor
    pooled_k: torch.Tensor
    mask: BlockSparseMask


class NABLAMaskCache:
    """NABLA masks of the current denoising step, one per caller-chosen key (a layer index, a CFG branch).

    `mask(q, k, grid, step=..., key=...)` returns the cached mask while the step and key are the same and the
    pooled Q/K are equal to the ones it was built from; a new step drops every entry. `mask_pooled` takes the
    block-pooled Q/K directly (a caller that has Q/K in tile order already, or a context-parallel rank that
    pooled its shard). `builds` counts the masks built. State lives on this object (e.g. on an attention
    handle), never in globals.
    """

    def __init__(self, config: NABLAConfig | None = None) -> None:
        self.config = NABLAConfig() if config is None else config
        self.step = None
        self.builds = 0
        self._entries: dict = {}

    def mask(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        grid: VideoGrid | tuple[int, int, int],
        *,
        step,
        key=None,
        text_tokens: int = 0,
        valid_text_tokens: int | None = None,
        scale: float | None = None,
    ) -> BlockSparseMask:
        """The NABLA mask of `nabla_block_mask(q, k, grid, self.config, ...)`, built at most once per (step, key, inputs)."""
        grid, text = _grid(grid), _text(text_tokens)
        _check_qk(q, k, math.prod(grid) + text)
        block = _block(self.config.block_size, self.config.tile)
        order = _tile_order(grid, self.config.tile, text)
        with torch.no_grad():  # the mask is not differentiable; nothing of it goes into the autograd graph
            pooled_q, pooled_k = _pooled(q.detach(), order, block), _pooled(k.detach(), order, block)
        return self.mask_pooled(
            pooled_q, pooled_k, grid, step=step, key=key, text_tokens=text, valid_text_tokens=valid_text_tokens,
            scale=scale,
        )

    def mask_pooled(
        self,
        pooled_q: torch.Tensor,
        pooled_k: torch.Tensor,
        grid: VideoGrid | tuple[int, int, int],
        *,
        step,
        key=None,
        text_tokens: int = 0,
        valid_text_tokens: int | None = None,
        scale: float | None = None,
    ) -> BlockSparseMask:
        """`mask` from the block means of Q and K in tile order, `(B, H, n_blocks, D)` (`mask` pools them itself)."""
        grid, text = _grid(grid), _text(text_tokens)
        valid = _valid(valid_text_tokens, text)
        n_blocks = -(-(math.prod(grid) + text) // _block(self.config.block_size, self.config.tile))
        for name, t in (("pooled_q", pooled_q), ("pooled_k", pooled_k)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[2] != n_blocks or t.shape != pooled_q.shape:
                raise ValueError(
                    f"{name}: expected (batch, heads, {n_blocks} blocks, head_dim) like pooled_q, got {getattr(t, 'shape', t)}"
                )
        if step != self.step:
            self._entries.clear()
            self.step = step
        entry_key = (key, grid, text, valid, scale)
        entry = self._entries.get(entry_key)
        if (
            entry is not None
            and entry.pooled_q.shape == pooled_q.shape
            and entry.pooled_q.device == pooled_q.device
            and torch.equal(entry.pooled_q, pooled_q)
            and torch.equal(entry.pooled_k, pooled_k)
        ):
            return entry.mask
        with torch.no_grad():
            mask = _nabla_mask(pooled_q, pooled_k, grid, self.config, text, scale, valid)
        self.builds += 1
        self._entries[entry_key] = _Entry(pooled_q, pooled_k, mask)
        return mask

    def clear(self) -> None:
        self._entries.clear()
        self.step = None
