"""VLM tab: the answer with and without each intervention, and what they see over the image (VAR's visual sink
tokens, GIFT's gaze-shift saliency map, the image tokens pruning keeps)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from .fields import Choice, Number, Text
from .handlers import handler
from .rendering import grid_overlay
from .vision_tab import IMAGE, SAMPLE, SAMPLES, sample_image
from .vlm_models import MODEL, TINY, VLM, load_vlm

__all__ = ["HOOKS", "VLMDemo"]

HOOKS = ("VAR", "GIFT", "FastV", "PyramidDrop")
PROMPT = Text("Prompt", max_chars=1000, required=True)
"""1000 characters: the tiny model answers with all four interventions and 64 new tokens in 3.4 s and 0.23 GB at its
peak on the 2-core CPU machine (4000 characters took 39 s, 8000 took 172 s); for a real model, about 250 tokens."""
INTERVENTIONS = Choice("Interventions", HOOKS, many=True)
NEW_TOKENS = Number("New tokens", 1, 64)
_PAPER_DEPTH = 24  # below this many layers the papers' layer choices are scaled to the model


def _intervention(name: str, vlm: VLM, sink_dims: tuple[int, ...]):
    """The intervention `name` with the papers' defaults, layer choices scaled down for shallow (tiny) models."""
    from mmattn import vlm as hooks

    layers = vlm.num_layers
    shallow = layers < _PAPER_DEPTH
    if name == "VAR":
        return hooks.VAR(sink_dims=sink_dims)
    if name == "GIFT":
        if not shallow:
            return hooks.GIFT(tokenizer=vlm.tokenizer)
        source = layers // 3
        return hooks.GIFT(saliency_layers=(source,), enhance_layers=tuple(range(source + 1, layers - 1)), tokenizer=vlm.tokenizer)
    if name == "FastV":
        return hooks.FastV()
    if name == "PyramidDrop":
        return hooks.PyramidDrop(layers=(layers // 4, layers // 2, 3 * layers // 4)) if shallow else hooks.PyramidDrop()
    raise ValueError(f"hooks must be among {HOOKS}, got {name!r}")


def _image_values(per_token: torch.Tensor, image_mask: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Row 0's values at the image-token positions, as the (rows, cols) image grid."""
    return per_token[0, image_mask[0]].float().reshape(grid).numpy()


class VLMDemo:
    """Loads VLMs on demand and keeps the `cached` last used, by path; serves one request at a time (the
    interventions patch the model)."""

    def __init__(self, cached: int = 2) -> None:
        self.vlm = functools.lru_cache(maxsize=cached)(load_vlm)
        self._lock = threading.Lock()

    @torch.no_grad()
    def compare(
        self, model_path: str, prompt: str, image: Image.Image | str | None, hooks: list[str], max_new_tokens: int = 12,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
    ) -> tuple[list[list[str]], list, str]:
        """Rows (intervention, answer) from greedy decoding, the heat maps (overlay, caption) and a note."""
        model_path, prompt, image = MODEL(model_path).strip(), PROMPT(prompt), IMAGE(image)
        hooks, max_new_tokens = INTERVENTIONS(hooks), NEW_TOKENS(max_new_tokens)
        with self._lock:
            return self._compare(model_path, prompt, image, hooks, max_new_tokens, progress)

    def _compare(self, model_path: str, prompt: str, image: Image.Image, hooks: list[str], max_new_tokens: int,
                 progress: gr.Progress) -> tuple[list[list[str]], list, str]:
        from mmattn import vlm as hooks_api
        from mmattn.vlm.interventions.var import KNOWN_SINK_DIMS, sink_scores

        progress(0.0, desc="loading the model")
        vlm = self.vlm(model_path or TINY)
        inputs = vlm.inputs(prompt, image)
        grid = vlm.image_grid(inputs)
        image_mask = inputs["input_ids"] == vlm.model.config.image_token_id
        shown = image.convert("RGB").resize((grid[1] * 28, grid[0] * 28))
        prompt_len = inputs["input_ids"].shape[1]

        def generate() -> str:
            ids = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            return vlm.decode(ids[0, prompt_len:])

        config = vlm.model.model.language_model.config
        sink_dims = KNOWN_SINK_DIMS.get((config.model_type.removesuffix("_text"), config.hidden_size))
        if sink_dims is None:
            sink_dims = tuple(hooks_api.find_sink_dims(vlm.model, inputs))
        answers = [["no intervention", generate()]]
        maps = []
        for index, name in enumerate(hooks):
            progress((index + 1) / (len(hooks) + 1), desc=f"generating with {name}")
            with hooks_api.apply(vlm.model, _intervention(name, vlm, sink_dims)) as handle:
                answers.append([name, generate()])
                if name == "VAR":
                    hidden = vlm.model(**inputs, output_hidden_states=True).hidden_states[2]  # input of layer 2
                    phi = sink_scores(hidden, sink_dims)
                    sinks = int((phi[image_mask] > handle.runtimes[0].settings.tau).sum())
                    maps.append((grid_overlay(shown, _image_values(phi, image_mask, grid)),
                                 f"VAR: sink score phi at layer 2 (dims {list(sink_dims)}); {sinks} image tokens above tau"))
                elif name == "GIFT":
                    multiplier = handle.runtimes[0].multiplier  # None when the prompt has no informative word
                    if multiplier is not None:
                        maps.append((grid_overlay(shown, _image_values(multiplier.log(), image_mask, grid)),
                                     "GIFT: gaze-shift saliency (alpha * S, min-max scaled)"))
                else:
                    layer = max(handle.call.keep)
                    kept = torch.zeros_like(image_mask)
                    kept.scatter_(1, handle.call.lm_positions.gather(1, handle.call.keep[layer]), True)
                    values = np.where(_image_values(kept, image_mask, grid), 1.0, np.nan)
                    count = int(np.isfinite(values).sum())
                    maps.append((grid_overlay(shown, values),
                                 f"{name}: {count} of {values.size} image tokens kept from layer {layer} on"))
        note = ("Tiny built-in model with **random weights**: its answers are arbitrary characters; the comparison "
                "and the maps show what each intervention does." if vlm.processor is None else
                f"Model: {Path(model_path).name}")
        return answers, maps, note


def build(demo: VLMDemo) -> None:
    """The tab's components and events, inside an open `gr.Blocks` (see `app.build_app` for the queue)."""
    with gr.Row():
        with gr.Column():
            model_path = MODEL.textbox(TINY, info="or a local Hugging Face LLaVA / Qwen2-VL directory")
            prompt = PROMPT.textbox("What is the person holding?")
            sample = SAMPLE.dropdown(SAMPLES[0])
            image = IMAGE.image(sample_image(SAMPLES[0]))
            hooks = INTERVENTIONS.checkboxes(HOOKS)
            tokens = NEW_TOKENS.slider(12)
            run = gr.Button("Answer with and without each intervention", variant="primary", elem_id="vlm-run")
        with gr.Column():
            note = gr.Markdown(elem_id="vlm-note")
            answers = gr.Dataframe(headers=["intervention", "answer"], label="Answers", elem_id="vlm-answers")
            maps = gr.Gallery(label="Over the image", columns=2, height="auto", elem_id="vlm-maps")
    sample.change(handler(sample_image), sample, image, api_name=False)
    run.click(handler(demo.compare), [model_path, prompt, image, hooks, tokens], [answers, maps, note],
              api_name="vlm_compare", concurrency_id="models")
