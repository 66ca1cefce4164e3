"""Neighborhood attention on the GPU: mmattn's fused Triton kernels vs FlexAttention (compiled, the same NA mask) vs
cuDNN SDPA dense, forward and forward+backward, bf16. Writes benchmarks/results/neighborhood.md.

Cases: the NAT/DiNAT stage shapes, a FLUX-like 2D case and a video 3D case. Before a case is timed, mmattn's output
and input gradients are checked against FlexAttention's on the same inputs (benchmarks/common.py: error against
FlexAttention in float32 at most 2x FlexAttention's own, plus slack); a case that disagrees stops the run. TFLOP/s
count the attended (query, key) pairs only: 4 * B * H * D * N * prod(kernel) forward, 3.5x that for
forward+backward. Speed ratios are peer time / our time (above 1: mmattn is faster).

    python benchmarks/neighborhood.py [--fast]                 # every case; writes benchmarks/results/neighborhood.md
    python benchmarks/neighborhood.py --only "NAT stage 1" --out /tmp/na.md   # a subset (never the committed file)
    python benchmarks/neighborhood.py --quick                  # tiny cases, also on the CPU (smoke test)

On the CPU, "ours" is the exact torch reference, or the Triton kernels under TRITON_INTERPRET=1, and the peer is SDPA
with the NA mask expanded to tokens (FlexAttention has no CPU backward).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (
    RESULTS, bench, benchmark_parser, check_agreement, highest_precision, outputs_and_grads, provenance, results_target,
    run_device, set_fast, tflops, tiles_picked, upcast, worst, write_results,
)

from mmattn.kernels import Neighborhood, neighborhood_attention
from mmattn.kernels.backends import INTERPRETED

# name, batch, heads, spatial, head_dim, kernel_size, dilation (benchmarks/kernel_resources.py reads these too)
CASES = [
    ("NAT stage 1", 64, 2, (56, 56), 32, (7, 7), 1),
    ("NAT stage 2", 16, 8, (64, 64), 64, (7, 7), 1),
    ("DiNAT stage 3", 16, 16, (28, 28), 32, (7, 7), 2),
    ("FLUX-like 2D", 1, 24, (256, 256), 128, (80, 80), 1),
    ("video 3D", 1, 24, (30, 48, 80), 128, (18, 24, 24), 1),
]
QUICK_CASES = [
    ("tiny 2D", 2, 2, (12, 14), 32, (5, 5), 1),
    ("tiny 2D dilated", 1, 2, (14, 13), 32, (3, 3), 2),
    ("tiny 3D", 1, 2, (4, 6, 8), 32, (3, 3, 5), 1),
]
DEFAULT_OUT = RESULTS / "neighborhood.md"
GOALS = (
    "Goals: NAT stage shapes >= 2x FlexAttention, forward and forward+backward; FLUX-like 2D >= 6x cuDNN dense "
    "(NATTEN's Hopper kernel); video 3D >= 4x cuDNN dense."
)
DENSE_GOALS = {"FLUX-like 2D": 6.0, "video 3D": 4.0}
NATTEN_HOPPER = {"FLUX-like 2D": (6.0, 5.2), "video 3D": (3.6, 3.4)}
"""NATTEN's published Hopper FNA forward speed-up over cuDNN dense on these cases (H100, fp16, its docs/profiler.md
sample outputs; kernel only, and with its token permutation): the target, since NATTEN's kernels are not installed."""


def flat(fn):
    """`fn` on tokens flattened to (B, H, N, D), the result reshaped back to the spatial layout."""
    return lambda q, k, v: fn(q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2)).view(q.shape)


def make_peer(nbhd: Neighborhood, device: str, compiled_flex):
    """FlexAttention with the NA mask (GPU; its `BlockMask` built once, outside the timing), or on the CPU SDPA with
    the NA mask expanded to tokens."""
    if device == "cuda":
        from mmattn.kernels.flex import neighborhood_block_mask

        block_mask = neighborhood_block_mask(nbhd, torch.device(device))
        return flat(lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask))
    tokens = torch.arange(nbhd.num_tokens)
    token_mask = nbhd.allowed(tokens[:, None], tokens[None, :])

    def sdpa_masked(q, k, v):
        with sdpa_kernel([SDPBackend.MATH]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)

    return flat(sdpa_masked)


def run(cases, device: str) -> tuple[list[dict], list[str]]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ours_backend = "triton" if device == "cuda" or INTERPRETED else "torch"
    peer_name = "flex" if device == "cuda" else "SDPA (token mask)"
    compiled_flex = None
    if device == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        compiled_flex = torch.compile(flex_attention, dynamic=False)
    dense_backend = SDPBackend.CUDNN_ATTENTION if device == "cuda" else SDPBackend.MATH
    rows, tiles = [], []
    for name, batch, heads, spatial, head_dim, kernel_size, dilation in cases:
        torch.manual_seed(0)
        q, k, v, grad = (torch.randn(batch, heads, *spatial, head_dim, device=device, dtype=dtype) for _ in range(4))
        nbhd = Neighborhood.create(spatial, kernel_size, dilation)
        peer = make_peer(nbhd, device, compiled_flex)

        def ours_fn(q, k, v, kernel_size=kernel_size, dilation=dilation):
            return neighborhood_attention(q, k, v, kernel_size, dilation=dilation, backend=ours_backend)

        def dense(q, k, v):
            with sdpa_kernel([dense_backend]):
                return flat(torch.nn.functional.scaled_dot_product_attention)(q, k, v)

        # the check, before any timing: ours and the peer against the peer in higher precision
        with highest_precision():
            reference = outputs_and_grads(peer, *upcast(q, k, v, grad))
        check = check_agreement(name, outputs_and_grads(ours_fn, q, k, v, grad), outputs_and_grads(peer, q, k, v, grad),
                                reference, peer_name=peer_name, reference_name=f"{peer_name} in {reference['out'].dtype}")
        del reference

        ours = bench(ours_fn, q, k, v, grad)
        flex = bench(peer, q, k, v, grad)
        cudnn = bench(dense, q, k, v, grad)
        flops = 4 * batch * heads * head_dim * nbhd.num_tokens * nbhd.num_keys
        shape = f"B{batch} H{heads} {'x'.join(map(str, spatial))} D{head_dim} k{'x'.join(map(str, kernel_size))}"
        rows.append({"name": name, "shape": shape + (f" dil{dilation}" if dilation > 1 else ""), "density": nbhd.density(),
                     "ours": ours, "flex": flex, "cudnn": cudnn, "flops": flops, "check": check})
        print(format_row(rows[-1]), flush=True)
        if ours_backend == "triton" and device == "cuda":
            tiles.append(f"{name}: " + picked_tiles())
            print(tiles[-1], flush=True)
    return rows, tiles


def picked_tiles() -> str:
    from mmattn.kernels.triton import neighborhood as kernels
    from mmattn.kernels.triton import neighborhood_tma

    return tiles_picked(kernels, lambda kw: f"Q {kw['TQ0']}x{kw['TQ1']}x{kw['TQ2']} KV {kw['TK0']}x{kw['TK1']}x{kw['TK2']}",
                        (("fwd TMA (Hopper)", neighborhood_tma.fwd_kernel),))


def format_row(r) -> str:
    o, f, c = r["ours"], r["flex"], r["cudnn"]
    return (
        f"| {r['name']} | {r['shape']} | {r['density']:.4f} "
        f"| {o.fwd_ms:.3f} | {f.fwd_ms:.3f} | {c.fwd_ms:.3f} | {tflops(r['flops'], o.fwd_ms):.0f} "
        f"| {f.fwd_ms / o.fwd_ms:.2f} | {c.fwd_ms / o.fwd_ms:.2f} "
        f"| {o.fwd_bwd_ms:.3f} | {f.fwd_bwd_ms:.3f} | {c.fwd_bwd_ms:.3f} | {tflops(3.5 * r['flops'], o.fwd_bwd_ms):.0f} "
        f"| {f.fwd_bwd_ms / o.fwd_bwd_ms:.2f} | {c.fwd_bwd_ms / o.fwd_bwd_ms:.2f} "
        f"| {r['check']['out'].vs_peer:.1e} | {worst(r['check'])} |"
    )


HEADER = (
    "| case | shape | density | fwd ours ms | fwd flex ms | fwd cuDNN dense ms | fwd ours TF/s | fwd vs flex "
    "| fwd vs cuDNN | f+b ours ms | f+b flex ms | f+b cuDNN dense ms | f+b ours TF/s | f+b vs flex | f+b vs cuDNN "
    "| out max abs ours-flex | check: worst tensor, error ours/flex |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def goals(rows) -> str:
    """Each goal of GOALS with the measured ratio, for the cases of this run."""
    by_name = {r["name"]: r for r in rows}
    lines = []
    nat = [r for r in rows if r["name"].startswith(("NAT", "DiNAT"))]
    if nat:
        for part, key in (("forward", "fwd_ms"), ("forward+backward", "fwd_bwd_ms")):
            ratios = [getattr(r["flex"], key) / getattr(r["ours"], key) for r in nat]
            verdict = "met" if min(ratios) >= 2 else "missed"
            lines.append(f"- NAT/DiNAT stage shapes vs FlexAttention, {part}: {min(ratios):.2f}-{max(ratios):.2f}x "
                         f"(goal >= 2x: {verdict}).")
    for name, goal in DENSE_GOALS.items():
        if name in by_name:
            r = by_name[name]
            fwd, fb = r["cudnn"].fwd_ms / r["ours"].fwd_ms, r["cudnn"].fwd_bwd_ms / r["ours"].fwd_bwd_ms
            kernel, permuted = NATTEN_HOPPER[name]
            lines.append(f"- {name} vs cuDNN dense: forward {fwd:.2f}x ({'met' if fwd >= goal else 'missed'}), "
                         f"forward+backward {fb:.2f}x ({'met' if fb >= goal else 'missed'}); goal >= {goal:g}x. "
                         f"NATTEN's Hopper kernel, published (H100): forward {kernel:g}x, {permuted:g}x with its "
                         "token permutation.")
    return "\n".join(lines)


def table(rows, tiles, device: str) -> str:
    precision, dtype = ("float32", "bf16") if device == "cuda" else ("float64", "float32")
    peer = ("flex = compiled FlexAttention with the identical NA `mask_mod`, its `BlockMask` built once outside the "
            "timing (the fastest NA peer here: NATTEN is not installed, and FlexAttention's FLASH backend fails on "
            "this `mask_mod`, specs/fa4.md)" if device == "cuda" else
            "flex column = SDPA (math) with the NA mask expanded to tokens: the CPU smoke run's stand-in")
    dense = "cuDNN SDPA" if device == "cuda" else "math SDPA (CPU)"
    return (
        "# Neighborhood attention: mmattn fused Triton vs FlexAttention vs cuDNN dense\n\n"
        f"{provenance(device)}\n\n"
        f"{dtype}, no rpb, N(0, 1) inputs. Peers: {peer}; cuDNN dense = {dense} on all pairs.\n\n"
        "\"vs\" columns are peer time / our time (above 1: mmattn is faster). TF/s count attended pairs only "
        "(forward+backward = 3.5x the forward FLOPs).\n\n"
        f"Check, before each case was timed: mmattn's output and dQ, dK, dV (of `(out * g).sum()`, g ~ N(0, 1)) and "
        f"the peer's were compared with the peer run on the same inputs in {precision}; every tensor met "
        "max|ours - ref| <= 2 x max|peer - ref| + 1e-3 x max(1, max|ref|) (benchmarks/common.py). The last column "
        "gives the tensor closest to its tolerance and the two errors.\n\n"
        + HEADER + "\n".join(format_row(r) for r in rows) + "\n\n"
        + (GOALS + "\n\n" + goals(rows) + "\n" if goals(rows) else "")
        + ("\nTiles picked by the autotuner (query tile, key tile, warps, stages; the last shape tuned per kernel):\n\n"
           + "\n".join(f"- {t}" for t in tiles) + "\n" if tiles else "")
    )


def main() -> None:
    parser = benchmark_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--only", default="", help="comma-separated case names (e.g. 'NAT stage 1,video 3D'): a subset")
    args = parser.parse_args()
    device = run_device(parser, args.quick)
    known = QUICK_CASES if args.quick else CASES
    only = [name for name in args.only.split(",") if name]
    if unknown := [name for name in only if name not in {case[0] for case in known}]:
        parser.error(f"--only: unknown cases {unknown}; known: {[case[0] for case in known]}")
    cases = [case for case in known if not only or case[0] in only]
    complete = not args.quick and len(cases) == len(CASES)
    target = results_target(parser, args.out, DEFAULT_OUT, complete, "--quick" if args.quick else "--only")
    set_fast(args.fast)
    rows, tiles = run(cases, device)
    write_results(table(rows, tiles, device), target)


if __name__ == "__main__":
    main()
