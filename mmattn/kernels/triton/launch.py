"""How mmattn launches its Triton kernels: autotuning with a cached pick, and the host-side argument helpers
shared by the block-sparse, neighborhood and routed kernels."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import triton

__all__ = ["INTERPRETED", "TunedKernel", "dot_precision", "head_dim_block", "row_strides", "rows_contiguous", "size_bucket",
           "tuned"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


class TunedKernel:
    """An autotuned kernel launched through the autotuner once per key, then directly with the tile it picked:
    the autotuner's own per-launch key computation costs tens of microseconds, as long as a sparse kernel runs.

    `configs` are the tiles it tunes over and `prune(configs, named_args, **kwargs)` keeps those that fit a launch;
    `kept(...)` lists them and `pinned(...)` runs a chosen one, so that tests can check every tile it may pick."""

    def __init__(self, autotuner, configs: list[triton.Config], prune) -> None:
        self.autotuner = autotuner
        self.configs = configs
        self.prune = prune
        self.picked: dict[tuple, triton.Config] = {}
        self._choose: triton.Config | Callable[[list[triton.Config]], triton.Config] | None = None

    @property
    def best_config(self) -> triton.Config:
        return self.autotuner.best_config

    def kept(self, *args, **kwargs) -> list[triton.Config]:
        """The tiles the autotuner may pick for a launch with these kernel arguments (those of `launch` after the
        key): the ones `prune` keeps, in order. It times them all (tiles that fail to compile, such as one out of
        shared memory, drop out); with MMATTN_AUTOTUNE=0 it takes the first."""
        return self.prune(self.configs, dict(zip(self.autotuner.arg_names, args)), **kwargs)

    @contextlib.contextmanager
    def pinned(self, choose: triton.Config | Callable[[list[triton.Config]], triton.Config]) -> Iterator[None]:
        """Within the block every launch runs one tile, untimed, instead of the autotuner's pick: `choose` itself,
        or `choose(kept)` of the tiles the autotuner may pick for that launch (`kept`). The autotuner and its picks
        are left as they were. For tests (one pin per kernel at a time, not thread-safe)."""
        previous, self._choose = self._choose, choose
        try:
            yield
        finally:
            self._choose = previous

    def launch(self, grid, key: tuple, *args, **kwargs) -> None:
        """Runs the kernel; `key` must determine the autotuning key (shapes, dtypes and compile-time flags)."""
        if self._choose is not None:
            choose = self._choose
            config = choose if isinstance(choose, triton.Config) else choose(self.kept(*args, **kwargs))
            self.autotuner.fn[grid](*args, **kwargs, **config.all_kwargs())
            return
        config = self.picked.get(key)
        if config is None:
            self.autotuner[grid](*args, **kwargs)
            self.picked[key] = self.autotuner.best_config
        else:
            self.autotuner.fn[grid](*args, **kwargs, **config.all_kwargs())


def tuned(kernel, configs: list[triton.Config], key: list[str], prune, interpreter_configs: list[triton.Config]):
    """`kernel` autotuned over `configs` (best on an H100 first), reduced by `prune(configs, named_args, **kwargs)`
    to the tiles that fit the problem. Under the interpreter (over `interpreter_configs`) or with
    MMATTN_AUTOTUNE=0, the first fitting tile is taken without timing."""

    def first_fitting(configs, named_args, **kwargs):
        return prune(configs, named_args, **kwargs)[:1]

    untimed = INTERPRETED or os.environ.get("MMATTN_AUTOTUNE") == "0"
    configs = interpreter_configs if INTERPRETED else configs
    autotuner = triton.autotune(configs, key=key,
                                prune_configs_by={"early_config_prune": first_fitting if untimed else prune})
    return TunedKernel(autotuner(kernel), configs, prune)


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels address rows by stride and read each row's elements contiguously (unit last stride);
    expanded or strided tensors, such as the gradient of a `.sum()`, are copied to that layout."""
    return t if t.stride(-1) == 1 else t.contiguous()


def row_strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Batch, head and row strides of `(B, H, L, D)` tensors, concatenated (the kernels' stride arguments)."""
    return tuple(s for t in tensors for s in t.stride()[:3])


def size_bucket(length: int) -> int:
    """Autotuning key: lengths within one power of two share a tuned config (no re-tuning per length)."""
    return 1 << max(0, length - 1).bit_length()


def head_dim_block(head_dim: int) -> int:
    """The padded head dim the kernels tile with: a power of two, at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless the user allowed TF32 (half precision inputs are unaffected)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
