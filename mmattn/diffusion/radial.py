"""`apply_radial_attention(pipe_or_transformer, config) -> handle`: Radial attention on a diffusers video model.

Installs the per-model processors on the self-attention modules its `mmattn.diffusion.models` entry lists
(e.g. Wan `blocks[i].attn1`, HunyuanVideo the 20 double-stream then 40 single-stream `attn`), and a diffusers
hook on the transformer that captures each call's token grid. A pipeline with two experts (Wan 2.2 A14B
`transformer` and `transformer_2`) gets both. The denoising-loop index comes from the pipeline's scheduler.
`handle.remove()` puts back the very processor objects that were there.
"""

from __future__ import annotations

import torch
from typing_extensions import Self

from ._extras import require
from .attention import RadialAttention, StepSource
from .config import RadialConfig
from .layout import GRID_HOOK_NAME, grid_capture_hook
from .models import model_support

__all__ = ["RadialHandle", "apply_radial_attention", "pipeline_step"]


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

        support = model_support(transformer)
        radial = RadialAttention(config, config.model or support.mask_rule, step_source)
        for layer_index, module in support.attention_modules(transformer):
            self._stock.append((module, module.processor))
            _set_processor(module, support.processor(radial, layer_index, stock=module.processor))
        hook = grid_capture_hook(support.grid, radial.set_grid)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, GRID_HOOK_NAME)
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
    if not transformers:
        raise ValueError("pipe_or_transformer: the pipeline has neither a transformer nor a transformer_2")
    for transformer in transformers:
        model_support(transformer)  # ValueError naming the class and the supported ones
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

    `pipe_or_transformer`: a pipeline whose transformer is in `mmattn.diffusion.models.MODELS` (Wan 2.1/2.2
    T2V, I2V, TI2V and VACE, with both Wan 2.2 A14B experts; HunyuanVideo 1.0 and 1.5; CogVideoX; Mochi;
    LTX-Video; LTX-2, video self-attention only; Kandinsky 5 with regular attention), or such a
    transformer; any other class is a `ValueError` naming it and the supported ones. `config`: a
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
