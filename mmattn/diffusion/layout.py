"""The video token grid of one transformer call, read from the transformer's own forward arguments.

Attention processors only see flattened token sequences; the (frames, height, width) grid after patchify
is known only to the transformer's forward, so a diffusers `ModelHook` reads it there before every call
(a new resolution or frame count therefore always reaches the mask builder).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["GRID_HOOK_NAME", "GRID_READERS", "VideoGrid", "grid_capture_hook", "grid_from_forward"]


@dataclass(frozen=True)
class VideoGrid:
    """Latent token grid after patchify: tokens are frame-major, raster order inside a frame."""

    frames: int
    height: int
    width: int

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame


def _patch(config, name: str, default: int = 1) -> int:
    value = getattr(config, name, None)
    return default if value is None else int(value)


def _channels_first_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> VideoGrid:
    """(B, C, F, H, W) latents, patch (patch_size_t or 1, patch_size, patch_size)."""
    patch = transformer.config.patch_size
    patch_t, patch_s = (patch[0], patch[1]) if isinstance(patch, (tuple, list)) else (_patch(transformer.config, "patch_size_t"), patch)
    _, _, frames, height, width = hidden_states.shape
    return VideoGrid(frames // patch_t, height // patch_s, width // patch_s)


def _cogvideox_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> VideoGrid:
    """(B, F, C, H, W) latents (frame axis 1), patch_size_t None (1.0) or 2 (1.5)."""
    patch_s, patch_t = transformer.config.patch_size, _patch(transformer.config, "patch_size_t")
    _, frames, _, height, width = hidden_states.shape
    return VideoGrid(frames // patch_t, height // patch_s, width // patch_s)


def _ltx_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor, num_frames: int, height: int, width: int) -> VideoGrid:
    """Packed (B, S, C) tokens; the latent grid comes as `num_frames`, `height`, `width` (patch 1 in LTX)."""
    patch_s, patch_t = _patch(transformer.config, "patch_size"), _patch(transformer.config, "patch_size_t")
    return VideoGrid(num_frames // patch_t, height // patch_s, width // patch_s)


GRID_READERS: dict[str, Callable[..., VideoGrid]] = {
    "WanTransformer3DModel": _channels_first_grid,
    "HunyuanVideoTransformer3DModel": _channels_first_grid,
    "MochiTransformer3DModel": _channels_first_grid,
    "CogVideoXTransformer3DModel": _cogvideox_grid,
    "LTXVideoTransformer3DModel": _ltx_grid,
}
"""Transformer class name -> reader of its forward arguments (only the ones it names are passed)."""


def grid_from_forward(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
    """The token grid of a call `transformer(*args, **kwargs)` of a supported diffusers video transformer."""
    name = type(transformer).__name__
    if name not in GRID_READERS:
        raise TypeError(f"transformer must be one of {sorted(GRID_READERS)}, got {name}")
    bound = inspect.signature(type(transformer).forward).bind(transformer, *args, **kwargs).arguments
    reader = GRID_READERS[name]
    wanted = list(inspect.signature(reader).parameters)[1:]
    return reader(transformer, *(bound.get(param) for param in wanted))


GRID_HOOK_NAME = "mmattn_grid_capture"


def grid_capture_hook(on_grid: Callable[[VideoGrid], None]):
    """A diffusers `ModelHook` that hands each call's `VideoGrid` to `on_grid` before the forward runs."""
    from diffusers.hooks import ModelHook

    class GridCaptureHook(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            on_grid(grid_from_forward(module, args, kwargs))
            return args, kwargs

    return GridCaptureHook()
