"""Vision tab: a backbone's predictions on a photo and what its attention looks at, plus kernel timings."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from .errors import shown_as_message
from .kernel_timing import HEADERS, time_backends
from .rendering import grid_overlay
from .vision_maps import attention_maps

__all__ = ["BACKBONES", "SAMPLES", "VisionDemo", "sample_image"]

BACKBONES = ("biformer_tiny", "nat_mini", "dinat_mini", "litv2_small", "agent_deit_tiny", "agent_pvt_tiny", "ela_resnet18")
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket")
_SIZE = 224


def sample_image(name: str) -> Image.Image:
    """One of scikit-image's bundled sample photos (no download)."""
    if name not in SAMPLES:
        raise ValueError(f"sample must be one of {SAMPLES}, got {name!r}")
    from skimage import data

    return Image.fromarray(getattr(data, name)())


class VisionDemo:
    """Builds timm models on demand and keeps them, keyed by (name, weights), for the life of the app."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, str, bool], torch.nn.Module] = {}

    def model(self, name: str, checkpoint: str = "", pretrained: bool = False) -> tuple[torch.nn.Module, str]:
        """The model and a sentence saying where its weights come from."""
        import timm

        import mmattn.vision  # noqa: F401  (registers the models with timm)

        if name not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
        checkpoint = (checkpoint or "").strip()
        if checkpoint and not Path(checkpoint).is_file():
            raise ValueError(f"checkpoint must be a local file, got {checkpoint!r} (not found)")
        key = (name, checkpoint, bool(pretrained))
        if key not in self.models:
            if checkpoint:
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": checkpoint})
            else:
                model = timm.create_model(name, pretrained=bool(pretrained))
            self.models[key] = model.eval()
        if checkpoint:
            source = f"Weights loaded from {checkpoint}."
        elif pretrained:
            source = "timm pretrained weights."
        else:
            source = ("**Random weights**: no checkpoint was given, so these predictions mean nothing; the attention "
                      "maps still show each design's pattern. Give a checkpoint path for real predictions.")
        return self.models[key], source

    @staticmethod
    def _input(model: torch.nn.Module, image: Image.Image) -> tuple[torch.Tensor, Image.Image]:
        shown = image.convert("RGB").resize((_SIZE, _SIZE), Image.BICUBIC)
        config = model.pretrained_cfg
        pixels = torch.from_numpy(np.asarray(shown, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = (torch.tensor(config.get(key, default)).view(3, 1, 1) for key, default in
                     (("mean", (0.485, 0.456, 0.406)), ("std", (0.229, 0.224, 0.225))))
        return ((pixels - mean) / std)[None], shown

    @torch.no_grad()
    def predict(self, name: str, image: Image.Image | None, checkpoint: str = "", pretrained: bool = False,
                query_x: float = 0.5, query_y: float = 0.5) -> tuple[dict[str, float], str, list]:
        """Top-5 ImageNet labels, the weights note and the attention maps (overlay, caption) for query (x, y)."""
        if image is None:
            raise ValueError("image: expected a picture, got none (pick a sample or upload one)")
        from timm.data import ImageNetInfo

        model, source = self.model(name, checkpoint, pretrained)
        pixels, shown = self._input(model, image)
        probs = model(pixels).softmax(-1)[0]
        top = probs.topk(5)
        labels = ImageNetInfo()
        predictions = {labels.index_to_description(i): float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}
        maps = attention_maps(name, model, pixels, (query_x, query_y))
        if not maps:
            source += f" {name} has no attention map to show (ELA is a gate on conv features, not attention)."
        gallery = [(grid_overlay(shown, values), caption) for caption, values in maps]
        return predictions, source, gallery


def build(demo: VisionDemo) -> None:
    """The tab's components and events, inside an open `gr.Blocks`."""
    with gr.Row():
        with gr.Column():
            backbone = gr.Dropdown(list(BACKBONES), value=BACKBONES[0], label="Backbone")
            sample = gr.Dropdown(list(SAMPLES), value=SAMPLES[0], label="Sample photo (scikit-image)")
            image = gr.Image(value=sample_image(SAMPLES[0]), type="pil", label="Image (upload, or click to pick the query)")
            with gr.Row():
                query_x = gr.Slider(0, 1, value=0.5, step=0.01, label="Query x (fraction of width)")
                query_y = gr.Slider(0, 1, value=0.5, step=0.01, label="Query y (fraction of height)")
            with gr.Accordion("Weights", open=False):
                checkpoint = gr.Textbox(label="Checkpoint path (official or timm keys)", placeholder="/path/to/model.pth")
                pretrained = gr.Checkbox(label="timm pretrained (needs the model hub)", value=False)
            run = gr.Button("Classify and show attention", variant="primary", elem_id="vision-run")
        with gr.Column():
            source = gr.Markdown(elem_id="vision-source")
            predictions = gr.Label(num_top_classes=5, label="Predictions")
            maps = gr.Gallery(label="Attention", columns=2, height="auto", elem_id="vision-maps")
    with gr.Accordion("Kernel backends on this machine", open=False):
        tokens = gr.Dropdown([256, 1024, 4096], value=1024, label="Tokens")
        time_button = gr.Button("Time the backends", elem_id="vision-time")
        timings = gr.Dataframe(headers=HEADERS, label="Median times", elem_id="vision-timings")

    def pick_query(picture: Image.Image | None, event: gr.SelectData) -> tuple[float, float]:
        if picture is None:
            return 0.5, 0.5
        x, y = event.index
        return round(x / picture.width, 3), round(y / picture.height, 3)

    inputs = [backbone, image, checkpoint, pretrained, query_x, query_y]
    sample.change(shown_as_message(sample_image), sample, image, api_name="vision_sample")
    image.select(pick_query, image, [query_x, query_y]).then(
        shown_as_message(demo.predict), inputs, [predictions, source, maps], api_name=False)
    run.click(shown_as_message(demo.predict), inputs, [predictions, source, maps], api_name="vision_predict")
    time_button.click(shown_as_message(lambda n: time_backends(int(n))), tokens, timings, api_name="vision_timings")
