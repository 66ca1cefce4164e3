"""Radial attention on the GPU (bf16, forward): mmattn's block-sparse kernel vs cuDNN dense SDPA vs FlexAttention
on the same mask, at Wan 480p / 720p and HunyuanVideo 720p shapes; then one denoising step of a full-size
Wan2.1-1.3B transformer (random weights, built from its config) with Radial on every step vs dense.
Writes benchmarks/results/diffusion.md. Ratios are peer time / our time (above 1: we are faster).

    python benchmarks/diffusion.py [--quick] [--out benchmarks/results/diffusion.md]

--quick runs tiny shapes on the CPU (exact torch backends, wall-clock timer) to smoke-test the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmattn.diffusion import RadialConfig, apply_radial_attention, radial_mask
from mmattn.kernels import block_sparse_attention

# name, frames, tokens per frame, text tokens, heads, decay, mask rule
ATTENTION_CASES = [
    ("Wan 480p 81f (1.3B heads)", 21, 30 * 52, 0, 12, 0.2, "wan"),
    ("Wan 480p 81f (14B heads)", 21, 30 * 52, 0, 40, 0.2, "wan"),
    ("Wan 720p 81f (1.3B heads)", 21, 45 * 80, 0, 12, 0.2, "wan"),
    ("Wan 720p 81f (14B heads)", 21, 45 * 80, 0, 40, 0.2, "wan"),
    ("HunyuanVideo 720p 129f", 33, 45 * 80, 256, 24, 0.95, "hunyuan"),
]
QUICK_CASES = [("tiny wan", 4, 64, 0, 2, 0.5, "wan"), ("tiny hunyuan", 5, 48, 20, 2, 0.95, "hunyuan")]
WAN_1_3B = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer config
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
    "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2)


def wan_step(quick: bool, device, dtype) -> tuple[torch.nn.Module, dict]:
    """Wan2.1-1.3B (random weights, seed 0) and the inputs of one denoising step at 720p 81 frames: latent
    21 x 90 x 160, 75,600 tokens (quick: the tiny config on 4 x 16 x 16)."""
    from diffusers import WanTransformer3DModel

    config = WAN_TINY if quick else WAN_1_3B
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    latent = (1, config["in_channels"], 4, 16, 16) if quick else (1, 16, 21, 90, 160)
    inputs = {
        "hidden_states": torch.randn(latent, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype),
        "timestep": torch.tensor([500], device=device),
        "return_dict": False,
    }
    return model, inputs


def sparse_step_config(quick: bool) -> RadialConfig:
    """Preset `wan2.1-t2v-1.3b` on a sparse step (layer 0 stays dense); quick: 16-token blocks, torch backend."""
    preset = dataclasses.replace(RadialConfig.preset("wan2.1-t2v-1.3b"), dense_steps=0)
    return dataclasses.replace(preset, block_size=16, backend="torch") if quick else preset


def timer(quick: bool):
    """Median milliseconds of a callable: do_bench on the GPU, a plain wall clock in --quick mode."""
    if quick:
        def wall(fn, repeats=3):
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return sorted(times)[len(times) // 2]

        return wall
    import triton

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


@torch.no_grad()
def attention_rows(cases, quick: bool) -> list[str]:
    device, dtype = ("cpu", torch.float32) if quick else ("cuda", torch.bfloat16)
    ours_backend, dense_backend = ("torch", SDPBackend.MATH) if quick else ("triton", SDPBackend.CUDNN_ATTENTION)
    measure = timer(quick)
    rows = []
    for name, frames, per_frame, text, heads, decay, rule in cases:
        mask = radial_mask(frames, per_frame, block_size=128 if not quick else 16, decay_factor=decay, model=rule,
                           text_tokens=text, device=device)
        n = frames * per_frame + text
        q, k, v = (torch.randn(1, heads, n, 128 if not quick else 32, device=device, dtype=dtype) for _ in range(3))
        ours = measure(lambda q=q, k=k, v=v, mask=mask: block_sparse_attention(q, k, v, mask, backend=ours_backend))
        flex = measure(lambda q=q, k=k, v=v, mask=mask: block_sparse_attention(q, k, v, mask, backend="flex"))
        with sdpa_kernel([dense_backend]):
            dense = measure(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        density = mask.density()
        rows.append(
            f"| {name} | {n:,} | {heads} | {density:.4f} | {ours:.2f} | {dense:.2f} | {flex:.2f} | "
            f"{dense / ours:.2f}x (goal {0.85 / density:.2f}x) | {flex / ours:.2f}x (goal 1.15x) |"
        )
        print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def wan_step_rows(quick: bool) -> list[str]:
    device, dtype = ("cpu", torch.float32) if quick else ("cuda", torch.bfloat16)
    model, inputs = wan_step(quick, device, dtype)
    latent = inputs["hidden_states"].shape
    measure = timer(quick)
    dense = measure(lambda: model(**inputs))
    with apply_radial_attention(model, sparse_step_config(quick)):
        radial = measure(lambda: model(**inputs))
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    row = f"| Wan2.1-1.3B step, {tokens:,} tokens | {dense:.1f} | {radial:.1f} | {dense / radial:.2f}x (goal 1.8x) |"
    print(row, flush=True)
    return [row]


def environment(quick: bool) -> str:
    if quick:
        return f"Device: CPU (--quick smoke test); torch {torch.__version__}; Python {platform.python_version()}"
    import triton

    return f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusion.md")
    args = parser.parse_args()
    if not args.quick and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --quick)")
    lines = [
        "# Radial attention (mmattn.diffusion)",
        "",
        environment(args.quick),
        "",
        ("Attention forward, median ms. Radial mask (block 128) as in the official repo; ours = mmattn Triton "
        "block-sparse, dense = cuDNN SDPA, flex = FlexAttention (compiled) on the same mask."),
        "",
        "| case | tokens | heads | density | ours ms | dense ms | flex ms | vs dense | vs flex |",
        "|---|---|---|---|---|---|---|---|---|",
        *attention_rows(QUICK_CASES if args.quick else ATTENTION_CASES, args.quick),
        "",
        ("One denoising step (transformer forward, CFG branch), random weights, median ms; radial = preset "
        "`wan2.1-t2v-1.3b` on a sparse step (layer 0 dense)."),
        "",
        "| case | dense ms | radial ms | speedup |",
        "|---|---|---|---|",
        *wan_step_rows(args.quick),
        "",
    ]
    if not args.quick or args.out != parser.get_default("out"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
