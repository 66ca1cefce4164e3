"""Video tab: Radial attention's mask and density, DiTCtrl's segment plan, and a tiny random pipeline run (Wan 2.1,
Wan 2.2 TI2V, HunyuanVideo 1.5, LTX-2, Kandinsky 5; dense, Radial, STA or NABLA attention) shown as a video."""

from __future__ import annotations

import gradio as gr
import torch

from mmattn.diffusion import radial_block_mask
from mmattn.diffusion.masks import MASK_RULES

from .fields import Choice, Clip, InputError, Number
from .handlers import handler, output_path
from .rendering import line_plot, mask_image, write_video
from .video_pipeline import PATTERNS, TINY_MODELS, latent_frames_as_video, run_tiny

__all__ = ["VIDEO", "build", "density_curve", "plan_figure", "radial_from_video", "radial_view", "tiny_run"]

_WAN_TIME, _WAN_SPACE = 4, 16  # Wan 2.1: VAE 4x in time; VAE 8x and patch 2x2 in space

FRAMES = Number("Latent frames", 1, 256)
TOKENS_PER_FRAME = Number("Tokens per frame", 1, 16384)
BLOCK = Choice("Block size", (16, 64, 128))
MAX_BLOCKS = 2048
"""Masks of at most 2048 x 2048 blocks (Wan 2.1 480p, 21 x 1560 tokens, in blocks of 16): the mask, its picture and the
density curve take at most 0.5 s and 0.18 GB on the 2-core CPU machine, and the 64 masks `radial_block_mask` caches at
most 0.27 GB (4096 blocks: 1.4 s, and four times that). The frames are capped too: the mask loops over frame pairs."""
DECAY = Number("Decay factor", 0.05, 2.0, step=0.05)
RULE = Choice("Mask rule", MASK_RULES)
VIDEO = Clip("Video", max_frames=(FRAMES.high - 1) * _WAN_TIME + 1, min_side=_WAN_SPACE)
PROMPTS = Number("Prompts", 2, 6)
SEGMENT = Number("Segment length", 2, 26)
OVERLAP = Number("Overlap", 0, 25)
TRANSITIONS = Number("Transition segments", 0, 4)
NUM_FRAMES = Choice("Frames", (5, 9, 13, 17))
STEPS = Number("Denoising steps", 1, 10)
MODEL = Choice("Model", tuple(TINY_MODELS))
PATTERN = Choice("Attention", PATTERNS)
_PATTERN_NAMES = {"dense": "dense", "radial": "Radial", "sta": "sliding-tile (STA)", "nabla": "NABLA"}


def density_curve(frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, model: str):
    """Figure of the Radial mask's block density against the number of latent frames (1 .. `frames`)."""
    counts = sorted({max(1, round(frames * i / 12)) for i in range(1, 13)})
    density = [radial_block_mask(f, tokens_per_frame, block_size=block_size, decay_factor=decay_factor,
                                 model=model).float().mean().item() for f in counts]
    return line_plot(counts, {"Radial": density}, xlabel="latent frames", ylabel="block density",
                     title=f"{tokens_per_frame} tokens/frame, block {block_size}, decay {decay_factor}")


def radial_view(frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, model: str):
    """The Radial block mask as a picture, a line with its size and density, and the density curve."""
    frames, tokens_per_frame, block_size = FRAMES(frames), TOKENS_PER_FRAME(tokens_per_frame), BLOCK(block_size)
    decay_factor, model = DECAY(decay_factor), RULE(model)
    if -(-frames * tokens_per_frame // block_size) > MAX_BLOCKS:
        raise InputError(f"{FRAMES.label} x {TOKENS_PER_FRAME.label}: expected at most {MAX_BLOCKS * block_size} "
                         f"tokens with block size {block_size}")
    mask = radial_block_mask(frames, tokens_per_frame, block_size=block_size, decay_factor=decay_factor, model=model)
    summary = (f"{frames} frames x {tokens_per_frame} tokens = {frames * tokens_per_frame} tokens; "
               f"{mask.shape[0]}x{mask.shape[1]} blocks of {block_size}; density **{mask.float().mean():.3f}**")
    return mask_image(mask), summary, density_curve(frames, tokens_per_frame, block_size, decay_factor, model)


def radial_from_video(path: str, block_size: int, decay_factor: float, model: str):
    """`radial_view` for the latent grid Wan 2.1 makes of a clip, ((T-1)//4 + 1) x (H//16)(W//16); also returns the
    grid for the inputs. The clip is only probed (frame count and size), never decoded."""
    block_size, decay_factor, model = BLOCK(block_size), DECAY(decay_factor), RULE(model)
    count, height, width = VIDEO.probe(path)
    frames, tokens = (count - 1) // _WAN_TIME + 1, (height // _WAN_SPACE) * (width // _WAN_SPACE)
    try:
        return (frames, tokens, *radial_view(frames, tokens, block_size, decay_factor, model))
    except InputError as error:
        raise InputError(f"{VIDEO.label}: expected a clip whose Wan latent grid fits ({error})") from None


def plan_figure(num_prompts: int, segment_frames: int, overlap: int, transitions: int):
    """DiTCtrl's segment plan over the long latent: one bar per segment, coloured by its prompt mix."""
    from matplotlib.figure import Figure

    from mmattn.diffusion.ditctrl import segment_plan

    segment_frames, overlap = SEGMENT(segment_frames), OVERLAP(overlap)
    if overlap >= segment_frames:
        raise InputError(f"{OVERLAP.label}: expected a whole number from 0 to {segment_frames - 1} (less than the "
                         "segment length)")
    plan = segment_plan(PROMPTS(num_prompts), segment_frames=segment_frames, overlap=overlap,
                        transitions=TRANSITIONS(transitions))
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
    num_frames: int, steps: int, model: str, pattern: str,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
) -> tuple[str, str]:
    """A tiny random run of `model` (dense, Radial, STA or NABLA attention) as an MP4 of its latent channels, and a note."""
    num_frames, steps, model, pattern = NUM_FRAMES(num_frames), STEPS(steps), MODEL(model), PATTERN(pattern)
    latents = run_tiny(model, num_frames, steps, pattern,
                       on_step=lambda step, total: progress(step / total, desc=f"denoising step {step}/{total}"))
    if not torch.isfinite(latents).all():
        raise ValueError("the run produced non-finite latents")
    path = write_video(latent_frames_as_video(latents), output_path(".mp4"), fps=4)
    note = (f"Tiny random {TINY_MODELS[model]} transformer ({_PATTERN_NAMES[pattern]} attention), {latents.shape[1]} "
            "latent frames; no VAE, so latent channels 0-2 are shown as colours.")
    return str(path), note


def build() -> None:
    """The tab's components and events, inside an open `gr.Blocks` (see `app.build_app` for the queue)."""
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Radial attention mask")
            frames = FRAMES.box(21)
            tokens = TOKENS_PER_FRAME.box(1560)
            block = BLOCK.dropdown(128)
            decay = DECAY.slider(1.0)
            rule = RULE.radio("wan", info="wan: frame 0 is an attention sink")
            video = VIDEO.video()
            gr.Markdown("Or upload a video above: the mask for the latent grid Wan 2.1 makes of it (read with PyAV).")
            show = gr.Button("Draw the mask", variant="primary", elem_id="video-mask")
        with gr.Column():
            summary = gr.Markdown(elem_id="video-summary")
            mask = gr.Image(label="Block mask (black: computed)", elem_id="video-mask-image")
            curve = gr.Plot(label="Density against frames")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### DiTCtrl segment plan")
            prompts = PROMPTS.slider(3)
            segment = SEGMENT.slider(13, info="latent frames")
            overlap = OVERLAP.slider(9)
            transitions = TRANSITIONS.slider(2)
            plan_button = gr.Button("Draw the plan", elem_id="video-plan")
        plan = gr.Plot(label="Segments over time")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Tiny pipeline run")
            num_frames = NUM_FRAMES.dropdown(13, info="pixel space")
            steps = STEPS.slider(4)
            model = MODEL.dropdown("wan2.1", info="diffusers' test-sized transformer, random weights")
            pattern = PATTERN.radio("radial", info="the sparse ones keep the first step dense")
            run = gr.Button("Generate", elem_id="video-run")
        with gr.Column():
            note = gr.Markdown(elem_id="video-note")
            clip = gr.Video(label="Generated frames", elem_id="video-clip")
    mask_inputs = [frames, tokens, block, decay, rule]
    show.click(handler(radial_view), mask_inputs, [mask, summary, curve], api_name="video_radial")
    video.upload(handler(radial_from_video), [video, block, decay, rule], [frames, tokens, mask, summary, curve],
                 api_name="video_radial_from_video")
    plan_button.click(handler(plan_figure), [prompts, segment, overlap, transitions], plan, api_name="video_plan")
    run.click(handler(tiny_run), [num_frames, steps, model, pattern], [clip, note], api_name="video_run",
              concurrency_id="models")
