"""GIFT, Gaze Shift-Guided Cross-modal Fusion Enhancement (arXiv 2510.22067).

Saliency: while the query is read, the positive change of each image token's attention from one query token to the
next ("gaze shift") is averaged over informative query words and the top half of heads of the saliency layers, then
clamped to mean ± 3σ, min-max scaled and turned into multipliers M_j = exp(α·Ŝ_j). Enhancement: at every decoding
step (and the last prompt row) in the enhancement layers, the top half of "vision heads" multiply their image
attention by M, the top half of "query heads" multiply their query attention by β·r (r = the vision heads' gain), and
each row is rescaled to its original mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..attention import AttentionRows
from .base import CallState, Intervention, ModelContext, Runtime
from .words import WordSelector, content_words

__all__ = ["GIFT"]


class _SaliencyReady(Exception):
    """Stops the extra saliency pass once its last layer has run."""


@dataclass(frozen=True)
class GIFT(Intervention):
    """Gaze-shift guided attention enhancement. Defaults: LLaVA-1.5-7B (saliency [11], enhance 12-22, α 5).

    tokenizer: to pick informative query words with `word_selector` (default: content words without spaCy;
    `spacy_content_words()` is the official POS rule); without a tokenizer every query token counts.
    When a saliency layer is not before every enhancement layer (Qwen2-VL-7B: [14] vs 5-18) the map comes from an
    extra prefill of the decoder that stops after the last saliency layer, as the official code's extra pass.
    """

    alpha: float = 5.0
    saliency_layers: Sequence[int] = (11,)
    enhance_layers: Sequence[int] = tuple(range(12, 23))
    beta: float = 1.0
    tokenizer: object | None = field(default=None, compare=False)
    word_selector: WordSelector = content_words

    def bind(self, context: ModelContext) -> Runtime:
        if self.alpha < 0:
            raise ValueError(f"alpha: expected a non-negative strength, got {self.alpha}")
        for name in ("saliency_layers", "enhance_layers"):
            layers = list(getattr(self, name))
            if not layers or any(not 0 <= layer < context.num_layers for layer in layers):
                raise ValueError(f"{name}: expected layers in [0, {context.num_layers}), got {layers}")
        return _GIFTRuntime(self, context)


class _GIFTRuntime(Runtime):
    def __init__(self, settings: GIFT, context: ModelContext) -> None:
        self.settings, self.context = settings, context
        self.saliency_layers = frozenset(settings.saliency_layers)
        self.enhance_layers = frozenset(settings.enhance_layers)
        self.extra_pass = max(self.saliency_layers) >= min(self.enhance_layers)
        self.call: CallState | None = None
        self.in_saliency_pass = False

    def start_call(self, call: CallState) -> None:
        self.call = call
        self.saliency_sum: torch.Tensor | None = None
        self.multiplier: torch.Tensor | None = None
        self.informative = call.layout.query & self._informative_tokens(call)

    def _informative_tokens(self, call: CallState) -> torch.Tensor:
        tokenizer, layout = self.settings.tokenizer, call.layout
        if tokenizer is None:
            return torch.ones_like(layout.query)
        informative = torch.zeros_like(layout.query)
        for row in range(layout.query.shape[0]):
            positions = layout.query[row].nonzero().flatten()
            tokens = tokenizer.convert_ids_to_tokens(layout.input_ids[row, positions].tolist())
            informative[row, positions] = torch.tensor(self.settings.word_selector(tokens), dtype=torch.bool)
        return informative

    # -- extra saliency pass -------------------------------------------------------------------------------------
    def shorten_decoder_inputs(self, kwargs: dict, call: CallState) -> dict:
        if self.extra_pass and not call.decoding and not self.in_saliency_pass:
            self.in_saliency_pass = True
            try:
                self.context.text_model(**{**kwargs, "past_key_values": None, "use_cache": False})
            except _SaliencyReady:
                pass
            finally:
                self.in_saliency_pass = False
        return kwargs

    def before_layer(self, layer: int, hidden: torch.Tensor, call: CallState) -> None:
        if self.in_saliency_pass and layer > max(self.saliency_layers):
            raise _SaliencyReady

    # -- attention -----------------------------------------------------------------------------------------------
    def _collects_saliency(self, layer: int, call: CallState) -> bool:
        return (
            not call.decoding and layer in self.saliency_layers and (self.in_saliency_pass or not self.extra_pass)
        )

    def wants_attention(self, layer: int, call: CallState) -> bool:
        if self._collects_saliency(layer, call):
            return True
        return layer in self.enhance_layers and not self.in_saliency_pass

    def attention_rows(self, layer: int, call: CallState, row_positions: torch.Tensor) -> torch.Tensor:
        if self._collects_saliency(layer, call):
            query = call.lookup(self.informative, row_positions)
            before_query = call.lookup(self.informative, row_positions + 1)
            return query | before_query
        rows = torch.zeros_like(row_positions, dtype=torch.bool)
        rows[:, -1] = True
        return rows

    def on_attention(self, rows: AttentionRows, selected: torch.Tensor) -> None:
        if self._collects_saliency(rows.layer, self.call):
            self._collect(rows)
            if rows.layer == max(self.saliency_layers):
                self._finish_saliency()
        elif rows.layer in self.enhance_layers:
            self._enhance(rows, selected)

    def _collect(self, rows: AttentionRows) -> None:
        """Gaze shifts D = max(A[i] - A[i-1], 0) on image columns of informative query rows, top H//2 heads."""
        call = self.call
        probs = rows.probs.float()
        image = call.lookup(call.layout.image, rows.kv_positions)[:, None, None, :]
        positions = rows.row_positions
        consecutive = positions[:, 1:] == positions[:, :-1] + 1
        counted = (call.lookup(self.informative, positions[:, 1:]) & consecutive)[:, None, :, None]
        shifts = (probs[:, :, 1:] - probs[:, :, :-1]).clamp_min(0) * image * counted
        heads = shifts.sum((2, 3)).topk(probs.shape[1] // 2 or 1, dim=1).indices
        kept = torch.zeros(probs.shape[:2], dtype=torch.bool, device=probs.device).scatter_(1, heads, True)
        per_column = (shifts * kept[:, :, None, None]).sum((1, 2))
        count = (kept.sum(1) * counted.sum((1, 2, 3))).clamp_min(1)[:, None]
        saliency = torch.zeros(call.layout.image.shape, device=probs.device)
        saliency.scatter_(1, rows.kv_positions.clamp(max=call.layout.prompt_len - 1), per_column / count)
        self.saliency_sum = saliency if self.saliency_sum is None else self.saliency_sum + saliency

    def _finish_saliency(self) -> None:
        """Clamp to mean ± 3σ over each row's image tokens, min-max scale, M = exp(α Ŝ); 1 off the image."""
        image = self.call.layout.image
        multiplier = torch.ones(image.shape, device=image.device)
        for row in range(image.shape[0]):
            values = self.saliency_sum[row, image[row]] / len(self.saliency_layers)
            mean, std = values.mean(), values.std(unbiased=False)
            values = values.clamp(mean - 3 * std, mean + 3 * std)
            spread = values.max() - values.min()
            scaled = (values - values.min()) / spread if spread > 0 else torch.zeros_like(values)
            multiplier[row, image[row]] = torch.exp(self.settings.alpha * scaled)
        self.multiplier = multiplier

    def _enhance(self, rows: AttentionRows, selected: torch.Tensor) -> None:
        if self.multiplier is None:
            return
        call, beta = self.call, self.settings.beta
        probs = rows.probs.float()
        image = call.lookup(call.layout.image, rows.kv_positions)[:, None, None, :]
        query = call.lookup(call.layout.query, rows.kv_positions)[:, None, None, :]
        multiplier = call.lookup(self.multiplier, rows.kv_positions, fill=1.0)[:, None, None, :]
        half = probs.shape[1] // 2 or 1

        def top_heads(mass: torch.Tensor) -> torch.Tensor:
            indices = mass.topk(half, dim=1).indices
            return torch.zeros_like(mass, dtype=torch.bool).scatter_(1, indices, True)[..., None]

        vision_heads = top_heads((probs * image).sum(-1)) & image
        query_heads = top_heads((probs * query).sum(-1)) & query
        boosted = torch.where(vision_heads, probs * multiplier, probs)
        old_mass = (probs * vision_heads).sum((1, 3), keepdim=True)
        gain = (boosted * vision_heads).sum((1, 3), keepdim=True) / old_mass.clamp_min(torch.finfo(torch.float32).tiny)
        boosted = torch.where(query_heads, boosted * (beta * gain), boosted)
        boosted = boosted * (probs.sum(-1, keepdim=True) / boosted.sum(-1, keepdim=True))
        rows.probs.copy_(torch.where(selected[:, None, :, None], boosted, probs))
