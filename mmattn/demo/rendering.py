"""Pictures shared by the demo tabs and `mmattn masks`: masks, heat maps over images, line plots, videos."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["grid_overlay", "heat_colors", "line_plot", "mask_image", "write_video"]


def mask_image(mask: torch.Tensor, max_side: int = 768) -> Image.Image:
    """A 2-D bool mask as a picture: kept entries black on white, one square per entry, scaled to about `max_side`."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    pixels = np.where(mask.cpu().numpy().astype(bool), 0, 255).astype(np.uint8)
    scale = max(1, max_side // max(mask.shape))
    return Image.fromarray(pixels).resize((mask.shape[1] * scale, mask.shape[0] * scale), Image.NEAREST)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 on a blue-to-yellow ramp (matplotlib's viridis)."""
    from matplotlib import colormaps

    return (colormaps["viridis"](np.clip(values, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def grid_overlay(image: Image.Image, values: torch.Tensor | np.ndarray, alpha: float = 0.55) -> Image.Image:
    """A `(rows, cols)` map of token values drawn over `image`, min-max scaled; NaN cells stay transparent."""
    grid = np.asarray(values.detach().float().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if grid.ndim != 2:
        raise ValueError(f"values must be a 2-D (rows, cols) map, got shape {grid.shape}")
    finite = np.isfinite(grid)
    low, high = (grid[finite].min(), grid[finite].max()) if finite.any() else (0.0, 1.0)
    scaled = (grid - low) / (high - low) if high > low else np.zeros_like(grid)
    colors = Image.fromarray(heat_colors(np.nan_to_num(scaled))).resize(image.size, Image.NEAREST)
    weight = Image.fromarray((finite * alpha * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    base = image.convert("RGB")
    return Image.composite(Image.blend(base, colors, 1.0), base, weight)


def line_plot(x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str, title: str):
    """A small matplotlib figure with one line per entry of `series` (for `gr.Plot`)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.2), layout="constrained")
    axes = figure.subplots()
    for label, ys in series.items():
        axes.plot(list(x), list(ys), marker="o", label=label)
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    return figure


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Frames `(T, H, W, 3)` uint8 -> an H.264 MP4 (PyAV); sides are padded to even sizes as yuv420p needs."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
