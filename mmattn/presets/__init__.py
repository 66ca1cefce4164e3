"""YAML presets shipped as package data and read with `importlib.resources`: `vlm/<model>.yaml` holds the
settings of each VLM intervention (`mmattn.vlm.load_preset`), `diffusion/<model>.yaml` the Radial attention
settings of a video model (`mmattn.diffusion.RadialConfig.preset`)."""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["folder", "names"]


def folder(kind: str) -> Traversable:
    """The installed folder of `kind`'s presets (`"vlm"` or `"diffusion"`)."""
    return files(__name__) / kind


def names(kind: str) -> list[str]:
    """The preset names of `kind`: its YAML file names without the suffix, sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in folder(kind).iterdir() if p.name.endswith(".yaml"))
