"""A folder of video clips with captions for LoRA training, read with decord.

Layout: every clip `name.<ext>` (ext in `VIDEO_EXTENSIONS`) has its caption in `name.txt` beside it (UTF-8,
the whole file, stripped). Subfolders are searched too. A clip without a caption file is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ._extras import require

__all__ = ["VIDEO_EXTENSIONS", "Clip", "find_clips", "load_clip"]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm")


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str


def find_clips(folder: str | Path) -> list[Clip]:
    """The clips of `folder` (sorted by path) with their captions; raises ValueError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {str(folder)!r} does not exist or is not a directory")
    clips = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()):
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise ValueError(f"clip {str(path)!r} has no caption file {caption.name!r} beside it")
        clips.append(Clip(path, caption.read_text(encoding="utf-8").strip()))
    if not clips:
        raise ValueError(f"data folder {str(folder)!r} holds no video clips ({', '.join(VIDEO_EXTENSIONS)})")
    return clips


def load_clip(path: str | Path, frames: int, height: int, width: int, frame_stride: int = 1) -> torch.Tensor:
    """`frames` frames (every `frame_stride`-th from the first) as a `(3, frames, height, width)` tensor in [-1, 1].

    Each frame is scaled to cover `height x width` (aspect ratio kept) and centre-cropped.
    """
    decord = require("decord", "train")
    reader = decord.VideoReader(str(path))
    needed = (frames - 1) * frame_stride + 1
    if len(reader) < needed:
        raise ValueError(f"clip {str(path)!r} has {len(reader)} frames, fewer than the {needed} needed")
    video = torch.from_numpy(reader.get_batch(list(range(0, needed, frame_stride))).asnumpy())  # (F, H, W, 3) uint8
    video = video.permute(0, 3, 1, 2).float() / 127.5 - 1
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    if size != tuple(video.shape[2:]):
        video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[:, :, top : top + height, left : left + width].clamp(-1, 1)
    return video.permute(1, 0, 2, 3).contiguous()
