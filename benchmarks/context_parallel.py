"""Context-parallel Radial attention, 1 GPU vs 2 GPUs of one host (bf16, forward): Wan 720p 81-frame attention and
one denoising step of a full-size Wan2.1-1.3B transformer (random weights), Radial and dense.

    torchrun --nproc_per_node=2 benchmarks/context_parallel.py [--out benchmarks/results/context_parallel.md]
    torchrun --nproc_per_node=2 benchmarks/context_parallel.py --quick    # tiny shapes, CPU, gloo: a smoke test

Radial on 2 GPUs runs mmattn's `context_parallel_attention` (Ulysses or ring); dense on 2 GPUs is diffusers' own
context parallelism (its Ulysses / ring templates around cuDNN SDPA). 1-GPU times come from every rank running the
whole problem alone. Each time is the median over fixed iterations (collectives need every rank to run the same
count), the slowest rank's.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion import environment, sparse_step_config, wan_step

from mmattn.diffusion import apply_radial_attention, radial_mask
from mmattn.kernels import block_sparse_attention
from mmattn.kernels.distributed import context_parallel_attention

# name, frames, tokens per frame, heads (radial decay 0.2, Wan mask rule, block 128, head_dim 128)
CASES = [("Wan 720p 81f (1.3B heads)", 21, 45 * 80, 12), ("Wan 720p 81f (14B heads)", 21, 45 * 80, 40)]
QUICK_CASES = [("tiny wan", 4, 64, 2)]
SCHEMES = {"Ulysses": {"ulysses_degree": 2}, "ring": {"ring_degree": 2}}
DENSE_BACKEND = "_native_cudnn"  # diffusers' ring template needs the log-sum-exp, which its "native" cannot give


def schemes(quick: bool) -> dict:
    """On the CPU only Ulysses: diffusers has no CPU attention backend that returns the log-sum-exp ring needs."""
    return {"Ulysses": SCHEMES["Ulysses"]} if quick else SCHEMES


def timed(fn, quick: bool) -> float:
    """Median ms of `fn` over a fixed count of iterations after warm-up, the slowest rank's."""
    warmup, iters = (1, 3) if quick else (5, 20)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        if not quick:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if not quick:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def parallel_config(degrees: dict, device: torch.device):
    """A set-up diffusers `ParallelConfig` over all ranks (what `enable_parallelism` builds)."""
    from diffusers import ContextParallelConfig, ParallelConfig

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))
    cp = config.context_parallel_config
    mesh = dist.device_mesh.init_device_mesh(device.type, cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    return config


@torch.no_grad()
def attention_rows(quick: bool, device: torch.device, dtype: torch.dtype) -> list[str]:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    rank, world = dist.get_rank(), dist.get_world_size()
    backend, dense_backend = ("torch", "native") if quick else ("triton", DENSE_BACKEND)
    configs = {name: parallel_config(degrees, device) for name, degrees in schemes(quick).items()}
    rows = []
    for name, frames, per_frame, heads in QUICK_CASES if quick else CASES:
        mask = radial_mask(frames, per_frame, block_size=16 if quick else 128, decay_factor=0.2, device=device)
        tokens, head_dim = frames * per_frame, 32 if quick else 128
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        shard = slice(rank * tokens // world, (rank + 1) * tokens // world)
        local = [t[:, :, shard].contiguous() for t in (q, k, v)]
        local_bshd = [t.transpose(1, 2).contiguous() for t in local]
        radial_one = timed(functools.partial(block_sparse_attention, q, k, v, mask, backend=backend), quick)
        with sdpa_kernel([SDPBackend.MATH if quick else SDPBackend.CUDNN_ATTENTION]):
            dense_one = timed(functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v), quick)
        for scheme, config in configs.items():
            cp = config.context_parallel_config
            groups = {"ulysses_group": cp._ulysses_mesh.get_group(), "ring_group": cp._ring_mesh.get_group()}
            radial_two = timed(
                functools.partial(context_parallel_attention, *local, mask, backend=backend, **groups), quick
            )
            dense_two = timed(
                functools.partial(dispatch_attention_fn, *local_bshd, backend=dense_backend, parallel_config=config),
                quick,
            )
            rows.append(
                f"| {name} | {tokens:,} | {scheme} | {radial_one:.2f} | {radial_two:.2f} | "
                f"{radial_one / radial_two:.2f}x | {dense_one:.2f} | {dense_two:.2f} | {dense_one / dense_two:.2f}x |"
            )
            if rank == 0:
                print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def step_rows(quick: bool, device: torch.device, dtype: torch.dtype) -> list[str]:
    from diffusers import ContextParallelConfig

    config = sparse_step_config(quick)

    def build():
        model, inputs = wan_step(quick, device, dtype)
        if not quick:
            model.set_attention_backend(DENSE_BACKEND)  # before Radial: its dense fallback keeps the stock backend
        return model, inputs

    def step_times(model, inputs) -> dict[str, float]:
        times = {"dense": timed(functools.partial(model, **inputs), quick)}
        with apply_radial_attention(model, config):
            times["radial"] = timed(functools.partial(model, **inputs), quick)
        return times

    one = step_times(*build())
    rows = []
    for scheme, degrees in schemes(quick).items():
        model, inputs = build()
        model.enable_parallelism(config=ContextParallelConfig(**degrees))  # cannot be undone: a fresh model each
        two = step_times(model, inputs)
        del model
        for attention in ("radial", "dense"):
            goal = " (goal 1.7x)" if attention == "radial" else ""
            rows.append(
                f"| Wan2.1-1.3B step, {inputs['hidden_states'][0, 0].numel() // 4:,} tokens | {attention} | {scheme} | "
                f"{one[attention]:.1f} | {two[attention]:.1f} | {one[attention] / two[attention]:.2f}x{goal} |"
            )
            if dist.get_rank() == 0:
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU with gloo")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "context_parallel.md")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("launch with torchrun --nproc_per_node=2")
    if not args.quick and not torch.cuda.is_available():
        parser.error("needs CUDA GPUs (or --quick)")
    dist.init_process_group("gloo" if args.quick else "nccl")
    if dist.get_world_size() != 2:
        parser.error(f"compares 1 GPU with 2: run 2 processes, got {dist.get_world_size()}")
    if args.quick:
        device, dtype = torch.device("cpu"), torch.float32
        torch.accelerator.device_count = lambda: 1  # diffusers places rank r on accelerator r % device_count
    else:
        device, dtype = torch.device("cuda", int(os.environ["LOCAL_RANK"])), torch.bfloat16
        torch.cuda.set_device(device)
    lines = [
        "# Context-parallel Radial attention (mmattn.kernels.distributed, mmattn.diffusion)",
        "",
        environment(args.quick) + f"; {dist.get_world_size()} processes",
        "",
        ("Attention forward, median ms; Radial mask (block 128, decay 0.2). Radial: mmattn Triton block-sparse on 1 "
         "GPU, `context_parallel_attention` on 2. Dense: cuDNN SDPA on 1 GPU, diffusers' context parallelism "
         f"(`{DENSE_BACKEND}`) on 2."),
        "",
        "| case | tokens | scheme | radial 1 GPU | radial 2 GPUs | speedup | dense 1 GPU | dense 2 GPUs | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
        *attention_rows(args.quick, device, dtype),
        "",
        ("One denoising step (transformer forward, one CFG branch), random weights, median ms; dense = diffusers' "
         f"`{DENSE_BACKEND}` backend; radial = preset `wan2.1-t2v-1.3b` on a sparse step (layer 0 dense); 2 GPUs "
         "through `enable_parallelism`."),
        "",
        "| case | attention | scheme | 1 GPU ms | 2 GPUs ms | speedup |",
        "|---|---|---|---|---|---|",
        *step_rows(args.quick, device, dtype),
        "",
    ]
    if dist.get_rank() == 0 and (not args.quick or args.out != parser.get_default("out")):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))
        print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
