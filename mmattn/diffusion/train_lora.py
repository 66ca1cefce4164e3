"""LoRA fine-tuning of a Wan transformer with Radial attention (Radial Attention, arXiv 2506.19852, section on
length extension: a sparse mask plus a LoRA on the attention projections).

`python -m mmattn.diffusion.train_lora --model PATH_OR_REPO --data CLIPS --output-dir OUT [...]` encodes every
clip once (VAE latents, text-encoder caption embeddings), frees the encoders' memory, then trains a peft LoRA
on the transformer's attention projections with the rectified-flow objective Wan is trained with, attention
running through Radial's block-sparse kernel (forward and backward), and saves it with the pipeline's
`save_lora_weights`, which `pipe.load_lora_weights(OUT)` reads back.

From Python: `add_lora(transformer, ...)`, then `train_lora(transformer, batches, TrainConfig(...), radial=...)`.

Objective: x_t = (1 - sigma) x_0 + sigma * noise, the transformer (timestep = 1000 sigma) predicts the velocity
noise - x_0, mean-squared error with uniform weighting over sigma. sigma is drawn as in diffusers' flow-matching
training scripts (`logit_normal`: sigmoid of N(mean, std); `uniform`; `mode`, SD3's mode sampling), then
shifted as the Wan scheduler shifts its sigmas: shift * s / (1 + (shift - 1) s).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .._argparse import OneLineParser
from .config import RadialConfig, preset_names

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "TrainConfig",
    "add_lora",
    "flow_matching_loss",
    "lora_state_dict",
    "main",
    "sample_sigmas",
    "train_lora",
]

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
"""Wan's attention projections (self- and cross-attention)."""

TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
MIXED_PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and objective settings of `train_lora` (AdamW on the LoRA parameters only)."""

    steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float = 3.0
    seed: int = 0
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}")
        if not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0, got {self.flow_shift!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {sorted(MIXED_PRECISION)}, got {self.mixed_precision!r}")


def add_lora(
    transformer: torch.nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
    dropout: float = 0.0,
) -> None:
    """Freezes `transformer` and adds a trainable peft LoRA (adapter "default") on `target_modules`.

    `alpha` defaults to `rank` (scale 1). LoRA parameters are kept in float32 whatever the base dtype.
    """
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                   init_lora_weights=True, target_modules=list(target_modules))
    )
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights keyed as diffusers' `save_lora_weights` expects (without the "transformer." prefix)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)


def sample_sigmas(batch: int, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Noise levels sigma in (0, 1) for one batch (CPU float32): density sampling then Wan's shift."""
    if config.timestep_sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator) * config.logit_std + config.logit_mean)
    elif config.timestep_sampling == "mode":
        u = torch.rand(batch, generator=generator)
        u = 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(batch, generator=generator)
    shift = config.flow_shift
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Rectified-flow loss: MSE between the prediction at x_t = (1 - sigma) x_0 + sigma noise and noise - x_0."""
    dtype = transformer.dtype if hasattr(transformer, "dtype") else next(transformer.parameters()).dtype
    s = sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1 - s) * latents.float() + s * noise.float()
    prediction = transformer(
        hidden_states=noisy.to(dtype),
        timestep=(sigmas * 1000).to(latents.device, torch.float32),
        encoder_hidden_states=prompt_embeds.to(dtype),
        return_dict=False,
    )[0]
    target = noise.float() - latents.float()
    return torch.nn.functional.mse_loss(prediction.float(), target)


def _forever(batches: Iterable[dict]) -> Iterable[dict]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("batches is empty")


def train_lora(
    transformer: torch.nn.Module,
    batches: Iterable[dict],
    config: TrainConfig = TrainConfig(),
    *,
    radial: RadialConfig | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Trains the LoRA parameters of `transformer` (see `add_lora`) for `config.steps` steps; returns the losses.

    `batches`: an iterable of `{"latents": (B, C, F, H, W), "prompt_embeds": (B, L, D)}` (normalised VAE
    latents and text-encoder states), re-iterated when exhausted (a list of precomputed batches is fine).
    `radial`: a `RadialConfig` or preset name to train with Radial attention (its dense layers apply; its dense
    steps do not, there is no sampling loop), None for the model's stock attention. Noise and sigmas come
    from a generator seeded with `config.seed`, so two runs see the same ones. `callback(step, loss)`.
    """
    from .radial import apply_radial_attention

    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("transformer has no trainable parameters: call add_lora(transformer) first")
    optimizer = optimizer or torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    dtype = MIXED_PRECISION[config.mixed_precision]
    scaler = None
    generator = torch.Generator().manual_seed(config.seed)
    handle = apply_radial_attention(transformer, radial, step_source=lambda: None) if radial is not None else None
    was_training = transformer.training
    transformer.train()
    losses = []
    try:
        stream = _forever(batches)
        for step in range(config.steps):
            batch = next(stream)
            latents = batch["latents"]
            sigmas = sample_sigmas(latents.shape[0], config, generator)
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
            device_type = latents.device.type
            if dtype is torch.float16 and scaler is None:
                scaler = torch.amp.GradScaler(device_type)
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not torch.float32):
                loss = flow_matching_loss(transformer, latents, batch["prompt_embeds"], sigmas, noise)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
    finally:
        if handle is not None:
            handle.remove()
        transformer.train(was_training)
    return losses


# ------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m mmattn.diffusion.train_lora",
        description="Train a LoRA on a Wan pipeline's transformer with Radial attention, on a folder of captioned clips "
        "(each clip NAME.mp4 with its caption in NAME.txt beside it).",
    )
    parser.add_argument("--model", required=True, help="local folder or diffusers repo id of a Wan pipeline (WanPipeline)")
    parser.add_argument("--data", required=True, type=Path, help="folder of clips (.mp4/.mov/.mkv/.avi/.webm) with NAME.txt captions")
    parser.add_argument("--output-dir", required=True, type=Path, help="where the LoRA (pytorch_lora_weights.safetensors) goes")
    parser.add_argument("--frames", type=int, default=81, help="frames per clip, 4k + 1 for Wan's VAE (default 81)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame of a clip")
    parser.add_argument("--max-sequence-length", type=int, default=512, help="caption tokens (Wan: 512)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--target-modules", default=",".join(DEFAULT_TARGET_MODULES),
                        help="comma-separated module names to adapt (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--timestep-sampling", choices=TIMESTEP_SAMPLING, default="logit_normal")
    parser.add_argument("--flow-shift", type=float, default=3.0, help="sigma shift of the Wan scheduler (default 3.0)")
    parser.add_argument("--radial", default="wan2.1-t2v-1.3b",
                        help=f"Radial preset ({', '.join(preset_names())}) or 'none' for dense attention")
    parser.add_argument("--decay-factor", type=float, default=None, help="override the preset's decay factor")
    parser.add_argument("--block-size", type=int, default=None, help="override the preset's block size")
    parser.add_argument("--dense-layers", type=int, default=None, help="override the preset's dense layers")
    parser.add_argument("--backend", default=None, help="block-sparse backend (auto, triton, flex, torch)")
    parser.add_argument("--mixed-precision", choices=sorted(MIXED_PRECISION), default="no",
                        help="dtype of the frozen weights and of autocast; LoRA weights stay float32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


def _radial_config(args, parser) -> RadialConfig | None:
    if args.radial == "none":
        return None
    overrides = {
        name: value
        for name, value in (("decay_factor", args.decay_factor), ("block_size", args.block_size),
                            ("dense_layers", args.dense_layers), ("backend", args.backend))
        if value is not None
    }
    try:
        config = RadialConfig.preset(args.radial)
        return dataclasses.replace(config, dense_steps=0, dense_last_steps=0, **overrides)
    except ValueError as error:
        parser.error(f"--radial: {error}")


def _check_args(args, parser) -> tuple[list, RadialConfig | None, TrainConfig]:
    from ._extras import require
    from .video_data import find_clips

    for name in ("frames", "height", "width", "steps", "batch_size", "rank", "frame_stride", "max_sequence_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    try:
        clips = find_clips(args.data)
        require("decord", "train")
        require("peft", "train")
        require("diffusers", "train")
        train = TrainConfig(
            steps=args.steps, learning_rate=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
            timestep_sampling=args.timestep_sampling, flow_shift=args.flow_shift, seed=args.seed,
            mixed_precision=args.mixed_precision,
        )
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    return clips, _radial_config(args, parser), train


def _load_pipeline(args, parser, dtype: torch.dtype):
    import diffusers

    try:
        pipe = diffusers.WanPipeline.from_pretrained(args.model, dtype=dtype)
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"--model {args.model!r}: cannot load a WanPipeline ({str(error).splitlines()[0] if str(error) else type(error).__name__})")
    if pipe.vae is None or pipe.text_encoder is None or pipe.transformer is None:
        parser.error(f"--model {args.model!r}: the pipeline needs its vae, text_encoder and transformer")
    spatial = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    temporal = pipe.vae_scale_factor_temporal
    if (args.frames - 1) % temporal:
        parser.error(f"--frames must be {temporal}k + 1 for this VAE, got {args.frames}")
    if args.height % spatial or args.width % spatial:
        parser.error(f"--height and --width must be multiples of {spatial}, got {args.height}x{args.width}")
    return pipe


@torch.no_grad()
def _encode(pipe, clips, args, device) -> list[dict]:
    """One `{"latents", "prompt_embeds"}` per clip, on the CPU: the VAE's normalised latent mean and the caption states."""
    from .video_data import load_clip

    vae = pipe.vae.to(device) if pipe.vae.dtype == torch.float32 else pipe.vae.to(device, torch.float32)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(device)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(device)
    pipe.text_encoder.to(device)
    encoded = []
    for clip in clips:
        video = load_clip(clip.path, args.frames, args.height, args.width, args.frame_stride)
        latents = (vae.encode(video[None].to(device)).latent_dist.mode() - mean) / std
        prompt_embeds, _ = pipe.encode_prompt(
            clip.caption, do_classifier_free_guidance=False, max_sequence_length=args.max_sequence_length, device=device
        )
        encoded.append({"latents": latents[0].cpu(), "prompt_embeds": prompt_embeds[0].float().cpu()})
    vae.to("cpu")
    pipe.text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return encoded


def _batches(encoded: list[dict], batch_size: int, seed: int, device) -> Iterable[dict]:
    """Shuffled batches (a new order every epoch), stacked and moved to `device`."""
    generator = torch.Generator().manual_seed(seed + 1)
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            items = [encoded[i] for i in order[start : start + batch_size]]
            yield {key: torch.stack([item[key] for item in items]).to(device) for key in ("latents", "prompt_embeds")}


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Path:
    """Encodes the clips, trains, saves; returns the output folder."""
    parser = parser or _parser()
    clips, radial, train = _check_args(args, parser)
    dtype = MIXED_PRECISION[args.mixed_precision]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    pipe = _load_pipeline(args, parser, dtype)
    try:
        encoded = _encode(pipe, clips, args, device)
    except ValueError as error:  # a clip too short, a caption the tokenizer rejects
        parser.error(str(error))
    transformer = pipe.transformer.to(device)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    add_lora(transformer, args.rank, args.alpha, [m for m in args.target_modules.split(",") if m])
    losses = train_lora(
        transformer, _batches(encoded, args.batch_size, args.seed, device), train, radial=radial,
        callback=lambda step, loss: print(f"step {step + 1}/{train.steps} loss {loss:.5f}", flush=True),
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(
        args.output_dir,
        transformer_lora_layers=lora_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    print(f"saved LoRA to {args.output_dir} (final loss {losses[-1]:.5f})", flush=True)
    return args.output_dir


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    run(parser.parse_args(argv), parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
