"""VAR, Visual Attention Redistribution (Kang et al., "See What You Are Told: Visual Attention Sink in Large
Multimodal Models", ICLR 2025).

Visual sink tokens carry massive activations in a few fixed "sink dimensions" of the residual stream; image-centric
heads waste attention on them. VAR moves a share `p` of the sink tokens' attention to the non-sink image tokens of the
image-centric heads, in proportion to the attention those tokens already receive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...kernels import massive_activation_tokens, sink_redistribution_attention
from ...kernels.reference import massive_activation_scores
from ..attention import AttentionRows, LayerColumns, column_masses, scale_columns
from .base import LAST_ROW, CallState, Intervention, ModelContext, RowSelection, Runtime, check_indices, check_number

__all__ = ["KNOWN_SINK_DIMS", "VAR", "find_sink_dims", "sink_scores"]

#: Sink dimensions per (text model_type, hidden size). LLaMA-2 values from the official code (src/logic/constants.py;
#: the code never selects its 13B entry, so its LLaVA-1.5-13B runs used the 7B dims); the Qwen2-VL-7B value is a
#: third-party port's, not verified: check it with `find_sink_dims` before relying on it.
KNOWN_SINK_DIMS: Mapping[tuple[str, int], tuple[int, ...]] = {
    ("llama", 4096): (2533, 1415),
    ("llama", 5120): (2100, 4743),
    ("qwen2_vl", 3584): (458, 2570),
}
_DETECTION_START_LAYER = 2


sink_scores = massive_activation_scores
"""phi(x) = max_{d in D_sink} |x_d| / RMS(x), RMS without weight and eps 1e-6, in fp32: [..., tokens]."""


@dataclass(frozen=True)
class VAR(Intervention):
    """Visual attention sink detection and redistribution.

    The defaults reproduce the released configuration (MICV-yonsei/VisAttnSink, A_exps/lv1.5_7b.yml: tau 20, rho 0.5,
    p 0.6, summ 0.2, except_last_layer 1) as its code runs it. Each parameter keeps the paper's meaning:

    Args:
        p: share of the sinks' attention REMOVED and given to the image tokens (paper Eq. 4: a_sink <- (1-p) a_sink).
            The code's `p` is the share kept: the default 0.4 is its p = 0.6. p = 0 is the identity.
        tau: sink threshold on phi (strict `>`, as the code; the paper writes >=).
        rho: image-centric rule, visual non-sink ratio sum_{V\\sink} A / sum_V A >= rho (paper Eq. 3). The code's
            `portion <= rho` bounds the visual-sink share instead (its rho is 1 - this one); both are 0.5 by default.
            The code's +1e-6 per image column in that ratio's denominator (a zero guard, which moves the threshold by
            at most (1-rho)·N·1e-6 of attention mass) is left out, so the fused decoding kernel decides alike.
        min_visual_mass: a (head, row) also needs sum_V A >= this (the code's `summ`).
        sink_dims: D_sink; None looks the backbone up in KNOWN_SINK_DIMS.
        except_last_layer: leave the last layer unmodified, as the paper states. Default False, as the code runs:
            its flag is dead (a class attribute shadows it), so the released runs edit the last layer too.
    Sinks are detected in the prefill from layer 2 on and reused while decoding. In a layer where a prompt has no
    visual sink the code selects no head, so that layer is left alone for that prompt (even if it has text sinks).
    Elsewhere the sinks' attention (visual and text sinks, as the code) is reduced and only non-sink image tokens
    receive the budget. Rows edited: prompt tokens after the last image and every decoded token, per (batch, head,
    row).
    """

    p: float = 0.4
    tau: float = 20.0
    rho: float = 0.5
    min_visual_mass: float = 0.2
    sink_dims: tuple[int, ...] | None = None
    except_last_layer: bool = False

    def __post_init__(self) -> None:
        for name in ("p", "rho", "min_visual_mass"):
            check_number(name, getattr(self, name), 0.0, 1.0)
        check_number("tau", self.tau, 0.0, what="the sink threshold on phi")
        if self.sink_dims is not None:
            check_indices("sink_dims", self.sink_dims, ascending=False, what="hidden dimensions")
            if not self.sink_dims:
                raise ValueError("sink_dims: expected at least one dimension, got an empty sequence")

    def bind(self, context: ModelContext) -> Runtime:
        config = context.text_model.config
        dims = self.sink_dims
        if dims is None:
            key = (config.model_type.removesuffix("_text"), config.hidden_size)
            if key not in KNOWN_SINK_DIMS:
                raise ValueError(
                    f"sink_dims: no known sink dimensions for {key}; find them with find_sink_dims(model, inputs)"
                )
            dims = KNOWN_SINK_DIMS[key]
        bad = [d for d in dims if not 0 <= d < config.hidden_size]
        if bad:
            raise ValueError(f"sink_dims: expected indices in [0, {config.hidden_size}), got {bad}")
        last = context.num_layers - 1 if self.except_last_layer else context.num_layers
        return _VARRuntime(self, tuple(dims), range(_DETECTION_START_LAYER, last), context.num_layers)


class _VARRuntime(Runtime):
    """Per layer, the sinks found in the prefill become column sets: `masses` [B, P, 4] (receivers - rho image,
    image, receivers, sinks), whose attention masses decide the image-centric rows and the budget, and `moves`
    [B, 2, P] (-p sinks, p receivers), whose scaling by (1, Ω / receiver mass) is the redistribution; the fused
    decoding kernel takes (image, receivers, sinks) [B, P, 3] (`fused`, one buffer for every layer). Receivers are
    the image tokens that are not sinks, so every set is a combination of three flags per token (image, sink, image
    sink): one matmul with `_combinations` makes all nine columns of a layer."""

    def __init__(self, settings: VAR, dims: tuple[int, ...], layers: range, num_layers: int) -> None:
        self.settings, self.dims, self.layers, self.num_layers = settings, dims, layers, num_layers
        self.sinks: dict[int, torch.Tensor] = {}
        self.columns: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fused = LayerColumns(num_layers)

    def start_call(self, call: CallState) -> None:
        self.sinks, self.columns, self.fused = {}, {}, LayerColumns(self.num_layers)
        self.prompt_rows = RowSelection.from_prompt(call.layout.after_last_image())
        device = call.layout.image.device
        smallest = torch.finfo(torch.float32).smallest_normal
        self.thresholds = torch.tensor([0.0, self.settings.min_visual_mass, smallest], device=device)
        self.dim_index = torch.tensor(self.dims, device=device)
        self.combinations = self._combinations(device)

    def _combinations(self, device: torch.device) -> torch.Tensor:
        """[3, 9] float32: the column sets (masses, moves, fused; see the class) from the flags (image, sink, image
        sink). 1 - rho is rounded once in float32, as `receivers - rho * image` rounds it."""
        rho, p = torch.tensor([self.settings.rho, self.settings.p], dtype=torch.float32)
        masses = [[1 - rho, 1, 1, 0], [0, 0, 0, 1], [-1, 0, -1, 0]]
        moves = [[0, p], [-p, 0], [0, -p]]
        fused = [[1, 1, 0], [0, 0, 1], [0, -1, 0]]
        return torch.tensor([a + b + c for a, b, c in zip(masses, moves, fused)], dtype=torch.float32, device=device)

    def before_layer(self, layer: int, hidden: torch.Tensor, call: CallState) -> None:
        """Sink detection in the prefill: I_sink = {j : phi(h_j) > tau} among the tokens this layer holds. The layer
        is edited only in the prompts where a sink is an image token (the code's head selection needs one): the
        others get an empty sink set, so nothing moves in them (their edit scales by zero, which keeps every bit)
        and the host never waits on the device to find out which prompts those are."""
        if call.decoding or layer not in self.layers:
            return
        sinks = massive_activation_tokens(hidden, self.dim_index, threshold=self.settings.tau, backend=call.backend)
        sinks &= call.at_layer(layer, call.layout.valid)
        self.sinks[layer] = sinks
        image = call.at_layer(layer, call.layout.image)
        image_sinks = sinks & image
        visual = image_sinks.any(1, keepdim=True)
        sets = torch.stack([image, sinks & visual, image_sinks & visual], -1).float() @ self.combinations
        self.columns[layer] = sets[..., :4], sets[..., 4:6].transpose(1, 2)
        self.fused.put(layer, sets[..., 6:], call.lm_positions.shape[1])

    def wants_attention(self, layer: int, call: CallState) -> bool:
        return layer in self.fused

    def attention_rows(self, layer: int, call: CallState) -> RowSelection:
        return LAST_ROW if call.decoding else self.prompt_rows

    def on_attention(self, rows: AttentionRows) -> None:
        """Image-centric rows (sum_{V\\sink} A >= rho sum_V A, sum_V A >= min mass, sum_{V\\sink} A > 0): sinks keep
        1-p of their attention, receivers gain p * sum_sink A in proportion to their own attention."""
        masses, moves = self.columns[rows.layer]
        mass = column_masses(rows, masses)
        other = (mass[..., :3] < self.thresholds).any(-1, keepdim=True)
        if rows.selected is not None:
            other |= ~rows.selected[:, None, :, None]
        # coefficients of the moves (-p sinks, p receivers): 1 and sum_sink A / sum_receivers A
        scale_columns(rows, (mass[..., 2:] / mass[..., 2:3]).masked_fill_(other, 0.0), moves)

    def fuses(self, layer: int, call: CallState) -> bool:
        return True

    def fused_rows(self, layer, query, key, value, visible, selected, scale, call, backend, out):
        settings = self.settings
        return sink_redistribution_attention(
            query, key, value, self.fused[layer], share=settings.p, rho=settings.rho,
            min_mass=settings.min_visual_mass, visible=visible, selected=selected, scale=scale, backend=backend,
            out=out,
        )


@torch.no_grad()
def find_sink_dims(model: nn.Module, inputs: Mapping[str, torch.Tensor], top: int = 2) -> list[int]:
    """The `top` residual-stream dimensions with the most massive activations, for a backbone without known D_sink.

    Scans max_tokens |h_d| / RMS(h) over the inputs of decoder layers >= 2 (where the paper finds the massive
    activations), ignoring padding; returns dimension indices, largest first.
    """
    if top < 1:
        raise ValueError(f"top: expected a positive count, got {top}")
    outputs = model(**inputs, output_hidden_states=True)
    valid = inputs.get("attention_mask")
    scores = None
    for hidden in outputs.hidden_states[_DETECTION_START_LAYER:-1]:
        hidden = hidden.float()
        ratio = hidden.abs() / hidden.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        if valid is not None:
            ratio = ratio * valid[..., None].to(ratio.dtype)
        layer_scores = ratio.flatten(0, 1).amax(0)
        scores = layer_scores if scores is None else torch.maximum(scores, layer_scores)
    if scores is None:
        raise ValueError(f"model: needs more than {_DETECTION_START_LAYER + 1} decoder layers to scan, got fewer")
    return scores.topk(top).indices.tolist()
