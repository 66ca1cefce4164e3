"""mmattn.diffusion: sparse attention (Radial, STA, NABLA) and DiTCtrl for diffusers video pipelines.

`radial_block_mask` / `radial_mask` build Radial attention's static mask; `apply_radial_attention(pipe,
config)` switches a video pipeline whose transformer `mmattn.diffusion.models.MODELS` lists (Wan 2.1/2.2,
HunyuanVideo 1.0/1.5, CogVideoX, Mochi, LTX-Video, LTX-2, Kandinsky 5) to it (`handle.remove()` undoes);
`apply_sparse_attention(pipe, pattern="radial" | "sta" | "nabla", config)` does the same with sliding-tile
attention or NABLA (`STAConfig`, `NABLAConfig`, masks in `mmattn.diffusion.patterns`); `load_preset` reads
any pattern's preset. `mmattn.diffusion.train_lora` trains a LoRA with Radial on.
`mmattn.diffusion.ditctrl` generates multi-prompt long videos with CogVideoX; `mmattn.diffusion.metrics`
scores them (CSCV, PSNR/SSIM). diffusers, open_clip and decord are imported only when used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .config import RadialConfig, load_preset, preset_names
from .layout import VideoGrid
from .masks import radial_block_mask, radial_mask
from .patterns import NABLAConfig, STAConfig
from .radial import RadialHandle, SparseHandle, apply_radial_attention, apply_sparse_attention

__all__ = [
    "NABLAConfig",
    "RadialConfig",
    "RadialHandle",
    "STAConfig",
    "SparseHandle",
    "VideoGrid",
    "apply_radial_attention",
    "apply_sparse_attention",
    "load_preset",
    "ditctrl",
    "metrics",
    "preset_names",
    "radial_block_mask",
    "radial_mask",
]

_SUBMODULES = ("ditctrl", "metrics")


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
