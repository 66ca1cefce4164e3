"""Radial attention's static block mask (Radial Attention, arXiv 2506.19852), as `BlockSparseMask`.

Video tokens are frame-major (token = frame * tokens_per_frame + raster position). For every (query frame i,
key frame j) pair at temporal distance d = |i - j| the paper's token-level rule is a band |p - q| <= w(d) in
raster order whose width halves with each power-of-two distance ("energy decay"), plus an attention sink on
frame 0 (Wan rule) and diagonal thinning once the band would be narrower than 128 tokens. Each pair's token
mask is shrunk to blocks by the official column-density rule: a block is kept when more than 60 % of its
non-empty columns are more than 1/3 full. Text tokens (placed after the video) attend and are attended densely.

The token-level masks are never materialised: each block's per-column counts follow from the band
limits, so a 100k-token mask costs milliseconds. Both builders are cached by their arguments.
"""

from __future__ import annotations

import functools
import math

import torch

from mmattn.kernels import BlockSparseMask
from mmattn.kernels.mask import BLOCK_MULTIPLE, MIN_BLOCK

__all__ = ["MASK_RULES", "check_radial_args", "radial_block_mask", "radial_mask"]

MASK_RULES = ("wan", "hunyuan")
"""`wan`: frame 0 is an attention sink for every query frame; `hunyuan`: no sink (official rules at HEAD)."""
_THINNING_THRESHOLD = 128
"""Band width below which whole frame pairs are dropped periodically; hard-coded to 128 even for 64-blocks."""


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_radial_args(block_size: object, decay_factor: object, model: object) -> None:
    """Validates the Radial hyper-parameters shared by the mask builders and `RadialConfig`."""
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < MIN_BLOCK or block_size % BLOCK_MULTIPLE:
        raise ValueError(
            f"block_size must be a multiple of {BLOCK_MULTIPLE} and >= {MIN_BLOCK} (what the block-sparse "
            f"kernels run), got {block_size}"
        )
    if not isinstance(decay_factor, (int, float)) or isinstance(decay_factor, bool):
        raise TypeError(f"decay_factor must be a float, got {type(decay_factor).__name__}")
    if not (decay_factor > 0 and math.isfinite(decay_factor)):
        raise ValueError(f"decay_factor must be a finite number > 0, got {decay_factor}")
    if model not in MASK_RULES:
        raise ValueError(f"model must be one of {MASK_RULES}, got {model!r}")


def _window(distance: int, tokens_per_frame: int, block_size: int, decay_factor: float) -> float:
    """Band half-width w(d): full for d <= 1, else 2^bitlen(S) / 2^bitlen(d) * decay, at least one block."""
    if distance <= 1:
        return float(tokens_per_frame)
    width = 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length() * decay_factor
    return width if width >= block_size else float(block_size)


def _thinned_out(distance: int, tokens_per_frame: int) -> bool:
    """Diagonal thinning: below a 128-token band only every k-th distance keeps its frame pair."""
    width = 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length()
    if width >= _THINNING_THRESHOLD:
        return False
    return distance % int(_THINNING_THRESHOLD / width) != 0


@functools.lru_cache(maxsize=4096)
def _pair_blocks(
    row_offset: int, col_offset: int, tokens_per_frame: int, block_size: int, half_width: int, rows_left: int
) -> torch.Tensor:
    """Shrinks one frame pair's band |p - q| <= half_width, placed at the given offsets inside its first block.

    Returns the `[ceil(S/B), ceil(S/B)]` kept-block grid; `half_width >= S` is the full pair. Column
    densities are per block row; `rows_left` (video tokens from this pair's first block row on) makes the
    sequence's trailing partial block count only its real rows, so it is judged like a whole block.
    """
    n = -(-tokens_per_frame // block_size)
    tile = torch.arange(n).view(n, 1, 1) * block_size
    col_tile = torch.arange(n).view(1, n, 1) * block_size
    q = col_tile + torch.arange(block_size).view(1, 1, block_size) - col_offset
    first_row = torch.clamp(tile - row_offset, min=0)
    last_row = torch.clamp(tile + block_size - 1 - row_offset, max=tokens_per_frame - 1)
    low = torch.maximum(first_row, q - half_width)
    high = torch.minimum(last_row, q + half_width)
    counts = torch.where((q >= 0) & (q < tokens_per_frame), (high - low + 1).clamp(min=0), 0)
    nonempty = (counts > 0).sum(-1)
    rows = torch.clamp(rows_left - tile, 1, block_size)
    dense = (3 * counts > rows).sum(-1)  # column density > 1/3
    return 5 * dense > 3 * nonempty  # more than 60 % of the non-empty columns are dense


@functools.lru_cache(maxsize=64)
def radial_block_mask(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model: str = "wan",
    text_tokens: int = 0,
) -> torch.BoolTensor:
    """Radial attention's block mask `[ceil(N/B), ceil(N/B)]`, N = frames * tokens_per_frame + text_tokens.

    Text tokens follow the video; every block row and column from `(frames * tokens_per_frame) // B` on is
    dense, as in the official mask. Where N is a multiple of `block_size` this is the official mask block for
    block; otherwise its leading `N // B` blocks are, and the trailing partial block follows the same rule
    with its column densities taken over its real rows (the official floor-sized mask drops it).
    The returned tensor is cached: do not modify it in place.
    """
    frames = _positive_int("frames", frames)
    tokens_per_frame = _positive_int("tokens_per_frame", tokens_per_frame)
    check_radial_args(block_size, decay_factor, model)
    if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < 0:
        raise ValueError(f"text_tokens must be an int >= 0, got {text_tokens!r}")
    video_tokens = frames * tokens_per_frame
    num_blocks = -(-(video_tokens + text_tokens) // block_size)
    per_frame = -(-tokens_per_frame // block_size)
    canvas = torch.zeros(num_blocks + per_frame, num_blocks + per_frame, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            distance = abs(i - j)
            if model == "wan" and j == 0:
                half_width = tokens_per_frame  # attention sink
            elif _thinned_out(distance, tokens_per_frame):
                continue
            else:
                half_width = min(math.floor(_window(distance, tokens_per_frame, block_size, decay_factor)), tokens_per_frame)
            row, col = i * tokens_per_frame, j * tokens_per_frame
            r, c = row // block_size, col // block_size
            rows_left = min(video_tokens - r * block_size, per_frame * block_size)
            blocks = _pair_blocks(row % block_size, col % block_size, tokens_per_frame, block_size, half_width, rows_left)
            canvas[r : r + per_frame, c : c + per_frame] |= blocks
    mask = canvas[:num_blocks, :num_blocks].clone()
    if text_tokens:
        border = video_tokens // block_size
        mask[border:] = True
        mask[:, border:] = True
    return mask


@functools.lru_cache(maxsize=64)
def radial_mask(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model: str = "wan",
    text_tokens: int = 0,
    valid_text_tokens: int | None = None,
    device: str | torch.device = "cpu",
) -> BlockSparseMask:
    """`radial_block_mask` as a `BlockSparseMask` over the joint [video | text] sequence, on `device`.

    `valid_text_tokens` (default: all) cuts the keys after the valid (left-aligned) text tokens, the way a
    padded prompt's key mask does; queries still span all `text_tokens`.
    """
    blocks = radial_block_mask(
        frames, tokens_per_frame, block_size=block_size, decay_factor=decay_factor, model=model, text_tokens=text_tokens
    )
    video_tokens = frames * tokens_per_frame
    valid = text_tokens if valid_text_tokens is None else valid_text_tokens
    if not isinstance(valid, int) or isinstance(valid, bool) or not 0 <= valid <= text_tokens:
        raise ValueError(f"valid_text_tokens must be an int in [0, text_tokens={text_tokens}], got {valid_text_tokens!r}")
    kv_len = video_tokens + valid
    blocks = blocks[:, : -(-kv_len // block_size)]
    return BlockSparseMask.from_dense(blocks.to(device), block_size, video_tokens + text_tokens, kv_len)
