"""Context-parallel Radial attention, 1 GPU vs 2 GPUs of one host (bf16, forward): Wan 720p 81-frame attention and
one denoising step of a full-size Wan2.1-1.3B transformer (random weights), Radial and dense.

    torchrun --nproc_per_node=2 benchmarks/context_parallel.py [--fast]    # writes benchmarks/results/context_parallel.md
    torchrun --nproc_per_node=2 benchmarks/context_parallel.py --quick    # tiny shapes, CPU, gloo: a smoke test

Radial on 2 GPUs runs mmattn's `context_parallel_attention` (Ulysses or ring); dense on 2 GPUs is diffusers' own
context parallelism (its Ulysses / ring templates around cuDNN SDPA). 1-GPU times come from every rank running the
whole problem alone. Each time is the median over fixed iterations (collectives need every rank to run the same
count), the slowest rank's.

Before timing, the 2-GPU results are checked against the 1-GPU ones (benchmarks/common.py), with errors reduced over
the ranks so that every rank stops alike: the sharded Radial attention output against the 1-GPU Radial output, both
against the 1-GPU result in float32 (float64 on the CPU), err(2 GPUs) <= 2 x err(1 GPU) + 1e-3 x max(1, max|ref|); the
Radial step's output on 2 GPUs against its 1-GPU output, relative difference at most 2x that of diffusers' own dense
context parallelism (2 GPUs against 1) + 1e-3.
"""

from __future__ import annotations

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
from common import (
    RESULTS, benchmark_parser, highest_precision, judge, max_abs_diff, provenance, relative_diff, results_target,
    set_fast, timing, write_results,
)
from diffusion import QUICK_STEP_CASES, STEP_CASES, sparse_step_config, wan_inputs, wan_model

from mmattn.diffusion import apply_radial_attention, radial_mask
from mmattn.kernels import block_sparse_attention
from mmattn.kernels.distributed import context_parallel_attention

# name, frames, tokens per frame, heads (radial decay 0.2, Wan mask rule, block 128, head_dim 128)
CASES = [("Wan 720p 81f (1.3B heads)", 21, 45 * 80, 12), ("Wan 720p 81f (14B heads)", 21, 45 * 80, 40)]
QUICK_CASES = [("tiny wan", 4, 64, 2)]
SCHEMES = {"Ulysses": {"ulysses_degree": 2}, "ring": {"ring_degree": 2}}
DEFAULT_OUT = RESULTS / "context_parallel.md"
DENSE_BACKEND = "_native_cudnn"  # diffusers' ring template needs the log-sum-exp, which its "native" cannot give


def schemes(quick: bool) -> dict:
    """On the CPU only Ulysses: diffusers has no CPU attention backend that returns the log-sum-exp ring needs."""
    return {"Ulysses": SCHEMES["Ulysses"]} if quick else SCHEMES


def timed(fn, quick: bool) -> float:
    """Median ms of `fn` over a fixed count of iterations after warm-up, the slowest rank's."""
    warmup, iters = (1, 3) if quick else (2, 8) if timing().rep_ms < 300 else (5, 20)
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


def reduced_max(*values: float) -> list[float]:
    """Each value's maximum over the ranks (so that every rank reaches the same verdict)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


@torch.no_grad()
def attention_rows(quick: bool, device: torch.device, dtype: torch.dtype) -> list[str]:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    rank, world = dist.get_rank(), dist.get_world_size()
    backend, dense_backend = ("torch", "native") if quick else ("triton", DENSE_BACKEND)
    reference_backend, reference_dtype = ("torch", torch.float64) if quick else ("flex", torch.float32)
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
        one_out = block_sparse_attention(q, k, v, mask, backend=backend)[:, :, shard]
        with highest_precision():
            reference = block_sparse_attention(*(t.to(reference_dtype) for t in (q, k, v)), mask,
                                               backend=reference_backend)[:, :, shard]
        radial_one = timed(functools.partial(block_sparse_attention, q, k, v, mask, backend=backend), quick)
        with sdpa_kernel([SDPBackend.MATH if quick else SDPBackend.CUDNN_ATTENTION]):
            dense_one = timed(functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v), quick)
        for scheme, config in configs.items():
            cp = config.context_parallel_config
            groups = {"ulysses_group": cp._ulysses_mesh.get_group(), "ring_group": cp._ring_mesh.get_group()}
            # the check, before timing this scheme: 2 GPUs as accurate as 1 against the higher-precision result
            two_out = context_parallel_attention(*local, mask, backend=backend, **groups)
            errors = reduced_max(max_abs_diff(two_out, reference), max_abs_diff(one_out, reference),
                                 max_abs_diff(two_out, one_out), reference.abs().max().item())
            check = judge(f"{name}, {scheme}", "out", *errors[:3], scale=errors[3], peer_name="Radial on 1 GPU",
                          reference_name=f"Radial on 1 GPU in {reference_dtype}")
            radial_two = timed(
                functools.partial(context_parallel_attention, *local, mask, backend=backend, **groups), quick
            )
            dense_two = timed(
                functools.partial(dispatch_attention_fn, *local_bshd, backend=dense_backend, parallel_config=config),
                quick,
            )
            rows.append(
                f"| {name} | {tokens:,} | {scheme} | {radial_one:.2f} | {radial_two:.2f} | "
                f"{radial_one / radial_two:.2f}x | {dense_one:.2f} | {dense_two:.2f} | {dense_one / dense_two:.2f}x | "
                f"{check.vs_peer:.1e} | {check.ours_err:.1e}/{check.peer_err:.1e} |"
            )
            if rank == 0:
                print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def step_rows(quick: bool, device: torch.device, dtype: torch.dtype) -> list[str]:
    from diffusers import ContextParallelConfig

    case = (QUICK_STEP_CASES if quick else STEP_CASES)[0]  # the Wan2.1-1.3B denoising step (quick: tiny Wan)
    config = sparse_step_config(case, quick)

    def build():
        model, inputs = wan_model(case, device, dtype), wan_inputs(case, case.latent[2], device, dtype)
        if not quick:
            model.set_attention_backend(DENSE_BACKEND)  # before Radial: its dense fallback keeps the stock backend
        return model, inputs

    def outputs(model, inputs) -> dict[str, torch.Tensor]:
        result = {"dense": model(**inputs)[0]}
        with apply_radial_attention(model, config):
            result["radial"] = model(**inputs)[0]
        return result

    def step_times(model, inputs) -> dict[str, float]:
        times = {"dense": timed(functools.partial(model, **inputs), quick)}
        with apply_radial_attention(model, config):
            times["radial"] = timed(functools.partial(model, **inputs), quick)
        return times

    model, inputs = build()
    one_out = outputs(model, inputs)
    one = step_times(model, inputs)
    del model
    rows = []
    for scheme, degrees in schemes(quick).items():
        model, inputs = build()
        model.enable_parallelism(config=ContextParallelConfig(**degrees))  # cannot be undone: a fresh model each
        # the check, before timing: Radial's 2-GPU step may deviate from its 1-GPU step at most twice as much as
        # diffusers' dense context parallelism deviates from its own 1-GPU step
        two_out = outputs(model, inputs)
        radial_dev, dense_dev = reduced_max(relative_diff(two_out["radial"], one_out["radial"]),
                                            relative_diff(two_out["dense"], one_out["dense"]))
        judge(f"Wan step, {scheme}", "output", radial_dev, dense_dev, radial_dev, scale=0.0, metric="relative",
              peer_name="dense context parallelism (diffusers)", reference_name="the same step on 1 GPU")
        two = step_times(model, inputs)
        del model
        for attention in ("radial", "dense"):
            goal = " (goal 1.7x)" if attention == "radial" else ""
            deviation = radial_dev if attention == "radial" else dense_dev
            rows.append(
                f"| Wan2.1-1.3B step, {inputs['hidden_states'][0, 0].numel() // 4:,} tokens | {attention} | {scheme} | "
                f"{one[attention]:.1f} | {two[attention]:.1f} | {one[attention] / two[attention]:.2f}x{goal} | "
                f"{deviation:.1e} |"
            )
            if dist.get_rank() == 0:
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__, DEFAULT_OUT, "tiny shapes on the CPU with gloo")
    args = parser.parse_args()
    target = results_target(parser, args.out, DEFAULT_OUT, not args.quick, "--quick")
    set_fast(args.fast)
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
        provenance(device.type, ("diffusers",), settings=(
            f"median of {'3' if args.quick else '8' if args.fast else '20'} synchronized wall-clock calls after "
            f"warm-up, the slowest rank's; {dist.get_world_size()} processes")),
        "",
        ("Attention forward, median ms; Radial mask (block 128, decay 0.2). Radial: mmattn Triton block-sparse on 1 "
         "GPU, `context_parallel_attention` on 2. Dense: cuDNN SDPA on 1 GPU, diffusers' context parallelism "
         f"(`{DENSE_BACKEND}`) on 2. Check, before timing: the 2-GPU Radial output against the 1-GPU one, both against "
         "the 1-GPU result in float32 (max abs error, worst rank): 2-GPU error <= 2 x 1-GPU error + 1e-3 x "
         "max(1, max|ref|); the last columns give the 2-GPU vs 1-GPU difference and the two errors."),
        "",
        "| case | tokens | scheme | radial 1 GPU | radial 2 GPUs | speedup | dense 1 GPU | dense 2 GPUs | speedup "
        "| out max abs 2 vs 1 GPU | check: error 2/1 GPUs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *attention_rows(args.quick, device, dtype),
        "",
        ("One denoising step (transformer forward, one CFG branch), random weights, median ms; dense = diffusers' "
         f"`{DENSE_BACKEND}` backend; radial = preset `wan2.1-t2v-1.3b` on a sparse step (layer 0 dense); 2 GPUs "
         "through `enable_parallelism`. Check, before timing: the relative difference (Frobenius) of the step output "
         "on 2 GPUs to the one on 1 GPU, Radial's at most 2 x dense's (diffusers' own context parallelism) + 1e-3."),
        "",
        "| case | attention | scheme | 1 GPU ms | 2 GPUs ms | speedup | output rel. diff 2 vs 1 GPU |",
        "|---|---|---|---|---|---|---|",
        *step_rows(args.quick, device, dtype),
        "",
    ]
    if dist.get_rank() == 0:
        write_results("\n".join(lines), target)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
