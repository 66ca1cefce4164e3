"""Visual-token pruning engine shared by FastV, PyramidDrop (`attention_ranked.py`), VFlowOpt (`vflowopt.py`), and
the methods that choose their tokens themselves (VisionZip, DivPrune, random: score="custom", their runtimes override
`choose`).

A plan says where the sequence shrinks (stages: the first decoder layer that runs on fewer image tokens, 0 = before
the LLM), how many image tokens each stage keeps, where the token scores come from, whether pruned tokens are merged
into kept ones (recycling), and which rotary positions the kept tokens get. Pruning happens once, in the prefill;
layers >= a stage cache only the kept tokens, so the KV cache and the attention cost really shrink, and decode tokens
attend the fixed kept set.

Per model: Qwen3-VL's DeepStack features (added to the outputs of its first decoder layers at the image positions)
are added by the engine, at the tokens still held, so they follow every prune; Gemma 3's prefill masks (bidirectional
image blocks, sliding windows) are restricted per layer like any 4D mask, and its decoding masks are built by the
engine over the keys the decoder holds, which needs prompt and generation within its sliding window.
"""

from __future__ import annotations

import inspect
import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..attention import AttentionRows, repeat_kv
from .base import (
    LAST_ROW,
    CallState,
    Intervention,
    ModelContext,
    RowSelection,
    Runtime,
    passed_cache,
)
from .gather import take_mask, take_tokens
from .vision_importance import context_relevance, patch_entropy, vit_attention_map

__all__ = ["PruneStage", "PruningPlan", "VisionImportance"]

SCORE_SOURCES = ("previous_layer", "own_layer", "vision", "custom")
_PREFILL, _DECODE = object(), object()
POSITION_POLICIES = ("keep", "reindex")
#: Families whose multimodal model turns the 2D padding mask into the decoder's 4D masks itself (Gemma 3).
_MASKS_BEFORE_DECODER = ("gemma3",)
COUNT_RULES = ("round", "floor", "relative")


@dataclass(frozen=True)
class PruneStage:
    """From decoder layer `layer` on, a fraction `keep` of the image tokens remains: of the prompt's, or of those the
    previous stage left (a plan with count="relative")."""

    layer: int
    keep: float


@dataclass(frozen=True)
class VisionImportance:
    """VFlowOpt's ViT-side importance: attention of ViT layer `vit_layer` (None: the layer whose output feeds the
    projector), global-token threshold t, entropy weight α_v."""

    vit_layer: int | None = None
    threshold: float = 39.26
    entropy_weight: float = 0.0


@dataclass(frozen=True)
class PruningPlan:
    """stages: ascending layers. score: "previous_layer" (FastV: last prompt row of the attention of layer K-1,
    head mean), "own_layer" (PyramidDrop: the stage layer's own q/k of the last prompt row), "vision" (VFlowOpt:
    `importance`), "custom" (the intervention's runtime chooses the kept image tokens itself: VisionZip, DivPrune,
    random). positions, at the stages inside the decoder: "keep" the rotary positions (gaps allowed; Qwen2-VL's
    multi-axis positions are gathered) or "reindex" contiguously; the tokens a layer-0 stage keeps are numbered as
    `input_positions` says. recycle_cell: VFlowOpt's cell side m for merging the
    pruned tokens of a layer-0 stage (None: drop them). count, the image tokens each stage keeps, as the official
    code of each method: "round" round(N·keep) of the prompt's N (FastV), "floor" int(N·keep) (PyramidDrop), both
    with non-increasing keeps, or "relative": a stage keeps n - round(n·(1-keep)) of the n image tokens the previous
    one left (VFlowOpt). input_positions: the rotary positions of the tokens a layer-0 stage keeps, "reindex"
    (contiguous, as a decoder input that never held the pruned ones) or "keep" (gathered: multi-axis positions)."""

    stages: tuple[PruneStage, ...]
    score: str = "previous_layer"
    positions: str = "keep"
    recycle_cell: float | None = None
    importance: VisionImportance | None = None
    count: str = "round"
    input_positions: str = "reindex"

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: expected at least one PruneStage, got none")
        layers = [stage.layer for stage in self.stages]
        keeps = [stage.keep for stage in self.stages]
        if layers != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"stages: expected strictly ascending layers >= 0, got {layers}")
        if self.count not in COUNT_RULES:
            raise ValueError(f"count: expected one of {COUNT_RULES}, got {self.count!r}")
        decreasing = self.count == "relative" or keeps == sorted(keeps, reverse=True)
        if any(not 0.0 <= keep <= 1.0 for keep in keeps) or not decreasing:
            raise ValueError(f"stages: expected non-increasing keep fractions in [0, 1], got {keeps}")
        if self.score not in SCORE_SOURCES:
            raise ValueError(f"score: expected one of {SCORE_SOURCES}, got {self.score!r}")
        if self.positions not in POSITION_POLICIES:
            raise ValueError(f"positions: expected one of {POSITION_POLICIES}, got {self.positions!r}")
        if self.input_positions not in POSITION_POLICIES:
            raise ValueError(f"input_positions: expected one of {POSITION_POLICIES}, got {self.input_positions!r}")
        if layers[0] == 0 and self.score not in ("vision", "custom"):
            raise ValueError(
                "stages: a stage at layer 0 needs score='vision' or 'custom' (no LLM attention yet), got "
                f"{self.score!r}"
            )
        if (self.score == "vision") != (self.importance is not None):
            raise ValueError("importance: give a VisionImportance exactly when score='vision'")
        if self.recycle_cell is not None and (layers[0] != 0 or self.recycle_cell < 1):
            raise ValueError(f"recycle_cell: expected m >= 1 with a layer-0 stage, got {self.recycle_cell}, {layers}")


#: generate's `cache_implementation` values that preallocate a fixed-size (compileable) cache.
STATIC_CACHE_NAMES = ("static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked")


def _static_cache_message(method: str, got: str) -> str:
    return (
        f"cache_implementation: {method} prunes visual tokens, which shortens the KV cache of the pruned layers to "
        "their kept tokens; that needs the dynamic cache (the default: generate without cache_implementation, or "
        f"cache_implementation='dynamic'), not a static one (compiled decoding); got {got}"
    )


class _PruningIntervention(Intervention):
    layers_argument: ClassVar[str]  # the setting that names the stage layers
    runtime_class: ClassVar[type | None] = None  # None: _PruningRuntime

    def __post_init__(self) -> None:
        self.plan()  # checks the settings as they are made, not at apply()

    def plan(self) -> PruningPlan:
        raise NotImplementedError

    def plan_for(self, context: ModelContext) -> PruningPlan:
        """The plan on this model (by default the same on every model)."""
        return self.plan()

    def bind(self, context: ModelContext) -> Runtime:
        plan = self.plan_for(context)
        implementation = getattr(getattr(context.model, "generation_config", None), "cache_implementation", None)
        if implementation in STATIC_CACHE_NAMES:
            raise ValueError(_static_cache_message(type(self).__name__, f"generation_config.cache_implementation="
                                                   f"{implementation!r}"))
        if plan.stages[-1].layer >= context.num_layers:
            raise ValueError(
                f"{self.layers_argument}: layer {plan.stages[-1].layer} >= the model's {context.num_layers} layers"
            )
        if plan.score == "vision" and context.family.name not in ("llava", "gemma3"):
            raise ValueError(
                "model: the ViT importance map needs one CLIP/SigLIP crop per image whose patches map onto the image "
                "tokens, as in model_type 'llava' (LLaVA-1.5, llava-interleave) or 'gemma3' (k x k patches pooled "
                f"per token); got model_type {context.family.name!r} (anyres tiles and newline tokens, merged Qwen "
                "patches, or InternVL's tiles and pixel shuffle)"
            )
        if context.family.multi_axis_rope and plan.stages[0].layer == 0 and plan.input_positions == "reindex":
            raise ValueError(
                f"input_positions: {context.family.name}'s multi-axis rotary positions must be gathered, not "
                "renumbered; use input_positions='keep'"
            )
        if plan.positions == "reindex" and context.family.multi_axis_rope and any(s.layer > 0 for s in plan.stages):
            raise ValueError(
                f"positions: {context.family.name}'s multi-axis rotary positions must be gathered, not renumbered; "
                "use positions='keep'"
            )
        return (self.runtime_class or _PruningRuntime)(plan, context, self)


class _PruningRuntime(Runtime):
    def __init__(self, plan: PruningPlan, context: ModelContext, settings: Intervention | None = None) -> None:
        self.plan, self.context, self.settings = plan, context, settings
        self.stages = {stage.layer: stage for stage in plan.stages}
        self.first_layer = plan.stages[0].layer
        self.call: CallState | None = None
        self.image_count = 0
        self.scores: dict[int, torch.Tensor] = {}
        self.importance: torch.Tensor | None = None
        self.relevance: torch.Tensor | None = None
        self.pixel_values: torch.Tensor | None = None
        self.deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        if plan.score == "vision":
            self._install_vision_hook()
        self._mask_gathered = False
        if context.family.name in _MASKS_BEFORE_DECODER:
            context.hooks.append(context.model.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        text_model = context.text_model
        if "deepstack_visual_embeds" in inspect.signature(text_model.forward).parameters:
            # Qwen3-VL's DeepStack adds vision features to the outputs of its first decoder layers at the image
            # positions; the engine takes those additions over, so they follow the pruned sequence
            context.hooks.append(text_model.norm.register_forward_pre_hook(self._deepstack_after_last_layer))

    # -- per call ------------------------------------------------------------------------------------------------
    def start_call(self, call: CallState) -> None:
        if getattr(call.cache, "is_compileable", False):
            method = "token pruning" if self.settings is None else type(self.settings).__name__
            raise ValueError(_static_cache_message(method, f"a {type(call.cache).__name__}"))
        counts = call.layout.image_counts.tolist()
        if len(set(counts)) != 1:
            raise ValueError(
                f"input_ids: pruning needs the same number of image tokens in every batch row, got {sorted(set(counts))}"
            )
        self.call, self.image_count, self.scores, self.importance = call, counts[0], {}, None
        self.present = self.image_count
        self._layer_inputs: tuple = ((), {})
        self.deepstack = None

    def _kept_count(self, stage: PruneStage) -> int:
        if self.plan.count == "relative":
            return self.present - round(self.present * (1 - stage.keep))
        kept = self.image_count * stage.keep
        return int(kept) if self.plan.count == "floor" else round(kept)

    # -- scores --------------------------------------------------------------------------------------------------
    def wants_attention(self, layer: int, call: CallState) -> bool:
        return self.plan.score == "previous_layer" and not call.decoding and layer + 1 in self.stages

    def attention_rows(self, layer: int, call: CallState) -> RowSelection:
        return LAST_ROW

    def on_attention(self, rows: AttentionRows) -> None:
        self.scores[rows.layer + 1] = rows.probs[:, :, -1].mean(1)

    def _own_layer_scores(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """PyramidDrop: softmax attention of the last prompt row from the stage layer's own input-normed q and k."""
        module = self.context.layers[layer]
        attention = module.self_attn
        x = module.input_layernorm(hidden)
        batch, length, _ = x.shape
        query = attention.q_proj(x[:, -1:]).view(batch, 1, -1, attention.head_dim)
        key = attention.k_proj(x).view(batch, length, -1, attention.head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3, Gemma 3: per-head RMSNorm of q and k before the rotation
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        cos, sin = kwargs["position_embeddings"]
        query, _ = rotate(query, query, cos[..., -1:, :], sin[..., -1:, :])
        key, _ = rotate(key, key, cos, sin)
        logits = query @ repeat_kv(key, attention.num_key_value_groups).transpose(2, 3) * attention.scaling
        mask = kwargs.get("attention_mask")
        if mask is not None:
            last = mask[..., -1:, :]
            logits = logits + (last.to(logits.dtype) if last.dtype != torch.bool else
                               torch.zeros_like(logits).masked_fill(~last, torch.finfo(logits.dtype).min))
        return logits.float().softmax(-1)[:, :, -1].mean(1)

    def _install_vision_hook(self) -> None:
        model = self.context.model
        vision = model.model.vision_tower
        encoder_layers = vision.vision_model.encoder.layers if hasattr(vision, "vision_model") else vision.encoder.layers
        feature_layer = getattr(model.config, "vision_feature_layer", -1)  # Gemma 3: the last layer's output
        if not isinstance(feature_layer, int):
            raise TypeError(f"vision_feature_layer: VFlowOpt needs a single feature layer, got {feature_layer}")
        # Gemma 3 average-pools k x k patches into one image token: so is the importance map
        self.pool = getattr(model.model.multi_modal_projector, "kernel_size", 1)
        vit_layer = self.plan.importance.vit_layer
        if vit_layer is None:
            vit_layer = len(encoder_layers) + feature_layer if feature_layer < 0 else feature_layer - 1
        if not 0 <= vit_layer < len(encoder_layers):
            raise ValueError(f"vit_layer: expected a ViT layer in [0, {len(encoder_layers)}), got {vit_layer}")
        self.context.hooks.append(encoder_layers[vit_layer].register_forward_pre_hook(self._vision_hook))
        self.context.hooks.append(vision.register_forward_pre_hook(self._pixels_hook, with_kwargs=True))

    def _pixels_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.pixel_values = kwargs.get("pixel_values", args[0] if args else None)

    def _vision_hook(self, module: nn.Module, args: tuple) -> None:
        """Runs inside the vision tower, which transformers may call before the first decoder forward (generate
        pre-encodes images), so the map waits in `relevance` until the prefill's layout is known."""
        settings, model = self.plan.importance, self.context.model
        relevance = context_relevance(vit_attention_map(module, args[0]), settings.threshold)
        if getattr(model.config, "vision_feature_select_strategy", "full") == "default":
            relevance = relevance[:, 1:]
        if settings.entropy_weight:
            entropy = patch_entropy(self.pixel_values, model.config.vision_config.patch_size)
            relevance = relevance + settings.entropy_weight * entropy.softmax(-1)
        if self.pool > 1:
            side = math.isqrt(relevance.shape[1])
            grid = relevance.view(-1, 1, side, side)
            relevance = nn.functional.avg_pool2d(grid, self.pool, self.pool).flatten(1)
        self.relevance = relevance.flatten().detach()

    def _importance(self) -> torch.Tensor:
        """[B, P] importance at the image-token positions of the prompt (images fill them in order), from the map the
        vision tower left for this prompt (used once). `generate` may encode each prompt's images once and repeat the
        features for its expanded rows (num_return_sequences, beams; transformers >= 5.24): so is the map."""
        if self.importance is None:
            image = self.call.layout.image
            relevance, self.relevance = self.relevance, None
            if relevance is None:
                raise ValueError("pixel_values: VFlowOpt's importance comes from the vision tower, which did not run "
                                 "for this prompt since apply() (image features computed before it?)")
            tokens = self.image_count * image.shape[0]
            repeats = tokens // relevance.numel()
            if relevance.numel() * repeats != tokens or image.shape[0] % repeats:
                raise ValueError(f"pixel_values: {relevance.numel()} ViT patches do not match {tokens} image tokens")
            relevance = relevance.view(-1, self.image_count).repeat_interleave(repeats, 0)
            importance = torch.zeros(image.shape, dtype=relevance.dtype, device=image.device)
            self.importance = importance.masked_scatter(image, relevance)
        return self.importance

    def _stage_scores(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if self.plan.score == "previous_layer":
            return self.scores.pop(layer)
        if self.plan.score == "own_layer":
            return self._own_layer_scores(layer, hidden, kwargs)
        return self.call.at_layer(layer - 1, self._importance())

    # -- selection -----------------------------------------------------------------------------------------------
    def _select(self, scores: torch.Tensor, image: torch.Tensor, kept: int) -> torch.Tensor | None:
        """Sorted local indices [B, n] keeping every non-image token and the `kept` best of the image tokens."""
        if kept >= self.present:
            return None
        top = scores.float().masked_fill(~image, float("-inf")).topk(kept, dim=1).indices
        length = image.shape[1] - self.present + kept
        self.present = kept
        return _true_indices((~image).scatter(1, top, True), length)

    def _recycle(self, hidden: torch.Tensor, scores: torch.Tensor, image: torch.Tensor, kept: int) -> torch.Tensor:
        """VFlowOpt recycling: outside the top (kept - int(N/m²)) image tokens, each m×m cell of the image grid
        becomes one token, the importance-weighted mean of its members (weights over their sum, of either sign, as the
        code; uniform where they sum to 0), written at its most important member. Returns the sorted local indices
        [B, n] of the kept tokens; `hidden` is edited in place."""
        count, cell = self.image_count, self.plan.recycle_cell
        positions = _true_indices(image, count)
        images, side = _square_images(positions)
        outright = max(kept - int(count / cell**2), 0)
        order = scores.gather(1, positions).float().argsort(dim=1, descending=True, stable=True)
        keep = (~image).scatter(1, positions.gather(1, order[:, :outright]), True)
        rest = order[:, outright:]
        per_side = math.ceil(side / cell)
        local = rest % (side * side)  # cells never straddle two images
        cells = (rest // (side * side) * per_side + (local // side / cell).floor().long()) * per_side + (
            local % side / cell
        ).floor().long()
        members = positions.gather(1, rest)
        weights = scores.gather(1, members).float()

        def per_cell(values: torch.Tensor, reduce: str) -> torch.Tensor:
            start = torch.full((hidden.shape[0], images * per_side**2), values.shape[1] if reduce == "amin" else 0,
                               dtype=values.dtype, device=values.device)
            return start.scatter_reduce(1, cells, values, reduce).gather(1, cells)

        totals, sizes = per_cell(weights, "sum"), per_cell(torch.ones_like(weights), "sum")
        weights = torch.where(totals != 0, weights / totals.masked_fill(totals == 0, 1.0), 1 / sizes)
        members_index = members[..., None].expand(-1, -1, hidden.shape[-1])
        values = hidden.gather(1, members_index)
        merged = torch.zeros(hidden.shape[0], images * per_side**2, hidden.shape[-1], device=hidden.device)
        merged = merged.scatter_add(1, cells[..., None].expand_as(values), weights[..., None] * values.float())
        rank = torch.arange(rest.shape[1], device=rest.device).expand_as(rest)
        target = rank == per_cell(rank, "amin")  # rest runs in descending importance: a cell's first is its best
        merged = merged.gather(1, cells[..., None].expand_as(values)).to(hidden.dtype)
        hidden.scatter_(1, members_index, torch.where(target[..., None], merged, values))
        keep.scatter_(1, members, target)
        lengths = keep.sum(1).tolist()
        if len(set(lengths)) != 1:
            raise ValueError(f"recycle_cell: batch rows keep different token counts {lengths}; prune them one by one")
        self.present = lengths[0] - (image.shape[1] - count)
        return _true_indices(keep, lengths[0])

    # -- the decoder's inputs (stage at layer 0) -----------------------------------------------------------------
    def shorten_decoder_inputs(self, kwargs: dict, call: CallState) -> dict:
        if not call.decoding and kwargs.get("deepstack_visual_embeds") is not None:
            mask = kwargs.pop("visual_pos_masks")
            self.deepstack = (mask, list(kwargs.pop("deepstack_visual_embeds")))
        if self.first_layer != 0:
            return kwargs
        if call.decoding:
            return self._decode_decoder_inputs(kwargs, call)
        embeds = kwargs["inputs_embeds"].clone()
        kept = self._kept_count(self.stages[0])
        image = call.layout.image
        if self.plan.score == "custom":
            local = self._chosen(self.choose(0, embeds, image, kept), image)
        elif self.plan.recycle_cell is not None:
            local = self._recycle(embeds, self._importance(), image, kept)
        else:
            local = self._select(self._importance(), image, kept)
        if local is None:
            return kwargs
        kwargs["inputs_embeds"] = take_tokens(embeds, local, 1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):  # Gemma 3: one prefill mask per layer type, image blocks bidirectional
            kwargs["attention_mask"] = {name: take_mask(m, local, local) for name, m in mask.items()}
        elif isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = take_mask(mask, local if mask.dim() == 4 else None, local)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(image.shape[1], device=image.device).expand(image.shape[0], -1)
        kwargs["position_ids"] = take_tokens(kwargs["position_ids"], local, -1)
        if self.plan.input_positions == "reindex":
            # contiguous, as in the official code, whose decoder input never held the pruned tokens
            removed_before = local - torch.arange(local.shape[1], device=local.device)
            kwargs["position_ids"] = kwargs["position_ids"] - removed_before
        elif kwargs.get("attention_mask") is None:
            # positions with gaps and no mask would read as packed sequences: an all-visible padding mask instead
            kwargs["attention_mask"] = torch.ones(local.shape, dtype=torch.long, device=local.device)
        self._prune_deepstack(local)
        call.lm_positions = local
        return kwargs

    def _decode_decoder_inputs(self, kwargs: dict, call: CallState) -> dict:
        """A decoding step's decoder kwargs after a layer-0 stage: mask columns of the kept prompt tokens, positions
        counted over the full prompt (shifted when the kept ones were renumbered)."""
        mask, ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        removed = call.layout.prompt_len - call.lm_positions.shape[1]
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if ids is None and self.plan.input_positions == "keep":
                ids = (mask.long().cumsum(-1) - 1)[:, -kwargs["inputs_embeds"].shape[1] :]
            tail = torch.arange(call.layout.prompt_len, mask.shape[1], device=mask.device)
            columns = torch.cat([call.lm_positions, tail.expand(mask.shape[0], -1)], 1)
            kwargs["attention_mask"] = take_mask(mask, None, columns)
        elif mask is not None and not self._mask_gathered:
            raise ValueError("attention_mask: a decoding step's 4D mask cannot be restricted to the kept tokens")
        if ids is not None and self.plan.input_positions == "reindex":
            ids = ids - removed  # counted over the full prompt; without ids the decoder counts its shorter cache
        if ids is not None:
            kwargs["position_ids"] = ids
        return kwargs

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Gemma 3 builds its per-layer-type masks before the decoder runs, each sized by the cache of the first
        layer of its type, which may be a pruned one. In a decoding step they are built here instead, over every key
        the decoder input holds (the prompt, or the tokens a layer-0 stage kept, then the decoded ones), so that each
        layer restricts them to its own keys: padding, and for sliding layers the window over cache positions."""
        self._mask_gathered = False
        cache, call, ids = passed_cache(kwargs), self.call, kwargs.get("input_ids")
        if cache is None or cache.get_seq_length() == 0 or call is None or ids is None:
            return args, kwargs
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            raise ValueError("attention_mask: pruning builds Gemma 3's decoding masks itself; pass the 2D padding mask")
        prompt_len, step = call.layout.prompt_len, ids.shape[1]
        total = prompt_len + cache.get_seq_length() - call.lm_positions.shape[1] + step  # layer 0 is never cropped
        if mask is None:
            mask = torch.ones(ids.shape[0], total, dtype=torch.long, device=ids.device)
        window = getattr(self.context.text_model.config, "sliding_window", None)
        if window is not None and total > window:
            raise ValueError(
                f"input_ids: prompt and generated tokens ({total}) exceed the sliding window ({window}) of "
                f"{type(self.context.model).__name__}, whose sliding cache then drops keys; pruning needs them "
                "within it"
            )
        if step != 1:
            raise ValueError(f"input_ids: pruning decodes one token per step on this model, got {step}")
        tail = torch.arange(prompt_len, mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
        columns = torch.cat([call.lm_positions, tail], 1) if self.first_layer == 0 else tail.new_tensor(
            range(mask.shape[1])).expand(mask.shape[0], -1)
        if kwargs.get("position_ids") is None and self.plan.input_positions == "keep" and self.first_layer == 0:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1)[:, -step:]
        visible = mask.gather(1, columns).bool()[:, None, None, :]
        sliding = visible & (columns > mask.shape[1] - 1 - (window or mask.shape[1] + 1))[:, None, None, :]
        implementation = self.context.text_model.config._attn_implementation
        if AttentionMaskInterface._global_mapping.get(implementation) is eager_mask:  # additive float masks
            minimum = torch.finfo(self.context.text_model.dtype).min
            visible, sliding = (torch.zeros(m.shape, dtype=self.context.text_model.dtype, device=m.device)
                                .masked_fill(~m, minimum) for m in (visible, sliding))
        kwargs["attention_mask"] = {"full_attention": visible, "sliding_attention": sliding}
        self._mask_gathered = True
        return args, kwargs

    def choose(self, layer: int, hidden: torch.Tensor, image: torch.Tensor, kept: int) -> torch.Tensor:
        """score='custom': [B, P] bool, the image tokens (of `image` [B, P], the tokens entering layer `layer`) to
        keep, the same count in every row; `hidden` [B, P, D] may be edited in place (merging)."""
        raise NotImplementedError

    def _chosen(self, chosen: torch.Tensor, image: torch.Tensor) -> torch.Tensor | None:
        """Sorted local indices of every non-image token and the `chosen` image tokens; None when all are kept."""
        chosen = chosen & image
        counts = chosen.sum(1).tolist()
        if len(set(counts)) != 1:
            raise ValueError(f"input_ids: batch rows keep different image-token counts {counts}; prune them one by one")
        if counts[0] >= self.present:
            return None
        self.present = counts[0]
        return _true_indices(~image | chosen, image.shape[1] - int(image[0].sum()) + counts[0])

    # -- DeepStack (Qwen3-VL) --------------------------------------------------------------------------------------
    def _prune_deepstack(self, local: torch.Tensor) -> None:
        """Keep the DeepStack features of the kept tokens, and their positions: `local` [B, n] indexes the tokens."""
        if self.deepstack is None:
            return
        mask, features = self.deepstack
        kept = torch.zeros_like(mask).scatter_(1, local, True)
        remaining = kept[mask]  # row-major, as the features are stored
        self.deepstack = (mask.gather(1, local), [feature[remaining] for feature in features])

    def _add_deepstack(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's own DeepStack addition of feature list `index` (after decoder layer `index`)."""
        if self.deepstack is None or index >= len(self.deepstack[1]):
            return hidden
        mask, features = self.deepstack
        return self.context.text_model._deepstack_process(hidden, mask, features[index])

    def _deepstack_after_last_layer(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.deepstack is None or self.call is None or self.call.decoding:
            return None
        return (self._add_deepstack(self.context.num_layers - 1, args[0]), *args[1:])

    # -- decoder layers ------------------------------------------------------------------------------------------
    def shorten_layer_inputs(
        self, layer: int, hidden: torch.Tensor, kwargs: dict, call: CallState
    ) -> tuple[torch.Tensor, dict]:
        if layer > 0 and not call.decoding:
            hidden = self._add_deepstack(layer - 1, hidden)
        if layer < max(self.first_layer, 1):
            return hidden, kwargs
        if call.decoding:
            return hidden, self._decode_inputs(layer, hidden, kwargs, call)
        current = call.keep.get(layer - 1)
        if layer in self.stages and layer > 0:
            image = call.at_layer(layer - 1, call.layout.image)
            kept = self._kept_count(self.stages[layer])
            if self.plan.score == "custom":
                local = self._chosen(self.choose(layer, hidden, image, kept), image)
            else:
                scores = self._stage_scores(layer, hidden, self._gathered(kwargs, current, hidden, layer))
                local = self._select(scores, image, kept)
            if local is not None:
                hidden = take_tokens(hidden, local, 1)
                self._prune_deepstack(local)
                current = local if current is None else current.gather(1, local)
        if current is None:
            return hidden, kwargs
        call.keep[layer] = current
        return hidden, self._gathered(kwargs, current, hidden, layer)

    def _rotary(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's rotary tables for renumbered positions (Gemma 3: of the layer's type, local or global)."""
        rotary = self.context.text_model.rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            return rotary(hidden, ids, self.context.text_model.config.layer_types[layer])
        return rotary(hidden, ids)

    def _memo(self, key: tuple, build: Callable[[], dict]) -> dict:
        """The layer-input updates for the inputs `key` (compared by identity; the first entry names the phase):
        every layer of a stage receives the same tensors, so they are gathered once per stage and step."""
        cached_key, updates = self._layer_inputs
        if len(key) != len(cached_key) or any(a is not b for a, b in zip(key, cached_key)):
            updates = build()
            self._layer_inputs = (key, updates)
        return updates

    def _gathered(self, kwargs: dict, keep: torch.Tensor | None, hidden: torch.Tensor, layer: int = 0) -> dict:
        """The layer kwargs of the full prefill restricted to the kept tokens (rows and columns of the mask)."""
        if keep is None:
            return kwargs
        mask, position_ids, (cos, sin) = kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs["position_embeddings"]

        def build() -> dict:
            ids = None if position_ids is None else take_tokens(position_ids, keep, -1)
            if self.plan.positions == "reindex":
                ids = ids - (keep - torch.arange(keep.shape[1], device=keep.device))
                embeddings = self._rotary(layer, hidden, ids)
            else:
                embeddings = (take_tokens(cos, keep, -2), take_tokens(sin, keep, -2))
            return {"attention_mask": take_mask(mask, keep, keep), "position_ids": ids, "position_embeddings": embeddings}

        return {**kwargs, **self._memo((_PREFILL, keep, mask, position_ids, cos), build)}  # cos: one per layer type

    def _decode_inputs(self, layer: int, hidden: torch.Tensor, kwargs: dict, call: CallState) -> dict:
        """A decoding step's layer kwargs for a layer holding the `keep` prompt tokens and every decoded token."""
        keep = call.keep.get(layer)
        if keep is None:
            return kwargs
        mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        lm_length = call.lm_positions.shape[1]

        def build() -> dict:
            updates = {}
            if mask is not None:
                tail = torch.arange(lm_length, mask.shape[-1], device=mask.device).expand(keep.shape[0], -1)
                updates["attention_mask"] = take_mask(mask, None, torch.cat([keep, tail], 1))
            if self.plan.positions == "reindex":
                updates["position_ids"] = position_ids - (lm_length - keep.shape[1])
                updates["position_embeddings"] = self._rotary(layer, hidden, updates["position_ids"])
            return updates

        cos = kwargs["position_embeddings"][0]  # one table per layer type (Gemma 3)
        return {**kwargs, **self._memo((_DECODE, keep, mask, position_ids, cos), build)}


def _square_images(positions: torch.Tensor) -> tuple[int, int]:
    """(images, grid side) of the image tokens at sorted `positions` [B, N]: each contiguous run is one image; all
    must be square grids of one size, the same in every batch row."""
    breaks = positions[:, 1:] - positions[:, :-1] != 1
    starts = [0, *(breaks[0].nonzero().flatten() + 1).tolist(), positions.shape[1]]
    sizes = {end - start for start, end in itertools.pairwise(starts)}
    side = math.isqrt(max(sizes))
    if len(sizes) != 1 or side * side != max(sizes) or not torch.equal(breaks, breaks[:1].expand_as(breaks)):
        raise ValueError(
            f"recycle_cell: needs every image as a square grid of one size in every prompt, got image runs of "
            f"{sorted(sizes)} tokens"
        )
    return len(starts) - 1, side


def _true_indices(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Sorted indices [B, length] of the True entries of `mask` [B, L], which holds `length` of them in every row."""
    return mask.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :length]
