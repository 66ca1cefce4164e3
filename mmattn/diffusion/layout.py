"""The video token grid of one transformer call, read from the transformer's own forward arguments.

Attention processors only see flattened token sequences; the (frames, height, width) grid after patchify
is known only to the transformer's forward, so a diffusers `ModelHook` reads it there before every call
(a new resolution or frame count therefore always reaches the mask builder). Which reader serves which
transformer class is said once, in `mmattn.diffusion.models`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "GRID_HOOK_NAME",
    "VideoGrid",
    "channels_first_grid",
    "channels_last_grid",
    "cogvideox_grid",
    "grid_capture_hook",
    "grid_from_forward",
    "packed_grid",
]


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


def channels_first_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> VideoGrid:
    """(B, C, F, H, W) latents (Wan 2.1/2.2 incl. TI2V-5B and VACE, HunyuanVideo 1.0/1.5, Mochi).

    The patch is the transformer's own: a (t, h, w) tuple, or `patch_size` with `patch_size_t` (default 1).
    """
    patch = transformer.config.patch_size
    if isinstance(patch, (tuple, list)):
        patch_t, patch_h, patch_w = patch
    else:
        patch_t, patch_h, patch_w = _patch(transformer.config, "patch_size_t"), patch, patch
    _, _, frames, height, width = hidden_states.shape
    return VideoGrid(frames // patch_t, height // patch_h, width // patch_w)


def channels_last_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> VideoGrid:
    """(B, F, H, W, C) latents with a (t, h, w) `patch_size` (Kandinsky 5)."""
    patch_t, patch_h, patch_w = transformer.config.patch_size
    _, frames, height, width, _ = hidden_states.shape
    return VideoGrid(frames // patch_t, height // patch_h, width // patch_w)


def cogvideox_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> VideoGrid:
    """(B, F, C, H, W) latents (frame axis 1), patch_size_t None (1.0) or 2 (1.5)."""
    patch_s, patch_t = transformer.config.patch_size, _patch(transformer.config, "patch_size_t")
    _, frames, _, height, width = hidden_states.shape
    return VideoGrid(frames // patch_t, height // patch_s, width // patch_s)


def packed_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor, num_frames: int, height: int, width: int) -> VideoGrid:
    """Packed (B, S, C) tokens whose latent grid comes as `num_frames`, `height`, `width` (LTX-Video, LTX-2).

    Each axis counts its patches the way the models' rotary coordinates do (a trailing partial patch counts).
    """
    if num_frames is None or height is None or width is None:
        raise ValueError(
            f"{type(transformer).__name__}: Radial attention reads the token grid from num_frames, height and width; "
            f"got num_frames={num_frames}, height={height}, width={width}"
        )
    patch_s, patch_t = _patch(transformer.config, "patch_size"), _patch(transformer.config, "patch_size_t")
    return VideoGrid(-(-num_frames // patch_t), -(-height // patch_s), -(-width // patch_s))


def grid_from_forward(transformer: torch.nn.Module, args: tuple, kwargs: dict, reader: Callable[..., VideoGrid]) -> VideoGrid:
    """The token grid of a call `transformer(*args, **kwargs)`, read by `reader` from the forward arguments it names."""
    bound = inspect.signature(type(transformer).forward).bind(transformer, *args, **kwargs).arguments
    wanted = list(inspect.signature(reader).parameters)[1:]
    return reader(transformer, *(bound.get(param) for param in wanted))


GRID_HOOK_NAME = "mmattn_grid_capture"


def grid_capture_hook(reader: Callable[..., VideoGrid], on_grid: Callable[[VideoGrid], None]):
    """A diffusers `ModelHook` that hands each call's `VideoGrid` (read by `reader`) to `on_grid` before the forward runs."""
    from diffusers.hooks import ModelHook

    class GridCaptureHook(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            on_grid(grid_from_forward(module, args, kwargs, reader))
            return args, kwargs

    return GridCaptureHook()
