"""Training-free attention interventions for LVLMs on Hugging Face transformers: VAR, GIFT and visual-token pruning
(FastV, VFlowOpt, PyramidDrop, VisionZip, DivPrune, random pruning; FastVID for videos), switched on and off with one
call; and varlen attention for the Qwen vision towers (`use_varlen_vision_attention`).

    with mmattn.vlm.apply(model, VAR(), FastV(k=2, ratio=0.5)):
        model.generate(**inputs)
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("mmattn.vlm needs transformers: pip install 'mmattn[vlm]'") from error

from .handle import InterventionHandle, apply
from .interventions.attention_ranked import FastV, PyramidDrop
from .interventions.base import Intervention
from .interventions.divprune import DivPrune
from .interventions.fastvid import FastVID
from .interventions.gift import GIFT
from .interventions.pruning import PruneStage, PruningPlan
from .interventions.random_prune import RandomPrune
from .interventions.var import VAR, find_sink_dims
from .interventions.vflowopt import VFlowOpt
from .interventions.visionzip import VisionZip
from .interventions.words import content_words, spacy_content_words
from .layout import FAMILIES, TokenLayout
from .presets import load_preset
from .varlen import packs_by_cu_seqlens, use_varlen_vision_attention

__all__ = [
    "FAMILIES",
    "DivPrune",
    "GIFT",
    "VAR",
    "FastV",
    "FastVID",
    "Intervention",
    "InterventionHandle",
    "PruneStage",
    "PruningPlan",
    "PyramidDrop",
    "RandomPrune",
    "TokenLayout",
    "VFlowOpt",
    "VisionZip",
    "apply",
    "content_words",
    "find_sink_dims",
    "load_preset",
    "packs_by_cu_seqlens",
    "spacy_content_words",
    "use_varlen_vision_attention",
]
