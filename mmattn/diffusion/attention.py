"""The one place where the diffusion plugin calls attention: a block-sparse pattern or the stock dense call.

`SparseAttention` is the per-transformer state a handle owns: the pattern (Radial,
STA or NABLA, `mmattn.diffusion.sparse`) with its config and caches, the token grid of the current call (set
by the grid-capture hook), the CFG branch (diffusers' cache-context name) and the step source. Processors hand
it (batch, tokens, heads, head_dim) tensors, the position of the text segment and a closure running the stock
dense attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from mmattn.kernels import block_sparse_attention
from mmattn.kernels.distributed import context_parallel_attention

from .layout import VideoGrid
from .sparse import SparseConfig, SparsePattern, pattern_for

__all__ = ["SparseAttention", "StepSource"]

StepSource = Callable[[], "tuple[int, int] | None"]
"""Returns (denoising-loop index, number of steps) of the running call, or None when unknown."""


class SparseAttention:
    """Block-sparse attention for one transformer: the dense fallback policy, the pattern and the kernel call.

    `config`: a `RadialConfig`, `STAConfig` or `NABLAConfig`; `model`: the transformer family's Radial mask rule
    (used by Radial when `config.model` is None). `pattern`: the `SparsePattern` built from them.
    """

    def __init__(self, config: SparseConfig, model: str, step_source: StepSource | None) -> None:
        self.config = config
        self.model = model
        self.step_source = step_source
        self.pattern: SparsePattern = pattern_for(config, model)
        self.grid: VideoGrid | None = None
        self.branch: str | None = None

    def set_grid(self, grid: VideoGrid) -> None:
        self.grid = grid

    def set_branch(self, branch: str | None) -> None:
        """The CFG branch of the running call (diffusers' `cache_context` name), None outside one."""
        self.branch = branch

    def _step(self) -> tuple[int, int] | None:
        return self.step_source() if self.step_source is not None else None

    def is_dense(self, layer_index: int) -> bool:
        """Dense in the first `dense_layers` layers, the first `dense_steps` and last `dense_last_steps` steps."""
        if layer_index < self.config.dense_layers:
            return True
        step = self._step()
        if step is None:
            return False
        index, total = step
        return index < self.config.dense_steps or index >= total - self.config.dense_last_steps

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        layer_index: int,
        dense: Callable[[], torch.Tensor],
        text_tokens: int = 0,
        text_first: bool = False,
        valid_text_tokens: torch.Tensor | None = None,
        parallel_config=None,
    ) -> torch.Tensor:
        """Attention over a [video | text] (or [text | video]) sequence of (B, S, H, D) tensors -> (B, S, H, D).

        `valid_text_tokens` `[B]` counts each sample's leading valid text tokens; the padded ones are not
        attended to (they still query). `dense()` is the stock call, used where the policy says dense.
        `parallel_config`: the processor's diffusers `ParallelConfig`; under context parallelism the tensors are
        this rank's token shard and the pattern runs as Ulysses and/or ring attention on the global mask
        (`_attend_shards`). Text goes after the video and, for STA / NABLA, the tokens into the pattern's tile
        order (once: NABLA pools the same permuted Q/K) before the kernel; the output comes back in the model's
        order.
        """
        if self.is_dense(layer_index):
            return dense()
        if self.grid is None:
            raise RuntimeError("the token grid is unknown: sparse attention runs only inside the patched transformer's forward")
        context_parallel = _context_parallel(parallel_config)
        if context_parallel is not None:
            return self._attend_shards(query, key, value, context_parallel, text_tokens, layer_index)
        grid, seq_len = self.grid, query.shape[1]
        if seq_len != grid.tokens + text_tokens:
            raise ValueError(
                f"query: expected {grid.tokens} video tokens ({grid}) + {text_tokens} text tokens, got {seq_len} tokens"
            )
        # Reordering happens on the model's (B, S, H, D) tensors, whose layout the kernels' outputs and gradients
        # keep: the output goes back to diffusers' (B, S, H * D) view without another copy.
        rotate = text_first and text_tokens > 0  # the masks put text after the video
        if rotate:
            query, key, value = (torch.cat([t[:, text_tokens:], t[:, :text_tokens]], 1) for t in (query, key, value))
        order = self.pattern.order(grid, text_tokens)
        if order is not None:
            query, key, value = (order.permute(t, dim=1) for t in (query, key, value))
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        counts = [None] if valid_text_tokens is None else valid_text_tokens.tolist()
        groups = list(dict.fromkeys(counts))
        step = self._step() if self.pattern.needs_qk else None
        call = dict(text_tokens=text_tokens, layer_index=layer_index, step=step)
        if len(groups) == 1:  # every sample alike: no gather and no scatter (each would copy tensors and gradients)
            out = self._attend_group(query, key, value, groups[0], **call)
        else:
            out = torch.empty_like(query)
            for valid in groups:
                rows = [b for b, c in enumerate(counts) if c == valid]
                out[rows] = self._attend_group(query[rows], key[rows], value[rows], valid, **call)
        out = out.transpose(1, 2)
        if order is not None:
            out = order.unpermute(out, dim=1)
        return torch.cat([out[:, -text_tokens:], out[:, :-text_tokens]], 1) if rotate else out

    def _attend_group(self, q, k, v, valid: int | None, *, text_tokens: int, layer_index: int, step) -> torch.Tensor:
        """The pattern's kernel call on (B, H, S, D) samples (in the pattern's token order) sharing `valid` text
        tokens (None: all valid)."""
        pooled = (self.pattern.pool(q), self.pattern.pool(k)) if self.pattern.needs_qk else None
        mask, _ = self.pattern.mask_for(
            self.grid, text_tokens, valid, q.device, pooled=pooled, layer=layer_index, step=step, branch=self.branch,
        )
        if mask.kv_len < k.shape[2]:  # padded text keys left out (a whole-length slice would cost a gradient copy)
            k, v = k[:, :, : mask.kv_len], v[:, :, : mask.kv_len]
        return block_sparse_attention(q, k, v, mask, backend=self.config.backend)

    def _attend_shards(self, query, key, value, context_parallel, text_tokens: int, layer_index: int) -> torch.Tensor:
        """Ulysses / ring attention of this rank's video-token shard (B, S / W, H, D) on the pattern's global mask.

        Where the tile order goes (STA, NABLA): the shards are contiguous in the model's frame-major order, and
        a 3D tile spans several shards unless each shard holds whole tile layers (along frames). So the tokens
        are permuted where they are whole: after the Ulysses all-to-all (every rank then has the full sequence
        for its heads; `context_parallel_attention(order=...)`), and undone before the all-to-all back. Ring
        attention keeps the query shards, so it runs only when every ring shard maps onto itself in the tile
        order (whole tiles per ring shard, e.g. whole tile layers); otherwise a `ValueError` naming `parallel_config`.
        NABLA's mask needs the pooled Q/K of the whole sequence: each rank pools its shard into the blocks of
        the tile order and the small `(B, H, n_blocks, D)` sums are all-reduced, so every rank builds the same
        mask (and the same cache decision) before the exchange.
        """
        name = type(self.config).__name__
        if text_tokens:
            raise ValueError(
                f"parallel_config: {name} runs context-parallel on video-only self-attention (Wan, LTX); "
                f"this layer joins {text_tokens} text tokens"
            )
        grid, world = self.grid, context_parallel.ring_degree * context_parallel.ulysses_degree
        if query.shape[1] * world != grid.tokens:
            raise ValueError(
                f"query: expected a shard of {grid.tokens} video tokens ({grid}) over {world} ranks, "
                f"got {query.shape[1]} tokens"
            )
        order = self.pattern.order(grid, 0)
        ring = context_parallel.ring_degree
        if order is not None and ring > 1 and not order.keeps_shards(ring):
            raise ValueError(
                f"parallel_config: ring attention (ring_degree={ring}) runs {name} only when each ring shard of "
                f"{grid.tokens // ring} tokens is made of whole {self.config.tile} tiles (e.g. whole tile layers "
                f"along the frames), not on grid {grid}; use ulysses_degree={world} (Ulysses permutes the whole "
                "sequence) or a frame count that splits into whole tile layers"
            )
        ulysses_group = context_parallel._ulysses_mesh.get_group()
        ring_group = context_parallel._ring_mesh.get_group()
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        pooled = None
        if self.pattern.needs_qk:
            ulysses = context_parallel.ulysses_degree
            shard = dist.get_rank(ring_group) * ulysses + dist.get_rank(ulysses_group)  # diffusers' mesh order
            groups = (ulysses_group, ring_group)
            pooled = tuple(self.pattern.pool_shard(t, grid, shard * q.shape[2], groups) for t in (q, k))
        step = self._step() if self.pattern.needs_qk else None
        mask, _ = self.pattern.mask_for(
            grid, 0, None, query.device, pooled=pooled, layer=layer_index, step=step, branch=self.branch
        )
        out = context_parallel_attention(
            q, k, v, mask, ulysses_group=ulysses_group, ring_group=ring_group, backend=self.config.backend,
            order=None if order is None else order.order,
        )
        return out.transpose(1, 2)



def _context_parallel(parallel_config):
    """The `ContextParallelConfig` of a diffusers `ParallelConfig` when it spans more than one rank, else None."""
    context_parallel = getattr(parallel_config, "context_parallel_config", None)
    if context_parallel is None or context_parallel.ring_degree * context_parallel.ulysses_degree == 1:
        return None
    return context_parallel
