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

from mmattn.kernels import block_sparse_attention
from mmattn.kernels.distributed import context_parallel_attention

from .layout import VideoGrid
from .sparse import RadialPattern, SparseConfig, SparsePattern, pattern_for

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
        this rank's token shard and Radial runs as Ulysses and/or ring attention on the global mask (STA and
        NABLA refuse it for now). Text goes after the video and, for STA / NABLA, the video tokens into the
        pattern's tile order before the kernel; the output comes back in the model's order.
        """
        if self.is_dense(layer_index):
            return dense()
        if self.grid is None:
            raise RuntimeError("the token grid is unknown: sparse attention runs only inside the patched transformer's forward")
        context_parallel = _context_parallel(parallel_config)
        if context_parallel is not None:
            if not isinstance(self.pattern, RadialPattern):
                raise ValueError(
                    f"parallel_config: {type(self.config).__name__} does not run context-parallel yet (only Radial "
                    "does); disable context parallelism or use Radial"
                )
            return self._attend_shards(query, key, value, context_parallel, text_tokens)
        grid, seq_len = self.grid, query.shape[1]
        if seq_len != grid.tokens + text_tokens:
            raise ValueError(
                f"query: expected {grid.tokens} video tokens ({grid}) + {text_tokens} text tokens, got {seq_len} tokens"
            )
        rotate = text_first and text_tokens > 0  # the masks put text after the video
        if rotate:
            query, key, value = (torch.cat([t[:, text_tokens:], t[:, :text_tokens]], 1) for t in (query, key, value))
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        counts = [None] if valid_text_tokens is None else valid_text_tokens.tolist()
        step = self._step() if self.pattern.needs_qk else None
        out = torch.empty_like(query)
        for valid in dict.fromkeys(counts):
            rows = slice(None) if valid is None else [b for b, c in enumerate(counts) if c == valid]
            q, k, v = query[rows], key[rows], value[rows]
            mask, order = self.pattern.mask_for(
                grid, text_tokens, valid, query.device, q=q if self.pattern.needs_qk else None,
                k=k if self.pattern.needs_qk else None, layer=layer_index, step=step, branch=self.branch,
            )
            if order is not None:
                q, k, v = (order.permute(t, dim=2) for t in (q, k, v))
            o = block_sparse_attention(
                q, k[:, :, : mask.kv_len], v[:, :, : mask.kv_len], mask, backend=self.config.backend
            )
            out[rows] = o if order is None else order.unpermute(o, dim=2)
        out = out.transpose(1, 2)
        return torch.cat([out[:, -text_tokens:], out[:, :-text_tokens]], 1) if rotate else out

    def _mask(self, device: torch.device, text_tokens: int = 0, valid_text_tokens: int | None = None):
        """The static mask of the current grid in frame-major order (Radial; cached by `radial_mask`)."""
        mask, _ = self.pattern.mask_for(self.grid, text_tokens, valid_text_tokens, device)
        return mask

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
