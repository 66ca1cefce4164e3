"""Rotary embeddings (RoPE) on the GPU: mmattn's `rotary_embedding` kernel vs the stock elementwise rotation of the
model's attention processor and that rotation compiled by `torch.compile` (the strongest peer: inductor fuses its
passes), forward and forward+backward, on the queries of the sparse self-attention layers: bf16
`(1, tokens, heads, 128)`. Wan: interleaved pairs (`processors._rotate_interleaved`, bitwise diffusers') with float32
tables `(1, tokens, 1, 128)` as `WanRotaryPosEmbed` makes them; LTX-2's split RoPE: the two halves paired
(`pairing="halves"`; diffusers' `apply_split_rotary_emb` on `(1, tokens, heads * 128)` with tables
`(1, heads, tokens, 64)`). Writes benchmarks/results/rotary.md.

Before a case is timed, the kernel's output and input gradient and the stock rotation's are checked against the
rotation in float64 (`reference.rotary_embedding`, complex products; benchmarks/common.py's tolerance). GB/s count
one read of x and of both tables and one write of the output.

    python benchmarks/rotary.py [--fast]          # every case; writes benchmarks/results/rotary.md
    python benchmarks/rotary.py --quick           # tiny cases, also on the CPU (smoke test)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (
    RESULTS, benchmark_parser, check_agreement, median_ms, provenance, results_target, run_device, set_fast, worst,
    write_results,
)

from mmattn.diffusion.processors import _rotate_interleaved
from mmattn.kernels import reference, rotary_embedding
from mmattn.kernels.backends import INTERPRETED


def wan_tables(tokens: int, heads: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random angles as Wan's tables hold them: one per channel pair, repeated for both channels, float32."""
    angles = torch.rand(1, tokens, 1, head_dim // 2, device=device) * 6.28
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def ltx2_split_tables(tokens: int, heads: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random angles as LTX-2's split tables hold them, `(1, heads, tokens, head_dim / 2)` float32, seen as
    `(1, tokens, heads, head_dim / 2)` (a view: the layout the kernel takes)."""
    angles = torch.rand(1, heads, tokens, head_dim // 2, device=device) * 6.28
    return angles.cos().transpose(1, 2), angles.sin().transpose(1, 2)


def ltx2_split_stock(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' `apply_split_rotary_emb` as LTX-2's processor calls it: x `(B, tokens, heads * D)`, tables
    `(B, heads, tokens, D / 2)`; in and out in the kernel's `(B, tokens, heads, D)` view."""
    from diffusers.models.transformers.transformer_ltx2 import apply_split_rotary_emb

    out = apply_split_rotary_emb(x.flatten(-2), (cos.transpose(1, 2), sin.transpose(1, 2)))
    return out.unflatten(-1, (x.shape[2], -1))


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    heads: int
    pairing: str
    tables: Callable
    stock: Callable


CASES = [
    Case("Wan2.1-1.3B 480p 81f", 32_760, 12, "interleaved", wan_tables, _rotate_interleaved),
    Case("Wan2.1-1.3B 720p 81f", 75_600, 12, "interleaved", wan_tables, _rotate_interleaved),
    Case("Wan2.2-TI2V-5B 720p 121f", 27_280, 24, "interleaved", wan_tables, _rotate_interleaved),
    Case("LTX-2 split RoPE, 1280x704 121f", 14_080, 32, "halves", ltx2_split_tables, ltx2_split_stock),
]
QUICK_CASES = [Case("tiny", 96, 2, "interleaved", wan_tables, _rotate_interleaved),
               Case("tiny split", 96, 2, "halves", ltx2_split_tables, ltx2_split_stock)]
DEFAULT_OUT = RESULTS / "rotary.md"


def results_of(rotate, x, cos, sin, grad) -> dict[str, torch.Tensor]:
    """The rotation of x and the gradient of `(out * grad).sum()` with respect to x."""
    leaf = x.detach().clone().requires_grad_()
    out = rotate(leaf, cos, sin)
    out.backward(grad.to(out.dtype))
    return {"out": out.detach(), "dx": leaf.grad}


def timings(rotate, x, cos, sin, grad, device: str) -> tuple[float, float]:
    """Median ms of the forward (no grad) and of forward+backward into x."""
    with torch.no_grad():
        forward = median_ms(lambda: rotate(x, cos, sin), device)
    leaf = x.detach().requires_grad_()

    def forward_backward():
        leaf.grad = None
        rotate(leaf, cos, sin).backward(grad)

    return forward, median_ms(forward_backward, device)


def run(cases: list[Case], device: str) -> tuple[list[str], list[str]]:
    """The table rows of `cases` and the peers' names."""
    dtype, head_dim = (torch.bfloat16, 128) if device == "cuda" else (torch.float32, 16)
    backend = "triton" if device == "cuda" or INTERPRETED else "torch"
    peer_names = ["stock"] + (["compiled stock"] if device == "cuda" else [])
    rows = []
    for case in cases:
        peers = {"stock": case.stock}
        if device == "cuda":
            peers["compiled stock"] = torch.compile(case.stock, dynamic=False)

        def ours(x, cos, sin, pairing=case.pairing):
            return rotary_embedding(x, cos, sin, pairing=pairing, backend=backend)

        def exact_rotation(x, cos, sin, pairing=case.pairing):
            return reference.rotary_embedding(x, cos, sin, pairing=pairing)

        torch.manual_seed(0)
        x, grad = (torch.randn(1, case.tokens, case.heads, head_dim, device=device, dtype=dtype) for _ in range(2))
        cos, sin = case.tables(case.tokens, case.heads, head_dim, device)
        exact = results_of(exact_rotation, x.double(), cos.double(), sin.double(), grad.double())
        check = check_agreement(case.name, results_of(ours, x, cos, sin, grad), results_of(case.stock, x, cos, sin,
                                grad), exact, peer_name="stock", reference_name="the rotation in float64")
        times = {label: timings(fn, x, cos, sin, grad, device) for label, fn in (("ours", ours), *peers.items())}
        gigabytes = (2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()) / 1e9
        forward, both = times["ours"]
        cells = [case.name, f"(1, {case.tokens:,}, {case.heads}, {head_dim})", case.pairing]
        gigabytes_per_s = gigabytes / (forward / 1e3)  # times are in ms
        cells += [f"{times[p][0] * 1e3:.0f}" for p in peers] + [f"{forward * 1e3:.0f}", f"{gigabytes_per_s:,.0f}"]
        cells += [f"{times[p][0] / forward:.2f}x" for p in peers]
        cells += [f"{times[p][1] * 1e3:.0f}" for p in peers] + [f"{both * 1e3:.0f}"]
        cells += [f"{times[p][1] / both:.2f}x" for p in peers] + [worst(check)]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows, peer_names


def table(rows: list[str], peers: list[str], device: str) -> str:
    columns = (["case", "x shape", "pairs"] + [f"fwd {p} us" for p in peers] + ["fwd ours us", "fwd ours GB/s"]
               + [f"fwd vs {p}" for p in peers] + [f"f+b {p} us" for p in peers] + ["f+b ours us"]
               + [f"f+b vs {p}" for p in peers] + ["check: worst tensor, error ours/stock"])
    return "\n".join([
        "# Rotary embedding (Wan's interleaved RoPE, LTX-2's split RoPE): mmattn's kernel vs the stock rotation",
        "",
        provenance(device, ("diffusers",)),
        "",
        "\"vs\" columns are peer time / our time (above 1: mmattn is faster). Forward+backward differentiates x only "
        "(the tables are constants in both models). Check, before each case was timed: out and dx of ours and of the "
        "stock rotation against the rotation in float64; max|ours - exact| <= 2 x max|stock - exact| + 1e-3 x max(1, "
        "max|exact|) (benchmarks/common.py).",
        "",
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
        *rows,
        "",
    ])


def main() -> None:
    parser = benchmark_parser(__doc__, DEFAULT_OUT)
    args = parser.parse_args()
    device = run_device(parser, args.quick)
    target = results_target(parser, args.out, DEFAULT_OUT, not args.quick, "--quick")
    set_fast(args.fast)
    rows, peers = run(QUICK_CASES if args.quick else CASES, device)
    write_results(table(rows, peers, device), target)


if __name__ == "__main__":
    main()
