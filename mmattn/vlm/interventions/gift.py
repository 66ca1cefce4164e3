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

from ...kernels import ranked_head_attention
from ...kernels.reference import top_half_heads
from ..attention import AttentionRows, LayerColumns, column_masses, scale_columns
from .base import (
    CACHE_ARGUMENTS,
    LAST_ROW,
    CallState,
    Intervention,
    ModelContext,
    RowSelection,
    Runtime,
    check_indices,
    check_number,
)
from .words import WordSelector, content_words

__all__ = ["GIFT"]

_TINY = torch.finfo(torch.float32).tiny


class _SaliencyReady(Exception):
    """Stops the extra saliency pass once its last layer has run."""


@dataclass(frozen=True)
class GIFT(Intervention):
    """Gaze-shift guided attention enhancement. Defaults: LLaVA-1.5-7B (saliency [11], enhance 12-22, α 5).

    tokenizer: to pick informative query words with `word_selector` (default: content words without spaCy;
    `spacy_content_words()` is the official POS rule); without a tokenizer every query token counts.
    When a saliency layer is not before every enhancement layer (Qwen2-VL-7B: [14] vs 5-18) the map comes from an
    extra prefill of the decoder that stops after the last saliency layer, as the official code's extra pass. That
    pass runs the plain decoder on the full prompt: other interventions of the same apply() (pruning, VAR) sit it out
    and act in the real prefill only.
    """

    alpha: float = 5.0
    saliency_layers: Sequence[int] = (11,)
    enhance_layers: Sequence[int] = tuple(range(12, 23))
    beta: float = 1.0
    tokenizer: object | None = field(default=None, compare=False)
    word_selector: WordSelector = content_words

    def __post_init__(self) -> None:
        check_number("alpha", self.alpha, 0.0, what="the strength α")
        check_number("beta", self.beta, 0.0, what="the query gain β")
        for name in ("saliency_layers", "enhance_layers"):
            check_indices(name, getattr(self, name), ascending=False)
            if not getattr(self, name):
                raise ValueError(f"{name}: expected at least one layer, got none")
        if not callable(self.word_selector):
            raise TypeError(f"word_selector: expected a callable on token strings, got {self.word_selector!r}")

    def bind(self, context: ModelContext) -> Runtime:
        for name in ("saliency_layers", "enhance_layers"):
            layers = list(getattr(self, name))
            if max(layers) >= context.num_layers:
                raise ValueError(f"{name}: expected layers in [0, {context.num_layers}), got {layers}")
        return _GIFTRuntime(self, context)


class _GIFTRuntime(Runtime):
    def __init__(self, settings: GIFT, context: ModelContext) -> None:
        self.settings, self.context = settings, context
        self.saliency_layers = frozenset(settings.saliency_layers)
        self.enhance_layers = frozenset(settings.enhance_layers)
        self.extra_pass = max(self.saliency_layers) >= min(self.enhance_layers)
        self.call: CallState | None = None
        self.in_auxiliary_pass = False

    def start_call(self, call: CallState) -> None:
        self.call = call
        self.saliency_sum: torch.Tensor | None = None
        self.multiplier: torch.Tensor | None = None
        self.moves: dict[int, torch.Tensor] = {}
        self.masses = LayerColumns(self.context.num_layers)
        self.informative = call.layout.query & self._informative_tokens(call)
        before_informative = torch.nn.functional.pad(self.informative[:, 1:], (0, 1), value=False)
        self.saliency_rows = RowSelection.from_prompt(self.informative | before_informative)

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
        if self.extra_pass and not call.decoding and not self.in_auxiliary_pass:
            self.in_auxiliary_pass = True
            try:
                uncached = {name: value for name, value in kwargs.items() if name not in CACHE_ARGUMENTS}
                self.context.text_model(**{**uncached, "use_cache": False})
            except _SaliencyReady:
                pass
            finally:
                self.in_auxiliary_pass = False
        return kwargs

    def observes_layers(self) -> bool:
        return self.extra_pass  # only the extra saliency pass stops at a layer

    def before_layer(self, layer: int, hidden: torch.Tensor, call: CallState) -> None:
        if self.in_auxiliary_pass and layer > max(self.saliency_layers):
            raise _SaliencyReady

    # -- attention -----------------------------------------------------------------------------------------------
    def _collects_saliency(self, layer: int, call: CallState) -> bool:
        return (
            not call.decoding and layer in self.saliency_layers and (self.in_auxiliary_pass or not self.extra_pass)
        )

    def wants_attention(self, layer: int, call: CallState) -> bool:
        if self._collects_saliency(layer, call):
            return True
        return layer in self.enhance_layers and self.multiplier is not None and not self.in_auxiliary_pass

    def attention_rows(self, layer: int, call: CallState) -> RowSelection:
        return self.saliency_rows if self._collects_saliency(layer, call) else LAST_ROW

    def on_attention(self, rows: AttentionRows) -> None:
        if self._collects_saliency(rows.layer, self.call):
            self._collect(rows)
            if rows.layer == max(self.saliency_layers):
                self._finish_saliency()
        else:
            self._enhance(rows)

    def _collect(self, rows: AttentionRows) -> None:
        """Gaze shifts D = max(A[i] - A[i-1], 0) on image columns of informative query rows, top H//2 heads.

        The rows are the prompt's last ones, from the row before its first informative token on."""
        call = self.call
        probs = rows.probs[..., : rows.prompt_len]
        image = call.at_layer(rows.layer, call.layout.image)[:, None, None, :]
        counted = self.informative[:, call.layout.prompt_len - probs.shape[2] + 1 :][:, None, :, None]
        shifts = (probs[:, :, 1:] - probs[:, :, :-1]).clamp_min(0) * image * counted
        kept = top_half_heads(shifts.sum((2, 3)))
        per_column = (shifts * kept[:, :, None, None]).sum((1, 2))
        count = (kept.sum(1) * counted.sum((1, 2, 3))).clamp_min(1)[:, None]
        saliency = per_column / count
        positions = call.prompt_positions(rows.layer)
        if positions is not None:
            saliency = torch.zeros(call.layout.image.shape, device=probs.device).scatter_(1, positions, saliency)
        self.saliency_sum = saliency if self.saliency_sum is None else self.saliency_sum + saliency

    def _finish_saliency(self) -> None:
        """Clamp to mean ± 3σ over each row's image tokens, min-max scale, M = exp(α Ŝ); 1 off the image. σ is the
        sample standard deviation (N - 1), the official code's `torch.std`."""
        image = self.call.layout.image
        values = self.saliency_sum / len(self.saliency_layers)
        count = image.sum(1, keepdim=True)
        mean = (values * image).sum(1, keepdim=True) / count
        std = (((values - mean) * image).pow(2).sum(1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
        values = values.clamp(mean - 3 * std, mean + 3 * std)
        low = values.masked_fill(~image, float("inf")).amin(1, keepdim=True)
        spread = values.masked_fill(~image, float("-inf")).amax(1, keepdim=True) - low
        scaled = torch.where(spread > 0, (values - low) / spread, 0.0)
        self.multiplier = torch.where(image, torch.exp(self.settings.alpha * scaled), 1.0)

    def _enhance_columns(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`masses` [B, P, 3] (image, image·(M-1), query; one buffer for every layer) and `moves` [B, 2, P]
        (image·(M-1), query) of a layer."""
        if layer not in self.masses:
            call = self.call
            image = call.at_layer(layer, call.layout.image).float()
            query = call.at_layer(layer, call.layout.query).float()
            boost = image * (call.at_layer(layer, self.multiplier) - 1)
            self.masses.put(layer, torch.stack([image, boost, query], -1), call.lm_positions.shape[1])
            self.moves[layer] = torch.stack([boost, query], 1)
        return self.masses[layer], self.moves[layer]

    def _enhance(self, rows: AttentionRows) -> None:
        """Vision heads (top H//2 by image mass) scale image column j by M_j; query heads (top H//2 by query mass)
        scale the query columns by β·r, r = the vision heads' image mass gain; each row keeps its mass."""
        masses, moves = self._enhance_columns(rows.layer)
        mass = column_masses(rows, masses)
        heads = top_half_heads(mass[..., ::2])
        vision = (heads[..., :1] * mass[..., :2]).sum(1, keepdim=True)
        gain = vision[..., 1:] / vision[..., :1].clamp_min(_TINY)  # r - 1
        if self.settings.beta != 1:
            gain = self.settings.beta * (1 + gain) - 1
        coefficients = heads  # (vision heads, query heads · (β r - 1)) for the moves (image·(M-1), query)
        coefficients[..., 1:].mul_(gain)
        if rows.selected is not None:
            coefficients.mul_(rows.selected[:, None, :, None])
        before = rows.probs.sum(-1, keepdim=True)
        scale_columns(rows, coefficients, moves)
        rows.probs.mul_(before / rows.probs.sum(-1, keepdim=True))

    def fuses(self, layer: int, call: CallState) -> bool:
        return not self._collects_saliency(layer, call)  # the saliency reads many rows' probabilities: explicit

    def fused_rows(self, layer, query, key, value, visible, selected, scale, call, backend, out):
        masses, _ = self._enhance_columns(layer)
        return ranked_head_attention(query, key, value, masses, beta=self.settings.beta, visible=visible, scale=scale,
                                     backend=backend, out=out)

