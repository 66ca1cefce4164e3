"""The mmattn demo: one Gradio Blocks app with a tab per subsystem (vision, VLM, video)."""

from __future__ import annotations

import gradio as gr

from . import video_tab, vision_tab, vlm_tab

__all__ = ["build_app", "launch"]

_INTRO = """# mmattn demo
Sparse and structured attention for vision backbones, VLM interventions and video diffusion, on one kernel layer.
Everything here runs on embedded defaults (random weights, bundled photos) with no download."""


def build_app() -> gr.Blocks:
    """The Blocks app; each tab keeps its loaded models on its own demo object."""
    with gr.Blocks(title="mmattn demo") as app:
        gr.Markdown(_INTRO)
        with gr.Tab("Vision", id="vision"):
            vision_tab.build(vision_tab.VisionDemo())
        with gr.Tab("VLM", id="vlm"):
            vlm_tab.build(vlm_tab.VLMDemo())
        with gr.Tab("Video", id="video"):
            video_tab.build()
    return app.queue(default_concurrency_limit=1)


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True) -> gr.Blocks:
    """Serve the app on `host:port` (a public gradio.live link with `share`); returns it when `block` is False."""
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    app = build_app()
    app.launch(server_name=host, server_port=port or None, share=share, prevent_thread_lock=not block,
               show_error=False, quiet=not block)
    return app
