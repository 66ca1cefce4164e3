"""The one place where the diffusion plugin calls attention: Radial block-sparse or the stock dense call.

`RadialAttention` is the per-transformer state a handle owns: the config, the token grid of the current call
(set by the grid-capture hook) and the step source. Processors hand it (batch, tokens, heads, head_dim)
tensors, the position of the text segment and a closure running the stock dense attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmattn.kernels import block_sparse_attention
from mmattn.kernels.distributed import context_parallel_attention

from .config import RadialConfig
from .layout import VideoGrid
from .masks import radial_mask

__all__ = ["RadialAttention", "StepSource"]

StepSource = Callable[[], "tuple[int, int] | None"]
"""Returns (denoising-loop index, number of steps) of the running call, or None when unknown."""


class RadialAttention:
    """Radial attention for one transformer: dense fallback policy plus the block-sparse call."""

    def __init__(self, config: RadialConfig, model: str, step_source: StepSource | None) -> None:
        self.config = config
        self.model = model
        self.step_source = step_source
        self.grid: VideoGrid | None = None

    def set_grid(self, grid: VideoGrid) -> None:
        self.grid = grid

    def is_dense(self, layer_index: int) -> bool:
        """Dense in the first `dense_layers` layers, the first `dense_steps` and last `dense_last_steps` steps."""
        if layer_index < self.config.dense_layers:
            return True
        step = self.step_source() if self.step_source is not None else None
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
        this rank's token shard and attention runs as Ulysses and/or ring attention on the global mask.
        """
        if self.is_dense(layer_index):
            return dense()
        if self.grid is None:
            raise RuntimeError("the token grid is unknown: Radial attention runs only inside the patched transformer's forward")
        context_parallel = _context_parallel(parallel_config)
        if context_parallel is not None:
            return self._attend_shards(query, key, value, context_parallel, text_tokens)
        grid, seq_len = self.grid, query.shape[1]
        if seq_len != grid.tokens + text_tokens:
            raise ValueError(
                f"query: expected {grid.tokens} video tokens ({grid}) + {text_tokens} text tokens, got {seq_len} tokens"
            )
        rotate = text_first and text_tokens > 0  # the mask puts text after the video
        if rotate:
            query, key, value = (torch.cat([t[:, text_tokens:], t[:, :text_tokens]], 1) for t in (query, key, value))
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        counts = [None] if valid_text_tokens is None else valid_text_tokens.tolist()
        out = torch.empty_like(query)
        for valid in dict.fromkeys(counts):
            rows = slice(None) if valid is None else [b for b, c in enumerate(counts) if c == valid]
            mask = self._mask(query.device, text_tokens, valid)
            out[rows] = block_sparse_attention(
                query[rows], key[rows, :, : mask.kv_len], value[rows, :, : mask.kv_len], mask, backend=self.config.backend
            )
        out = out.transpose(1, 2)
        return torch.cat([out[:, -text_tokens:], out[:, :-text_tokens]], 1) if rotate else out

    def _mask(self, device: torch.device, text_tokens: int = 0, valid_text_tokens: int | None = None):
        """The Radial mask of the current grid (cached by `radial_mask`)."""
        return radial_mask(
            self.grid.frames,
            self.grid.tokens_per_frame,
            block_size=self.config.block_size,
            decay_factor=self.config.decay_factor,
            model=self.model,
            text_tokens=text_tokens,
            valid_text_tokens=valid_text_tokens,
            device=device,
        )

    def _attend_shards(self, query, key, value, context_parallel, text_tokens: int) -> torch.Tensor:
        """Ulysses / ring attention of this rank's video-token shard (B, S / W, H, D) on the global Radial mask."""
        if text_tokens:
            raise ValueError(
                "parallel_config: Radial attention runs context-parallel on video-only self-attention (Wan, LTX); "
                f"this layer joins {text_tokens} text tokens"
            )
        world = context_parallel.ring_degree * context_parallel.ulysses_degree
        if query.shape[1] * world != self.grid.tokens:
            raise ValueError(
                f"query: expected a shard of {self.grid.tokens} video tokens ({self.grid}) over {world} ranks, "
                f"got {query.shape[1]} tokens"
            )
        out = context_parallel_attention(
            *(t.transpose(1, 2) for t in (query, key, value)),
            self._mask(query.device),
            ulysses_group=context_parallel._ulysses_mesh.get_group(),
            ring_group=context_parallel._ring_mesh.get_group(),
            backend=self.config.backend,
        )
        return out.transpose(1, 2)


def _context_parallel(parallel_config):
    """The `ContextParallelConfig` of a diffusers `ParallelConfig` when it spans more than one rank, else None."""
    context_parallel = getattr(parallel_config, "context_parallel_config", None)
    if context_parallel is None or context_parallel.ring_degree * context_parallel.ulysses_degree == 1:
        return None
    return context_parallel
