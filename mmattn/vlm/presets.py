"""Per-model intervention presets, the package data mmattn/presets/vlm/*.yaml (the spec's defaults per model)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mmattn import presets

from .interventions.attention_ranked import FastV, PyramidDrop
from .interventions.base import Intervention
from .interventions.divprune import DivPrune
from .interventions.fastvid import FastVID
from .interventions.gift import GIFT
from .interventions.random_prune import RandomPrune
from .interventions.var import VAR
from .interventions.vflowopt import VFlowOpt
from .interventions.visionzip import VisionZip

__all__ = ["PRESET_DIR", "load_preset"]

PRESET_DIR = presets.folder("vlm")
_METHODS = {
    "var": VAR,
    "gift": GIFT,
    "fastv": FastV,
    "pyramiddrop": PyramidDrop,
    "vflowopt": VFlowOpt,
    "visionzip": VisionZip,
    "divprune": DivPrune,
    "random": RandomPrune,
    "fastvid": FastVID,
}
_TUPLE_FIELDS = ("sink_dims", "saliency_layers", "enhance_layers", "layers", "llm_layers", "llm_ratios")


def load_preset(model: str | Path, method: str, **overrides: object) -> Intervention:
    """The `method` intervention ("var", "gift", "fastv", "pyramiddrop", "vflowopt", "visionzip", "divprune",
    "random", "fastvid") with the settings of preset
    `model` (a name in mmattn/presets/vlm such as "llava-1.5-7b", or a YAML path); keyword overrides win."""
    path = Path(model) if str(model).endswith(".yaml") else PRESET_DIR / f"{model}.yaml"
    if not path.is_file():
        raise ValueError(f"model: expected a preset in {presets.names('vlm')} or a YAML path, got {str(model)!r}")
    settings = yaml.safe_load(path.read_text())
    if method not in _METHODS or method not in settings:
        raise ValueError(f"method: expected one of {sorted(settings)} for {path.name.removesuffix('.yaml')}, got {method!r}")
    values = {**settings[method], **overrides}
    values = {k: tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v for k, v in values.items()}
    return _METHODS[method](**values)
