"""The mmattn demo: one Gradio Blocks app with a tab per subsystem (vision, VLM, video)."""

from __future__ import annotations

import gradio as gr

from . import video_tab, vision_tab, vlm_tab

__all__ = ["MAX_FILE_SIZE", "QUEUE_SIZE", "build_app", "launch"]

_INTRO = """# mmattn demo
Sparse and structured attention for vision backbones, VLM interventions and video diffusion, on one kernel layer.
Everything here runs on embedded defaults (random weights, bundled photos) with no download."""

QUEUE_SIZE = 64
"""Requests waiting at most, all endpoints together; more are refused ("queue is full") rather than kept."""
MAX_FILE_SIZE = "100mb"
"""Largest upload; pictures and videos are also bounded by what they hold (`vision_tab.IMAGE`, `video_tab.VIDEO`)."""
_CACHE_CLEANUP = (600, 3600)
"""Every 10 minutes, delete the output files and uploads older than an hour."""


def build_app() -> gr.Blocks:
    """The Blocks app; each tab keeps its loaded models on its own demo object.

    Queue: every endpoint runs one request at a time (`default_concurrency_limit=1`), and the model runs (Vision
    predict and timings, VLM compare, Video run) share one slot, the "models" concurrency group: each uses all the
    cores of the 2-core CPU machine, where two at once only slow each other down. The cheap ones (samples, Radial
    mask, DiTCtrl plan) run beside them.
    """
    with gr.Blocks(title="mmattn demo", delete_cache=_CACHE_CLEANUP) as app:
        gr.Markdown(_INTRO)
        with gr.Tab("Vision", id="vision"):
            vision_tab.build(vision_tab.VisionDemo())
        with gr.Tab("VLM", id="vlm"):
            vlm_tab.build(vlm_tab.VLMDemo())
        with gr.Tab("Video", id="video"):
            video_tab.build()
    return app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True) -> gr.Blocks:
    """Serve the app on `host:port` (a public gradio.live link with `share`); returns it when `block` is False.

    Errors reach the page only as the demo's one-line messages (`gr.Error`); `show_error` stays off so that an
    unexpected exception in Gradio itself shows Gradio's generic notice, not its text."""
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    app = build_app()
    app.launch(server_name=host, server_port=port or None, share=share, prevent_thread_lock=not block,
               show_error=False, quiet=not block, max_file_size=MAX_FILE_SIZE)
    return app
