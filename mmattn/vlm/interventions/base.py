"""What an intervention is: a frozen settings object that binds to one model into a runtime owned by the handle."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..attention import AttentionRows
from ..layout import FamilySpec, TokenLayout

__all__ = [
    "CACHE_ARGUMENTS",
    "LAST_ROW",
    "CallState",
    "Intervention",
    "ModelContext",
    "RowSelection",
    "Runtime",
    "check_indices",
    "check_number",
    "passed_cache",
]

#: The names of the decoders' KV-cache argument: `cache` from transformers 5.24 on, `past_key_values` before it (and a
#: deprecated alias of `cache` until 5.40).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def passed_cache(arguments: Mapping[str, object]) -> object | None:
    """The KV cache among a forward call's `arguments` (by name), under either of its names; None without one."""
    return next((arguments[name] for name in CACHE_ARGUMENTS if arguments.get(name) is not None), None)


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


@dataclass(frozen=True)
class RowSelection:
    """The query rows an intervention reads or edits: the last `tail` rows of a layer call, `selected` [B, tail]
    per batch row (None: all of them).

    Every intervention's rows lie after the prompt's last image token (the text that reads the image, decoded
    tokens); pruning removes image tokens only, so these rows keep their distance from the end in every layer.
    """

    tail: int
    selected: torch.Tensor | None = None

    @classmethod
    def from_prompt(cls, wanted: torch.Tensor) -> RowSelection:
        """The rows marked in `wanted` [B, P] (prompt positions); one host read per call."""
        first = wanted.any(0).nonzero()[:1].flatten().tolist()
        tail = wanted.shape[1] - first[0] if first else 0
        return cls(tail, wanted[:, wanted.shape[1] - tail :])

    def within(self, tail: int, batch: int, device: torch.device) -> torch.Tensor | None:
        """`selected` as [B, tail] for the last `tail` >= self.tail rows; None when that is every row."""
        if tail == self.tail:
            return self.selected
        if self.selected is None:
            return torch.arange(tail, device=device).expand(batch, -1) >= tail - self.tail
        return F.pad(self.selected, (tail - self.tail, 0), value=False)


#: The single query row of a decoding step (and the last prompt row), for every batch row.
LAST_ROW = RowSelection(1)


@dataclass
class CallState:
    """Everything one generate (or forward) call accumulates; rebuilt at every prefill.

    lm_positions: [B, P'] original prompt position of each token entering the decoder (P' < P once tokens are pruned
    before layer 0). keep: per layer, [B, n] indices into those P' tokens that the layer (and its KV cache) holds.
    cache: the KV cache object the prefill filled (its decoding steps pass the same one). backend: the handle's
    `backend` for the interventions' kernels.
    """

    layout: TokenLayout
    lm_positions: torch.Tensor
    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    decoding: bool = False
    cache: object | None = None
    backend: str = "auto"
    _positions: tuple = (None, None)

    def prompt_len(self, layer: int) -> int:
        """How many prompt tokens layer `layer` (and its KV cache) holds."""
        keep = self.keep.get(layer)
        return self.lm_positions.shape[1] if keep is None else keep.shape[1]

    def prompt_positions(self, layer: int) -> torch.Tensor | None:
        """[B, n] original positions of the prompt tokens layer `layer` holds; None when that is the whole prompt."""
        keep = self.keep.get(layer)
        if keep is None:
            return None if self.lm_positions.shape[1] == self.layout.prompt_len else self.lm_positions
        if self._positions[0] is not keep:
            self._positions = (keep, self.lm_positions.gather(1, keep))
        return self._positions[1]

    def at_layer(self, layer: int, per_token: torch.Tensor) -> torch.Tensor:
        """per_token [B, P] (over the prompt) read at the prompt tokens layer `layer` holds: [B, n]."""
        positions = self.prompt_positions(layer)
        return per_token if positions is None else per_token.gather(1, positions)

    def kv_positions(self, layer: int, kv_len: int) -> torch.Tensor:
        """[B, kv] original positions of layer `layer`'s keys; decode tokens continue after the prompt."""
        prompt = self.prompt_positions(layer)
        batch, device = self.lm_positions.shape[0], self.lm_positions.device
        if prompt is None:
            return torch.arange(kv_len, device=device).expand(batch, -1)
        tail = torch.arange(self.layout.prompt_len, self.layout.prompt_len + kv_len - prompt.shape[1], device=device)
        return torch.cat([prompt, tail.expand(batch, -1)], 1)

    def lookup(self, per_token: torch.Tensor, positions: torch.Tensor, fill: float | bool = False) -> torch.Tensor:
        """per_token [B, P] read at original `positions` [B, n]; positions past the prompt read `fill`."""
        padded = F.pad(per_token, (0, 1), value=fill)
        return padded.gather(1, positions.clamp(max=per_token.shape[1]))


class Runtime:
    """One intervention bound to one model; the handle calls these hooks. Per-call state lives on the runtime."""

    #: True while this runtime runs an extra forward of the decoder of its own (GIFT's saliency prefill); the
    #: handle then calls no other runtime's hooks.
    in_auxiliary_pass: bool = False

    def start_call(self, call: CallState) -> None:
        """A new prefill begins: drop everything from the previous call."""

    def wants_attention(self, layer: int, call: CallState) -> bool:
        """Whether this layer's attention call needs explicit probabilities for this intervention."""
        return False

    def attention_rows(self, layer: int, call: CallState) -> RowSelection:
        """The query rows this intervention reads or edits in this layer call."""
        raise NotImplementedError

    def on_attention(self, rows: AttentionRows) -> None:
        """Read or edit rows.probs in place (rows.selected marks the rows this intervention asked for)."""

    def fuses(self, layer: int, call: CallState) -> bool:
        """Whether `fused_rows` computes this layer's edited rows (else the explicit-probabilities path does)."""
        return False

    def fused_rows(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None,
        selected: torch.Tensor | None, scale: float, call: CallState, backend: str, out: torch.Tensor | None,
    ) -> torch.Tensor:
        """The edited attention output [B, H, R, D] of this intervention's last R query rows `query` [B, H, R, D]
        (`attention_rows`; `selected` [B, R] the rows it edits, None: all) by a fused kernel over the keys (`visible`
        [B, R, kv] bool or None: every key) on the column-set `backend` the handle resolved, written into `out`
        where given (the last rows of the layer's attention output). Called where `fuses` says so."""
        raise NotImplementedError

    def observes_layers(self) -> bool:
        """Whether the handle hooks the decoder layers for this runtime (`before_layer`, `shorten_layer_inputs`):
        where its class overrides either. A module hook costs every layer call of every decoding step."""
        cls = type(self)
        return (cls.before_layer is not Runtime.before_layer
                or cls.shorten_layer_inputs is not Runtime.shorten_layer_inputs)

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


def check_number(
    name: str,
    value: object,
    low: float,
    high: float = math.inf,
    what: str = "a number",
    open_low: bool = False,
    integer: bool = False,
) -> None:
    """A setting's check: TypeError unless `value` is a real number (an int with `integer`), ValueError unless it lies
    in [low, high] ((low, high] with `open_low`); both name the argument, the expected and the received value."""
    expected = f"{name}: expected {what} in {'(' if open_low else '['}{low}, {high}{')' if high == math.inf else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{expected}, got {value!r}")
    if not (low < value if open_low else low <= value) or not value <= high:
        raise ValueError(f"{expected}, got {value!r}")


def check_indices(
    name: str, indices: Iterable[int], minimum: int = 0, ascending: bool = True, what: str = "layer indices"
) -> None:
    """A setting's check: a sequence of indices (layers, dimensions), ints >= `minimum`, strictly ascending if
    `ascending`; TypeError or ValueError naming the argument, the expected and the received value."""
    expected = f"{name}: expected a sequence of {'strictly ascending ' if ascending else ''}{what} >= {minimum}"
    values = list(indices) if isinstance(indices, Iterable) and not isinstance(indices, str) else None
    if values is None or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{expected}, got {indices!r}")
    if any(v < minimum for v in values) or (ascending and values != sorted(set(values))):
        raise ValueError(f"{expected}, got {values}")


class Intervention:
    """Settings of one training-free intervention; `bind` makes the runtime the handle owns."""

    def bind(self, context: ModelContext) -> Runtime:
        raise NotImplementedError
