"""Vision tab: a backbone's predictions on a photo and what its attention looks at, plus kernel timings."""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from .fields import Choice, Flag, InputError, Number, Picture, Text
from .handlers import handler
from .kernel_timing import HEADERS, time_backends
from .rendering import grid_overlay
from .vision_maps import attention_maps
from .weights import random_weights

__all__ = ["BACKBONES", "IMAGE", "SAMPLES", "VisionDemo", "sample_image"]

logger = logging.getLogger(__name__)

BACKBONES = ("biformer_tiny", "nat_mini", "dinat_mini", "litv2_small", "agent_deit_tiny", "agent_pvt_tiny", "ela_resnet18")
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket")
_SIZE = 224

BACKBONE = Choice("Backbone", BACKBONES)
SAMPLE = Choice("Sample photo", SAMPLES)
IMAGE = Picture("Image", max_pixels=50_000_000, side=1024)
"""Refused from the header above 50 MP: a 50 MP PNG takes 1.7 s and 0.22 GB at its peak on the 2-core CPU machine
(a 50 MP JPEG, decoded at a reduced scale, 0.4 s and 0.06 GB); the models see 224x224, so pictures are reduced to
1024 px as they are decoded."""
QUERY_X = Number("Query x", 0.0, 1.0, step=0.01)
QUERY_Y = Number("Query y", 0.0, 1.0, step=0.01)
CHECKPOINT = Text("Checkpoint path", max_chars=4096)  # PATH_MAX on Linux
PRETRAINED = Flag("timm pretrained")
TOKENS = Choice("Tokens", (256, 1024, 4096) if torch.cuda.is_available() else (256, 1024))
"""4096 tokens only on a GPU: on the 2-core CPU machine that table takes about 20 s and 0.9 GB (1024: 1.4 s, 0.1 GB)."""


def sample_image(name: str) -> Image.Image:
    """One of scikit-image's bundled sample photos (no download)."""
    from skimage import data

    return Image.fromarray(getattr(data, SAMPLE(name))())


class VisionDemo:
    """Builds timm models on demand and keeps the `cached` last used, keyed by (name, weights); serves one request at
    a time (the attention maps hook the model)."""

    def __init__(self, cached: int = 4) -> None:
        self._models = functools.lru_cache(maxsize=cached)(self._build)
        self._lock = threading.Lock()

    @staticmethod
    def _build(name: str, checkpoint: str, pretrained: bool) -> torch.nn.Module:
        import timm

        import mmattn.vision  # noqa: F401  (registers the models with timm)

        if not (checkpoint or pretrained):
            return random_weights(timm.create_model(name)).eval()
        overlay = {"file": checkpoint} if checkpoint else None
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
        except Exception:
            logger.exception("loading the weights of %s failed", name)
            field, accepts = ((CHECKPOINT, f"a checkpoint of {name} (official or timm keys)") if checkpoint else
                              (PRETRAINED, "false here (the model hub could not be reached)"))
            raise InputError(f"{field.label}: expected {accepts}") from None

    def model(self, name: str, checkpoint: str = "", pretrained: bool = False) -> tuple[torch.nn.Module, str]:
        """The model and a sentence saying where its weights come from."""
        name, checkpoint, pretrained = BACKBONE(name), CHECKPOINT(checkpoint).strip(), PRETRAINED(pretrained)
        if checkpoint and not os.path.isfile(checkpoint):
            raise InputError(f"{CHECKPOINT.label}: expected the path of a file on the server (none there)")
        if checkpoint:
            source = f"Weights loaded from {Path(checkpoint).name}."
        elif pretrained:
            source = "timm pretrained weights."
        else:
            source = ("**Random weights**: no checkpoint was given, so these predictions mean nothing; the attention "
                      "maps still show each design's pattern. Give a checkpoint path for real predictions.")
        return self._models(name, checkpoint, pretrained), source

    @staticmethod
    def _input(model: torch.nn.Module, image: Image.Image) -> tuple[torch.Tensor, Image.Image]:
        shown = image.convert("RGB").resize((_SIZE, _SIZE), Image.BICUBIC)
        config = model.pretrained_cfg
        pixels = torch.from_numpy(np.asarray(shown, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = (torch.tensor(config.get(key, default)).view(3, 1, 1) for key, default in
                     (("mean", (0.485, 0.456, 0.406)), ("std", (0.229, 0.224, 0.225))))
        return ((pixels - mean) / std)[None], shown

    @torch.no_grad()
    def predict(self, name: str, image: Image.Image | str | None, checkpoint: str = "", pretrained: bool = False,
                query_x: float = 0.5, query_y: float = 0.5) -> tuple[dict[str, float], str, list]:
        """Top-5 ImageNet labels, the weights note and the attention maps (overlay, caption) for query (x, y)."""
        from timm.data import ImageNetInfo

        image, query = IMAGE(image), (QUERY_X(query_x), QUERY_Y(query_y))
        with self._lock:
            model, source = self.model(name, checkpoint, pretrained)
            pixels, shown = self._input(model, image)
            probs = model(pixels).softmax(-1)[0]
            maps = attention_maps(name, model, pixels, query)
        top = probs.topk(5)
        labels = ImageNetInfo()
        predictions = {labels.index_to_description(i): float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}
        if not maps:
            source += f" {name} has no attention map to show (ELA is a gate on conv features, not attention)."
        gallery = [(grid_overlay(shown, values), caption) for caption, values in maps]
        return predictions, source, gallery


def build(demo: VisionDemo) -> None:
    """The tab's components and events, inside an open `gr.Blocks` (see `app.build_app` for the queue)."""
    with gr.Row():
        with gr.Column():
            backbone = BACKBONE.dropdown(BACKBONES[0])
            sample = SAMPLE.dropdown(SAMPLES[0], info="scikit-image's bundled photos")
            image = IMAGE.image(sample_image(SAMPLES[0]))
            with gr.Row():
                query_x = QUERY_X.slider(0.5, info="fraction of the width; or click the image")
                query_y = QUERY_Y.slider(0.5, info="fraction of the height")
            with gr.Accordion("Weights", open=False):
                checkpoint = CHECKPOINT.textbox("", info="official or timm keys", placeholder="/path/to/model.pth")
                pretrained = PRETRAINED.checkbox(False, info="needs the model hub")
            run = gr.Button("Classify and show attention", variant="primary", elem_id="vision-run")
        with gr.Column():
            source = gr.Markdown(elem_id="vision-source")
            predictions = gr.Label(num_top_classes=5, label="Predictions")
            maps = gr.Gallery(label="Attention", columns=2, height="auto", elem_id="vision-maps")
    with gr.Accordion("Kernel backends on this machine", open=False):
        tokens = TOKENS.dropdown(1024)
        time_button = gr.Button("Time the backends", elem_id="vision-time")
        timings = gr.Dataframe(headers=HEADERS, label="Median times", elem_id="vision-timings")

    def pick_query(upload: dict, event: gr.SelectData) -> tuple[float, float]:
        """The click as (x, y) fractions of the picture, whose size is read from its header (no preprocessing)."""
        with Image.open(upload["path"]) as picture:
            width, height = picture.size
        x, y = event.index
        return QUERY_X(round(min(x / width, 1.0), 3)), QUERY_Y(round(min(y / height, 1.0), 3))

    def backend_timings(count: int) -> list[list]:
        return time_backends(TOKENS(count))

    inputs = [backbone, image, checkpoint, pretrained, query_x, query_y]
    sample.change(handler(sample_image), sample, image, api_name="vision_sample")
    image.select(handler(pick_query), image, [query_x, query_y], preprocess=False, api_name=False).then(
        handler(demo.predict), inputs, [predictions, source, maps], api_name=False, concurrency_id="models")
    run.click(handler(demo.predict), inputs, [predictions, source, maps], api_name="vision_predict",
              concurrency_id="models")
    time_button.click(handler(backend_timings), tokens, timings, api_name="vision_timings", concurrency_id="models")
