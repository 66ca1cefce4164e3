"""`apply_radial_attention(pipe_or_transformer, config) -> handle`: Radial attention on a diffusers video model;
`apply_sparse_attention(pipe_or_transformer, pattern="radial" | "sta" | "nabla", config)` the same for any pattern.

Installs the per-model processors on the self-attention modules its `mmattn.diffusion.models` entry lists
(e.g. Wan `blocks[i].attn1`, HunyuanVideo the 20 double-stream then 40 single-stream `attn`), and a diffusers
hook on the transformer that captures each call's token grid. A pipeline with two experts (Wan 2.2 A14B
`transformer` and `transformer_2`) gets both. The denoising-loop index comes from the pipeline's scheduler.
`handle.remove()` puts back the very processor objects that were there. A second hook records diffusers'
`cache_context` name (the CFG branch) for NABLA's mask cache.
"""

from __future__ import annotations

import torch
from typing_extensions import Self

from ._extras import require
from .attention import SparseAttention, StepSource
from .config import RadialConfig, load_preset
from .layout import GRID_HOOK_NAME, grid_capture_hook
from .models import model_support
from .sparse import PATTERNS, SparseConfig

__all__ = ["RadialHandle", "SparseHandle", "apply_radial_attention", "apply_sparse_attention", "pipeline_step"]

BRANCH_HOOK_NAME = "mmattn_cfg_branch"


def _branch_hook(on_branch):
    """A stateful diffusers `ModelHook`: diffusers hands stateful hooks the `cache_context` of each denoiser call
    (`transformer.cache_context("cond")`); this one passes its name to `on_branch` before the forward runs."""
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    class _NoState(BaseState):
        pass

    class BranchHook(ModelHook):
        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.state_manager = StateManager(_NoState)

        def pre_forward(self, module, *args, **kwargs):
            context = self.state_manager._context
            on_branch(None if context is None else context.name)
            return args, kwargs

        def reset_state(self, module):
            return module

    return BranchHook()


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
    """Undo handle of `apply_radial_attention` / `apply_sparse_attention`; also a context manager. `radial` holds
    one `SparseAttention` state per transformer (whatever the pattern)."""

    def __init__(self) -> None:
        self.radial: list[SparseAttention] = []
        self._stock: list[tuple[torch.nn.Module, object]] = []
        self._hooked: list[torch.nn.Module] = []

    def _install(self, transformer: torch.nn.Module, config: SparseConfig, step_source: StepSource | None) -> None:
        from diffusers.hooks import HookRegistry

        support = model_support(transformer)
        state = SparseAttention(config, getattr(config, "model", None) or support.mask_rule, step_source)
        for layer_index, module in support.attention_modules(transformer):
            self._stock.append((module, module.processor))
            _set_processor(module, support.processor(state, layer_index, stock=module.processor))
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(grid_capture_hook(support.grid, state.set_grid), GRID_HOOK_NAME)
        registry.register_hook(_branch_hook(state.set_branch), BRANCH_HOOK_NAME)
        self._hooked.append(transformer)
        self.radial.append(state)

    def remove(self) -> None:
        """Restores the stock processors and removes the grid hook; a second call does nothing."""
        from diffusers.hooks import HookRegistry

        for module, processor in reversed(self._stock):
            _set_processor(module, processor)
        for transformer in self._hooked:
            registry = HookRegistry.check_if_exists_or_initialize(transformer)
            registry.remove_hook(BRANCH_HOOK_NAME, recurse=False)
            registry.remove_hook(GRID_HOOK_NAME, recurse=False)
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
            raise ValueError("pipe_or_transformer already has Radial (or STA / NABLA) attention; remove() its handle first")
    return transformers


SparseHandle = RadialHandle
"""The handle of `apply_sparse_attention` (the same class)."""


def _install_all(pipe_or_transformer, config: SparseConfig, step_source: StepSource | None) -> RadialHandle:
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
    try:
        for transformer in transformers:
            handle._install(transformer, config, step_source)
    except Exception:
        handle.remove()
        raise
    return handle


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
    return _install_all(pipe_or_transformer, config, step_source)


def apply_sparse_attention(
    pipe_or_transformer,
    pattern: str | SparseConfig = "radial",
    config: SparseConfig | str | None = None,
    *,
    step_source: StepSource | None = None,
) -> RadialHandle:
    """Switches a diffusers video pipeline (or transformer) to a block-sparse attention pattern.

    `pattern`: `"radial"` (Radial attention, arXiv 2506.19852; the default), `"sta"` (sliding-tile attention,
    arXiv 2502.04507) or `"nabla"` (NABLA, as Kandinsky 5 runs it: a per-layer mask from block-pooled Q/K,
    thresholded on cumulative softmax mass and ORed with an STA window), or directly a `RadialConfig`,
    `STAConfig` or `NABLAConfig`. `config`: that pattern's config, a preset name (`load_preset`), or None for
    the config class's defaults. `pipe_or_transformer` and `step_source` as in `apply_radial_attention`, which
    this generalises (same handle, same dense-step / dense-layer policy). Under diffusers' context parallelism STA
    and NABLA run their tile order between Ulysses' exchanges; ring attention needs each ring shard to hold whole
    tiles (else a `ValueError` naming `parallel_config` at the first sparse call).
    """
    if isinstance(pattern, tuple(PATTERNS.values())):
        if config is not None:
            raise ValueError(f"config: pattern is already a {type(pattern).__name__}; got config={config!r} as well")
        config, pattern = pattern, next(name for name, cls in PATTERNS.items() if isinstance(pattern, cls))
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {sorted(PATTERNS)} or a config object, got {pattern!r}")
    if isinstance(config, str):
        config = load_preset(config)
    if config is None:
        config = PATTERNS[pattern]()
    if not isinstance(config, PATTERNS[pattern]):
        raise TypeError(
            f"config must be a {PATTERNS[pattern].__name__} for pattern={pattern!r}, got {type(config).__name__}"
        )
    return _install_all(pipe_or_transformer, config, step_source)
