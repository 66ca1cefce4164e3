"""Radial attention on the GPU (bf16, forward): mmattn's block-sparse attention ("auto", which runs FlashAttention-4
where installed, and our Triton kernel alone) vs cuDNN dense SDPA vs FlexAttention on the same mask (and, where
`flash_attn.cute` is installed, FA4 called directly and through FlexAttention's FLASH backend), at Wan
480p / 720p and HunyuanVideo 1.0 / 1.5 720p shapes; then full-size Wan transformers (random weights, built from their
configs) with Radial on a sparse step vs dense: a Wan2.1-1.3B and a Wan2.2-TI2V-5B denoising step, and a Wan2.1-1.3B
training step (forward+backward). Writes benchmarks/results/diffusion.md. Ratios are peer time / our time (above 1:
we are faster).

Before timing, each attention case checks mmattn's output against FlexAttention's on the same inputs, and the Radial
step checks its output against the same step with Radial run by FlexAttention (benchmarks/common.py: error against
FlexAttention in float32 at most 2x FlexAttention's own, plus slack); a disagreement stops the run.

    python benchmarks/diffusion.py [--fast]     # every case; writes benchmarks/results/diffusion.md (needs diffusers)
    python benchmarks/diffusion.py --quick      # tiny shapes on the CPU (exact torch backends): a smoke test
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_sparse import fa4_direct, has_fa4
from common import (
    RESULTS, benchmark_parser, check_agreement, highest_precision, median_ms, outputs_and_grads, provenance,
    results_target, set_fast, upcast, worst, write_results,
)

from mmattn.diffusion import RadialConfig, apply_radial_attention, radial_mask
from mmattn.kernels import block_sparse_attention

# name, frames, tokens per frame, text tokens, heads, decay, mask rule
ATTENTION_CASES = [
    ("Wan 480p 81f (1.3B heads)", 21, 30 * 52, 0, 12, 0.2, "wan"),
    ("Wan 480p 81f (14B heads)", 21, 30 * 52, 0, 40, 0.2, "wan"),
    ("Wan 720p 81f (1.3B heads)", 21, 45 * 80, 0, 12, 0.2, "wan"),
    ("Wan 720p 81f (14B heads)", 21, 45 * 80, 0, 40, 0.2, "wan"),
    ("HunyuanVideo 720p 129f", 33, 45 * 80, 256, 24, 0.95, "hunyuan"),
    # HunyuanVideo 1.5: 4x16x16 VAE, patch 1 -> 31 x 45 x 80; 16 heads; text = 1,000 Qwen2.5-VL + 256 byT5 tokens
    ("HunyuanVideo 1.5 720p 121f", 31, 45 * 80, 1256, 16, 0.95, "hunyuan"),
]
QUICK_CASES = [("tiny wan", 4, 64, 0, 2, 0.5, "wan"), ("tiny hunyuan", 5, 48, 20, 2, 0.95, "hunyuan")]
WAN_1_3B = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer config
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
    "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
WAN_TI2V_5B = dict(WAN_1_3B, num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48)
"""Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer config (3072 wide, 48 latent channels of its 4x16x16 VAE)."""
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2)
DEFAULT_OUT = RESULTS / "diffusion.md"


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One transformer call of a Wan model: `latent` (B, C, F, H, W) with `preset`'s Radial on a sparse step;
    `train`: forward+backward through every weight (a full fine-tuning step) instead of the forward alone;
    `check_frames`: the latent frames of the (smaller) clip the agreement check runs on, when the float32 check
    at the timed size would not fit the GPU; `checkpointing`: diffusers' gradient checkpointing (each block's
    forward recomputed in the backward, as `train_lora --gradient-checkpointing` trains); `goal`: None for a row
    the issues set none for."""

    name: str
    config: dict
    latent: tuple[int, ...]
    preset: str
    goal: float | None
    train: bool = False
    check_frames: int | None = None
    checkpointing: bool = False

    @property
    def tokens(self) -> int:
        _, _, frames, height, width = self.latent
        return frames * (height // 2) * (width // 2)


STEP_CASES = [
    StepCase("Wan2.1-1.3B step, 720p 81f", WAN_1_3B, (1, 16, 21, 90, 160), "wan2.1-t2v-1.3b", 2.2),
    StepCase("Wan2.2-TI2V-5B step, 720p 121f", WAN_TI2V_5B, (1, 48, 31, 44, 80), "wan2.2-ti2v-5b", 2.0),
    StepCase("Wan2.1-1.3B training step, 480p 81f", WAN_1_3B, (1, 16, 21, 60, 104), "wan2.1-t2v-1.3b", 1.8,
             train=True, check_frames=5),
    StepCase("Wan2.1-1.3B training step, 480p 81f, gradient checkpointing", WAN_1_3B, (1, 16, 21, 60, 104),
             "wan2.1-t2v-1.3b", None, train=True, check_frames=5, checkpointing=True),
]
QUICK_STEP_CASES = [
    StepCase("tiny Wan step", WAN_TINY, (1, 16, 4, 16, 16), "wan2.1-t2v-1.3b", 1.8),
    StepCase("tiny Wan training step", WAN_TINY, (1, 16, 4, 16, 16), "wan2.1-t2v-1.3b", 1.8, train=True, check_frames=2),
    StepCase("tiny Wan training step, gradient checkpointing", WAN_TINY, (1, 16, 4, 16, 16), "wan2.1-t2v-1.3b", None,
             train=True, check_frames=2, checkpointing=True),
]


def wan_model(case: StepCase, device, dtype) -> torch.nn.Module:
    """The case's Wan transformer with random weights (seed 0)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**case.config).to(dtype).eval()
    if case.checkpointing:
        model.enable_gradient_checkpointing()
    return model


def wan_inputs(case: StepCase, frames: int, device, dtype) -> dict:
    """One call's inputs: N(0, 1) latents of `frames` latent frames, 512 N(0, 1) text states, timestep 500."""
    generator = torch.Generator().manual_seed(1)
    latent = (*case.latent[:2], frames, *case.latent[3:])
    return {
        "hidden_states": torch.randn(latent, generator=generator).to(device, dtype),
        "encoder_hidden_states": torch.randn(1, 512, case.config["text_dim"], generator=generator).to(device, dtype),
        "timestep": torch.tensor([500], device=device),
        "return_dict": False,
    }


def sparse_step_config(case: StepCase, quick: bool) -> RadialConfig:
    """The case's preset on a sparse step (its dense layers stay dense); quick: 16-token blocks, torch backend."""
    preset = dataclasses.replace(RadialConfig.preset(case.preset), dense_steps=0, dense_last_steps=0)
    return dataclasses.replace(preset, block_size=16, backend="torch") if quick else preset


DENSE_GOALS = {"Wan 480p 81f (1.3B heads)": 3.3, "Wan 720p 81f (14B heads)": 3.7}
"""Issue 17's goals for Radial with "auto" over cuDNN dense; the other rows' goal is 0.85 / density (issue 18)."""


def attention_peers(device: str) -> dict:
    """name -> fn(q, k, v, mask), forward only; the first (FlexAttention) is also the higher-precision reference;
    FlashAttention-4 directly and through FlexAttention's FLASH backend where it is installed."""
    peers = {"flex": lambda q, k, v, mask: block_sparse_attention(q, k, v, mask, backend="flex")}
    if device == "cuda" and has_fa4():
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        peers["FA4"] = fa4_direct
        peers["flex FLASH"] = lambda q, k, v, mask: compiled(
            q, k, v, block_mask=mask.flex_block_mask, kernel_options={"BACKEND": "FLASH"})
    return peers


@torch.no_grad()
def attention_rows(cases, device: str) -> tuple[list[str], list[str], list[str]]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ours = {"auto": "auto", "triton": "triton"} if device == "cuda" else {"ours": "torch"}
    dense_backend = SDPBackend.CUDNN_ATTENTION if device == "cuda" else SDPBackend.MATH
    block = 128 if device == "cuda" else 16
    peers = attention_peers(device)
    rows = []
    for name, frames, per_frame, text, heads, decay, rule in cases:
        mask = radial_mask(frames, per_frame, block_size=block, decay_factor=decay, model=rule, text_tokens=text,
                           device=device)
        n = frames * per_frame + text
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, 128 if device == "cuda" else 32, device=device, dtype=dtype) for _ in range(3))
        runs = {mine: (lambda q, k, v, mask=mask, backend=backend:
                       block_sparse_attention(q, k, v, mask, backend=backend)) for mine, backend in ours.items()}
        runs.update({peer_name: (lambda q, k, v, p=peer, mask=mask: p(q, k, v, mask)) for peer_name, peer in peers.items()})

        # the check, before any timing (forward only: this table times the forward)
        with highest_precision():
            reference = outputs_and_grads(runs["flex"], *upcast(q, k, v), None)
        results = {run_name: outputs_and_grads(fn, q, k, v, None) for run_name, fn in runs.items()}
        checks = {(mine, peer_name): check_agreement(f"{name} {mine}", results[mine], results[peer_name], reference,
                                                     peer_name=peer_name,
                                                     reference_name=f"flex in {reference['out'].dtype}")
                  for mine in ours for peer_name in peers}
        del reference, results

        timed = {run_name: median_ms(lambda fn=fn: fn(q, k, v), device) for run_name, fn in runs.items()}
        with sdpa_kernel([dense_backend]):
            dense = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device)
        density, first = mask.density(), next(iter(ours))
        goal = DENSE_GOALS.get(name, 0.85 / density)
        cells = [name, f"{n:,}", str(heads), f"{density:.4f}", f"{dense:.2f}",
                 *(f"{ms:.2f}" for ms in timed.values()),
                 f"{dense / timed[first]:.2f}x (goal {goal:.2f}x)", f"{timed['flex'] / timed[first]:.2f}x (goal 1.15x)"]
        if "FA4" in timed:
            best = min(timed["FA4"], timed["flex FLASH"])
            cells.append(f"{best / timed[first]:.2f}x")
        cells += [f"{checks[(first, 'flex')]['out'].vs_peer:.1e}", worst(checks[(first, "flex")])]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows, list(ours), list(peers)


def step_results(model: torch.nn.Module, inputs: dict, train: bool) -> dict[str, torch.Tensor]:
    """The transformer output; for a training step also every weight's gradient of `(output * g).sum()`, g ~ N(0, 1)
    (seed 2), joined into one vector."""
    if not train:
        with torch.no_grad():
            return {"output": model(**inputs)[0].float()}
    model.zero_grad(set_to_none=True)
    output = model(**inputs)[0]
    grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(2)).to(output.device, output.dtype)
    output.backward(grad)
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return {"output": output.detach().float(), "weight grads": grads}


def training_step(model: torch.nn.Module, inputs: dict) -> None:
    """What the training row times: forward, backward of the output's sum into every weight, gradients freed."""
    model(**inputs)[0].sum().backward()
    model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def stock_rotary():
    """Radial processors rotate queries and keys with the stock elementwise ops instead of the rotary kernel."""
    from mmattn.diffusion.processors import RadialProcessor

    default = RadialProcessor.fused_rotary
    RadialProcessor.fused_rotary = False
    try:
        yield
    finally:
        RadialProcessor.fused_rotary = default


def step_row(case: StepCase, quick: bool, device: str) -> str:
    """Dense vs Radial (our kernel) on one call, after checking the Radial call against Radial run by FlexAttention
    (bf16, and float32 as the reference; relative errors of the output, and for training of the weight gradients)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    high = torch.float32 if device == "cuda" else torch.float64
    config = sparse_step_config(case, quick)
    peer_backend = "flex" if device == "cuda" or not case.train else "torch"  # no FlexAttention backward on the CPU
    flex_config = dataclasses.replace(config, backend=peer_backend)
    check_frames = case.check_frames or case.latent[2]
    reference_model = wan_model(case, device, high).requires_grad_(case.train)
    with apply_radial_attention(reference_model, flex_config), highest_precision():
        reference = step_results(reference_model, wan_inputs(case, check_frames, device, high), case.train)
    model = reference_model.to(dtype)  # the same random weights, rounded
    del reference_model
    inputs = wan_inputs(case, check_frames, device, dtype)
    with apply_radial_attention(model, config):
        ours = step_results(model, inputs, case.train)
    with apply_radial_attention(model, flex_config):
        peer = step_results(model, inputs, case.train)
    where = "" if check_frames == case.latent[2] else f" (checked on {check_frames} latent frames)"
    check = check_agreement(f"{case.name} (Radial){where}", ours, peer, reference, peer_name=f"Radial through {peer_backend}",
                            reference_name=f"Radial through {peer_backend} in {high}", metric="relative")
    del ours, peer, reference

    inputs = wan_inputs(case, case.latent[2], device, dtype)
    call = functools.partial(training_step, model, inputs) if case.train else functools.partial(model, **inputs)
    triton_config = dataclasses.replace(config, backend="triton") if device == "cuda" else config
    with torch.no_grad() if not case.train else contextlib.nullcontext():
        dense = median_ms(call, device)
        with apply_radial_attention(model, config):
            radial = median_ms(call, device)
            with stock_rotary():
                radial_stock_rotary = median_ms(call, device)
        with apply_radial_attention(model, triton_config):
            radial_triton = median_ms(call, device)
    del call, model
    checked = "; ".join(f"{name} {a.vs_peer:.1e}, {a.ours_err:.1e}/{a.peer_err:.1e}" for name, a in check.items())
    goal = "" if case.goal is None else f" (goal {case.goal:g}x)"
    row = (f"| {case.name}, {case.tokens:,} tokens{where} | {dense:.1f} | {radial:.1f} | {radial_stock_rotary:.1f} | "
           f"{radial_triton:.1f} | {dense / radial:.2f}x{goal} | {dense / radial_stock_rotary:.2f}x | "
           f"{dense / radial_triton:.2f}x | {checked} |")
    print(row, flush=True)
    return row


def table(attention: list[str], ours: list[str], peers: list[str], step: list[str], device: str) -> str:
    gpu = device == "cuda"
    names = [*ours, *peers]
    fa4_ratio = " vs FA4-class |" if "FA4" in peers else ""
    fa4 = "" if not gpu or "FA4" in peers else (
        " FlashAttention-4 (`flash_attn.cute`) was not installed: no FA4 columns, and \"auto\" ran Triton.")
    mine = ("auto = `block_sparse_attention(backend=\"auto\")` (FA4 where installed), triton = our Triton kernel "
            "alone" if gpu else "ours = mmattn's torch block-sparse reference")
    precision = "float32" if gpu else "float64"
    attention_section = [
        (f"Attention forward, median ms, {'bf16' if gpu else 'float32'}, N(0, 1) inputs, head dim "
         f"{128 if gpu else 32}. Radial mask (block {128 if gpu else 16}) as in the official repo; {mine}; dense = "
         f"{'cuDNN' if gpu else 'math'} SDPA; flex = FlexAttention ({'compiled' if gpu else 'eager'}) on the same "
         "mask; FA4 = FlashAttention-4's `flash_attn_func` with the same block lists; flex FLASH = FA4's kernels "
         f"through FlexAttention's FLASH backend.{fa4} Ratios: dense or peer time / {ours[0]}'s (goals: issue 17 for "
         "Wan 480p and Wan 720p 14B heads, else 0.85 / density; 1.15x FlexAttention); \"vs FA4-class\" divides the "
         "faster of FA4 and flex FLASH. Check, before each row was timed: each mmattn column's output and each "
         f"block-sparse peer's against flex in {precision} on the same inputs, max|ours - ref| <= 2 x max|peer - ref| "
         f"+ 1e-3 x max(1, max|ref|); the last columns give {ours[0]}'s output max abs difference to flex and the "
         "errors (ours/flex)."),
        "",
        "| case | tokens | heads | density | dense ms | " + " | ".join(f"{n} ms" for n in names)
        + f" | {ours[0]} vs dense | {ours[0]} vs flex |{fa4_ratio} out max abs {ours[0]}-flex | check: error ours/flex |",
        "|---" * (9 + len(names) + bool(fa4_ratio)) + "|",
        *attention,
        "",
    ]
    step_section = [
        ("One transformer call (one CFG branch), random weights (seed 0), median ms; dense = diffusers' stock "
         "attention; radial = the model's preset (`wan2.1-t2v-1.3b`, `wan2.2-ti2v-5b`) on a sparse step (its dense "
         "layers dense) with `backend=\"auto\"` (its sparse layers' rotary embedding by "
         "`rotary_embedding`: one kernel forward and backward), radial stock RoPE the same with diffusers' "
         "elementwise rotary embedding (`fused_rotary = False`), radial Triton with our Triton attention kernel. "
         "Denoising steps time the forward; the training steps time forward and backward through every weight (full "
         "fine-tuning), the gradient-checkpointing one with each block's forward recomputed in the backward "
         "(`train_lora --gradient-checkpointing`; no goal). Check, before timing: the Radial call's output (and the "
         "training step's weight gradients of `(output * g).sum()`, g ~ N(0, 1), one vector) against the same call "
         "with Radial run by FlexAttention, "
         f"both against that call in {precision} (same weights): relative error (Frobenius) ours <= 2 x flex's + 1e-3; where the float32 run "
         "would not fit the GPU, the check runs on fewer latent frames."),
        "",
        "| case | dense ms | radial ms | radial stock RoPE ms | radial Triton ms | speedup | speedup stock RoPE | "
        "speedup Triton | check: rel. diff ours-flex, rel. error ours/flex |",
        "|---|---|---|---|---|---|---|---|---|",
        *step,
        "",
    ]
    return "\n".join(["# Radial attention (mmattn.diffusion)", "", provenance(device, ("diffusers",)), "",
                      *(attention_section if attention else []), *(step_section if step else [])])


SECTIONS = ("attention", "steps")


def main() -> None:
    parser = benchmark_parser(__doc__, DEFAULT_OUT, "tiny shapes on the CPU: a smoke test")
    parser.add_argument("--only", choices=SECTIONS, default=None,
                        help="run one section only: the attention table or the transformer steps (a subset: see --out)")
    parser.add_argument("--match", default=None, help="run only the cases whose name contains this text (a subset)")
    args = parser.parse_args()
    if not args.quick and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --quick)")
    if importlib.util.find_spec("diffusers") is None:
        parser.error("needs diffusers for the Wan step (pip install 'mmattn[diffusion]'); nothing was measured")
    device = "cpu" if args.quick else "cuda"
    full = not args.quick and args.only is None and args.match is None
    target = results_target(parser, args.out, DEFAULT_OUT, full, "--quick, --only or --match")
    set_fast(args.fast)
    attention_cases = [c for c in (QUICK_CASES if args.quick else ATTENTION_CASES) if (args.match or "") in c[0]]
    step_cases = [c for c in (QUICK_STEP_CASES if args.quick else STEP_CASES) if (args.match or "") in c.name]
    attention, ours, peers = attention_rows(attention_cases if args.only != "steps" else (), device)
    step = [step_row(case, args.quick, device) for case in (step_cases if args.only != "attention" else ())]
    write_results(table(attention, ours, peers, step, device), target)


if __name__ == "__main__":
    main()
