"""What an intervention is: a frozen settings object that binds to one model into a runtime owned by the handle."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..attention import AttentionRows
from ..layout import FamilySpec, TokenLayout

__all__ = ["CallState", "Intervention", "ModelContext", "Runtime"]


@dataclass
class ModelContext:
    """The model an intervention binds to: its family, the text decoder and a place to register removable hooks."""

    model: nn.Module
    family: FamilySpec
    image_token_id: int
    text_model: nn.Module
    hooks: list = field(default_factory=list)

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.text_model.layers)

    @property
    def num_heads(self) -> int:
        return self.text_model.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.text_model.config.hidden_size


@dataclass
class CallState:
    """Everything one generate (or forward) call accumulates; rebuilt at every prefill.

    lm_positions: [B, P'] original prompt position of each token entering the decoder (P' < P once tokens are pruned
    before layer 0). keep: per layer, [B, n] indices into those P' tokens that the layer (and its KV cache) holds.
    """

    layout: TokenLayout
    lm_positions: torch.Tensor
    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    decoding: bool = False
    _positions: dict = field(default_factory=dict)

    def kv_positions(self, layer: int, kv_len: int) -> torch.Tensor:
        """[B, kv] original positions of layer `layer`'s keys; decode tokens continue after the prompt."""
        keep = self.keep.get(layer)
        cache_key = (None if keep is None else id(keep), kv_len)
        if cache_key not in self._positions:
            lm_len = self.lm_positions.shape[1]
            batch, device = self.lm_positions.shape[0], self.lm_positions.device
            if keep is None:
                lm_index = torch.arange(kv_len, device=device).expand(batch, -1)
            else:
                tail = torch.arange(lm_len, lm_len + kv_len - keep.shape[1], device=device).expand(batch, -1)
                lm_index = torch.cat([keep, tail], 1)
            original = torch.where(
                lm_index < lm_len,
                self.lm_positions.gather(1, lm_index.clamp(max=lm_len - 1)),
                self.layout.prompt_len + lm_index - lm_len,
            )
            self._positions = {k: v for k, v in self._positions.items() if k[1] == kv_len}
            self._positions[cache_key] = original
        return self._positions[cache_key]

    def lookup(self, per_token: torch.Tensor, positions: torch.Tensor, fill: float | bool = False) -> torch.Tensor:
        """per_token [B, P] read at original `positions` [B, n]; positions past the prompt read `fill`."""
        padded = F.pad(per_token, (0, 1), value=fill)
        return padded.gather(1, positions.clamp(max=per_token.shape[1]))


class Runtime:
    """One intervention bound to one model; the handle calls these hooks. Per-call state lives on the runtime."""

    def start_call(self, call: CallState) -> None:
        """A new prefill begins: drop everything from the previous call."""

    def wants_attention(self, layer: int, call: CallState) -> bool:
        """Whether this layer's attention call needs explicit probabilities for this intervention."""
        return False

    def attention_rows(self, layer: int, call: CallState, row_positions: torch.Tensor) -> torch.Tensor:
        """[B, q] bool: the query rows (original positions given) this intervention reads or edits."""
        raise NotImplementedError

    def on_attention(self, rows: AttentionRows, selected: torch.Tensor) -> None:
        """Read or edit rows.probs in place; `selected` [B, R] marks the rows this intervention asked for."""

    def before_layer(self, layer: int, hidden: torch.Tensor, call: CallState) -> None:
        """Observe the residual stream entering decoder layer `layer` (after any pruning)."""

    def shorten_decoder_inputs(self, kwargs: dict, call: CallState) -> dict:
        """Edit the decoder's (language model's) forward kwargs; sequence-shortening interventions only."""
        return kwargs

    def shorten_layer_inputs(
        self, layer: int, hidden: torch.Tensor, kwargs: dict, call: CallState
    ) -> tuple[torch.Tensor, dict]:
        """Edit a decoder layer's input and kwargs; sequence-shortening interventions only."""
        return hidden, kwargs


class Intervention:
    """Settings of one training-free intervention; `bind` makes the runtime the handle owns."""

    def bind(self, context: ModelContext) -> Runtime:
        raise NotImplementedError
