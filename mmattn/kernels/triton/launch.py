"""How mmattn launches its Triton kernels: autotuning with a cached pick, tile lists, and the host-side helpers
shared by every kernel family (strides, padded sizes, the backward's delta launch), with what the Hopper kernels
(TMA descriptors) need: the device check, the descriptor allocator and the input checks."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator

import torch
import triton

from ..backends import INTERPRETED
from .common import backward_delta_kernel

__all__ = ["TunedKernel", "backward_delta", "broadcast_stride", "ceil_div", "descriptor_reason", "dot_precision",
           "env_switch", "head_dim_block", "hopper", "next_power_of_2", "row_strides", "rows_contiguous",
           "set_allocator", "size_bucket", "tile_configs", "tuned"]


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


def tuned(kernel, configs: list[triton.Config], key: list[str], prune, interpreter_configs: list[triton.Config],
          reset_to_zero: list[str] | None = None):
    """`kernel` autotuned over `configs` (best on an H100 first), reduced by `prune(configs, named_args, **kwargs)`
    to the tiles that fit the problem. Under the interpreter (over `interpreter_configs`) or with
    MMATTN_AUTOTUNE=0, the first fitting tile is taken without timing. `reset_to_zero` names the buffers a kernel
    adds into (atomics): zeroed before each timed tile and before the real run."""

    def first_fitting(configs, named_args, **kwargs):
        return prune(configs, named_args, **kwargs)[:1]

    untimed = INTERPRETED or os.environ.get("MMATTN_AUTOTUNE") == "0"
    configs = interpreter_configs if INTERPRETED else configs
    autotuner = triton.autotune(configs, key=key, reset_to_zero=reset_to_zero,
                                prune_configs_by={"early_config_prune": first_fitting if untimed else prune})
    return TunedKernel(autotuner(kernel), configs, prune)


SWITCHES: dict[str, tuple[bool, bool]] = {}
"""Every `env_switch` read so far: variable -> (on, default)."""


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment switch (read once, at import): unset gives `default`, "1" on, "0" off; any other value
    is a clear error naming the variable. Recorded in `SWITCHES` (`mmattn info` lists them)."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be unset, '0' or '1', got {value!r}")
    SWITCHES[name] = (value == "1", default)
    return value == "1"


def tile_configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """`(BLOCK_M, BLOCK_N, num_warps, num_stages)` rows as autotuner configs."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def ceil_div(n: int, d: int) -> int:
    """ceil(n / d) for the host's grid and split arithmetic: `triton.cdiv` is a constexpr function whose Python call
    costs microseconds (several per launch of a host-bound decoding step)."""
    return -(-n // d)


def next_power_of_2(n: int, at_least: int = 1) -> int:
    """The smallest power of two >= `n`, and >= `at_least` (a tile side, a padded head dim, a tuning bucket)."""
    return max(at_least, 1 << max(0, n - 1).bit_length())


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels address rows by stride and read each row's elements contiguously (unit last stride);
    expanded or strided tensors, such as the gradient of a `.sum()`, are copied to that layout."""
    return t if t.stride(-1) == 1 else t.contiguous()


def row_strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Batch, head and row strides of `(B, H, L, D)` tensors, concatenated (the kernels' stride arguments)."""
    return tuple(s for t in tensors for s in t.stride()[:3])


def broadcast_stride(t: torch.Tensor, dim: int) -> int:
    """`t.stride(dim)`, or 0 where `dim` has extent 1 (broadcast over the batch or the heads)."""
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def size_bucket(length: int) -> int:
    """Autotuning key: lengths within one power of two share a tuned config (no re-tuning per length)."""
    return next_power_of_2(length)


def head_dim_block(head_dim: int) -> int:
    """The padded head dim the kernels tile with: a power of two, at least 16."""
    return next_power_of_2(head_dim, 16)


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless the user allowed TF32 (half precision inputs are unaffected)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def backward_delta(out: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor | None,
                   lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention's backward row term D = rowsum(dO * O) - dLSE, `(B, H, L)` float32, for `(B, H, L, D)`
    outputs with unit last stride (shared by every kernel family's backward)."""
    batch, heads, length, head_dim = out.shape
    delta = torch.empty_like(lse)
    backward_delta_kernel[(ceil_div(length, 64), batch * heads)](
        out, grad_out, grad_lse.contiguous() if grad_lse is not None else lse, delta,
        *row_strides(out, grad_out), heads, length,
        HAS_DLSE=grad_lse is not None, HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), BLOCK_M=64,
    )
    return delta


@functools.cache
def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def hopper(device: torch.device) -> bool:
    """Whether the Hopper kernels (TMA descriptors, warp specialization) run on `device`: a compiled sm90 GPU, or
    any device under the interpreter."""
    return INTERPRETED or _sm90(device)


_per_thread = threading.local()


def set_allocator() -> None:
    """Device-side descriptors take a scratch buffer from `triton.set_allocator`'s allocator, which Triton keeps in
    a context variable: set it, to the torch caching allocator, once per thread (autograd's backward threads run
    forwards too, under activation checkpointing)."""
    if not getattr(_per_thread, "allocator_set", False):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _per_thread.allocator_set = True


DESCRIPTOR_HEAD_DIMS = (64, 128)
"""Head dims the Hopper kernels run: their descriptors' tile is the whole, unpadded head dim."""


def descriptor_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **more: torch.Tensor) -> str:
    """Why the Hopper kernels cannot run on `(B, H, L, D)` q, k, v (and the tensors named in `more`, such as a
    backward's grad_out), or "" if they can: they need a compiled sm90 GPU (or the interpreter), float16/bfloat16
    (under the interpreter, which has no bfloat16: float16/float32), a head dim of `DESCRIPTOR_HEAD_DIMS` and 16-byte
    aligned base pointers and strides with a unit last stride (TMA)."""
    if not hopper(q.device):
        return f"needs a compiled Hopper (sm90) GPU, got {q.device}"
    dtypes = (torch.float16, torch.float32) if INTERPRETED else (torch.float16, torch.bfloat16)
    if q.dtype not in dtypes:
        return f"dtype must be one of {dtypes}, got {q.dtype}"
    if q.shape[-1] not in DESCRIPTOR_HEAD_DIMS:
        return f"head dim must be one of {DESCRIPTOR_HEAD_DIMS}, got {q.shape[-1]}"
    for name, t in {"q": q, "k": k, "v": v, **more}.items():
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:3]):
            return f"{name}: TMA needs a 16-byte aligned base and strides, got strides {t.stride()}"
    return ""
