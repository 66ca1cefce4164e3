"""LVLM interventions: decoding overhead of VAR and GIFT (eager, and compiled static-cache decoding) and the prefill
speed-up and KV-cache saving of visual-token pruning, on random-weight models of the published sizes, in one process.

GPU:   python benchmarks/vlm.py          (bf16; writes benchmarks/results/vlm.md after every section)
       python benchmarks/vlm.py --fast   (fewer new tokens and rounds: same rows, same checks, noisier medians)
CPU:   python benchmarks/vlm.py --quick  (tiny configs, smoke test only; prints the tables)

Sections, in the order they run (each prints a timestamp when it starts, and the results file is rewritten after each,
so a run cut short keeps what it measured):

1. Pruning, batch of 8 left-padded prompts: prefill time (`generate(max_new_tokens=1)`) and image-token KV bytes of
   FastV, PyramidDrop, VFlowOpt, VisionZip, DivPrune and random pruning (90 % of the visual tokens where the method
   takes a ratio) against no pruning, on LLaVA-1.5-7B (576 image tokens), Qwen2.5-VL-7B and Qwen3-VL-8B (one 1,024-token
   image) and Gemma-3-4B (256 image tokens), each method on the families it supports.
2. Decoding, one 651-token LLaVA-1.5-7B prompt: total latency of greedy generation with no intervention, VAR and GIFT
   (their decode rows fused, and on the explicit path) in eager decoding (dynamic cache), and of no intervention, VAR
   and GIFT in transformers' compiled decoding (`cache_implementation="static"`, the decoding step compiled with
   `torch.compile` through `generate(compile_config=CompileConfig())`, inductor in "reduce-overhead" mode; warmed up
   before timing; the dynamo graphs compiled during the timed rounds are counted and reported).

Every row is timed in interleaved rounds: each round runs every row of its section once (in an order rotated from
round to round), so drifts of the shared host's speed hit all rows alike; tables give medians and least times, and
each ratio is the median over rounds of the row's time over the plain row's time in the same round and mode. Rounds
of a second or so (pruning at LLaVA's size, compiled decoding) run `SHORT_ROUND_FACTOR` times as often as eager
decoding rounds: host-bound pruned prefills vary by a third from round to round on a busy host (62-93 ms in one H200
run), and compiled GIFT's median over three rounds was 1.13x plain where its least time was 1.03x. Each
method runs on its own copy of the model's modules over the one set of weights (`twin`; its eager and compiled rows
share it), with its interventions applied once: hooks and compiled graphs stay put for the whole run. On the GPU no
timing round starts past a time budget (`--time-budget`, 540 s from the start), so that one 600-second call brings
back every section, with fewer rounds where compilation took long.

Checks before timing; a row whose check fails is not timed (the table says why) and the run exits non-zero:
- VAR's and GIFT's fused decode rows (`backend="auto"`) against their explicit ones (`backend="torch"`): the logits of
  the prefill and of the first decoding step may differ by at most 2x the model's noise floor (SDPA vs eager attention
  for the unedited model, same logits) + 1e-3 x max(1, max|logit|) (benchmarks/common.py `judge`);
- compiled static-cache decoding against eager dynamic-cache decoding of the same row, on the prefill logits and the
  first compiled decoding step's: plain decoding within that noise floor or with all greedy tokens equal (the number
  of equal tokens is shown); VAR and GIFT within 2x the larger of the noise floor and plain decoding's own
  compiled-vs-eager difference (transformers' compilation is the peer), + the same slack;
- pruning: the KV cache of each layer after the prefill holds as many image tokens as the method's own rule says
  (FastV: round(N(1-R)) from layer K; PyramidDrop: floor(N λ^s) from stage s; VFlowOpt: its top tokens plus one per
  recycling cell, then k - round(k(1-r)) per LLM stage (`vflowopt_rule`); VisionZip: dominant + contextual; DivPrune
  and random: round(N keep)), computed here independently of the engine.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

START = time.monotonic()

import torch  # noqa: E402
import transformers  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers import (  # noqa: E402
    CompileConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS as RESULTS_DIR  # noqa: E402
from common import Disagreement, judge, max_abs_diff, provenance, results_target, write_results  # noqa: E402

from mmattn import vlm  # noqa: E402
from mmattn.vlm.interventions.vflowopt import VFLOWOPT_PRESETS  # noqa: E402

RESULTS = RESULTS_DIR / "vlm.md"
FUSED_DECODE = ("VAR", "GIFT")  # methods whose decode rows have a fused kernel, also timed on the explicit path
GOALS = {"compiled": {"VAR": 1.1, "GIFT": 1.1}, "eager": {"GIFT": 1.15}}
PRUNE_SPEEDUP_GOAL, PRUNE_KV_GOAL = 3.0, 0.1
GOAL_MODELS = ("llava-1.5-7b", "qwen2.5-vl-7b")  # the pruning goals name these two
VISION = "vision tower"  # the extra timed call of each pruning section
VARLEN = ", varlen tower"  # a pruning call with the vision tower on `vlm.use_varlen_vision_attention`


def log(message: str) -> None:
    print(f"[vlm {time.monotonic() - START:6.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------------------------------ models

#: LLaVA sizes: "full" is llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336 + Vicuna-7B); "proxy" keeps its 576 image tokens
#: and prompt but shrinks widths and depth for CPU measurements; "host" keeps the 32 layers with tiny widths, so CPU
#: time is mostly host overhead (the regime of HF decoding on a GPU); "quick" is a smoke test
#: (benchmarks/vlm_host_overhead.py takes any of them: "proxy" and "host" on the CPU, "full" on a GPU).
SIZES = {
    "full": ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
             {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}),
    "proxy": ({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
              {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 16, "num_attention_heads": 8}),
    "host": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
             {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 32, "num_attention_heads": 4}),
    "quick": ({"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
              {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}),
}
LLAVA_IMAGE_ID, QWEN_IMAGE_ID, QWEN_VISION_START, QWEN_VISION_END = 32000, 151655, 151652, 151653
GEMMA_IMAGE_ID, GEMMA_IMAGE_START, GEMMA_IMAGE_END = 262144, 255999, 256000
QWEN_IDS = {"image_token_id": QWEN_IMAGE_ID, "video_token_id": 151656, "vision_start_token_id": QWEN_VISION_START,
            "vision_end_token_id": QWEN_VISION_END}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2}
TINY_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 37, "num_heads": 4}


def llava_config(size: str) -> LlavaConfig:
    vision, text = SIZES[size]
    vision = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "projection_dim": 768, **vision}
    text = {"model_type": "llama", "num_key_value_heads": text["num_attention_heads"], "vocab_size": 32064,
            "max_position_embeddings": 4096, "pad_token_id": 0, **text}
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE_ID, image_seq_length=576,
                       vision_feature_layer=-2)


def qwen2_5_vl_config(size: str) -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct: 28 layers x 28 heads (4 kv), hidden 3584; ViT of 32 blocks (window attention but
    in blocks 7, 15, 23, 31), patch 14, 2x2 merge."""
    text = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4} if size == "full" else TINY_TEXT
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
              "fullatt_block_indexes": [7, 15, 23, 31]} if size == "full" else {**TINY_VISION,
                                                                                "fullatt_block_indexes": [1]}
    text = {**text, "vocab_size": 152064, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24] if size == "full" else [4, 2, 2],
                                "rope_theta": 1e6}}
    vision = {**vision, "out_hidden_size": text["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 112}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **QWEN_IDS)


def qwen3_vl_config(size: str) -> Qwen3VLConfig:
    """Qwen/Qwen3-VL-8B-Instruct: 36 layers x 32 heads (8 kv), hidden 4096; ViT of 27 blocks, patch 16, 2x2 merge,
    DeepStack features of blocks 8, 16, 24 added after decoder layers 0-2."""
    text = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128} if size == "full" else {**TINY_TEXT, "head_dim": 16}
    vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
              "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]} if size == "full" else {
        **TINY_VISION, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]}
    text = {**text, "vocab_size": 151936, "max_position_embeddings": 262144, "rope_parameters": {
        "rope_type": "default", "mrope_section": [24, 20, 20] if size == "full" else [4, 2, 2],
        "mrope_interleaved": True, "rope_theta": 5e6}}
    vision = {**vision, "out_hidden_size": text["hidden_size"], "patch_size": 16, "spatial_merge_size": 2,
              "temporal_patch_size": 2}
    return Qwen3VLConfig(text_config=text, vision_config=vision, **QWEN_IDS)


def gemma3_config(size: str) -> Gemma3Config:
    """google/gemma-3-4b-it: 34 layers x 8 heads (4 kv, head dim 256), hidden 2560, five sliding-window (1024) layers
    per global one; SigLIP-so400m at 896 pixels, 64x64 patches average-pooled to 16x16 = 256 image tokens."""
    if size == "full":
        text = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
                "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024}
        vision = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                  "image_size": 896}
        tokens = 256
    else:
        text = {**TINY_TEXT, "head_dim": 16, "sliding_window": 512}
        vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "image_size": 224}
        tokens = 64
    layers = text["num_hidden_layers"]
    text = {"model_type": "gemma3_text", "vocab_size": 262208, **text,
            "layer_types": ["full_attention" if (i + 1) % 6 == 0 or (size != "full" and i % 2) else "sliding_attention"
                            for i in range(layers)]}
    vision = {"model_type": "siglip_vision_model", "patch_size": 14, **vision}
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                        image_token_index=GEMMA_IMAGE_ID, boi_token_index=GEMMA_IMAGE_START,
                        eoi_token_index=GEMMA_IMAGE_END)


@dataclass(frozen=True)
class Shape:
    """A benchmarked model: its published name, class, config per size, and the image of its prompts."""

    title: str
    model_class: type[PreTrainedModel]
    config: Callable[[str], object]
    grid: tuple[int, int, int] | None = None  # Qwen: the image's (t, h, w) patch grid, full size and quick
    quick_grid: tuple[int, int, int] | None = None


SHAPES = {
    "llava-1.5-7b": Shape("LLaVA-1.5-7B", LlavaForConditionalGeneration, llava_config),
    "qwen2.5-vl-7b": Shape("Qwen2.5-VL-7B", Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config, (1, 64, 64),
                           (1, 16, 16)),
    "qwen3-vl-8b": Shape("Qwen3-VL-8B", Qwen3VLForConditionalGeneration, qwen3_vl_config, (1, 64, 64), (1, 16, 16)),
    "gemma-3-4b": Shape("Gemma-3-4B", Gemma3ForConditionalGeneration, gemma3_config),
}


def build(size: str, device: str, dtype: torch.dtype, key: str = "llava-1.5-7b") -> PreTrainedModel:
    """A random-weight model of `SHAPES[key]` at `size`, built in `dtype` directly on `device` (transformers' own
    initialization, run there: a few GPU kernels per weight, no CPU copy of a 7B model), SDPA attention. The LLaVA
    model gets planted visual sinks (`plant_sinks`)."""
    shape = SHAPES[key]
    config = shape.config(size)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = shape.model_class(config)
    finally:
        torch.set_default_dtype(default)
    model.eval().set_attn_implementation("sdpa")
    if key == "llava-1.5-7b":
        plant_sinks(model, sink_dims(size))
    return model


def sink_dims(size: str) -> tuple[int, ...]:
    """VAR's D_sink: LLaMA-2-7B's for the full size (the preset), two small dims otherwise."""
    return (2533, 1415) if size == "full" else (3, 7)


def plant_sinks(model: LlavaForConditionalGeneration, dims: tuple[int, ...]) -> None:
    """Random weights have no massive activations, and VAR leaves a layer without visual sinks alone: from layer 2
    on, BOS and every 64th image token of the prompt get 100x their RMS on the sink dims `dims` (phi = 100 /
    sqrt(1 + 20000 / hidden size): 41 at 4096, 5.6 at 64), as LLaVA-1.5 has a few such tokens, so that VAR edits as
    on the real model. In unpruned prefills of the decoding prompt only (`inputs`); every compared row runs on this
    model."""
    positions = [0, *range(35, 35 + 576, 64)]  # the layout of `inputs`: BOS, 34 text tokens, 576 image tokens

    def plant(module, args, hidden):
        if hidden.shape[1] != 1 + 34 + 576 + 40:
            return hidden
        hidden = hidden.clone()
        rms = hidden[:, positions].float().pow(2).mean(-1).sqrt().to(hidden.dtype)
        for dim in dims:
            hidden[:, positions, dim] = 100 * rms
        return hidden

    model.model.language_model.layers[1].register_forward_hook(plant)


def twin(model: PreTrainedModel) -> PreTrainedModel:
    """A second copy of `model`'s modules, config and hooks over the same weight and buffer tensors: each row of a
    section applies its interventions to its own twin once and keeps them (and its compiled decoding graphs) for the
    whole run, at no memory cost."""
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    copied = copy.deepcopy(model, memo)
    assert all(a is b for a, b in zip(copied.parameters(), model.parameters(), strict=True))
    return copied


# ------------------------------------------------------------------------------------------------------------ inputs

def inputs(device: str, dtype: torch.dtype, batch: int = 1) -> dict:
    """The decoding prompt: `batch` copies of one 651-token LLaVA prompt (BOS, 34 text tokens, 576 image tokens, 40 text
    tokens) and its image."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([1]), torch.randint(2, 31000, (34,), generator=generator),
                     torch.full((576,), LLAVA_IMAGE_ID), torch.randint(2, 31000, (40,), generator=generator)])
    ids = ids[None].expand(batch, -1)
    pixels = torch.randn(1, 3, 336, 336, generator=generator).expand(batch, -1, -1, -1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows padded on the left with id 0 to the longest."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = row
        mask[index, width - len(row):] = 1
    return ids, mask


def image_tokens(key: str, model: PreTrainedModel, quick: bool) -> int:
    """Image tokens per prompt of `key`'s pruning batch."""
    shape = SHAPES[key]
    if shape.grid is not None:
        t, h, w = shape.quick_grid if quick else shape.grid
        return t * h * w // model.config.vision_config.spatial_merge_size ** 2
    return model.config.mm_tokens_per_image if key.startswith("gemma") else model.config.image_seq_length


def pruning_batch(key: str, model: PreTrainedModel, batch: int, quick: bool, device: str, dtype: torch.dtype) -> dict:
    """`batch` prompts of different lengths, left-padded: [BOS, 34 text tokens, the image's tokens (Qwen: between
    <vision_start> and <vision_end>; Gemma: between <start_of_image> and <end_of_image>), 40 + 2i text tokens], one
    random image each."""
    generator = torch.Generator().manual_seed(1)
    count = image_tokens(key, model, quick)
    shape = SHAPES[key]
    family = "qwen" if key.startswith("qwen") else key.split("-")[0]
    image_id = {"llava": LLAVA_IMAGE_ID, "qwen": QWEN_IMAGE_ID, "gemma": GEMMA_IMAGE_ID}[family]
    brackets = {"qwen": (QWEN_VISION_START, QWEN_VISION_END), "gemma": (GEMMA_IMAGE_START, GEMMA_IMAGE_END)}.get(family)
    rows = []
    for row in range(batch):
        image = torch.full((count,), image_id)
        if brackets:
            image = torch.cat([torch.tensor([brackets[0]]), image, torch.tensor([brackets[1]])])
        rows.append(torch.cat([torch.tensor([1]), torch.randint(2, 31000, (34,), generator=generator), image,
                               torch.randint(2, 31000, (40 + 2 * row,), generator=generator)]))
    ids, mask = left_padded(rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if shape.grid is not None:
        t, h, w = shape.quick_grid if quick else shape.grid
        vision = model.config.vision_config
        patch = 3 * vision.temporal_patch_size * vision.patch_size ** 2
        out["pixel_values"] = torch.randn(batch * t * h * w, patch, generator=generator)
        out["image_grid_thw"] = torch.tensor([[t, h, w]] * batch)
        out["mm_token_type_ids"] = (ids == image_id).long()
    else:
        size = model.config.vision_config.image_size
        out["pixel_values"] = torch.randn(batch, 3, size, size, generator=generator)
        if key.startswith("gemma"):
            out["token_type_ids"] = (ids == image_id).long()
    return {name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for name, value in out.items()}


# ------------------------------------------------------------------------------------------------------------ methods

def scaled(layers: tuple[int, ...], depth: int, full_depth: int) -> tuple[int, ...]:
    """Layer indices of a `full_depth`-layer setting at `depth` layers (at least 1)."""
    return tuple(max(layer * depth // full_depth, 1) for layer in layers)


def methods(size: str) -> dict:
    """The decoding rows' interventions on the LLaVA model: the LLaVA-1.5-7B presets at full size; at other sizes
    VAR on the planted sink dims and GIFT's layers scaled with depth."""
    layers = SIZES[size][1]["num_hidden_layers"]
    if size == "full":
        return {"none": None, "VAR": vlm.load_preset("llava-1.5-7b", "var"),
                "GIFT": vlm.load_preset("llava-1.5-7b", "gift")}
    saliency = max(round(11 * layers / 32), 1)
    return {"none": None, "VAR": vlm.VAR(sink_dims=sink_dims(size), tau=4.0),  # planted sinks: phi >= 5.6 here
            "GIFT": vlm.GIFT(saliency_layers=(saliency,),
                             enhance_layers=tuple(range(saliency + 1, max(round(23 * layers / 32), saliency + 2))))}


@dataclass(frozen=True)
class Pruning:
    """A pruning row: the intervention and the image tokens its rule leaves in each decoder layer's KV cache
    (`per_layer`, or `rule(measured)` for a rule with a data-dependent part)."""

    intervention: object
    per_layer: tuple[int, ...] = ()
    note: str = ""
    at_90: bool = True  # prunes 90 % of the image tokens (the goals apply)
    rule: Callable[[list[int]], tuple[int, ...]] | None = None

    def expected(self, measured: list[int]) -> tuple[int, ...]:
        return self.per_layer if self.rule is None else self.rule(measured)


def vflowopt_rule(n: int, depth: int, llm_layers: tuple[int, ...], images: int = 1) -> Callable:
    """VFlowOpt keep 0.1 (the released preset: r_v, m, LLM ratios r): before the LLM, the top
    n - round(n(1 - r_v)) - int(n / m²) image tokens by importance remain as they are and the rest of each image's
    side x side grid merges into one token per non-empty m x m cell (ceil(side / m)² cells, a cell wholly inside the
    top set gives none); each LLM stage then removes round(k(1 - r)) of the k tokens present."""
    _, _, cell, vit_ratio, llm_ratios = VFLOWOPT_PRESETS[0.1]
    side = math.isqrt(n // images)
    outright = max(n - round(n * (1 - vit_ratio)) - int(n / cell**2), 0)
    cells = images * math.ceil(side / cell) ** 2

    def rule(measured: list[int]) -> tuple[int, ...]:
        kept = measured[0] if outright < measured[0] <= outright + cells else outright + cells
        per_layer = []
        for layer in range(depth):
            if layer in llm_layers:
                kept -= round(kept * (1 - llm_ratios[llm_layers.index(layer)]))
            per_layer.append(kept)
        return tuple(per_layer)

    return rule


def pruning_methods(key: str, depth: int, n: int) -> dict[str, Pruning]:
    """The pruning rows for `key` at 90 % of the `n` image tokens pruned (keep 10 %), with each method's own rule for
    the image tokens per layer. PyramidDrop runs its published schedule (λ = 0.5 at 1/4, 1/2, 3/4 of the depth;
    ends at 1/8) and VisionZip 49 dominant + 9 contextual tokens (58 = round(0.1 x 576), its 54:10 split)."""
    multi_axis = key.startswith("qwen")
    rows = {}
    k, ratio = 2, 0.9
    fastv_kept = round(n * (1 - ratio))
    rows[f"FastV K={k} R={ratio}"] = Pruning(vlm.FastV(k=k, ratio=ratio), (n,) * k + (fastv_kept,) * (depth - k))
    stages = scaled((8, 16, 24), depth, 32)
    per_layer, kept = [], n
    for layer in range(depth):
        if layer in stages:
            kept = int(n * 0.5 ** (stages.index(layer) + 1))
        per_layer.append(kept)
    rows[f"PyramidDrop layers {list(stages)} λ=0.5"] = Pruning(
        vlm.PyramidDrop(layers=stages, ratio=0.5, positions="keep" if multi_axis else "reindex"), tuple(per_layer),
        note="published schedule, not 90 %", at_90=False)
    if key.startswith(("llava", "gemma")):
        llm_layers = (9, 18) if depth > 18 else scaled((9, 18), depth, 32)  # the released layers at full size
        rows["VFlowOpt keep 0.1"] = Pruning(vlm.VFlowOpt(keep=0.1, llm_layers=llm_layers),
                                            rule=vflowopt_rule(n, depth, llm_layers))
    if key.startswith("llava"):
        dominant, contextual = 49, 9  # 58 = round(0.1 x 576) tokens, in VisionZip's 54:10 split
        rows[f"VisionZip {dominant}+{contextual}"] = Pruning(vlm.VisionZip(dominant=dominant, contextual=contextual),
                                                             (dominant + contextual,) * depth)
    for name, method in (("DivPrune", vlm.DivPrune), ("random", vlm.RandomPrune)):
        rows[f"{name} keep 0.1"] = Pruning(method(keep=0.1), (round(n * 0.1),) * depth)
    return rows


# ------------------------------------------------------------------------------------------------------------ timing

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate(model: PreTrainedModel, batch: dict, tokens: int, compiled: CompileConfig | None = None, **extra):
    """Greedy generation of exactly `tokens` tokens; with `compiled`, transformers' compiled decoding (a static cache,
    the decoding step compiled with `compiled`)."""
    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "pad_token_id": 0}
    if compiled is not None:
        kwargs.update(cache_implementation="static", compile_config=compiled)
    with torch.no_grad():
        return model.generate(**batch, **kwargs, **extra)


def compile_config(device: str) -> CompileConfig:
    """What `generate` compiles the decoding step with: transformers' default on CUDA (inductor, "reduce-overhead");
    on the CPU (smoke runs) the "eager" dynamo backend, which traces and guards as inductor would, switched on with
    transformers' `_compile_all_devices` flag."""
    if device == "cuda":
        return CompileConfig()
    config = CompileConfig(backend="eager", mode=None)  # the "eager" backend takes no mode
    config._compile_all_devices = True
    return config


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, device: str, deadline: float | None) -> dict:
    """Seconds per call of each entry of `calls`, in up to `rounds` rounds that run every entry once (in an order
    rotated by one each round); stops early, after at least one round, when the next round would end past `deadline`
    (time.monotonic()). Each round's log line gives every entry's time."""
    times = {label: [] for label in calls}
    labels = list(calls)
    for index in range(rounds):
        started = time.monotonic()
        for label in labels[index % len(labels):] + labels[:index % len(labels)]:
            sync(device)
            start = time.perf_counter()
            calls[label]()
            sync(device)
            times[label].append(time.perf_counter() - start)
        took = time.monotonic() - started
        log(f"round {index + 1}/{rounds}: {took:.1f}s; ms per call: "
            + ", ".join(f"{label} {times[label][-1] * 1e3:.1f}" for label in labels))
        if deadline is not None and index + 1 < rounds and time.monotonic() + took > deadline:
            log(f"time budget: stopping after {index + 1} of {rounds} rounds")
            break
    return times


def with_varlen(model: PreTrainedModel, call: Callable[[], object]):
    """`call()` with `model`'s vision tower on mmattn's varlen attention (`vlm.use_varlen_vision_attention`)."""
    with vlm.use_varlen_vision_attention(model):
        return call()


def ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of a row's time over the base row's time in the same round."""
    return statistics.median(a / b for a, b in zip(times, base, strict=True))


def kv_bytes_per_token(cache) -> int:
    keys = cache.layers[0].keys
    return keys[:, :, 0].numel() * keys.element_size() * 2


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def generated_cache(output):
    """The KV cache a `generate(..., return_dict_in_generate=True)` output holds: `.cache` from transformers 5.24 on
    (where `.past_key_values` is deprecated), `.past_key_values` before."""
    return output.cache if "cache" in output else output.past_key_values


def runs(counts: list[int]) -> str:
    """`[576, 576, 58, ...]` as `576 x2, 58 x30`."""
    return ", ".join(f"{value} x{len(list(group))}" for value, group in itertools.groupby(counts))


# ------------------------------------------------------------------------------------------------------------ report

@dataclass
class Report:
    """The results file: the header, a goals table, one part per section; rewritten after every section."""

    header: str
    target: Path | None
    parts: list[str] = field(default_factory=list)
    goals: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pruning_noted: bool = False  # the notes shared by the pruning sections are in the first one

    def goal(self, what: str, measured: str, goal: str, met: bool) -> str:
        verdict = "met" if met else "missed"
        self.goals.append(f"| {what} | {measured} | {goal} | {verdict} |")
        return verdict

    def add(self, lines: list[str]) -> None:
        print("\n".join(lines), flush=True)
        self.parts.append("\n".join(lines))
        if self.target is not None:  # the final write is write_results'
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.target.write_text(self.render(final=False))

    def goals_table(self) -> str:
        return "\n".join(["## Goals", "", "| goal | measured | target | verdict |", "|---|---:|---|---|", *self.goals])

    def render(self, final: bool) -> str:
        status = [] if final else [f"Run in progress or cut short: {len(self.parts)} section(s) written so far."]
        if self.failures:
            status.append("Rows not timed (their check failed or they raised): " + "; ".join(self.failures) + ".")
        return "\n\n".join([self.header, *status, self.goals_table(), *self.parts]) + "\n"


def attempt(report: Report, label: str, fn: Callable[[], object]):
    """`fn()`, or None when it raises: the row is reported as not timed, with the error, and the run goes on (one
    GPU call should bring back every row that works)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - reported, and the run exits non-zero
        traceback.print_exc()
        kind = "check failed" if isinstance(error, Disagreement) else f"{type(error).__name__}"
        report.failures.append(f"{label}: {kind}: {str(error)[:300]}")
        log(f"{label}: not timed ({kind})")
        return None


# ------------------------------------------------------------------------------------------------------------ pruning

def pruning_section(report: Report, key: str, model: PreTrainedModel, args, device: str, dtype: torch.dtype,
                    deadline: float | None) -> None:
    shape = SHAPES[key]
    quick = args.quick
    batch = pruning_batch(key, model, args.batch, quick, device, dtype)
    n = image_tokens(key, model, quick)
    depth = model.config.get_text_config().num_hidden_layers
    width = batch["input_ids"].shape[1]
    rows = {"none": Pruning(None, (n,) * depth)} | pruning_methods(key, depth, n)
    log(f"pruning {shape.title}: batch {args.batch} x {width} tokens ({n} image tokens each), {len(rows)} rows")
    twins, handles, measured = {}, [], {}

    def prepare(label: str, row: Pruning):
        copy_ = model if row.intervention is None else twin(model)
        if row.intervention is not None:
            handles.append(vlm.apply(copy_, row.intervention))
        cache = generated_cache(generate(copy_, batch, 1, return_dict_in_generate=True))
        counts = [layer.keys.shape[2] - (width - n) for layer in cache.layers]
        expected = list(row.expected(counts))
        if counts != expected:
            raise Disagreement(f"{shape.title} {label}: image tokens in the KV cache per layer {runs(counts)}, the "
                               f"method's rule says {runs(expected)}")
        per_token = kv_bytes_per_token(cache)
        measured[label] = {"counts": counts, "image_kv": sum(counts) * per_token, "prompt_kv": kv_bytes(cache)}
        twins[label] = copy_

    try:
        for label, row in rows.items():
            attempt(report, f"{shape.title} {label}", lambda: prepare(label, row))
        if "none" not in twins:
            return
        calls = {label: (lambda m=m: generate(m, batch, 1)) for label, m in twins.items()}
        vision_inputs = {name: batch[name] for name in ("pixel_values", "image_grid_thw") if name in batch}
        with torch.no_grad():
            model.model.get_image_features(**vision_inputs)
        calls[VISION] = torch.no_grad()(lambda: model.model.get_image_features(**vision_inputs))
        if vlm.packs_by_cu_seqlens(model):  # the same calls with the vision tower on mmattn's varlen attention
            calls |= {label + VARLEN: (lambda m=m: with_varlen(m, lambda: generate(m, batch, 1)))
                      for label, m in twins.items()}
            calls[VISION + VARLEN] = torch.no_grad()(
                lambda: with_varlen(model, lambda: model.model.get_image_features(**vision_inputs)))
        times = interleaved(calls, args.rounds * SHORT_ROUND_FACTOR, device, deadline)
    finally:
        for handle in handles:
            handle.remove()
    base, vision = times["none"], times[VISION]
    varlen = VISION + VARLEN in times
    bytes_unit = 2**20
    lines = [f"## Pruning: {shape.title}-shaped random model, batch of {args.batch} prompts", ""]
    if not report.pruning_noted:
        report.pruning_noted = True
        lines += [(f"In every pruning section: prefill = `generate(max_new_tokens=1)` (vision tower, projector, "
                   "decoder, first token) of a batch of left-padded prompts that differ in length by 2 tokens, one "
                   "image each. Image-token KV: the image tokens the prompt's KV cache holds, summed over layers "
                   "(checked against each method's own rule: column 2). Goals (90 % of the visual tokens pruned, batch "
                   f"of 8, on LLaVA-1.5-7B and Qwen2.5-VL-7B): prefill >= {PRUNE_SPEEDUP_GOAL:g}x faster, image-token "
                   f"KV <= {PRUNE_KV_GOAL:g}x (judged at the printed precision: round(0.1 N) tokens can be a hair over "
                   "0.1 N). The vision tower and projector alone (`get_image_features`) are timed in the same rounds; "
                   "the \"without the vision tower\" column leaves their time out of both prefills. Qwen towers, which "
                   "pack their images and windows by `cu_seqlens`, are also timed on mmattn's varlen attention "
                   "(`mmattn.vlm.use_varlen_vision_attention`: one attention call per block instead of one per "
                   "window), every row again in the same rounds, its speed-up over \"none\" on that tower too."), ""]
    lines += [(f"{'Tiny --quick config' if quick else 'Full size'}, {dtype}; {args.batch} prompts of "
               f"{width - 2 * (args.batch - 1)}-{width} tokens with {n} image tokens each; {len(base)} interleaved "
               f"rounds; vision tower and projector: {statistics.median(vision) * 1e3:.1f} ms"
               + (f", on varlen attention {statistics.median(times[VISION + VARLEN]) * 1e3:.1f} ms." if varlen else ".")),
              "",
              "| method | image tokens in the KV cache per layer | prefill ms (median) | least ms | speed-up x none "
              "| image-token KV MiB | x none | prompt KV x none | goals | speed-up without the vision tower |"
              + (" prefill ms, varlen tower | speed-up x none, varlen tower |" if varlen else ""),
              "|---|---|---:|---:|---:|---:|---:|---:|---|---:|" + ("---:|---:|" if varlen else "")]
    for label, row in rows.items():
        if label not in twins:
            lines.append(f"| {label} | not timed (see the note above) | | | | | | | | |")
            continue
        speedup = 1 / ratio(times[label], base)
        decoder = statistics.median((b - v) / max(t - v, 1e-9) for t, b, v in zip(times[label], base, vision))
        kv = measured[label]["image_kv"] / measured["none"]["image_kv"]
        verdicts, extra = "", ""
        if varlen:
            on_varlen = 1 / ratio(times[label + VARLEN], times["none" + VARLEN])
            extra = f" {statistics.median(times[label + VARLEN]) * 1e3:.1f} | {on_varlen:.2f} |"
        if row.intervention is not None and key in GOAL_MODELS and row.at_90:
            fast = report.goal(f"{shape.title} {label}: prefill, batch of {args.batch}", f"{speedup:.2f}x faster",
                               f">= {PRUNE_SPEEDUP_GOAL:g}x", speedup >= PRUNE_SPEEDUP_GOAL)
            small = report.goal(f"{shape.title} {label}: image-token KV", f"{kv:.2f}x", f"<= {PRUNE_KV_GOAL:g}x",
                                round(kv, 2) <= PRUNE_KV_GOAL)
            verdicts = f"speed {fast}, KV {small}"
            if varlen:
                verdicts += ", varlen tower: speed " + report.goal(
                    f"{shape.title} {label}, tower on varlen attention: prefill, batch of {args.batch}",
                    f"{on_varlen:.2f}x faster", f">= {PRUNE_SPEEDUP_GOAL:g}x", on_varlen >= PRUNE_SPEEDUP_GOAL)
        elif row.note:
            verdicts = row.note
        lines.append(
            f"| {label} | {runs(measured[label]['counts'])} | {statistics.median(times[label]) * 1e3:.1f} | "
            f"{min(times[label]) * 1e3:.1f} | {speedup:.2f} | {measured[label]['image_kv'] / bytes_unit:.1f} | "
            f"{kv:.3f} | {measured[label]['prompt_kv'] / measured['none']['prompt_kv']:.3f} | {verdicts} | "
            f"{decoder:.2f} |{extra}")
    report.add(lines)


# ------------------------------------------------------------------------------------------------------------ decoding

def first_logits(model, batch: dict, tokens: int = 2, compiled: CompileConfig | None = None):
    """Greedy generation of `tokens` tokens: the prefill's last logits, the first decoding step's logits, the tokens."""
    output = generate(model, batch, tokens, compiled, output_logits=True, return_dict_in_generate=True)
    return output.logits[0].float(), output.logits[1].float(), output.sequences[:, batch["input_ids"].shape[1]:]


def logit_diffs(ours, reference) -> list[float]:
    """Max abs differences of the prefill and first-decode-step logits of two `first_logits` results (NaN for the
    step when the prefills picked different tokens, a near-tie: their decoding steps see different inputs)."""
    same_first = torch.equal(ours[2][:, 0], reference[2][:, 0])
    return [max_abs_diff(ours[0], reference[0]),
            max_abs_diff(ours[1], reference[1]) if same_first else float("nan")]


def compare(case: str, ours, reference, floor: list[float], reference_name: str,
            peer_name: str = "SDPA vs eager attention") -> str:
    """`judge` the prefill and first-decode-step logits of `ours` against `reference` (both from `first_logits`):
    at most 2 x `floor` (the peer's own difference, per step) + 1e-3 x max(1, max|logit|); one line for the report."""
    parts = []
    for index, (label, diff) in enumerate(zip(("prefill logits", "first decode-step logits"),
                                              logit_diffs(ours, reference))):
        if diff != diff:
            parts.append(f"{label}: not compared (the prefills picked different tokens, a near-tie)")
            continue
        verdict = judge(case, label, diff, floor[index], diff, scale=reference[index].abs().max().item(),
                        peer_name=peer_name, reference_name=reference_name)
        parts.append(f"{label} max abs diff {diff:.2e} (tolerance {verdict.tolerance:.2e})")
    return "; ".join(parts)


def noise_floor(model, batch: dict) -> list[float]:
    """Max abs difference of the prefill and first-step logits between SDPA and eager attention (no intervention)."""
    sdpa = first_logits(model, batch)
    model.set_attn_implementation("eager")
    try:
        eager = first_logits(model, batch)
    finally:
        model.set_attn_implementation("sdpa")
    return [max_abs_diff(a, b) for a, b in zip(sdpa[:2], eager[:2])]


def check_decode_rows(model, batch: dict, chosen: dict, noise: list[float]) -> list[str]:
    """VAR's and GIFT's fused decode rows against their explicit ones within twice the noise floor; raises
    `Disagreement` otherwise. Returns one line per method."""
    lines = []
    for name in FUSED_DECODE:
        results = {}
        for backend in ("auto", "torch"):
            with vlm.apply(model, chosen[name], backend=backend):
                results[backend] = first_logits(model, batch)
        line = compare(f"{name} (fused vs explicit decode rows)", results["auto"], results["torch"], noise,
                       "the explicit decode rows")
        lines.append(f"- {name}, fused vs explicit decode rows: {line}.")
        print(lines[-1], flush=True)
    return lines


def decoding_section(report: Report, model: PreTrainedModel, size: str, args, device: str, dtype: torch.dtype,
                     deadline: float | None) -> None:
    tokens = args.new_tokens
    batch = inputs(device, dtype)
    chosen = methods(size)
    log(f"decoding: noise floor and fused-vs-explicit checks ({batch['input_ids'].shape[1]}-token prompt)")
    noise = noise_floor(model, batch)
    check_lines = attempt(report, "VAR/GIFT fused decode rows", lambda: check_decode_rows(model, batch, chosen, noise))
    fused_ok = check_lines is not None
    config = compile_config(device)
    # one model copy per row, its interventions applied once; eager and compiled rows of a method share it
    copies, handles = {"none": model}, []
    for name in FUSED_DECODE:
        for backend, label in (("auto", name), ("torch", f"{name}, explicit decode rows")):
            copies[label] = twin(model)
            handles.append(vlm.apply(copies[label], chosen[name], backend=backend))
    calls, compiled_lines, compile_seconds, plain_diffs = {}, [], {}, []
    graphs_before = counters["stats"]["unique_graphs"]

    def check_compiled(name: str) -> bool:
        """Eager reference, then the compiled row's first call with the timed length (it compiles the decoding
        step; its static cache has the length every later call reuses), then a second call (CUDA graphs record).
        Plain decoding must give the eager greedy tokens or logits within the noise floor; VAR and GIFT may differ
        from their eager decoding by twice as much as plain decoding does from its own (or the noise floor)."""
        copy_ = copies[name]
        # plain decoding: every greedy token compared (eager, all `tokens`); VAR and GIFT: the first two steps
        reference = first_logits(copy_, batch, tokens if name == "none" else 2)
        start = time.monotonic()
        ours = first_logits(copy_, batch, tokens, config)
        compile_seconds[name] = time.monotonic() - start
        case = f"{name} (compiled static-cache vs eager decoding)"
        if name == "none":
            plain_diffs.extend(logit_diffs(ours, reference))
            same = (ours[2] == reference[2])[0].int().cumprod(0).sum().item()
            try:
                line = compare(case, ours, reference, noise, "eager dynamic-cache decoding")
            except Disagreement:
                if same < tokens:
                    raise
                line = (f"logits beyond the noise floor (max abs diff {plain_diffs[0]:.2e}, {plain_diffs[1]:.2e}), "
                        "greedy tokens equal")
            line += f"; the first {same} of {tokens} greedy tokens equal"
        else:
            floor = [max(a, b) if b == b else a for a, b in zip(noise, plain_diffs or [float("nan")] * 2)]
            line = compare(case, ours, reference, floor, "eager dynamic-cache decoding",
                           "plain compiled vs eager decoding (or SDPA vs eager attention)")
        generate(copy_, batch, tokens, config)
        compiled_lines.append(f"- {name}, compiled vs eager: {line} (first compiled call, compiling: "
                              f"{compile_seconds[name]:.1f}s).")
        log(compiled_lines[-1])
        return True

    for name in ("none", *FUSED_DECODE):
        if deadline is not None and compile_seconds and time.monotonic() + 1.2 * max(compile_seconds.values()) > \
                deadline:
            report.failures.append(f"compiled {name}: skipped, its compilation would end past the time budget")
            log(report.failures[-1])
            continue
        log(f"decoding: compiling and checking '{name}'")
        if attempt(report, f"compiled {name}", lambda: check_compiled(name)):
            calls[("compiled", name)] = lambda m=copies[name]: generate(m, batch, tokens, config)
            calls[("compiled prefill", name)] = lambda m=copies[name]: generate(m, batch, 1, config)
    for label, copy_ in copies.items():
        if label in FUSED_DECODE and not fused_ok:
            continue  # its fused decode rows disagree with the explicit ones: not timed
        generate(copy_, batch, 4)  # warm-up (Triton kernels of the fused rows compile here)
        calls[("eager", label)] = lambda m=copy_: generate(m, batch, tokens)
        calls[("eager prefill", label)] = lambda m=copy_: generate(m, batch, 1)
    graphs = counters["stats"]["unique_graphs"]
    warm_up_graphs = graphs - graphs_before
    if device == "cuda":
        torch._logging.set_logs(recompiles=True)  # a recompile in the timed rounds prints its reason
    log(f"decoding: timing {len(calls)} calls per round ({tokens} new tokens)")
    compiled = {key: call for key, call in calls.items() if key[0].startswith("compiled")}
    try:
        times = interleaved({key: call for key, call in calls.items() if key not in compiled}, args.rounds, device,
                            deadline)
        if compiled:
            times.update(interleaved(compiled, args.rounds * SHORT_ROUND_FACTOR, device, deadline))
    finally:
        torch._logging.set_logs()
        for handle in handles:
            handle.remove()
    recompiles = counters["stats"]["unique_graphs"] - graphs
    rounds = {mode: max((len(t) for (m, _), t in times.items() if m == mode), default=0)
              for mode in ("eager", "compiled")}
    compiled_with = "CompileConfig()" if device == "cuda" else 'CompileConfig(backend="eager", mode=None)'
    lines = [f"## Decoding: {SHAPES['llava-1.5-7b'].title}-shaped random model, one prompt", "",
             (f"{'Tiny --quick config' if args.quick else 'Full size'}, {dtype}, {batch['input_ids'].shape[1]}-token "
              f"prompt with 576 image tokens, greedy, {tokens} new tokens, {rounds['eager']} interleaved rounds "
              f"eager and {rounds['compiled']} compiled. Eager: "
              "dynamic cache, SDPA. Compiled: `generate(cache_implementation=\"static\", compile_config="
              f"{compiled_with})`, transformers' "
              "compiled decoding steps (the prefill runs eagerly). x plain: median over rounds of the row's time over "
              "plain decoding's in the same round and mode. Decode ms/token: (total - prefill) / (new tokens - 1)."),
             "", "| mode | method | total ms (median) | least ms | x plain | prefill ms | decode ms/token | goal |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for mode in ("eager", "compiled"):
        base = times.get((mode, "none"))
        for label in copies:
            if (mode, label) not in times:
                if mode == "eager" or label in ("none", *FUSED_DECODE):
                    lines.append(f"| {mode} | {label} | not timed (see the note above) | | | | | |")
                continue
            total = statistics.median(times[(mode, label)])
            prefill = statistics.median(times[(f"{mode} prefill", label)])
            x = ratio(times[(mode, label)], base) if base is not None else float("nan")
            target = GOALS[mode].get(label)
            goal = ""
            if target is not None:
                verdict = report.goal(f"{mode} decoding: {label} total latency", f"{x:.2f}x plain {mode}",
                                      f"<= {target:g}x", x <= target)
                goal = f"<= {target:g}x: {verdict}"
            lines.append(f"| {mode} | {label} | {total * 1e3:.0f} | {min(times[(mode, label)]) * 1e3:.0f} | {x:.2f} | "
                         f"{prefill * 1e3:.1f} | {(total - prefill) / max(tokens - 1, 1) * 1e3:.2f} | {goal} |")
    lines += ["", (f"Dynamo graphs compiled during the warm-up calls: {warm_up_graphs}; recompiles during the timed "
                   f"rounds: {recompiles}."), "",
              ("Checks, before timing: fused decode rows (`backend=\"auto\"`) against explicit ones "
               "(`backend=\"torch\"`), max abs logit difference <= 2 x that of SDPA vs eager attention on the "
               f"unedited model (noise floor: prefill {noise[0]:.2e}, first decode step {noise[1]:.2e}) + 1e-3 x "
               "max(1, max|logit|); compiled static-cache decoding against eager dynamic-cache decoding of the same "
               "row: plain decoding within the noise floor or with equal greedy tokens, VAR and GIFT within 2 x the "
               "larger of the noise floor and plain decoding's own compiled-vs-eager difference + the same slack:"),
              *(check_lines or []), *compiled_lines]
    report.add(lines)


# ------------------------------------------------------------------------------------------------------------ main

SHORT_ROUND_FACTOR = 3
"""Pruning sections and compiled decoding run this many times eager decoding's rounds (`--rounds`, or the default of
the mode)."""

SECTIONS = ("prune-llava-1.5-7b", "prune-qwen2.5-vl-7b", "prune-qwen3-vl-8b", "prune-gemma-3-4b", "decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny configs on the CPU (smoke test)")
    parser.add_argument("--fast", action="store_true", help="64 new tokens and 3 rounds (default: 128 and 5)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per decoding call")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved eager decoding rounds (at most); pruning sections and compiled decoding "
                             "run SHORT_ROUND_FACTOR times as many")
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch of the pruning sections")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only (a subset: see --out)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds from start after which no further timing round starts (default 540 on the GPU, "
                             "so that one 600-second call brings the whole table back)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results file (default {RESULTS.name}; a --quick or --only run writes only where --out "
                             "says)")
    args = parser.parse_args()
    sections = args.only or SECTIONS
    subset = args.quick or args.only is not None or args.batch != 8
    target = results_target(parser, args.out, RESULTS, not subset, "--quick, --only or --batch")
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        torch.set_num_threads(1)  # tiny ops: threads only add spin-waiting on a shared CPU
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = "quick" if args.quick else "full"
    args.new_tokens = args.new_tokens or (6 if args.quick else 64 if args.fast else 128)
    args.rounds = args.rounds or (2 if args.quick else 3 if args.fast else 5)
    budget = args.time_budget if args.time_budget is not None else (None if args.quick else 540.0)
    deadline = None if budget is None else START + budget
    rounds = f"{args.rounds * SHORT_ROUND_FACTOR} (pruning, compiled decoding) or {args.rounds} (eager decoding)"
    settings = (f"every row timed with synchronized wall clocks in up to {rounds} interleaved rounds (rounds stop "
                f"early at the {budget:g}-second time budget; each table says how many ran); warm-up calls first"
                if budget is not None else f"{rounds} interleaved rounds of synchronized wall-clock calls after "
                "warm-up calls (CPU smoke run: not a measurement)")
    report = Report("# LVLM interventions: decoding overhead and visual-token pruning\n\n"
                    + provenance(device, ("transformers",), settings), target)
    log(f"device {device}, {dtype}, sections {', '.join(sections)}; transformers {transformers.__version__}")
    llava = None
    for section in sections:
        key = section.removeprefix("prune-") if section != "decode" else "llava-1.5-7b"
        if key == "llava-1.5-7b" and llava is not None:
            model = llava
        else:
            log(f"building {SHAPES[key].title} ({size})")
            model = attempt(report, f"building {SHAPES[key].title}", lambda: build(size, device, dtype, key))
            if model is None:
                continue
            log(f"built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
        if key == "llava-1.5-7b":
            llava = model
        if section == "decode":
            attempt(report, "decoding section", lambda: decoding_section(report, model, size, args, device, dtype,
                                                                         deadline))
        else:
            attempt(report, f"pruning section {SHAPES[key].title}",
                    lambda: pruning_section(report, key, model, args, device, dtype, deadline))
        if model is not llava:
            del model
            gc.collect()  # hooks and handles form reference cycles
            if device == "cuda":
                torch.cuda.empty_cache()
    log("done")
    if target is not None:
        write_results(report.render(final=True), target)
    else:  # the sections are printed already
        print(f"\n{report.goals_table()}\n\n(not written: a subset or smoke run writes only where --out says)")
    if report.failures:
        print("Rows not timed:\n- " + "\n- ".join(report.failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
