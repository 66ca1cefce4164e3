"""DiTCtrl (arXiv 2412.18597): training-free multi-prompt long videos with diffusers' CogVideoX (2b, 5b, 1.5).

The long latent is covered by overlapping segments, one prompt (or an interpolated transition prompt) each.
Every denoising step predicts each adjacent segment pair in one batch `[u_s, u_t, c_s, c_t]`, where the
target segment's queries read the source segment's keys and values ("KV-sharing") on the configured steps
and layers, optionally restricted to the source's foreground / background ("mask-guided KV-sharing"). The
predictions are blended into the long latent with triangular weights ("latent blending"), then one scheduler
step updates it. Video editing (word swap) is the two-segment case without blending.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from typing_extensions import Self

from ._extras import require
from .layout import VideoGrid
from .processors import CogVideoXRadialAttnProcessor

__all__ = [
    "DiTCtrlHandle",
    "KVSharingConfig",
    "SegmentPlan",
    "apply_kv_sharing",
    "blend_weights",
    "edit_video",
    "generate_multi_prompt",
    "segment_plan",
]


@dataclass(frozen=True)
class SegmentPlan:
    """Segments over the long latent: start frames and conditions `(prompt_a, prompt_b, alpha)`.

    A segment's text embedding is `(1 - alpha) * emb[prompt_a] + alpha * emb[prompt_b]` (transition
    segments interpolate linearly between neighbouring prompts).
    """

    segment_frames: int
    overlap: int
    starts: tuple[int, ...]
    conditions: tuple[tuple[int, int, float], ...]

    @property
    def num_segments(self) -> int:
        return len(self.starts)

    @property
    def latent_frames(self) -> int:
        return self.starts[-1] + self.segment_frames


def _int_at_least(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def segment_plan(
    num_prompts: int, *, segment_frames: int = 13, overlap: int = 9, transitions: int = 2, mid_segments: int = 0
) -> SegmentPlan:
    """DiTCtrl's segments: N = P + T(P-1) + M(P-2), stride L - overlap, long length L + (N-1) * stride.

    First and last prompt get one segment, middle prompts 1 + `mid_segments`; between prompts i and i+1,
    `transitions` segments at alpha = (j+1)/(T+1). Defaults (13 latent frames, overlap 9, 2 transitions) are
    the official config's; the paper used overlap 6 with 1 transition.
    """
    _int_at_least("num_prompts", num_prompts, 2)
    _int_at_least("segment_frames", segment_frames, 1)
    _int_at_least("transitions", transitions, 0)
    _int_at_least("mid_segments", mid_segments, 0)
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < segment_frames:
        raise ValueError(f"overlap must be an int in [0, segment_frames={segment_frames}), got {overlap!r}")
    conditions: list[tuple[int, int, float]] = []
    for prompt in range(num_prompts):
        repeats = 1 if prompt in (0, num_prompts - 1) else 1 + mid_segments
        conditions += [(prompt, prompt, 0.0)] * repeats
        if prompt < num_prompts - 1:
            conditions += [(prompt, prompt + 1, (j + 1) / (transitions + 1)) for j in range(transitions)]
    stride = segment_frames - overlap
    return SegmentPlan(segment_frames, overlap, tuple(k * stride for k in range(len(conditions))), tuple(conditions))


def blend_weights(segment_frames: int) -> torch.Tensor:
    """Triangular latent-blending weights w_f = min(2(f + 1/2)/L, 2 - 2(f + 1/2)/L), f = 0..L-1 (float32)."""
    _int_at_least("segment_frames", segment_frames, 1)
    ramp = 2 * (torch.arange(segment_frames, dtype=torch.float64) + 0.5) / segment_frames
    return torch.minimum(ramp, 2 - ramp).float()


@dataclass(frozen=True)
class KVSharingConfig:
    """Where KV-sharing is on: steps in [start_step, end_step) and layers in [start_layer, end_layer).

    Defaults are the official config for CogVideoX-2B (50 steps, 30 layers). `mask_guided` restricts the
    target's queries to the source's foreground (or background) keys, the masks coming from the head-averaged
    video-to-text attention of the text positions `ref_token_idx` (source prompt) / `cur_token_idx` (target
    prompt), min-max normalised per frame and binarised at `threshold`.
    """

    start_step: int = 2
    end_step: int = 25
    start_layer: int = 25
    end_layer: int = 30
    mask_guided: bool = False
    threshold: float = 0.3
    ref_token_idx: tuple[int, ...] = ()
    cur_token_idx: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("start_step", "end_step", "start_layer", "end_layer"):
            _int_at_least(name, getattr(self, name), 0)
        if self.mask_guided and not (self.ref_token_idx and self.cur_token_idx):
            raise ValueError(
                f"ref_token_idx and cur_token_idx must name text positions when mask_guided, got "
                f"{self.ref_token_idx!r} and {self.cur_token_idx!r}"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")


def _min_max_per_frame(maps: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W) -> min-max normalised over each frame's (H, W), epsilon 1e-6."""
    flat = maps.flatten(2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low + 1e-6)).view_as(maps)


@dataclass
class _KVSharingState:
    """Per-handle state the processors read: current step, grid and the accumulated text attention maps."""

    config: KVSharingConfig
    step: int | None = None
    grid: VideoGrid | None = None
    maps: torch.Tensor | None = field(default=None, repr=False)
    map_layers: int = 0

    def active(self, layer_index: int) -> bool:
        c = self.config
        return self.step is not None and c.start_step <= self.step < c.end_step and c.start_layer <= layer_index < c.end_layer

    def attend(self, query, key, value, *, layer_index, dense, text_tokens=0, text_first=True, **_):
        """Attention over the pair batch [u_s, u_t, c_s, c_t] (or [s, t]) of (B, S, H, D) [text | video] tensors."""
        if self.config.mask_guided:
            self._accumulate_maps(query, key, layer_index, text_tokens)
        if not self.active(layer_index):
            return dense()
        batch = query.shape[0]
        if batch % 2:
            raise ValueError(f"query: expected the segment-pair batch [source, target] per CFG half, got batch {batch}")
        source = torch.arange(batch).view(-1, 2)[:, 0].repeat_interleave(2)
        shared_k, shared_v = key[source], value[source]  # target rows read the source branch's K/V
        if not self.config.mask_guided:
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, shared_k, shared_v)))
            return out.transpose(1, 2)
        return self._mask_guided(query, shared_k, shared_v, text_tokens, dense)

    def _accumulate_maps(self, query, key, layer_index, text_tokens) -> None:
        """Adds this layer's head-averaged video->text attention probabilities of [c_s, c_t] (one head at a time)."""
        if layer_index == 0:
            self.maps, self.map_layers = None, 0
        q, k = query[-2:, text_tokens:].float(), key[-2:].float()
        heads = q.shape[2]
        video_to_text = sum(
            torch.softmax(q[:, :, h] @ k[:, :, h].transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)[..., :text_tokens]
            for h in range(heads)
        ) / heads
        self.maps = video_to_text if self.maps is None else self.maps + video_to_text
        self.map_layers += 1

    def _foreground(self, sample: int, token_idx: Sequence[int]) -> torch.Tensor:
        grid = self.grid
        maps = (self.maps[sample] / self.map_layers)[:, list(token_idx)].sum(-1)
        maps = _min_max_per_frame(maps.view(1, grid.frames, grid.height, grid.width))
        return (maps >= self.config.threshold).flatten()

    def _mask_guided(self, query, shared_k, shared_v, text_tokens, dense):
        c = self.config
        fg_source, fg_target = self._foreground(0, c.ref_token_idx), self._foreground(1, c.cur_token_idx)
        n = query.shape[1]
        text_keys = torch.ones(text_tokens, dtype=torch.bool, device=query.device)
        outputs = []
        for keys in (fg_source, ~fg_source):
            allowed = torch.ones(n, n, dtype=torch.bool, device=query.device)
            allowed[text_tokens:] = torch.cat([text_keys, keys])  # video queries: text + chosen video keys
            outputs.append(
                F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, shared_k, shared_v)), attn_mask=allowed).transpose(1, 2)
            )
        text_fg = torch.zeros(text_tokens, dtype=torch.bool, device=query.device)
        text_fg[list(c.cur_token_idx)] = True
        use_fg = torch.cat([text_fg, fg_target]).view(1, n, 1, 1)
        out = torch.where(use_fg, outputs[0], outputs[1])
        batch = query.shape[0]
        source_rows = torch.arange(0, batch, 2)
        out[source_rows] = dense()[source_rows]  # source segments keep their own full attention
        return out


class _KVSharingProcessor(CogVideoXRadialAttnProcessor):
    """CogVideoX's processor with its one attention call sent to the KV-sharing state; the stock rotary embedding."""

    fused_rotary = False


class DiTCtrlHandle:
    """KV-sharing processors on a CogVideoX transformer; `remove()` restores the stock ones."""

    def __init__(self, transformer: torch.nn.Module, config: KVSharingConfig) -> None:
        if type(transformer).__name__ != "CogVideoXTransformer3DModel":
            raise TypeError(f"transformer must be a CogVideoXTransformer3DModel, got {type(transformer).__name__}")
        self.state = _KVSharingState(config)
        self._stock = [(block.attn1, block.attn1.processor) for block in transformer.transformer_blocks]
        for layer_index, (attn, stock) in enumerate(self._stock):
            attn.set_processor(_KVSharingProcessor(self.state, layer_index, stock=stock))

    def remove(self) -> None:
        for attn, stock in self._stock:
            attn.set_processor(stock)
        self._stock = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_kv_sharing(transformer: torch.nn.Module, config: KVSharingConfig | None = None) -> DiTCtrlHandle:
    """Installs DiTCtrl's KV-sharing attention on a CogVideoX transformer (steps are set by the caller)."""
    return DiTCtrlHandle(transformer, config or KVSharingConfig())


def _segment_embeddings(embeds: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """(P, T, C) prompt embeddings -> (N, T, C) per-segment conditions (interpolated for transitions)."""
    return torch.stack([(1 - alpha) * embeds[a] + alpha * embeds[b] for a, b, alpha in plan.conditions])


def _encode(pipe, prompts, prompt_embeds, negative_prompt_embeds, guidance, device):
    if prompt_embeds is None:
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings when prompt_embeds is not given")
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            list(prompts), [""] * len(prompts), guidance, num_videos_per_prompt=1, device=device
        )
    if guidance and negative_prompt_embeds is None:
        raise ValueError("negative_prompt_embeds is required with prompt_embeds when guidance_scale > 1")
    return prompt_embeds, negative_prompt_embeds


@torch.no_grad()
def generate_multi_prompt(
    pipe,
    prompts: Sequence[str] | None = None,
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 6.0,
    overlap: int = 9,
    transitions: int = 2,
    mid_segments: int = 0,
    kv_sharing: KVSharingConfig | None = None,
    latent_blending: bool = True,
    generator: torch.Generator | None = None,
    output_type: str = "latent",
):
    """DiTCtrl multi-prompt generation with a diffusers `CogVideoXPipeline` (2b, 5b or 1.5).

    `prompts` (P >= 2) or their T5 embeddings `prompt_embeds` (P, T, C) with `negative_prompt_embeds`. Segments
    are the pipeline's default clip length in latent frames (13 for 49 frames). Returns the long latent
    (1, F, C, H, W) for `output_type="latent"`, else the decoded video via the pipeline's video processor.
    Without `latent_blending`, every segment keeps its own latent (video editing); the result is then
    stacked per segment (N, L, C, H, W).
    """
    require("diffusers", "diffusion")
    transformer, scheduler = pipe.transformer, pipe.scheduler
    device, config = pipe._execution_device, transformer.config
    guidance = guidance_scale > 1.0
    embeds, negative = _encode(pipe, prompts, prompt_embeds, negative_prompt_embeds, guidance, device)
    height = height or config.sample_height * pipe.vae_scale_factor_spatial
    width = width or config.sample_width * pipe.vae_scale_factor_spatial
    segment_frames = (config.sample_frames - 1) // pipe.vae_scale_factor_temporal + 1
    patch_t = config.patch_size_t or 1
    segment_frames += (-segment_frames) % patch_t  # CogVideoX 1.5 pads to a multiple of patch_size_t
    if latent_blending:
        plan = segment_plan(embeds.shape[0], segment_frames=segment_frames, overlap=overlap, transitions=transitions, mid_segments=mid_segments)
    else:
        plan = SegmentPlan(segment_frames, segment_frames, (0,) * embeds.shape[0], tuple((p, p, 0.0) for p in range(embeds.shape[0])))
    conditions = _segment_embeddings(embeds, plan).to(device)
    uncond = _segment_embeddings(negative, plan).to(device) if guidance else None

    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    shape = (1, plan.latent_frames, config.in_channels, height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial)
    noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu").to(device, conditions.dtype)
    latents = noise * scheduler.init_noise_sigma
    if not latent_blending:
        latents = latents.expand(plan.num_segments, *shape[1:]).clone()
    rope = (
        pipe._prepare_rotary_positional_embeddings(height, width, segment_frames, device)
        if config.use_rotary_positional_embeddings
        else None
    )
    weights = blend_weights(segment_frames).to(device).view(1, -1, 1, 1, 1)
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    is_dpm = type(scheduler).__name__ == "CogVideoXDPMScheduler"
    old_x0 = None
    grid = VideoGrid(segment_frames // patch_t, shape[3] // config.patch_size, shape[4] // config.patch_size)
    with apply_kv_sharing(transformer, kv_sharing) as handle:
        handle.state.grid = grid
        for i, t in enumerate(timesteps):
            handle.state.step = i
            pred = torch.zeros_like(latents, dtype=torch.float32)
            total = torch.zeros(latents.shape[:2], device=device).view(*latents.shape[:2], 1, 1, 1)
            for k in range(plan.num_segments - 1):
                pair = (k, k + 1)
                if latent_blending:
                    segs = torch.cat([latents[:, plan.starts[j] : plan.starts[j] + segment_frames] for j in pair])
                else:
                    segs = latents[list(pair)]
                text = conditions[list(pair)]
                model_in = torch.cat([segs, segs]) if guidance else segs
                text = torch.cat([uncond[list(pair)], text]) if guidance else text
                model_in = scheduler.scale_model_input(model_in, t)
                out = transformer(
                    hidden_states=model_in, encoder_hidden_states=text, timestep=t.expand(model_in.shape[0]),
                    image_rotary_emb=rope, return_dict=False,
                )[0].float()
                if guidance:
                    out_uncond, out_text = out.chunk(2)
                    out = out_uncond + guidance_scale * (out_text - out_uncond)
                for j, seg_out in zip(pair, out):
                    if latent_blending:
                        window = slice(plan.starts[j], plan.starts[j] + segment_frames)
                        pred[:, window] += weights * seg_out
                        total[:, window] += weights
                    else:
                        pred[j] += seg_out
                        total[j] += 1
            pred = pred / total
            if is_dpm:
                latents, old_x0 = scheduler.step(pred, old_x0, t, timesteps[i - 1] if i > 0 else None, latents, **extra, return_dict=False)
            else:
                latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
            latents = latents.to(conditions.dtype)
    if output_type == "latent":
        return latents
    video = pipe.decode_latents(latents)
    return pipe.video_processor.postprocess_video(video=video, output_type=output_type)


def edit_video(pipe, source_prompt_embeds: torch.Tensor, target_prompt_embeds: torch.Tensor, **kwargs):
    """DiTCtrl video editing (word swap): source and target share the noise; the target reads the source's K/V.

    Embeddings are (1, T, C) each; `negative_prompt_embeds` (2, T, C) when guided. Returns (2, L, C, H, W)
    latents: the source video and the edited one.
    """
    embeds = torch.cat([source_prompt_embeds, target_prompt_embeds])
    return generate_multi_prompt(pipe, prompt_embeds=embeds, latent_blending=False, **kwargs)
