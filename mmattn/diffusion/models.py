"""The diffusers video transformers Radial attention supports: one registry entry per transformer class.

An entry says everything `apply_radial_attention` needs about a class: the processor that replaces the
stock one, the reader of the token grid from the forward arguments, the default mask rule (`"wan"`: frame-0
attention sink; `"hunyuan"`: none) and the self-attention modules with their layer indices (the paper's
dense layers come first). Modules an entry does not list keep their stock processors: cross-attention,
text-only attention (token refiners, Kandinsky's text encoder), LTX-2's audio and audio-video attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .layout import VideoGrid, channels_first_grid, channels_last_grid, cogvideox_grid, packed_grid
from .processors import (
    CogVideoXRadialAttnProcessor,
    HunyuanVideo15RadialAttnProcessor,
    HunyuanVideoRadialAttnProcessor,
    Kandinsky5RadialAttnProcessor,
    LTX2RadialAttnProcessor,
    LTXRadialAttnProcessor,
    MochiRadialAttnProcessor,
    RadialProcessor,
    WanRadialAttnProcessor,
)

__all__ = ["MODELS", "ModelSupport", "model_support"]

LayeredModules = Callable[[torch.nn.Module], Iterable[tuple[int, torch.nn.Module]]]


@dataclass(frozen=True)
class ModelSupport:
    """How Radial attention goes onto one transformer class.

    `processor`: the `RadialProcessor` subclass; `grid`: reads the `VideoGrid` from the forward arguments it
    names (`layout.grid_from_forward`); `mask_rule`: the default Radial rule; `attention_modules`: the
    self-attention modules as (layer index, module), in the order the forward runs them; `check`: raises a
    `ValueError` for a configuration of the class that Radial cannot serve; `pipelines`: the diffusers
    pipelines whose `transformer` (and `transformer_2`) is of this class.
    """

    processor: type[RadialProcessor]
    grid: Callable[..., VideoGrid]
    mask_rule: str
    attention_modules: LayeredModules
    pipelines: tuple[str, ...]
    check: Callable[[torch.nn.Module], None] | None = None


def _each(blocks: str, attention: str) -> LayeredModules:
    """`transformer.<blocks>[i].<attention>` with layer index i."""
    return lambda t: ((i, getattr(block, attention)) for i, block in enumerate(getattr(t, blocks)))


def _wan_vace_modules(transformer: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """The main blocks' `attn1`, then each VACE block's `attn1` with the index of the main layer it feeds."""
    main = [(i, block.attn1) for i, block in enumerate(transformer.blocks)]
    vace = [(layer, block.attn1) for layer, block in zip(transformer.config.vace_layers, transformer.vace_blocks)]
    return main + vace


def _hunyuan_modules(transformer: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """The 20 double-stream blocks (layers 0-19), then the 40 single-stream blocks (layers 20-59)."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    return [(i, block.attn) for i, block in enumerate(blocks)]


def _kandinsky5_check(transformer: torch.nn.Module) -> None:
    attention_type = transformer.config.attention_type
    if attention_type != "regular":
        raise ValueError(
            f"Kandinsky5Transformer3DModel: Radial attention needs attention_type='regular' (raster token order); "
            f"got attention_type={attention_type!r}, which runs NABLA in 8x8 fractal order"
        )


_WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")

MODELS: dict[str, ModelSupport] = {
    # Wan 2.1 (T2V, I2V), Wan 2.2 A14B (both experts) and TI2V-5B (4x16x16 VAE, per-token timesteps).
    "WanTransformer3DModel": ModelSupport(
        WanRadialAttnProcessor, channels_first_grid, "wan", _each("blocks", "attn1"), _WAN_PIPELINES
    ),
    "WanVACETransformer3DModel": ModelSupport(
        WanRadialAttnProcessor, channels_first_grid, "wan", _wan_vace_modules, ("WanVACEPipeline",)
    ),
    "HunyuanVideoTransformer3DModel": ModelSupport(
        HunyuanVideoRadialAttnProcessor, channels_first_grid, "hunyuan", _hunyuan_modules, ("HunyuanVideoPipeline",)
    ),
    "HunyuanVideo15Transformer3DModel": ModelSupport(
        HunyuanVideo15RadialAttnProcessor, channels_first_grid, "hunyuan", _each("transformer_blocks", "attn"),
        ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
    ),
    "CogVideoXTransformer3DModel": ModelSupport(
        CogVideoXRadialAttnProcessor, cogvideox_grid, "hunyuan", _each("transformer_blocks", "attn1"), ("CogVideoXPipeline",)
    ),
    "MochiTransformer3DModel": ModelSupport(
        MochiRadialAttnProcessor, channels_first_grid, "hunyuan", _each("transformer_blocks", "attn1"), ("MochiPipeline",)
    ),
    "LTXVideoTransformer3DModel": ModelSupport(
        LTXRadialAttnProcessor, packed_grid, "wan", _each("transformer_blocks", "attn1"), ("LTXPipeline",)
    ),
    # LTX-2: the video self-attention only; audio and audio-video attention stay stock.
    "LTX2VideoTransformer3DModel": ModelSupport(
        LTX2RadialAttnProcessor, packed_grid, "wan", _each("transformer_blocks", "attn1"),
        ("LTX2Pipeline", "LTX2ImageToVideoPipeline"),
    ),
    # Kandinsky 5 (regular attention): the visual blocks' self-attention; the text encoder blocks stay stock.
    "Kandinsky5Transformer3DModel": ModelSupport(
        Kandinsky5RadialAttnProcessor, channels_last_grid, "wan", _each("visual_transformer_blocks", "self_attention"),
        ("Kandinsky5T2VPipeline", "Kandinsky5I2VPipeline"), check=_kandinsky5_check,
    ),
}
"""Transformer class name -> its `ModelSupport`."""


def model_support(transformer: torch.nn.Module) -> ModelSupport:
    """The registry entry of `transformer`'s class; a `ValueError` naming it and the supported ones otherwise."""
    name = type(transformer).__name__
    support = MODELS.get(name)
    if support is None:
        raise ValueError(f"transformer: Radial attention supports {sorted(MODELS)}, got {name}")
    if support.check is not None:
        support.check(transformer)
    return support
