"""Block-sparse attention on the GPU: mmattn's Triton kernels vs FlexAttention (compiled, identical mask) vs
cuDNN SDPA dense, forward and forward+backward, bf16. Writes benchmarks/results/block_sparse.md.

TFLOP/s count only the kept (query, key) pairs: 4 * B * H * D * pairs forward, 2.5x that for the backward.
Speed ratios are peer time / our time (above 1: we are faster). Efficiency = density * T(our dense mask) /
T(our sparse mask). Masks: "band" (each query block sees a window of consecutive key blocks) and "random"
(each query block sees the same number of key blocks drawn at random, per head).

    python benchmarks/block_sparse.py [--quick] [--out benchmarks/results/block_sparse.md]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import bench, environment, tflops

from mmattn.kernels import BlockSparseMask, block_sparse_attention
from mmattn.kernels.triton import block_sparse as kernels

SHAPES = [(1, 24, 32760, 128), (1, 12, 16384, 64), (8, 16, 4096, 128)]
DENSITIES = [1.0, 0.5, 0.25, 0.1, 0.05]
BLOCK = 128


def band_blocks(heads: int, n: int, density: float) -> torch.Tensor:
    """Each query block i sees `w` consecutive key blocks centred on i, shifted inward at the borders."""
    width = max(1, round(density * n))
    start = (torch.arange(n) - width // 2).clamp(0, n - width)
    cols = torch.arange(n)
    rows = (cols[None, :] >= start[:, None]) & (cols[None, :] < start[:, None] + width)
    return rows.expand(1, heads, n, n).contiguous()


def random_blocks(heads: int, n: int, density: float, seed: int = 0) -> torch.Tensor:
    """Each (head, query block) sees the same number of key blocks, drawn at random."""
    width = max(1, round(density * n))
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(1, heads, n, n, generator=g).argsort(-1)[..., :width]
    return torch.zeros(1, heads, n, n, dtype=torch.bool).scatter_(-1, picks, True)


def run(shapes, densities, out_path: Path) -> None:
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    rows, tiles = [], []
    for batch, heads, length, head_dim in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        n = math.ceil(length / BLOCK)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn = bench(torch.nn.functional.scaled_dot_product_attention, q, k, v)
        dense_flops = 4 * batch * heads * head_dim * length * length
        ours_dense = None
        for pattern in ("band", "random"):
            for density in densities:
                if density == 1.0 and pattern == "random":
                    continue
                make = band_blocks if pattern == "band" else random_blocks
                mask = BlockSparseMask.from_dense(make(heads, n, density), BLOCK, length, length).to("cuda")
                block_mask = mask.to_flex()
                ours = bench(lambda q, k, v: block_sparse_attention(q, k, v, mask, backend="triton"), q, k, v)
                flex = bench(lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask), q, k, v)
                with torch.no_grad():
                    diff = (block_sparse_attention(q, k, v, mask) - compiled_flex(q, k, v, block_mask=block_mask))
                    max_diff = diff.abs().max().item()
                if density == 1.0:
                    ours_dense = ours
                kept = mask.density()
                flops = dense_flops * kept
                rows.append({
                    "shape": f"B{batch} H{heads} L{length} D{head_dim}", "pattern": "all" if density == 1.0 else pattern,
                    "density": kept, "ours": ours, "flex": flex, "cudnn": cudnn, "flops": flops, "max_diff": max_diff,
                    "efficiency": (kept * ours_dense.fwd_ms / ours.fwd_ms, kept * ours_dense.fwd_bwd_ms / ours.fwd_bwd_ms),
                })
                print(format_row(rows[-1]), flush=True)
        tiles.append(f"B{batch} H{heads} L{length} D{head_dim}: " + ", ".join(
            f"{name} {describe(kernel.best_config)}"
            for name, kernel in (("fwd", kernels.fwd_kernel), ("dK/dV", kernels.dkdv_kernel), ("dQ", kernels.dq_kernel))
        ))
        print(tiles[-1], flush=True)
    write_table(rows, tiles, out_path)


def describe(config) -> str:
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"


def format_row(r) -> str:
    o, f, c = r["ours"], r["flex"], r["cudnn"]
    return (
        f"| {r['shape']} | {r['pattern']} | {r['density']:.3f} "
        f"| {o.fwd_ms:.3f} | {f.fwd_ms:.3f} | {c.fwd_ms:.3f} | {tflops(r['flops'], o.fwd_ms):.0f} "
        f"| {tflops(r['flops'], f.fwd_ms):.0f} | {f.fwd_ms / o.fwd_ms:.2f} | {c.fwd_ms / o.fwd_ms:.2f} | {r['efficiency'][0]:.2f} "
        f"| {o.fwd_bwd_ms:.3f} | {f.fwd_bwd_ms:.3f} | {c.fwd_bwd_ms:.3f} | {tflops(3.5 * r['flops'], o.fwd_bwd_ms):.0f} "
        f"| {tflops(3.5 * r['flops'], f.fwd_bwd_ms):.0f} | {f.fwd_bwd_ms / o.fwd_bwd_ms:.2f} | {c.fwd_bwd_ms / o.fwd_bwd_ms:.2f} "
        f"| {r['efficiency'][1]:.2f} | {r['max_diff']:.1e} |"
    )


HEADER = (
    "| shape | mask | density | fwd ours ms | fwd flex ms | fwd cuDNN dense ms | fwd ours TF/s | fwd flex TF/s "
    "| fwd vs flex | fwd vs cuDNN | fwd eff. | f+b ours ms | f+b flex ms | f+b cuDNN dense ms | f+b ours TF/s "
    "| f+b flex TF/s | f+b vs flex | f+b vs cuDNN | f+b eff. | max |ours-flex| |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def write_table(rows, tiles, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# Block-sparse attention: mmattn Triton vs FlexAttention vs cuDNN dense\n\n"
        f"{environment()}; bf16, block {BLOCK}x{BLOCK}, medians of `triton.testing.do_bench`.\n\n"
        "\"vs\" columns are peer time / our time (above 1: mmattn is faster). TF/s count kept blocks only "
        "(forward+backward = 3.5x the forward FLOPs). Efficiency = density x T(our all-ones mask) / T(ours).\n\n"
        + HEADER + "\n".join(format_row(r) for r in rows) + "\n\n"
        "Tiles picked by the autotuner (BLOCK_M x BLOCK_N, warps, stages):\n\n"
        + "\n".join(f"- {t}" for t in tiles) + "\n"
    )
    out_path.write_text(text)
    print(f"wrote {out_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape, densities 1.0 and 0.1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "block_sparse.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/block_sparse.py needs a CUDA GPU")
    shapes, densities = (SHAPES[:1], [1.0, 0.1]) if args.quick else (SHAPES, DENSITIES)
    run(shapes, densities, args.out)


if __name__ == "__main__":
    main()
