"""`apply_radial_attention(pipe_or_transformer, config) -> handle`: Radial attention on a diffusers video model.

Installs the per-model processors on the self-attention modules (Wan `blocks[i].attn1`; HunyuanVideo the 20
double-stream then 40 single-stream `attn`; CogVideoX, Mochi and LTX `transformer_blocks[i].attn1`), and a
diffusers hook on the transformer that captures each call's token grid. The denoising-loop index comes from
the pipeline's scheduler. `handle.remove()` puts back the very processor objects that were there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from typing_extensions import Self

from ._extras import require
from .attention import RadialAttention, StepSource
from .config import RadialConfig
from .layout import GRID_HOOK_NAME, grid_capture_hook
from .processors import (
    CogVideoXRadialAttnProcessor,
    HunyuanVideoRadialAttnProcessor,
    LTXRadialAttnProcessor,
    MochiRadialAttnProcessor,
    RadialProcessor,
    WanRadialAttnProcessor,
)

__all__ = ["SUPPORTED_TRANSFORMERS", "RadialHandle", "apply_radial_attention", "pipeline_step"]


@dataclass(frozen=True)
class _ModelSupport:
    processor: type[RadialProcessor]
    mask_rule: str
    attention_modules: Callable[[torch.nn.Module], Iterable[torch.nn.Module]]


SUPPORTED_TRANSFORMERS: dict[str, _ModelSupport] = {
    "WanTransformer3DModel": _ModelSupport(WanRadialAttnProcessor, "wan", lambda t: (b.attn1 for b in t.blocks)),
    "HunyuanVideoTransformer3DModel": _ModelSupport(
        HunyuanVideoRadialAttnProcessor,
        "hunyuan",
        lambda t: [b.attn for b in t.transformer_blocks] + [b.attn for b in t.single_transformer_blocks],
    ),
    "CogVideoXTransformer3DModel": _ModelSupport(
        CogVideoXRadialAttnProcessor, "hunyuan", lambda t: (b.attn1 for b in t.transformer_blocks)
    ),
    "MochiTransformer3DModel": _ModelSupport(MochiRadialAttnProcessor, "hunyuan", lambda t: (b.attn1 for b in t.transformer_blocks)),
    "LTXVideoTransformer3DModel": _ModelSupport(LTXRadialAttnProcessor, "wan", lambda t: (b.attn1 for b in t.transformer_blocks)),
}
"""Transformer class -> Radial processor, default mask rule (sink or not) and its self-attention modules in layer order."""


def pipeline_step(pipe) -> tuple[int, int] | None:
    """(denoising-loop index, number of steps) of a running diffusers pipeline, or None outside its loop.

    Schedulers that count their steps (flow matching, UniPC) give `step_index` (None until the first
    `step()`, i.e. the first index); the others are looked up by `pipe.current_timestep`.
    """
    scheduler = pipe.scheduler
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    if hasattr(scheduler, "step_index"):
        index = scheduler.step_index
        return (scheduler.begin_index or 0 if index is None else index), len(timesteps)
    current = getattr(pipe, "current_timestep", None)
    if current is None:
        return None
    hits = torch.nonzero(torch.as_tensor(timesteps) == torch.as_tensor(current).to(timesteps.device)).flatten()
    return (int(hits[0]), len(timesteps)) if hits.numel() else None


def _set_processor(module: torch.nn.Module, processor) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:  # MochiAttention has no set_processor
        module.processor = processor


class RadialHandle:
    """Undo handle of `apply_radial_attention`; also a context manager. `radial` holds one state per transformer."""

    def __init__(self) -> None:
        self.radial: list[RadialAttention] = []
        self._stock: list[tuple[torch.nn.Module, object]] = []
        self._hooked: list[torch.nn.Module] = []

    def _install(self, transformer: torch.nn.Module, config: RadialConfig, step_source: StepSource | None) -> None:
        from diffusers.hooks import HookRegistry

        support = SUPPORTED_TRANSFORMERS[type(transformer).__name__]
        radial = RadialAttention(config, config.model or support.mask_rule, step_source)
        for layer_index, module in enumerate(support.attention_modules(transformer)):
            self._stock.append((module, module.processor))
            _set_processor(module, support.processor(radial, layer_index, stock=module.processor))
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(grid_capture_hook(radial.set_grid), GRID_HOOK_NAME)
        self._hooked.append(transformer)
        self.radial.append(radial)

    def remove(self) -> None:
        """Restores the stock processors and removes the grid hook; a second call does nothing."""
        from diffusers.hooks import HookRegistry

        for module, processor in reversed(self._stock):
            _set_processor(module, processor)
        for transformer in self._hooked:
            HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(GRID_HOOK_NAME, recurse=False)
        self._stock, self._hooked, self.radial = [], [], []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        configs = {repr(r.config) for r in self.radial}
        return f"RadialHandle(transformers={len(self._hooked)}, layers={len(self._stock)}, config={', '.join(configs) or None})"


def _transformers_of(target) -> list[torch.nn.Module]:
    require("diffusers", "diffusion")
    if isinstance(target, torch.nn.Module):
        transformers = [target]
    elif hasattr(target, "transformer"):
        transformers = [t for t in (target.transformer, getattr(target, "transformer_2", None)) if t is not None]
    else:
        raise TypeError(f"pipe_or_transformer must be a diffusers pipeline or transformer, got {type(target).__name__}")
    for transformer in transformers:
        if type(transformer).__name__ not in SUPPORTED_TRANSFORMERS:
            raise TypeError(
                f"pipe_or_transformer: transformer must be one of {sorted(SUPPORTED_TRANSFORMERS)}, got {type(transformer).__name__}"
            )
        registry = getattr(transformer, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(GRID_HOOK_NAME) is not None:
            raise ValueError("pipe_or_transformer already has Radial attention; remove() its handle first")
    return transformers


def apply_radial_attention(
    pipe_or_transformer,
    config: RadialConfig | str,
    *,
    step_source: StepSource | None = None,
) -> RadialHandle:
    """Switches a diffusers video pipeline (or transformer) to Radial attention (arXiv 2506.19852).

    `pipe_or_transformer`: a `WanPipeline` (2.1, and 2.2 with `transformer_2`), `HunyuanVideoPipeline`,
    `CogVideoXPipeline`, `MochiPipeline`, `LTXPipeline`, or one of their transformers. `config`: a
    `RadialConfig` or a preset name (`RadialConfig.preset`). `step_source` returns the running
    (step index, step count); pipelines default to their scheduler's, a bare transformer needs one when the
    config has dense steps. Returns the handle whose `remove()` restores the stock processors.
    """
    if isinstance(config, str):
        config = RadialConfig.preset(config)
    if not isinstance(config, RadialConfig):
        raise TypeError(f"config must be a RadialConfig or a preset name, got {type(config).__name__}")
    transformers = _transformers_of(pipe_or_transformer)
    if step_source is None and not isinstance(pipe_or_transformer, torch.nn.Module):
        pipe = pipe_or_transformer
        step_source = lambda: pipeline_step(pipe)
    if step_source is None and (config.dense_steps or config.dense_last_steps):
        raise ValueError(
            f"step_source is required with a bare transformer when config has dense steps "
            f"(dense_steps={config.dense_steps}, dense_last_steps={config.dense_last_steps})"
        )
    handle = RadialHandle()
    for transformer in transformers:
        handle._install(transformer, config, step_source)
    return handle
