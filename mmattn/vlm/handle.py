"""`apply(model, *interventions)`: install interventions on a transformers LVLM through its own extension points."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from types import TracebackType

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from typing_extensions import Self

from ..kernels.backends import backend_choices, check_backend, resolve_backend
from .attention import AttentionRows, eager_attention, rows_attention, tail_mask, tail_visibility
from .interventions.base import CACHE_ARGUMENTS, CallState, Intervention, ModelContext, Runtime, passed_cache
from .interventions.pruning import _PruningIntervention, _PruningRuntime
from .layout import TokenLayout, resolve_family

__all__ = ["InterventionHandle", "apply"]

_handle_ids = itertools.count()


class InterventionHandle:
    """Installed interventions on one model. A context manager; `remove()` restores the model bit for bit.

    The text decoder runs the attention function registered under `attention_name` (with the mask function of the
    model's original implementation); decoder-layer pre-hooks, where an intervention needs them, observe or shorten
    the sequence. State of the current generate call lives in `call` and is rebuilt at every prefill.
    """

    def __init__(self, model: nn.Module, interventions: tuple[Intervention, ...], backend: str = "auto") -> None:
        family, image_token_id = resolve_family(model)
        hooks = model.model._forward_pre_hooks.values()
        if any(isinstance(getattr(hook, "__self__", None), InterventionHandle) for hook in hooks):
            raise ValueError(
                "model: already has mmattn interventions applied; remove() their handle first, or pass every "
                "intervention to one apply(model, *interventions)"
            )
        self.backend = backend
        text_model = model.model.language_model
        self.model = model
        self.context = ModelContext(model, family, image_token_id, text_model)
        self.runtimes: list[Runtime] = [intervention.bind(self.context) for intervention in interventions]
        self.call: CallState | None = None
        self._tail_masks: dict = {}  # (kind, tail, q_len, kv_len, device) -> (attention mask, mask), per forward
        self._backends: dict = {}  # (device, dtype, head dim) -> the column-set kernels' backend
        self.model_parameters = tuple(inspect.signature(model.model.forward).parameters)
        self.original_implementation = text_model.config._attn_implementation
        self.eager_base = self.original_implementation == "eager"
        self.attention_name = f"mmattn_{next(_handle_ids)}"
        AttentionInterface.register(self.attention_name, self._attention)
        AttentionMaskInterface.register(self.attention_name, eager_mask if self.eager_base else sdpa_mask)
        model.set_attn_implementation({"text_config": self.attention_name})
        hooks = self.context.hooks
        hooks.append(model.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        hooks.append(text_model.register_forward_pre_hook(self._before_decoder, with_kwargs=True))
        if any(runtime.observes_layers() for runtime in self.runtimes):
            for index, layer in enumerate(text_model.layers):
                hooks.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook, restore the original attention implementation and unregister the function."""
        for hook in self.context.hooks:
            hook.remove()
        self.context.hooks.clear()
        if self.attention_name in AttentionInterface._global_mapping:
            self.model.set_attn_implementation({"text_config": self.original_implementation})
            del AttentionInterface._global_mapping[self.attention_name]
            del AttentionMaskInterface._global_mapping[self.attention_name]
        self.call = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.remove()

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A call with a filled cache decodes; any other starts a new prompt."""
        self._tail_masks = {}  # masks are built per forward
        arguments = {**dict(zip(self.model_parameters, args)), **kwargs}
        cache = passed_cache(arguments)
        if self._decoding(cache, arguments.get("input_ids")):
            if self.call is None:
                names = "/".join(CACHE_ARGUMENTS)
                raise ValueError(f"{names}: the cache was filled before the interventions were applied")
            self.call.decoding = True
            return
        input_ids = arguments.get("input_ids")
        if input_ids is None:
            raise ValueError("input_ids: the interventions locate image tokens by id, got inputs_embeds only")
        layout = TokenLayout.from_input_ids(
            input_ids, _padding_mask(arguments.get("attention_mask"), input_ids), self.context.image_token_id,
            self.context.family,
        )
        positions = torch.arange(layout.prompt_len, device=input_ids.device).expand(input_ids.shape[0], -1)
        self.call = CallState(layout=layout, lm_positions=positions, cache=cache, backend=self.backend)
        for runtime in self.runtimes:
            runtime.start_call(self.call)

    def _active(self) -> list[Runtime]:
        """The runtimes that see this forward: all, except inside a runtime's own extra pass of the decoder (GIFT's
        saliency prefill), which runs the plain decoder with that runtime alone, so that the other interventions'
        per-call state (pruning's kept tokens, VAR's sinks) comes from the real prefill only."""
        return [rt for rt in self.runtimes if rt.in_auxiliary_pass] or self.runtimes

    def _decoding(self, cache: object | None, input_ids: torch.Tensor | None) -> bool:
        """Whether a forward with this cache is a decoding step: its cache holds tokens. Under `torch.compile` (the
        decoding steps `generate` compiles with a static cache) that length is not read from the device: a compiled
        forward decodes when it gets one new token and the cache that the current call's prefill filled (a prompt
        needs its image tokens, so it is never one token long)."""
        if cache is None:
            return False
        if torch.compiler.is_compiling():
            one_token = input_ids is None or input_ids.shape[1] == 1
            return self.call is not None and cache is self.call.cache and one_token
        return bool(cache.get_seq_length() > 0)

    def _before_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # an extra pass (GIFT's) sees the decoder input before any pruning of it, whatever the order of apply()
        for runtime in sorted(self._active(), key=lambda runtime: isinstance(runtime, _PruningRuntime)):
            kwargs = runtime.shorten_decoder_inputs(kwargs, self.call)
        return args, kwargs

    def _layer_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            runtimes = self._active()
            for runtime in runtimes:
                hidden, kwargs = runtime.shorten_layer_inputs(layer, hidden, kwargs, self.call)
            for runtime in runtimes:
                runtime.before_layer(layer, hidden, self.call)
            return (hidden, *args[1:]), kwargs

        return hook

    # -- attention -------------------------------------------------------------------------------------------------
    def _attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        call, layer = self.call, module.layer_idx
        scaling = module.scaling if scaling is None else scaling
        users = [] if call is None else [rt for rt in self._active() if rt.wants_attention(layer, call)]
        selections = [runtime.attention_rows(layer, call) for runtime in users]
        tail = max([0, *(selection.tail for selection in selections)])  # no max(default=): torch 2.11's dynamo breaks on it
        if not tail:
            if self.eager_base:
                return eager_attention(module, query, key, value, attention_mask, scaling)
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if len(users) == 1 and not self.eager_base:
            output = self._fused_attention(users[0], selections[0], module, query, key, value, attention_mask,
                                           scaling, **kwargs)
            if output is not None:
                return output, None
        prompt_len = call.prompt_len(layer)

        def edit(probs: torch.Tensor) -> None:
            for runtime, selection in zip(users, selections):
                selected = selection.within(tail, probs.shape[0], probs.device)
                runtime.on_attention(AttentionRows(layer, probs, selected, prompt_len))

        if self.eager_base:
            return eager_attention(module, query, key, value, attention_mask, scaling, tail, edit)
        mask = self._tail_mask(attention_mask, tail, query.shape[2], key.shape[2], query.device)
        rows = rows_attention(query, key, value, mask, scaling, tail, edit)
        return self._with_last_rows(rows, module, query, key, value, attention_mask, scaling, **kwargs)

    def _tail_mask(self, attention_mask, tail: int, q_len: int, kv_len: int, device, kind=tail_mask):
        """`tail_mask` (or `tail_visibility`), built once for the layers of a forward that pass the same mask (VAR
        edits up to 30 layers of a prefill; a mask per layer cost 6 ops each) and again for another mask or shape
        (Gemma 3's sliding layers). Not under torch.compile, which traces it into the graph."""
        if torch.compiler.is_compiling():
            return kind(attention_mask, tail, q_len, kv_len, device)
        key = (kind, tail, q_len, kv_len, device)
        memo = self._tail_masks.get(key)
        if memo is None or memo[0] is not attention_mask:
            memo = self._tail_masks[key] = (attention_mask, kind(attention_mask, tail, q_len, kv_len, device))
        return memo[1]

    @staticmethod
    def _sdpa_rows(module, query, key, value, attention_mask, scaling, tail: int, **kwargs):
        """SDPA's attention output [B, q, H, D] of every row of the layer, and the view [B, tail, H, D] of its last
        `tail` rows, which the edited rows overwrite."""
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return output, output[:, output.shape[1] - tail :]

    def _with_last_rows(self, rows, module, query, key, value, attention_mask, scaling, **kwargs):
        """The layer's attention output [B, q, H, D]: SDPA for the rows before the edited last ones."""
        if rows.shape[1] == query.shape[2]:
            return rows.contiguous(), None
        output, last = self._sdpa_rows(module, query, key, value, attention_mask, scaling, rows.shape[1], **kwargs)
        last.copy_(rows)
        return output, None

    def _column_sets_backend(self, query: torch.Tensor) -> str:
        """The handle's backend for the column-set kernels on queries like `query`, resolved once per device, dtype
        and head dim (every edited layer of every step asks; under torch.compile it is traced instead)."""
        if torch.compiler.is_compiling():
            return resolve_backend("column_sets", self.backend, query)
        key = (query.device, query.dtype, query.shape[-1])
        if key not in self._backends:
            self._backends[key] = resolve_backend("column_sets", self.backend, query)
        return self._backends[key]

    def _fused_attention(self, runtime, selection, module, query, key, value, attention_mask, scaling, **kwargs):
        """The layer's attention output [B, q, H, D] whose last R = `selection.tail` rows come from the runtime's fused
        kernel, written over SDPA's output of every row (one kernel and no copy), on the handle's backend as the
        column-set kernels resolve it ("auto": the fastest that runs this query here, Triton on CUDA); None where
        that is "torch", the runtime does not fuse this layer or the mask is not a boolean one. Under torch.compile
        (compiled decoding) the kernels are custom ops of the compiled step."""
        layer, call = module.layer_idx, self.call
        backend = self._column_sets_backend(query)
        if (backend == "torch" or (attention_mask is not None and attention_mask.dtype != torch.bool)
                or not runtime.fuses(layer, call)):
            return None
        tail, batch, q_len = selection.tail, query.shape[0], query.shape[2]
        visible = self._tail_mask(attention_mask, tail, q_len, key.shape[2], query.device, tail_visibility)
        if visible is not None:
            visible = visible.expand(batch, -1, -1)
        output = out = None
        if tail < q_len:
            output, out = self._sdpa_rows(module, query, key, value, attention_mask, scaling, tail, **kwargs)
            out = out.transpose(1, 2)
        rows = runtime.fused_rows(layer, query[:, :, q_len - tail :], key, value, visible, selection.selected,
                                  scaling, call, backend, out)
        return rows.transpose(1, 2).contiguous() if output is None else output


def _padding_mask(mask: object, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The [B, P] padding mask of a prefill's `attention_mask`: as given when 2D; from the last prompt row of a 4D
    mask (a static cache's prefill gets the decoder's mask, [B, 1, P, max_cache_len], boolean or additive; Gemma 3:
    one per layer type), which sees every non-padding prompt token of a left-padded prompt."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return mask
    last = mask[:, 0, -1, : input_ids.shape[1]]
    return last if last.dtype == torch.bool else last == 0


def apply(model: nn.Module, *interventions: Intervention, backend: str = "auto") -> InterventionHandle:
    """Install `interventions` (VAR, GIFT, FastV, VFlowOpt, PyramidDrop, VisionZip, DivPrune, RandomPrune, FastVID) on a
    loaded transformers LVLM.

    Supported: LlavaForConditionalGeneration (LLaVA-1.5, llava-interleave, OneVision-style configs),
    LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration,
    InternVLForConditionalGeneration, Gemma3ForConditionalGeneration (VFlowOpt: LLaVA and Gemma 3; VisionZip: LLaVA
    only; FastVID: Qwen2.5-VL and Qwen3-VL videos), on transformers 5.17 and later
    (the KV cache passed as `cache` or `past_key_values`). Works with `generate` (greedy and sampling, KV cache,
    left-padded batches). Returns a handle; use it as a context manager or call `.remove()`. One handle per model:
    pass every intervention to one call.

    `backend`: how the rows edited by a single intervention (VAR: the prompt rows after the image and every decoded
    row; GIFT: the last prompt row and every decoded row) are computed: `"triton"` (fused kernels over the key
    cache, `mmattn.kernels.sink_redistribution_attention` and `ranked_head_attention`), `"torch"` (explicit fp32
    probabilities, edited in place, as transformers' eager attention) or `"auto"` (the fastest of these that runs the
    layer's query here, as `mmattn.kernels.supported_backends("column_sets", query)` orders them: Triton on CUDA,
    else torch), also inside a torch.compile'd forward such as the decoding steps of
    `generate(..., cache_implementation="static")`, where the fused kernels are custom ops of the compiled graph.
    Rows whose probabilities an intervention reads (GIFT's saliency), layers that several interventions edit, eager
    attention and additive masks take the explicit path.

    Compiled decoding: VAR and GIFT trace into the compiled decoding step without a graph break and recompile
    nothing from step to step; token pruning needs the dynamic cache and raises a ValueError with a static one.
    """
    check_backend(backend, backend_choices("column_sets"))
    if not interventions:
        raise ValueError("interventions: expected at least one intervention, got none")
    for intervention in interventions:
        if not isinstance(intervention, Intervention):
            raise TypeError(f"interventions: expected Intervention objects, got {type(intervention).__name__}")
    shortening = [type(iv).__name__ for iv in interventions if isinstance(iv, _PruningIntervention)]
    if len(shortening) > 1:
        raise ValueError(f"interventions: expected at most one token-pruning intervention, got {shortening}")
    return InterventionHandle(model, interventions, backend)
