"""mmattn: one attention-kernel toolkit for vision backbones, VLM interventions and video diffusion.

Subpackages load on first attribute access (PEP 562), so ``import mmattn`` stays cheap and never
imports torch-heavy extras (timm, transformers, diffusers, gradio).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_SUBPACKAGES = ("kernels", "vision", "vlm", "diffusion")
__all__ = ["__version__", *_SUBPACKAGES]

if TYPE_CHECKING:
    from . import diffusion, kernels, vision, vlm  # noqa: F401


def __getattr__(name: str) -> ModuleType:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))
