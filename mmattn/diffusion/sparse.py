"""Sparse-attention patterns for `SparseAttention`: Radial, sliding-tile (STA) and NABLA behind one small protocol.

A pattern turns the running call (token grid, text segment, and for data-dependent patterns the layer's
block-pooled Q/K, the step, the layer and the CFG branch) into the `BlockSparseMask` the kernel runs and the
`TileOrder` its blocks are laid over (None: the model's own frame-major order). Every mask is over
[video | text], text after the video; `SparseAttention.attend` rotates text-first models and permutes Q/K/V
into the tile order once per call, and a data-dependent pattern pools those permuted Q/K (under context
parallelism: each rank's shard, summed across ranks).
"""

from __future__ import annotations

from typing import Protocol, Union

import torch

from mmattn.kernels import BlockSparseMask

from .config import RadialConfig
from .layout import VideoGrid
from .masks import radial_mask
from .patterns import (
    NABLAConfig,
    NABLAMaskCache,
    STAConfig,
    TileOrder,
    _block,
    _pool_blocks,
    _pooled_shard,
    sta_block_mask,
    tile_order,
)

__all__ = ["PATTERNS", "NABLAPattern", "RadialPattern", "SparseConfig", "SparsePattern", "STAPattern", "pattern_for"]

SparseConfig = Union[RadialConfig, STAConfig, NABLAConfig]
"""The configs `apply_sparse_attention` takes; each carries the shared dense-step / dense-layer policy and a backend."""

PATTERNS: dict[str, type] = {"radial": RadialConfig, "sta": STAConfig, "nabla": NABLAConfig}
"""Pattern name -> its config class."""


class SparsePattern(Protocol):
    """What `SparseAttention` asks of a pattern.

    `order` is the token order the mask's blocks live in (None: frame-major). `needs_qk`: whether `mask_for`
    reads the layer's Q/K, as `pooled=(pooled_q, pooled_k)`, their `(B, H, n_blocks, D)` block means in that
    order, made by the pattern's `pool` (of `(B, H, N, D)` tensors already in that order) or, under context
    parallelism, `pool_shard` (of a rank's frame-major shard, summed over the process groups); or as `q`/`k`,
    `(B, H, N, D)` in the model's frame-major [video | text] order, which the pattern pools itself.
    `mask_for` returns the mask over the [video | text] sequence, keys cut after `video + valid_text` tokens,
    and `order`.
    """

    config: SparseConfig
    needs_qk: bool

    def order(self, grid: VideoGrid, text_tokens: int) -> TileOrder | None: ...

    def mask_for(
        self,
        grid: VideoGrid,
        text_tokens: int,
        valid_text: int | None,
        device: torch.device,
        *,
        q: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
        pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
        layer: int = 0,
        step: object = None,
        branch: object = None,
    ) -> tuple[BlockSparseMask, TileOrder | None]: ...


class RadialPattern:
    """Radial attention (arXiv 2506.19852): the static `radial_mask` of the grid in frame-major order."""

    needs_qk = False

    def __init__(self, config: RadialConfig, model: str) -> None:
        self.config, self.model = config, model

    def order(self, grid, text_tokens):
        return None

    def mask_for(
        self, grid, text_tokens, valid_text, device, *, q=None, k=None, pooled=None, layer=0, step=None, branch=None
    ):
        mask = radial_mask(
            grid.frames, grid.tokens_per_frame, block_size=self.config.block_size, decay_factor=self.config.decay_factor,
            model=self.model, text_tokens=text_tokens, valid_text_tokens=valid_text, device=device,
        )
        return mask, None


class STAPattern:
    """Sliding-tile attention (arXiv 2502.04507): the static `sta_block_mask` over `tile_order` of the grid."""

    needs_qk = False

    def __init__(self, config: STAConfig) -> None:
        self.config = config

    def order(self, grid, text_tokens):
        return tile_order(grid, self.config.tile, text_tokens)

    def mask_for(
        self, grid, text_tokens, valid_text, device, *, q=None, k=None, pooled=None, layer=0, step=None, branch=None
    ):
        c = self.config
        mask = sta_block_mask(
            grid, c.tile, c.window, clamp=c.clamp, text_tokens=text_tokens, block_size=c.block_size,
            valid_text_tokens=valid_text, device=device,
        )
        return mask, self.order(grid, text_tokens)


class NABLAPattern:
    """NABLA (Kandinsky 5): the data-dependent `nabla_block_mask` of each layer's Q/K over `tile_order`.

    When it is built: Kandinsky 5 (diffusers' `Kandinsky5AttnProcessor`, `nablaT_v2`) builds the mask inside
    every visual self-attention call from that call's own Q and K, so each layer of each denoising step (and
    each CFG call) has its own mask; this pattern does the same. What is cached (`NABLAMaskCache`, one per
    handle, never global): one mask per (step, layer, CFG branch, batch, valid text), reused while the pooled
    Q/K are equal, so a repeated call with identical inputs (gradient checkpointing's recompute) gets the very
    same mask object and nothing is rebuilt; a new step drops the previous step's masks. The CFG branch is
    diffusers' `cache_context` name (Wan, HunyuanVideo: "cond" / "uncond"), None outside one (batched CFG
    has both branches in the batch, one mask per row).

    The pooled Q/K are computed at every call (they decide whether the cached mask still holds), from the Q/K
    that `SparseAttention` has already permuted into tile order for the kernel: nothing is permuted twice.
    """

    needs_qk = True

    def __init__(self, config: NABLAConfig) -> None:
        self.config = config
        self.cache = NABLAMaskCache(config)
        self._block = _block(config.block_size, config.tile)

    def order(self, grid, text_tokens):
        return tile_order(grid, self.config.tile, text_tokens)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Block means of a tile-ordered `(B, H, N, D)` tensor (no gradient: the mask is not differentiable)."""
        with torch.no_grad():
            return _pool_blocks(x.detach(), self._block)

    def pool_shard(self, x: torch.Tensor, grid: VideoGrid, start: int, groups=()) -> torch.Tensor:
        """Block means of the whole video from this rank's frame-major shard `(B, H, s, D)` of tokens
        `[start, start + s)`, summed over the context-parallel process `groups`: the same on every rank."""
        with torch.no_grad():
            return _pooled_shard(x.detach(), self.order(grid, 0), self._block, start, groups)

    def mask_for(
        self, grid, text_tokens, valid_text, device, *, q=None, k=None, pooled=None, layer=0, step=None, branch=None
    ):
        if pooled is None and (q is None or k is None):
            raise ValueError("pooled: NABLA's mask is built from the layer's (pooled) query and key; got none")
        batch = (q if pooled is None else pooled[0]).shape[0]
        key = (layer, branch, batch)
        kwargs = {"step": step, "text_tokens": text_tokens, "valid_text_tokens": valid_text}
        if pooled is None:
            mask = self.cache.mask(q, k, grid, key=key, **kwargs)
        else:
            mask = self.cache.mask_pooled(*pooled, grid, key=key, **kwargs)
        return mask, self.order(grid, text_tokens)


def pattern_for(config: SparseConfig, model: str) -> SparsePattern:
    """The pattern object of `config`; `model` is the Radial mask rule of the transformer's family."""
    if isinstance(config, RadialConfig):
        return RadialPattern(config, config.model or model)
    if isinstance(config, STAConfig):
        return STAPattern(config)
    if isinstance(config, NABLAConfig):
        return NABLAPattern(config)
    raise TypeError(f"config must be a RadialConfig, STAConfig or NABLAConfig, got {type(config).__name__}")
