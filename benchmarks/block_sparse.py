"""Block-sparse attention on the GPU: mmattn's Triton kernels vs FlexAttention (compiled, the identical mask; and
FlexAttention's FLASH backend, FlashAttention-4, where `flash_attn.cute` is installed) vs cuDNN SDPA dense, forward
and forward+backward, bf16. Writes benchmarks/results/block_sparse.md.

Before timing a row, mmattn's output and input gradients are checked against every block-sparse peer on the same
inputs (benchmarks/common.py: error against FlexAttention in float32 at most 2x the peer's, plus slack); a row that
disagrees stops the run. TFLOP/s count only the kept (query, key) pairs: 4 * B * H * D * pairs forward, 3.5x that
for forward+backward. Speed ratios are peer time / our time (above 1: we are faster). Efficiency = density *
T(our all-ones mask) / T(our sparse mask). Masks: "band" (each query block sees a window of consecutive key blocks)
and "random" (each query block sees the same number of key blocks drawn at random, per head).

    python benchmarks/block_sparse.py [--fast]    # every case; writes benchmarks/results/block_sparse.md
    python benchmarks/block_sparse.py --quick     # tiny shapes, also on the CPU (smoke test; prints the table)

On the CPU, "ours" is the exact torch reference, or the Triton kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (
    RESULTS, bench, check_agreement, highest_precision, outputs_and_grads, provenance, results_target, set_fast, tflops, upcast, worst,
    tiles_picked, write_results,
)

from mmattn.kernels import BlockSparseMask, block_sparse_attention
from mmattn.kernels.backends import INTERPRETED

SHAPES = [(1, 24, 32760, 128), (1, 12, 16384, 64), (8, 16, 4096, 128)]
DENSITIES = [1.0, 0.5, 0.25, 0.1, 0.05]
QUICK_SHAPES = [(1, 2, 700, 64)]
QUICK_DENSITIES = [1.0, 0.5]
BLOCK = 128
DEFAULT_OUT = RESULTS / "block_sparse.md"


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


def has_fa4() -> bool:
    """FlashAttention-4 (CuTe DSL), which FlexAttention reaches with kernel_options BACKEND="FLASH"."""
    try:
        return importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


def make_peers(device: str) -> dict:
    """name -> fn(q, k, v, mask): the block-sparse peers, the first one also the higher-precision reference (run on
    float32 inputs). GPU: compiled FlexAttention (its Triton backend), and its FLASH backend (FlashAttention-4) where
    installed. CPU smoke runs: SDPA on the token mask (FlexAttention has no CPU backward)."""
    if device != "cuda":
        def sdpa_masked(q, k, v, mask):
            with sdpa_kernel([SDPBackend.MATH]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to_token_mask())

        return {"SDPA (token mask)": sdpa_masked}
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    peers = {"flex": lambda q, k, v, mask: compiled(q, k, v, block_mask=mask.flex_block_mask)}
    if has_fa4():
        peers["FA4 (flex FLASH)"] = lambda q, k, v, mask: compiled(
            q, k, v, block_mask=mask.flex_block_mask, kernel_options={"BACKEND": "FLASH"})
    return peers


def dense_sdpa(device: str):
    backend = SDPBackend.CUDNN_ATTENTION if device == "cuda" else SDPBackend.MATH

    def dense(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return dense


def run(shapes, densities, device: str) -> tuple[list[dict], list[str], list[str]]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ours_backend = "triton" if device == "cuda" or INTERPRETED else "torch"
    peers = make_peers(device)
    reference_peer = next(iter(peers))
    dense = dense_sdpa(device)
    rows, tiles = [], []
    for batch, heads, length, head_dim in shapes:
        torch.manual_seed(0)
        q, k, v, grad = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(4))
        n = math.ceil(length / BLOCK)
        cudnn = bench(dense, q, k, v, grad)
        dense_flops = 4 * batch * heads * head_dim * length * length
        ours_dense = None
        for pattern in ("band", "random"):
            for density in densities:
                if density == 1.0 and pattern == "random":
                    continue
                make = band_blocks if pattern == "band" else random_blocks
                mask = BlockSparseMask.from_dense(make(heads, n, density), BLOCK, length, length).to(device)
                label = f"B{batch} H{heads} L{length} D{head_dim} {'all' if density == 1.0 else pattern} {density:g}"

                def ours_fn(q, k, v, mask=mask):
                    return block_sparse_attention(q, k, v, mask, backend=ours_backend)

                # the check, before any timing: ours and every peer against the first peer in higher precision
                ours_result = outputs_and_grads(ours_fn, q, k, v, grad)
                with highest_precision():
                    reference = outputs_and_grads(lambda *t, mask=mask: peers[reference_peer](*t, mask),
                                                  *upcast(q, k, v, grad))
                checks = {}
                for name, peer in peers.items():
                    peer_result = outputs_and_grads(lambda *t, peer=peer, mask=mask: peer(*t, mask), q, k, v, grad)
                    checks[name] = check_agreement(label, ours_result, peer_result, reference, peer_name=name,
                                                   reference_name=f"{reference_peer} in {reference['out'].dtype}")
                    del peer_result
                del ours_result, reference

                ours = bench(ours_fn, q, k, v, grad)
                timed = {name: bench(lambda q, k, v, peer=peer, mask=mask: peer(q, k, v, mask), q, k, v, grad)
                         for name, peer in peers.items()}
                if density == 1.0:
                    ours_dense = ours
                kept = mask.density()
                rows.append({
                    "shape": f"B{batch} H{heads} L{length} D{head_dim}", "pattern": "all" if density == 1.0 else pattern,
                    "density": kept, "ours": ours, "peers": timed, "cudnn": cudnn, "flops": dense_flops * kept,
                    "checks": checks,
                    "efficiency": (kept * ours_dense.fwd_ms / ours.fwd_ms, kept * ours_dense.fwd_bwd_ms / ours.fwd_bwd_ms),
                })
                print(format_row(rows[-1], list(peers)), flush=True)
        if device == "cuda":
            tiles.append(f"B{batch} H{heads} L{length} D{head_dim}: " + picked_tiles())
            print(tiles[-1], flush=True)
    return rows, tiles, list(peers)


def picked_tiles() -> str:
    from mmattn.kernels.triton import block_sparse as kernels

    return tiles_picked(kernels, lambda kw: f"{kw['BLOCK_M']}x{kw['BLOCK_N']}")


def format_row(r, peers: list[str]) -> str:
    o, c = r["ours"], r["cudnn"]
    first, *more = peers
    f = r["peers"][first]
    cells = [
        r["shape"], r["pattern"], f"{r['density']:.3f}",
        f"{o.fwd_ms:.3f}", f"{f.fwd_ms:.3f}", f"{c.fwd_ms:.3f}", f"{tflops(r['flops'], o.fwd_ms):.0f}",
        f"{tflops(r['flops'], f.fwd_ms):.0f}", f"{f.fwd_ms / o.fwd_ms:.2f}", f"{c.fwd_ms / o.fwd_ms:.2f}",
        f"{r['efficiency'][0]:.2f}",
        f"{o.fwd_bwd_ms:.3f}", f"{f.fwd_bwd_ms:.3f}", f"{c.fwd_bwd_ms:.3f}", f"{tflops(3.5 * r['flops'], o.fwd_bwd_ms):.0f}",
        f"{tflops(3.5 * r['flops'], f.fwd_bwd_ms):.0f}", f"{f.fwd_bwd_ms / o.fwd_bwd_ms:.2f}",
        f"{c.fwd_bwd_ms / o.fwd_bwd_ms:.2f}", f"{r['efficiency'][1]:.2f}",
    ]
    for name in more:
        p = r["peers"][name]
        cells += [f"{p.fwd_ms:.3f}", f"{p.fwd_ms / o.fwd_ms:.2f}", f"{p.fwd_bwd_ms:.3f}", f"{p.fwd_bwd_ms / o.fwd_bwd_ms:.2f}"]
    cells += [f"{r['checks'][first]['out'].vs_peer:.1e}", worst(r["checks"][first])]
    return "| " + " | ".join(cells) + " |"


def header(peers: list[str]) -> str:
    first, *more = peers
    names = [
        "shape", "mask", "density", "fwd ours ms", f"fwd {first} ms", "fwd cuDNN dense ms", "fwd ours TF/s",
        f"fwd {first} TF/s", f"fwd vs {first}", "fwd vs cuDNN", "fwd eff.", "f+b ours ms", f"f+b {first} ms",
        "f+b cuDNN dense ms", "f+b ours TF/s", f"f+b {first} TF/s", f"f+b vs {first}", "f+b vs cuDNN", "f+b eff.",
    ]
    for name in more:
        names += [f"fwd {name} ms", f"fwd vs {name}", f"f+b {name} ms", f"f+b vs {name}"]
    names += [f"out max abs ours-{first}", "check: worst tensor, error ours/peer"]
    return "| " + " | ".join(names) + " |\n" + "|---" * len(names) + "|\n"


PEER_NOTES = {
    "flex": "compiled FlexAttention (Triton backend) on the identical `BlockMask` (`mask.to_flex()`, built outside the "
            "timing)",
    "FA4 (flex FLASH)": "FlashAttention-4 (`flash_attn.cute`) through compiled FlexAttention's FLASH backend, the same "
                        "`BlockMask`",
    "SDPA (token mask)": "SDPA (math) with the mask expanded to tokens: the CPU smoke run's stand-in, FlexAttention "
                         "has no CPU backward",
}


def table(rows, tiles, peers: list[str], device: str) -> str:
    first = peers[0]
    fa4 = "" if device != "cuda" or len(peers) > 1 else (
        " FlashAttention-4 (`flash_attn.cute`, reached through FlexAttention's FLASH backend) was not installed: no "
        "FA4 columns.")
    precision, dtype = ("float32", "bf16") if device == "cuda" else ("float64", "float32")
    dense = "cuDNN SDPA" if device == "cuda" else "math SDPA (CPU)"
    return (
        "# Block-sparse attention: mmattn Triton vs FlexAttention vs cuDNN dense\n\n"
        f"{provenance(device)}\n\n"
        f"{dtype}, block {BLOCK}x{BLOCK}, N(0, 1) inputs. Peers: "
        + "; ".join(f"{name} = {PEER_NOTES[name]}" for name in peers)
        + f"; cuDNN dense = {dense} on all pairs.{fa4}\n\n"
        "\"vs\" columns are peer time / our time (above 1: mmattn is faster). TF/s count kept blocks only "
        "(forward+backward = 3.5x the forward FLOPs). Efficiency = density x T(our all-ones mask) / T(ours).\n\n"
        f"Check, before each row was timed: mmattn's output and dQ, dK, dV (of `(out * g).sum()`, g ~ N(0, 1)) and "
        f"each block-sparse peer's were compared with {first} run on the same inputs in {precision}; every tensor met "
        "max|ours - ref| <= 2 x max|peer - ref| + 1e-3 x max(1, max|ref|) (benchmarks/common.py). The last column "
        "gives the tensor closest to its tolerance and the two errors.\n\n"
        + header(peers) + "\n".join(format_row(r, peers) for r in rows) + "\n"
        + ("\nTiles picked by the autotuner (BLOCK_M x BLOCK_N, warps, stages; the last shape tuned per kernel):\n\n"
           + "\n".join(f"- {t}" for t in tiles) + "\n" if tiles else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, also on the CPU: a smoke test")
    parser.add_argument("--fast", action="store_true", help="every case with fewer timing iterations")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {DEFAULT_OUT} for a full run)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.quick and device != "cuda":
        parser.error("needs a CUDA GPU (or --quick for a smoke test on the CPU)")
    complete = not args.quick and device == "cuda"
    target = results_target(parser, args.out, DEFAULT_OUT, complete, "--quick")
    set_fast(args.fast)
    shapes, densities = (QUICK_SHAPES, QUICK_DENSITIES) if args.quick else (SHAPES, DENSITIES)
    rows, tiles, peers = run(shapes, densities, device)
    write_results(table(rows, tiles, peers, device), target)


if __name__ == "__main__":
    main()
