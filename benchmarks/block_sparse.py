"""Block-sparse attention on the GPU: mmattn (`backend="auto"`, which runs FlashAttention-4 where it is installed,
and our Triton kernels alone) vs FlashAttention-4 (called directly, and through FlexAttention's FLASH backend) vs
FlexAttention (compiled, its Triton backend, the identical mask) vs cuDNN SDPA dense, forward and forward+backward,
bf16. Writes benchmarks/results/block_sparse.md.

Before timing a row, each mmattn column's output and input gradients are checked against every block-sparse peer on
the same inputs (benchmarks/common.py: error against FlexAttention in float32 at most 2x the peer's, plus slack); a row that
disagrees stops the run. TFLOP/s count only the kept (query, key) pairs: 4 * B * H * D * pairs forward, 3.5x that
for forward+backward. Speed ratios are peer time / our time (above 1: we are faster). Efficiency = density *
T(our all-ones mask) / T(our sparse mask). Masks: "band" (each query block sees a window of consecutive key blocks)
and "random" (each query block sees the same number of key blocks drawn at random, per head).

    python benchmarks/block_sparse.py [--fast]    # every case; writes benchmarks/results/block_sparse.md
    python benchmarks/block_sparse.py --quick     # tiny shapes, also on the CPU (smoke test; prints the table)
    python benchmarks/block_sparse.py --only "B1 H24 L32760 D128" --out /tmp/bs.md   # a subset (never the committed file)

On the CPU, "ours" is the exact torch reference, or the Triton kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (
    RESULTS, bench, benchmark_parser, check_agreement, highest_precision, outputs_and_grads, provenance, results_target,
    run_device, set_fast, tflops, tiles_picked, upcast, worst, write_results,
)

from mmattn.kernels import BlockSparseMask, block_sparse_attention, supported_backends
from mmattn.kernels.backends import INTERPRETED

SHAPES = [(1, 24, 32760, 128), (1, 12, 16384, 64), (8, 16, 4096, 128)]
DENSITIES = [1.0, 0.5, 0.25, 0.1, 0.05]
QUICK_SHAPES = [(1, 2, 300, 64)]
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
    """FlashAttention-4 (CuTe DSL) imports: mmattn's "auto" then runs it, and it is timed as a peer, directly and
    through FlexAttention's FLASH backend."""
    from mmattn.kernels.fa4 import fa4_available

    return torch.cuda.is_available() and fa4_available()[0]


def fa4_direct(q, k, v, mask):
    """FlashAttention-4 called as its users call it: `flash_attn_func` on (B, L, H, D) views, every kept block a
    full block of `BlockSparseTensorsTorch` (the forward index and, for the backward, the transposed one)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    def lists(counts, indices):
        return BlockSparseTensorsTorch(torch.zeros_like(counts), torch.zeros_like(indices[..., :1]), counts, indices,
                                       block_size=tuple(mask.block_size))

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          block_sparse_tensors=lists(mask.kv_num_blocks, mask.kv_indices),
                          block_sparse_tensors_bwd=lists(mask.q_num_blocks, mask.q_indices))
    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)


def make_peers(device: str) -> dict:
    """name -> fn(q, k, v, mask): the block-sparse peers, the first one also the higher-precision reference (run on
    float32 inputs). GPU: compiled FlexAttention (its Triton backend), and where FlashAttention-4 is installed FA4
    itself and FlexAttention's FLASH backend (FA4's kernels). CPU smoke runs: SDPA on the token mask (FlexAttention
    has no CPU backward)."""
    if device != "cuda":
        def sdpa_masked(q, k, v, mask):
            with sdpa_kernel([SDPBackend.MATH]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to_token_mask())

        return {"SDPA (token mask)": sdpa_masked}
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    peers = {"flex": lambda q, k, v, mask: compiled(q, k, v, block_mask=mask.flex_block_mask)}
    if has_fa4():
        peers["FA4"] = fa4_direct
        peers["flex FLASH"] = lambda q, k, v, mask: compiled(
            q, k, v, block_mask=mask.flex_block_mask, kernel_options={"BACKEND": "FLASH"})
    return peers


def ours_backends(device: str) -> dict[str, str]:
    """name -> backend of the mmattn rows: what "auto" runs (FA4 where installed, else our Triton kernels with their
    default backward) and our Triton kernels alone with each form of their backward (`switched_results`); on the CPU
    the interpreted Triton kernels or the reference."""
    if device == "cuda":
        return {"auto": "auto", "triton": "triton", ATOMIC: "triton", TMA_BWD: "triton"}
    return {"ours": "triton" if INTERPRETED else "torch"}


ATOMIC = "triton atomic dQ"
TMA_BWD = "triton TMA bwd"
OURS = ("auto", "triton", ATOMIC, TMA_BWD, "ours")
BACKWARD_FORMS = {"triton": (False, False), ATOMIC: (True, False), TMA_BWD: (False, True)}
"""Column -> (dQ added atomically, the Hopper TMA backward): the form each Triton column's backward is held to."""


@contextlib.contextmanager
def backward_form(atomic: bool, tma: bool):
    """Our Triton backward held to one form at every head dim: dQ added atomically (`atomic`), the Hopper TMA kernels
    (`tma`), or neither (the deterministic pointer kernels)."""
    from mmattn.kernels.triton import block_sparse as kernels
    from mmattn.kernels.triton import block_sparse_tma

    with mock.patch.object(kernels, "hopper_backward_pays", lambda q: True), \
            mock.patch.object(kernels, "ATOMIC_DQ_SWITCH", atomic), \
            mock.patch.object(block_sparse_tma, "BWD_SWITCH", tma):
        yield


def switched_results(runs: dict, measure) -> dict:
    """`measure(fn)` of every column, each Triton column under its own backward form (`BACKWARD_FORMS`): the
    deterministic pointer kernels for `triton`, dQ added atomically for `ATOMIC`, the Hopper kernels
    (`block_sparse_tma.backward`) for `TMA_BWD`; the other columns as they run by default."""
    results = {}
    for name, fn in runs.items():
        with backward_form(*BACKWARD_FORMS[name]) if name in BACKWARD_FORMS else contextlib.nullcontext():
            results[name] = measure(fn)
    return results


def dense_sdpa(device: str):
    backend = SDPBackend.CUDNN_ATTENTION if device == "cuda" else SDPBackend.MATH

    def dense(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return dense


def run(shapes, densities, device: str) -> tuple[list[dict], list[str], list[str], list[str]]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ours = ours_backends(device)
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
                runs = {name: (lambda q, k, v, mask=mask, backend=backend:
                               block_sparse_attention(q, k, v, mask, backend=backend)) for name, backend in ours.items()}
                runs.update({name: (lambda q, k, v, peer=peer, mask=mask: peer(q, k, v, mask))
                             for name, peer in peers.items()})
                # the check, before any timing: each of ours against each peer, with the first peer in higher
                # precision as the reference
                with highest_precision():
                    reference = outputs_and_grads(runs[reference_peer], *upcast(q, k, v, grad))
                results = switched_results(runs, lambda fn: outputs_and_grads(fn, q, k, v, grad))
                checks = {
                    (mine, peer): check_agreement(f"{label} {mine}", results[mine], results[peer], reference,
                                                  peer_name=peer,
                                                  reference_name=f"{reference_peer} in {reference['out'].dtype}")
                    for mine in ours for peer in peers
                }
                del results, reference

                timed = switched_results(runs, lambda fn: bench(fn, q, k, v, grad))
                timed["cuDNN dense"] = cudnn
                first = next(iter(ours))
                if density == 1.0:
                    ours_dense = timed[first]
                kept = mask.density()
                rows.append({
                    "shape": f"B{batch} H{heads} L{length} D{head_dim}", "pattern": "all" if density == 1.0 else pattern,
                    "density": kept, "timed": timed, "flops": dense_flops * kept, "checks": checks,
                    "auto runs": supported_backends("block_sparse", q, k=k, v=v, mask=mask)[0],
                    "efficiency": (kept * ours_dense.fwd_ms / timed[first].fwd_ms,
                                   kept * ours_dense.fwd_bwd_ms / timed[first].fwd_bwd_ms),
                })
                print(format_row(rows[-1], "fwd_ms"), "\n", format_row(rows[-1], "fwd_bwd_ms"), flush=True)
        if device == "cuda":
            tiles.append(f"B{batch} H{heads} L{length} D{head_dim}: " + picked_tiles())
            print(tiles[-1], flush=True)
    return rows, tiles, list(ours), list(peers)


def picked_tiles() -> str:
    from mmattn.kernels.triton import block_sparse as kernels
    from mmattn.kernels.triton import block_sparse_tma

    return tiles_picked(kernels, lambda kw: f"{kw['BLOCK_M']}x{kw['BLOCK_N']}",
                        (("fwd TMA (Hopper)", block_sparse_tma.fwd_kernel), ("dK/dV/dQ atomic", kernels.dkdvq_kernel),
                         ("dK/dV TMA (Hopper)", block_sparse_tma.dkdv_kernel),
                         ("dQ TMA (Hopper)", block_sparse_tma.dq_kernel)))


GOALS = {  # (numerator, denominators, pass: forward goal, forward+backward goal); ratio = denominator time / ours
    "auto vs FA4-class": ("auto", ("FA4", "flex FLASH"), 0.97, 0.97),
    "triton vs FA4": ("triton", ("FA4",), 0.85, 0.8),
    "triton atomic dQ vs FA4": (ATOMIC, ("FA4",), 0.85, 0.8),
    "triton TMA bwd vs FA4": (TMA_BWD, ("FA4",), 0.85, 0.8),
}
"""Issue 17's goals: "auto" at least 0.97x the faster of FA4 and FlexAttention-FLASH; our Triton kernels alone at
least 0.85x FA4 forward and 0.8x forward+backward; the all-ones mask at least 1.1x cuDNN (see `ratios`)."""


def ratios(r, field: str) -> list[tuple[str, float, float | None]]:
    """(label, peer time / ours, goal or None) for the row's ratio columns."""
    t = r["timed"]
    names = list(t)
    ours = [name for name in names if name in OURS]
    out = []
    for label, (mine, against, fwd_goal, fb_goal) in GOALS.items():
        present = [name for name in against if name in t]
        if mine in t and present:
            best = min(getattr(t[name], field) for name in present)
            out.append((label, best / getattr(t[mine], field), fwd_goal if field == "fwd_ms" else fb_goal))
    first = ours[0]
    for name in names:
        if name not in ours and name not in ("FA4", "flex FLASH"):
            goal = 1.1 if name == "cuDNN dense" and r["pattern"] == "all" and first == "auto" else None
            out.append((f"{first} vs {name}", getattr(t[name], field) / getattr(t[first], field), goal))
    return out


def format_row(r, field: str) -> str:
    t = r["timed"]
    ours = next(name for name in t if name in OURS)
    scale = 1.0 if field == "fwd_ms" else 3.5
    cells = [r["shape"], r["pattern"], f"{r['density']:.3f}", r["auto runs"]]
    cells += [f"{getattr(timing, field):.3f}" for timing in t.values()]
    cells += [f"{tflops(scale * r['flops'], getattr(t[ours], field)):.0f}"]
    for _, value, goal in ratios(r, field):
        cells.append(f"{value:.2f}" + ("" if goal is None else (" ok" if value >= goal else f" (goal {goal:g})")))
    cells.append(f"{r['efficiency'][0 if field == 'fwd_ms' else 1]:.2f}")
    return "| " + " | ".join(cells) + " |"


def header(r, field: str) -> str:
    ours = next(name for name in r["timed"] if name in OURS)
    names = ["shape", "mask", "density", "auto runs", *(f"{name} ms" for name in r["timed"]), f"{ours} TF/s",
             *(label for label, _, _ in ratios(r, field)), "eff."]
    return "| " + " | ".join(names) + " |\n" + "|---" * len(names) + "|\n"


def check_lines(rows) -> str:
    lines = []
    for r in rows:
        cells = "; ".join(f"{mine} vs {peer}: {worst(check)}" for (mine, peer), check in r["checks"].items())
        lines.append(f"- {r['shape']} {r['pattern']} {r['density']:.3f}: {cells}")
    return "\n".join(lines)


PEER_NOTES = {
    "flex": "compiled FlexAttention (Triton backend) on the identical `BlockMask` (`mask.to_flex()`, built outside the "
            "timing)",
    "FA4": "FlashAttention-4 (`flash_attn.cute.flash_attn_func`) with the same block lists as full blocks "
           "(`block_sparse_tensors`, transposed lists for the backward)",
    "flex FLASH": "FA4's kernels through compiled FlexAttention's FLASH backend, the same `BlockMask`",
    "SDPA (token mask)": "SDPA (math) with the mask expanded to tokens: the CPU smoke run's stand-in, FlexAttention "
                         "has no CPU backward",
}


def table(rows, tiles, ours: list[str], peers: list[str], device: str) -> str:
    first = peers[0]
    fa4 = "" if device != "cuda" or "FA4" in peers else (
        " FlashAttention-4 (`flash_attn.cute`) was not installed: no FA4 columns, and \"auto\" ran Triton.")
    precision, dtype = ("float32", "bf16") if device == "cuda" else ("float64", "float32")
    dense = "cuDNN SDPA" if device == "cuda" else "math SDPA (CPU)"
    mine = ("`auto` = `block_sparse_attention(backend=\"auto\")` (the backend it ran in the column \"auto runs\"), "
            "`triton` = our Triton kernels alone with the deterministic pointer backward, `triton atomic dQ` = the "
            "same with the backward that adds dQ atomically in its dK/dV kernel (the default on Hopper at head dim "
            "128; its forward is `triton`'s), `triton TMA bwd` = the same with the deterministic Hopper backward on "
            "TMA descriptors (the default there under deterministic algorithms)" if device == "cuda" else
            "`ours` = the interpreted Triton kernels or the reference (CPU smoke run)")
    sections = [(title, field) for title, field in (("Forward", "fwd_ms"), ("Forward + backward", "fwd_bwd_ms"))]
    return (
        "# Block-sparse attention: mmattn vs FlashAttention-4 vs FlexAttention vs cuDNN dense\n\n"
        f"{provenance(device)}\n\n"
        f"{dtype}, block {BLOCK}x{BLOCK}, N(0, 1) inputs. mmattn: {mine}. Peers: "
        + "; ".join(f"{name} = {PEER_NOTES[name]}" for name in peers)
        + f"; cuDNN dense = {dense} on all pairs.{fa4}\n\n"
        "Ratio columns are peer time / our time (above 1: mmattn is faster); \"auto vs FA4-class\" divides the faster "
        "of FA4 and flex FLASH, goals (issue 17) beside each: auto >= 0.97x the FA4 class, Triton alone >= 0.85x FA4 "
        "forward and >= 0.8x forward+backward, all-ones mask >= 1.1x cuDNN. TF/s count kept blocks only "
        "(forward+backward = 3.5x the forward FLOPs). Efficiency = density x T(all-ones mask) / T(this mask), for "
        f"the first mmattn column.\n\n"
        + "".join(f"## {title}\n\n" + header(rows[0], field) + "\n".join(format_row(r, field) for r in rows) + "\n\n"
                  for title, field in sections)
        + f"## Checks\n\nBefore each row was timed, each mmattn column's output and dQ, dK, dV (of `(out * g).sum()`, "
        f"g ~ N(0, 1)) and each block-sparse peer's were compared with {first} run on the same inputs in {precision}; "
        "every tensor met max|ours - ref| <= 2 x max|peer - ref| + 1e-3 x max(1, max|ref|) "
        "(benchmarks/common.py). Per row, the tensor closest to its tolerance and the two errors:\n\n"
        + check_lines(rows) + "\n"
        + ("\nTiles picked by the autotuner for the Triton kernels (BLOCK_M x BLOCK_N, warps, stages; the last shape "
           "tuned per kernel):\n\n" + "\n".join(f"- {t}" for t in tiles) + "\n" if tiles else "")
    )


def main() -> None:
    parser = benchmark_parser(__doc__, DEFAULT_OUT, "tiny shapes, also on the CPU: a smoke test")
    parser.add_argument("--only", default="", help="comma-separated shapes (e.g. 'B1 H24 L32760 D128'): a subset")
    args = parser.parse_args()
    device = run_device(parser, args.quick)
    shapes, densities = (QUICK_SHAPES, QUICK_DENSITIES) if args.quick else (SHAPES, DENSITIES)
    if args.only:
        names = {"B{} H{} L{} D{}".format(*shape): shape for shape in shapes}
        unknown = sorted(set(args.only.split(",")) - set(names))
        if unknown:
            parser.error(f"--only: unknown shapes {unknown}; known: {sorted(names)}")
        shapes = [names[name] for name in args.only.split(",")]
    complete = not args.quick and not args.only and device == "cuda"
    target = results_target(parser, args.out, DEFAULT_OUT, complete, "--quick" if args.quick else "--only")
    set_fast(args.fast)
    rows, tiles, ours, peers = run(shapes, densities, device)
    write_results(table(rows, tiles, ours, peers, device), target)


if __name__ == "__main__":
    main()
