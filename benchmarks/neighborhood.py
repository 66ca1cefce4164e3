"""Neighborhood attention on the GPU: mmattn's fused Triton kernels vs FlexAttention (compiled, the same NA
mask) vs cuDNN SDPA dense, forward and forward+backward, bf16. Writes benchmarks/results/neighborhood.md.

Cases: the NAT/DiNAT stage shapes, a FLUX-like 2D case and a video 3D case. TFLOP/s count the attended
(query, key) pairs only: 4 * B * H * D * N * prod(kernel) forward, 3.5x that for forward+backward. Speed
ratios are peer time / our time (above 1: mmattn is faster).

    python benchmarks/neighborhood.py [--quick] [--out benchmarks/results/neighborhood.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import bench, environment, tflops

from mmattn.kernels import Neighborhood, neighborhood_attention
from mmattn.kernels.flex import neighborhood_block_mask
from mmattn.kernels.triton import neighborhood as kernels

# name, batch, heads, spatial, head_dim, kernel_size, dilation
CASES = [
    ("NAT stage 1", 64, 2, (56, 56), 32, (7, 7), 1),
    ("NAT stage 2", 16, 8, (64, 64), 64, (7, 7), 1),
    ("DiNAT stage 3", 16, 16, (28, 28), 32, (7, 7), 2),
    ("FLUX-like 2D", 1, 24, (256, 256), 128, (80, 80), 1),
    ("video 3D", 1, 24, (30, 48, 80), 128, (18, 24, 24), 1),
]


def run(cases, out_path: Path) -> None:
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    rows, tiles = [], []
    for name, batch, heads, spatial, head_dim, kernel_size, dilation in cases:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, *spatial, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        nbhd = Neighborhood.create(spatial, kernel_size, dilation)
        block_mask = neighborhood_block_mask(nbhd, q.device)

        def ours_fn(q, k, v):
            return neighborhood_attention(q, k, v, kernel_size, dilation=dilation, backend="triton")

        def flat(fn):
            return lambda q, k, v: fn(q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2)).view(q.shape)

        ours = bench(ours_fn, q, k, v)
        flex = bench(flat(lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask)), q, k, v)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn = bench(flat(torch.nn.functional.scaled_dot_product_attention), q, k, v)
        with torch.no_grad():
            diff = ours_fn(q, k, v).flatten(2, -2) - compiled_flex(*(t.flatten(2, -2) for t in (q, k, v)), block_mask=block_mask)
        flops = 4 * batch * heads * head_dim * nbhd.num_tokens * nbhd.num_keys
        shape = f"B{batch} H{heads} {'x'.join(map(str, spatial))} D{head_dim} k{'x'.join(map(str, kernel_size))}"
        rows.append({"name": name, "shape": shape + (f" dil{dilation}" if dilation > 1 else ""), "density": nbhd.density(),
                         "ours": ours, "flex": flex, "cudnn": cudnn, "flops": flops, "max_diff": diff.abs().max().item()})
        print(format_row(rows[-1]), flush=True)
        tiles.append(f"{name}: " + ", ".join(
            f"{part} {describe(kernel.best_config)}"
            for part, kernel in (("fwd", kernels.fwd_kernel), ("dQ", kernels.dq_kernel), ("dK/dV", kernels.dkdv_kernel))
        ))
        print(tiles[-1], flush=True)
        write_table(rows, tiles, out_path)  # after every case: a long run cut short keeps what it measured


def describe(config) -> str:
    kw = config.kwargs
    return (f"Q {kw['TQ0']}x{kw['TQ1']}x{kw['TQ2']} KV {kw['TK0']}x{kw['TK1']}x{kw['TK2']} "
            f"w{config.num_warps} s{config.num_stages}")


def format_row(r) -> str:
    o, f, c = r["ours"], r["flex"], r["cudnn"]
    return (
        f"| {r['name']} | {r['shape']} | {r['density']:.4f} "
        f"| {o.fwd_ms:.3f} | {f.fwd_ms:.3f} | {c.fwd_ms:.3f} | {tflops(r['flops'], o.fwd_ms):.0f} "
        f"| {f.fwd_ms / o.fwd_ms:.2f} | {c.fwd_ms / o.fwd_ms:.2f} "
        f"| {o.fwd_bwd_ms:.3f} | {f.fwd_bwd_ms:.3f} | {c.fwd_bwd_ms:.3f} | {tflops(3.5 * r['flops'], o.fwd_bwd_ms):.0f} "
        f"| {f.fwd_bwd_ms / o.fwd_bwd_ms:.2f} | {c.fwd_bwd_ms / o.fwd_bwd_ms:.2f} | {r['max_diff']:.1e} |"
    )


HEADER = (
    "| case | shape | density | fwd ours ms | fwd flex ms | fwd cuDNN dense ms | fwd ours TF/s | fwd vs flex "
    "| fwd vs cuDNN | f+b ours ms | f+b flex ms | f+b cuDNN dense ms | f+b ours TF/s | f+b vs flex | f+b vs cuDNN "
    "| max |ours-flex| |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def write_table(rows, tiles, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        "# Neighborhood attention: mmattn fused Triton vs FlexAttention vs cuDNN dense\n\n"
        f"{environment()}; bf16, no rpb, medians of `triton.testing.do_bench`.\n\n"
        "\"vs\" columns are peer time / our time (above 1: mmattn is faster). TF/s count attended pairs only "
        "(forward+backward = 3.5x the forward FLOPs). FlexAttention uses the identical NA `mask_mod`, compiled, "
        "its `BlockMask` built once outside the timing.\n\n"
        + HEADER + "\n".join(format_row(r) for r in rows) + "\n\n"
        "Tiles picked by the autotuner (query tile, key tile, warps, stages):\n\n"
        + "\n".join(f"- {t}" for t in tiles) + "\n"
    )
    print(f"wrote {out_path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the NAT stage shapes only")
    parser.add_argument("--only", help="comma-separated case names (e.g. 'NAT stage 1,video 3D')")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "neighborhood.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/neighborhood.py needs a CUDA GPU")
    cases = CASES[:3] if args.quick else CASES
    if args.only:
        cases = [case for case in CASES if case[0] in args.only.split(",")]
    run(cases, args.out)


if __name__ == "__main__":
    main()
