"""Video quality metrics: MPVBench's CSCV (transition smoothness) and frame PSNR / SSIM between two videos.

Videos are `(T, H, W, 3)` uint8 arrays or tensors, or paths read with decord.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._extras import require

__all__ = ["clip_frame_similarities", "cscv", "frame_psnr", "frame_ssim", "load_clip", "read_video"]


def read_video(video: str | Path | np.ndarray | torch.Tensor) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a path (decord) or an array."""
    if isinstance(video, (str, Path)):
        decord = require("decord", "video")
        reader = decord.VideoReader(str(video))
        return reader.get_batch(list(range(len(reader)))).asnumpy()
    frames = video.cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"video must be (T, H, W, 3) uint8 frames, got shape {frames.shape} dtype {frames.dtype}")
    return frames


def load_clip(model_name: str = "ViT-B-32", checkpoint: str | Path | None = None, device: str = "cpu"):
    """An open_clip image model and its preprocessing from a local checkpoint (None: random weights)."""
    open_clip = require("open_clip", "clip")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(checkpoint) if checkpoint else None, device=device
    )
    return model.eval(), preprocess


@torch.no_grad()
def clip_frame_similarities(video, model, preprocess) -> torch.Tensor:
    """Cosine similarity of the CLIP image embeddings of consecutive frames, `(T - 1,)`."""
    from PIL import Image

    frames = read_video(video)
    if len(frames) < 2:
        raise ValueError(f"video must have at least 2 frames, got {len(frames)}")
    device = next(model.parameters()).device
    batch = torch.stack([preprocess(Image.fromarray(f)) for f in frames]).to(device)
    features = torch.nn.functional.normalize(model.encode_image(batch).float(), dim=-1)
    return (features[1:] * features[:-1]).sum(-1).cpu()


def cscv(video, model, preprocess) -> float:
    """CLIP Similarity Coefficient of Variation (MPVBench): std / mean of consecutive-frame CLIP similarities.

    Lower is smoother: abrupt prompt transitions show up as dips in the similarity sequence.
    """
    similarities = clip_frame_similarities(video, model, preprocess).double()
    return float(similarities.std(unbiased=False) / similarities.mean())


def _paired(reference, candidate) -> tuple[np.ndarray, np.ndarray]:
    a, b = read_video(reference), read_video(candidate)
    if a.shape != b.shape:
        raise ValueError(f"candidate: expected the reference's shape {a.shape}, got {b.shape}")
    return a, b


def frame_psnr(reference, candidate) -> float:
    """Mean over frames of the PSNR (dB, peak 255) between two videos (e.g. dense vs Radial)."""
    a, b = _paired(reference, candidate)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(-1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def frame_ssim(reference, candidate) -> float:
    """Mean over frames of the SSIM (scikit-image, colour channels averaged) between two videos."""
    from skimage.metrics import structural_similarity

    a, b = _paired(reference, candidate)
    return float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(a, b)]))
