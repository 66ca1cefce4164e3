"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", 2025,
arXiv 2503.11187): video-token pruning before the LLM, for Qwen2.5-VL and Qwen3-VL video inputs.

Dynamic Temporal Segmentation (DySeg): the frames' global features f_i (the mean of a frame's visual tokens at the LLM
input) give transition similarities t_i = cos(f_i, f_{i+1}); the video is cut after frame i for the c-1 lowest t_i
(at least c segments) and for every t_i < τ.

Density Spatiotemporal Pruning (STPrune), per frame of M tokens keeping int(M·r): int(int(M·r)·d) contextual and the
rest salient tokens. Attention-based Token Selection (ATS): the salient tokens are the frame's top tokens by the
attention its mean query pays them in the last ViT block. Density-based Token Merging (DTM): in a segment of L frames
the last frame and every p-th one before it are anchor frames, each with (int(int(M·r)·d)·L) // ⌈L/p⌉ anchor
tokens: the density peaks (DPC-kNN) among its non-salient tokens. Every non-salient token of the segment is assigned
to the anchor it is most cosine-similar to, and each anchor becomes w·anchor + (1-w)·mean(assigned),
w = max(1/(n+1), β) for its n assigned tokens. The salient and anchor tokens remain, at their original (multi-axis)
rotary positions.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import ModelContext, check_number
from .pruning import PruneStage, PruningPlan, _PruningIntervention, _PruningRuntime

__all__ = ["FastVID", "density_peak_scores", "dynamic_segments", "fastvid_select"]

#: Model types whose video frames FastVID reads (one ViT frame per temporal patch, 2x2-merged tokens).
_FAMILIES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
             "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


def dynamic_segments(global_features: torch.Tensor, c: int, tau: float) -> list[int]:
    """DySeg: the lengths of the temporally ordered segments of the T frames whose global features are
    `global_features` [T, D]. Cuts after frame i where t_i = cos(f_i, f_{i+1}) is among the c-1 lowest (ties: the
    earlier transition; at most T-1 cuts) or below `tau`."""
    frames = global_features.shape[0]
    if frames < 2:
        return [frames]
    unit = nn.functional.normalize(global_features.float(), dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(-1)
    cut = similarity < tau
    lowest = similarity.argsort(stable=True)[: min(c - 1, frames - 1)]
    cut[lowest] = True
    bounds = [0, *(cut.nonzero().flatten() + 1).tolist(), frames]
    return [end - start for start, end in zip(bounds[:-1], bounds[1:])]


def density_peak_scores(features: torch.Tensor, neighbours: int = 4) -> torch.Tensor:
    """DPC-kNN score ρ_i·δ_i of each of the n tokens `features` [n, D] (fp32): distances d_ij = ||x_i - x_j|| / √D;
    local density ρ_i = exp(-mean of d_ij² over the `neighbours` nearest tokens, itself included); δ_i = the
    distance to the nearest denser token (equal densities: the lower index counts as denser), or the largest
    distance of all for the densest token."""
    x = features.float()
    tokens = x.shape[0]
    distance = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(x.shape[1])
    nearest = distance.topk(min(neighbours, tokens), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))
    index = torch.arange(tokens, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )  # denser[i, j]: token j is denser than token i
    delta = distance.masked_fill(~denser, float("inf")).amin(-1)
    delta = torch.where(denser.any(-1), delta, distance.max())
    return density * delta


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores (ties: the lower index), in descending order of score."""
    return scores.argsort(descending=True, stable=True)[:count]


def fastvid_select(
    features: torch.Tensor, salience: torch.Tensor, retention: float, c: int, tau: float, d: float, p: int, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVID on one video of T frames of M tokens: `features` [T, M, D] (the LLM-input video tokens), `salience`
    [T, M] (ATS scores). Returns (keep [T, M] bool, features with every anchor token replaced by its merge)."""
    frames, tokens, _ = features.shape
    retained = int(tokens * retention)
    contextual = int(retained * d)
    salient = retained - contextual
    x = features.float()
    keep = torch.zeros(frames, tokens, dtype=torch.bool, device=features.device)
    for frame in range(frames):
        keep[frame, _top(salience[frame].float(), salient)] = True
    rest = [(~keep[frame]).nonzero().flatten() for frame in range(frames)]  # non-salient tokens per frame
    merged = features.clone()
    start = 0
    for length in dynamic_segments(x.mean(1), c, tau):
        anchor_frames = [start + j for j in range(length) if (length - 1 - j) % p == 0]
        per_anchor_frame = contextual * length // len(anchor_frames)
        for frame in anchor_frames if per_anchor_frame else ():
            candidates = rest[frame]
            anchors = candidates[_top(density_peak_scores(x[frame, candidates]), per_anchor_frame)]
            # every frame of the segment an anchor frame (one frame, or p = 1): it merges its own frame only
            scope = [frame] if len(anchor_frames) == length else range(start, start + length)
            pool = torch.cat([x[f, rest[f]] for f in scope])
            targets = x[frame, anchors]
            similarity = nn.functional.normalize(pool, dim=-1) @ nn.functional.normalize(targets, dim=-1).T
            assigned = nn.functional.one_hot(similarity.argmax(-1), anchors.numel()).to(x.dtype)  # [pool, anchors]
            counts = assigned.sum(0)[:, None]
            weight = (1.0 / (counts + 1)).clamp(min=beta)
            mean = assigned.T @ pool / counts.clamp(min=1)
            merged[frame, anchors] = (weight * targets + (1 - weight) * mean).to(features.dtype)
            keep[frame, anchors] = True
        start += length
    return keep, merged


def _frame_salience(block: nn.Module, hidden: torch.Tensor, rotary: tuple, grids: list[tuple[int, int]],
                    merge: int) -> torch.Tensor:
    """ATS scores from a Qwen ViT block's input `hidden` [S, C] (patches in the block's order, frames contiguous):
    per frame, softmax of its mean query (after the rotation) over the keys averaged per merged token, mean over
    heads; [S / merge²] in the block's order. `grids`: per video (frames, patches per frame)."""
    attention = block.attn
    x = block.norm1(hidden)
    length = x.shape[0]
    query, key, _ = attention.qkv(x).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    query, key = rotate(query, key, *rotary)
    unit, head_dim = merge * merge, query.shape[-1]
    scores, start = [], 0
    for frames, patches in grids:
        end = start + frames * patches
        q = query[start:end].float().view(frames, patches, -1, head_dim).mean(1)  # [T, heads, d]
        k = key[start:end].float().view(frames, patches // unit, unit, -1, head_dim).mean(2)  # [T, M, heads, d]
        logits = torch.einsum("thd,tmhd->thm", q, k) / math.sqrt(head_dim)
        scores.append(logits.softmax(-1).mean(1).flatten())
        start = end
    return torch.cat(scores)


class _InstancePatch:
    """A method replaced on one object (an instance attribute shadowing the class's); `remove()` restores it."""

    def __init__(self, owner: object, name: str, replacement: object) -> None:
        self.owner, self.name = owner, name
        setattr(owner, name, replacement)

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


class _FastVIDRuntime(_PruningRuntime):
    def __init__(self, plan: PruningPlan, context: ModelContext, settings: FastVID) -> None:
        super().__init__(plan, context, settings)
        inner = context.model.model
        self.visual = inner.visual
        self.encoding: list[tuple[int, int, int]] | None = None  # the video grids while the ViT encodes videos
        self.frame_scores: tuple[torch.Tensor, list[tuple[int, int]]] | None = None
        original = inner.get_video_features

        @functools.wraps(original)  # keeps the signature generate() reads to pre-encode videos
        def get_video_features(*args, **kwargs):
            grid = kwargs.get("video_grid_thw", args[1] if len(args) > 1 else None)
            self.encoding = None if grid is None else [tuple(g) for g in grid.tolist()]
            try:
                return original(*args, **kwargs)
            finally:
                self.encoding = None

        context.hooks.append(_InstancePatch(inner, "get_video_features", get_video_features))
        context.hooks.append(self.visual.blocks[-1].register_forward_pre_hook(self._salience_hook, with_kwargs=True))

    def _window_order(self, grids: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor | None:
        """Qwen2.5-VL's ViT runs on patches grouped into windows: the merged-token order of its blocks (None: the
        natural order, Qwen3-VL)."""
        visual = self.visual
        if not hasattr(visual, "fullatt_block_indexes"):
            return None
        grid = torch.tensor(grids, device=device)
        try:
            from transformers.vision_utils import get_vision_window_index
        except ImportError:  # transformers before the vision utilities: the model's own method
            return visual.get_window_index(grid)[0]
        return get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]

    def _salience_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.encoding is None:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        merge = self.visual.spatial_merge_size
        grids = [(t, h * w) for t, h, w in self.encoding]
        rotary = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
        scores = _frame_salience(module, hidden, rotary, grids, merge)
        order = self._window_order(self.encoding, hidden.device)
        if order is not None:
            scores = scores[order.to(hidden.device).argsort()]
        self.frame_scores = (scores.detach(), [(t, m // (merge * merge)) for t, m in grids])

    def choose(self, layer: int, hidden: torch.Tensor, image: torch.Tensor, kept: int) -> torch.Tensor:
        """Each video's salient and anchor tokens (anchors merged in place in `hidden`); image tokens all remain."""
        video = self.call.layout.video
        if self.settings.retention == 1.0 or video is None or not bool(video.any()):
            return image
        scores, self.frame_scores = self.frame_scores, None
        if scores is None:
            raise ValueError("pixel_values_videos: FastVID scores the frames inside the vision tower, which did not "
                             "run for this prompt since apply() (video features computed before it?)")
        salience, grids = scores
        counts = video.sum(1).tolist()
        repeats = sum(counts) // salience.numel()  # generate may encode each video once for its expanded rows
        if salience.numel() * repeats != sum(counts) or len(counts) % repeats:
            raise ValueError(f"pixel_values_videos: {salience.numel()} frame tokens do not match {sum(counts)} video "
                             "tokens")
        rows = self._videos_per_row(counts[::repeats], grids)
        settings = self.settings
        chosen = image & ~video
        for row in range(len(counts)):
            positions = video[row].nonzero().flatten()
            done = 0
            for first, frames, tokens in rows[row // repeats]:
                where = positions[done : done + frames * tokens]
                scores_of = salience[first : first + frames * tokens].view(frames, tokens)
                features = hidden[row, where].view(frames, tokens, -1)
                keep, merged = fastvid_select(features, scores_of.to(hidden.device), settings.retention, settings.c,
                                              settings.tau, settings.d, settings.p, settings.beta)
                hidden[row, where] = merged.flatten(0, 1)
                chosen[row, where[keep.flatten()]] = True
                done += frames * tokens
        return chosen

    @staticmethod
    def _videos_per_row(counts: list[int], grids: list[tuple[int, int]]) -> list[list[tuple[int, int, int]]]:
        """The videos (first token in the score vector, frames, tokens per frame) of each prompt, in order."""
        rows, video, first = [], 0, 0
        for count in counts:
            videos = []
            while count > 0 and video < len(grids):
                frames, tokens = grids[video]
                videos.append((first, frames, tokens))
                first, count, video = first + frames * tokens, count - frames * tokens, video + 1
            if count != 0:
                raise ValueError(f"video_grid_thw: the video grids {grids} do not match the prompts' video tokens")
            rows.append(videos)
        return rows


@dataclass(frozen=True)
class FastVID(_PruningIntervention):
    """FastVID: per video, the salient and the merged anchor tokens of every frame remain (round-downs as the
    official code: int(M·r) per frame of M tokens, int(int(M·r)·d) of them contextual); image tokens are untouched.

    Defaults: the official Qwen2.5-VL run (LunarShen/FastVID, fastvid_qwen25vl/scripts/eval.sh): r = 0.27, c = 8,
    τ = 0.84, d = 0.4, p = 4, β = 0.6 (the LLaVA-OneVision run: r = 0.10, τ = 0.9, same c, d, p, β). The
    per-segment allocation and merging follow the paper's released implementation (LLaVA-OneVision, parallel density
    scores), so r = 0.27 keeps about 27 % of the video tokens here (the script notes 24.1 % with its port's
    allocation); the port's extra split inside segments (fastvid_DySeg_ignore = 0.95, salient tokens only on the last
    frame of each part) is not reproduced. As the Qwen2.5-VL port: the global feature of a frame is the mean of its
    LLM-input tokens, and the ATS score is the last ViT block's attention from the frame's mean query (rotated) to each
    merged token's mean key, softmax over the frame, head mean. DPC-kNN as the code: k = 4 nearest neighbours (the
    token itself included), distances scaled by 1/√D. The official code has no Qwen3-VL port: there the same rules
    run on its (un-windowed) last ViT block. Choices where the code leaves a case open: ties (densities, scores,
    similarities) go to the lower index instead of the code's 1e-6 random noise; an anchor frame with fewer non-salient
    tokens than anchors to pick keeps all of them (the code would fail); the c-1 lowest transitions are capped at T-1;
    r = 1.0 keeps every video token unchanged (no merging: the identity). Positions: the kept tokens keep their
    multi-axis rotary positions (gathered, as the official code gathers position_ids).

    Args:
        retention: r, the kept fraction of each frame's tokens, in (0, 1].
        c: the minimum number of segments (DySeg).
        tau: τ, the transition similarity below which DySeg always cuts, in [-1, 1].
        d: the contextual (anchor) share of a frame's kept tokens, in [0, 1].
        p: the anchor-frame interval of DTM.
        beta: β, the floor of an anchor's own weight in its merge, in [0, 1].

    Supported: Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
    with video inputs (`pixel_values_videos`, `video_grid_thw`); the same kept count in every batch row.
    """

    retention: float = 0.27
    c: int = 8
    tau: float = 0.84
    d: float = 0.4
    p: int = 4
    beta: float = 0.6
    layers_argument: ClassVar[str] = "retention"
    runtime_class: ClassVar[type] = _FastVIDRuntime

    def plan(self) -> PruningPlan:
        check_number("retention", self.retention, 0.0, 1.0, what="the kept fraction r of each frame", open_low=True)
        check_number("c", self.c, 1, what="the minimum segment count", integer=True)
        check_number("tau", self.tau, -1.0, 1.0, what="the similarity threshold τ")
        check_number("d", self.d, 0.0, 1.0, what="the contextual share of the kept tokens")
        check_number("p", self.p, 1, what="the anchor-frame interval", integer=True)
        check_number("beta", self.beta, 0.0, 1.0, what="the merge weight floor β")
        return PruningPlan(stages=(PruneStage(0, self.retention),), score="custom", positions="keep",
                           input_positions="keep")

    def bind(self, context: ModelContext):
        if context.family.name not in _FAMILIES:
            raise ValueError(
                f"model: FastVID reads the video frames of {', '.join(_FAMILIES.values())} (model_type "
                f"{sorted(_FAMILIES)}); got {type(context.model).__name__} (model_type {context.family.name!r})"
            )
        return super().bind(context)
