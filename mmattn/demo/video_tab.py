"""Video tab: Radial attention's mask and density, DiTCtrl's segment plan, and a tiny Wan run shown as a video."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from .errors import shown_as_message
from .rendering import line_plot, mask_image, write_video
from .video_pipeline import latent_frames_as_video, run_tiny_wan

__all__ = ["build", "density_curve", "plan_figure", "radial_from_video", "radial_view", "read_video", "tiny_run", "wan_grid"]

_WAN_TIME, _WAN_SPACE = 4, 16  # Wan 2.1: VAE 4x in time; VAE 8x and patch 2x2 in space


def read_video(path: str) -> np.ndarray:
    """Frames `(T, H, W, 3)` uint8, read with decord (PyAV when decord is missing)."""
    if not path or not Path(path).is_file():
        raise ValueError(f"video must be a local file, got {path!r}")
    try:
        import decord
    except ImportError:
        import av

        with av.open(path) as container:
            return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    return decord.VideoReader(path).get_batch(range(len(decord.VideoReader(path)))).asnumpy()


def wan_grid(frames: np.ndarray) -> tuple[int, int]:
    """(latent frames, tokens per frame) that Wan 2.1 makes of a clip: ((T-1)//4 + 1, (H//16) * (W//16))."""
    count, height, width = frames.shape[:3]
    if height < _WAN_SPACE or width < _WAN_SPACE:
        raise ValueError(f"video: expected frames of at least {_WAN_SPACE}x{_WAN_SPACE} pixels, got {height}x{width}")
    return (count - 1) // _WAN_TIME + 1, (height // _WAN_SPACE) * (width // _WAN_SPACE)


def density_curve(frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, model: str):
    """Figure of the Radial mask's block density against the number of latent frames (1 .. `frames`)."""
    from mmattn.diffusion import radial_block_mask

    counts = sorted({max(1, round(frames * i / 12)) for i in range(1, 13)})
    density = [radial_block_mask(f, tokens_per_frame, block_size=block_size, decay_factor=decay_factor,
                                 model=model).float().mean().item() for f in counts]
    return line_plot(counts, {"Radial": density}, xlabel="latent frames", ylabel="block density",
                     title=f"{tokens_per_frame} tokens/frame, block {block_size}, decay {decay_factor}")


def radial_view(frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, model: str):
    """The Radial block mask as a picture, a line with its size and density, and the density curve."""
    from mmattn.diffusion import radial_block_mask

    frames, tokens_per_frame, block_size = int(frames), int(tokens_per_frame), int(block_size)
    mask = radial_block_mask(frames, tokens_per_frame, block_size=block_size, decay_factor=float(decay_factor), model=model)
    summary = (f"{frames} frames x {tokens_per_frame} tokens = {frames * tokens_per_frame} tokens; "
               f"{mask.shape[0]}x{mask.shape[1]} blocks of {block_size}; density **{mask.float().mean():.3f}**")
    return mask_image(mask), summary, density_curve(frames, tokens_per_frame, block_size, float(decay_factor), model)


def radial_from_video(path: str, block_size: int, decay_factor: float, model: str):
    """`radial_view` for the latent grid Wan makes of an uploaded clip; also returns the grid for the inputs."""
    frames, tokens = wan_grid(read_video(path))
    return (frames, tokens, *radial_view(frames, tokens, block_size, decay_factor, model))


def plan_figure(num_prompts: int, segment_frames: int, overlap: int, transitions: int):
    """DiTCtrl's segment plan over the long latent: one bar per segment, coloured by its prompt mix."""
    from matplotlib.figure import Figure

    from mmattn.diffusion.ditctrl import segment_plan

    plan = segment_plan(int(num_prompts), segment_frames=int(segment_frames), overlap=int(overlap),
                        transitions=int(transitions))
    figure = Figure(figsize=(7, 0.5 + 0.35 * plan.num_segments), layout="constrained")
    axes = figure.subplots()
    for row, (start, (a, b, alpha)) in enumerate(zip(plan.starts, plan.conditions)):
        label = f"prompt {a + 1}" if a == b else f"{1 - alpha:.2f}·p{a + 1} + {alpha:.2f}·p{b + 1}"
        axes.barh(row, plan.segment_frames, left=start, color=f"C{a % 10}", alpha=1.0 - 0.6 * alpha,
                  edgecolor="black")
        axes.text(start + plan.segment_frames / 2, row, label, ha="center", va="center", fontsize=8)
    axes.invert_yaxis()
    axes.set(xlabel="latent frame", ylabel="segment", xlim=(0, plan.latent_frames),
             title=f"{plan.num_segments} segments, {plan.latent_frames} latent frames")
    return figure


def tiny_run(
    num_frames: int, steps: int, radial: bool, progress: gr.Progress = gr.Progress()  # noqa: B008 (Gradio injects it)
) -> tuple[str, str]:
    """A tiny random Wan 2.1 run (stock or Radial attention) as an MP4 of its latent channels, and a note."""
    latents = run_tiny_wan(int(num_frames), int(steps), bool(radial),
                           on_step=lambda step, total: progress(step / total, desc=f"denoising step {step}/{total}"))
    if not torch.isfinite(latents).all():
        raise ValueError("the run produced non-finite latents")
    path = write_video(latent_frames_as_video(latents), Path(tempfile.mkdtemp(prefix="mmattn-demo-")) / "tiny_wan.mp4", fps=4)
    note = (f"Tiny random Wan 2.1 transformer ({'Radial' if radial else 'dense'} attention), {latents.shape[1]} latent "
            "frames; no VAE, so latent channels 0-2 are shown as colours.")
    return str(path), note


def build() -> None:
    """The tab's components and events, inside an open `gr.Blocks`."""
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Radial attention mask")
            frames = gr.Number(value=21, precision=0, label="Latent frames")
            tokens = gr.Number(value=1560, precision=0, label="Tokens per frame")
            block = gr.Dropdown([16, 64, 128], value=128, label="Block size")
            decay = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Decay factor")
            rule = gr.Radio(["wan", "hunyuan"], value="wan", label="Mask rule (wan: frame-0 sink)")
            video = gr.Video(label="Or a video: its Wan latent grid (read with decord / PyAV)", sources=["upload"])
            show = gr.Button("Draw the mask", variant="primary", elem_id="video-mask")
        with gr.Column():
            summary = gr.Markdown(elem_id="video-summary")
            mask = gr.Image(label="Block mask (black: computed)", type="pil", elem_id="video-mask-image")
            curve = gr.Plot(label="Density against frames")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### DiTCtrl segment plan")
            prompts = gr.Slider(2, 6, value=3, step=1, label="Prompts")
            segment = gr.Slider(2, 26, value=13, step=1, label="Segment length (latent frames)")
            overlap = gr.Slider(0, 25, value=9, step=1, label="Overlap")
            transitions = gr.Slider(0, 4, value=2, step=1, label="Transition segments")
            plan_button = gr.Button("Draw the plan", elem_id="video-plan")
        plan = gr.Plot(label="Segments over time")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Tiny pipeline run")
            num_frames = gr.Dropdown([5, 9, 13, 17], value=13, label="Frames (pixel space)")
            steps = gr.Slider(1, 10, value=4, step=1, label="Denoising steps")
            radial = gr.Checkbox(value=True, label="Radial attention")
            run = gr.Button("Generate", elem_id="video-run")
        with gr.Column():
            note = gr.Markdown(elem_id="video-note")
            clip = gr.Video(label="Generated frames", elem_id="video-clip")
    mask_inputs = [frames, tokens, block, decay, rule]
    show.click(shown_as_message(radial_view), mask_inputs, [mask, summary, curve], api_name="video_radial")
    video.upload(shown_as_message(radial_from_video), [video, block, decay, rule], [frames, tokens, mask, summary, curve],
                 api_name="video_radial_from_video")
    plan_button.click(shown_as_message(plan_figure), [prompts, segment, overlap, transitions], plan, api_name="video_plan")
    run.click(shown_as_message(tiny_run), [num_frames, steps, radial], [clip, note], api_name="video_run")
