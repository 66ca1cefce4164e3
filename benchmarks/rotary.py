"""Wan's interleaved rotary embedding (RoPE) on the GPU: mmattn's `rotary_embedding` kernel vs the stock elementwise
rotation Wan's attention processor runs (`processors._rotate_interleaved`, bitwise diffusers') and that rotation
compiled by `torch.compile` (the strongest peer: inductor fuses its passes), forward and forward+backward, on the
queries of Wan's sparse self-attention layers: bf16 `(1, tokens, heads, 128)` with float32 tables
`(1, tokens, 1, 128)`, as diffusers' `WanRotaryPosEmbed` makes them. Writes benchmarks/results/rotary.md.

Before a case is timed, the kernel's output and input gradient and the stock rotation's are checked against the
rotation in float64 (`reference.rotary_embedding`, complex products; benchmarks/common.py's tolerance). GB/s count
one read of x and of both tables and one write of the output.

    python benchmarks/rotary.py [--fast]          # every case; writes benchmarks/results/rotary.md
    python benchmarks/rotary.py --quick           # tiny cases, also on the CPU (smoke test)
"""

from __future__ import annotations

import sys
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

# name, tokens, heads (head dim 128)
CASES = [
    ("Wan2.1-1.3B 480p 81f", 32_760, 12),
    ("Wan2.1-1.3B 720p 81f", 75_600, 12),
    ("Wan2.2-TI2V-5B 720p 121f", 27_280, 24),
]
QUICK_CASES = [("tiny", 96, 2)]
DEFAULT_OUT = RESULTS / "rotary.md"


def wan_tables(tokens: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random angles as Wan's tables hold them: one per channel pair, repeated for both channels, float32."""
    angles = torch.rand(1, tokens, 1, head_dim // 2, device=device) * 6.28
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


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


def run(cases, device: str) -> tuple[list[str], list[str]]:
    """The table rows of `cases` and the peers' names."""
    dtype, head_dim = (torch.bfloat16, 128) if device == "cuda" else (torch.float32, 16)
    backend = "triton" if device == "cuda" or INTERPRETED else "torch"
    peers = {"stock": _rotate_interleaved}
    if device == "cuda":
        peers["compiled stock"] = torch.compile(_rotate_interleaved, dynamic=False)

    def ours(x, cos, sin):
        return rotary_embedding(x, cos, sin, backend=backend)

    rows = []
    for name, tokens, heads in cases:
        torch.manual_seed(0)
        x, grad = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype) for _ in range(2))
        cos, sin = wan_tables(tokens, head_dim, device)
        exact = results_of(reference.rotary_embedding, x.double(), cos.double(), sin.double(), grad.double())
        check = check_agreement(name, results_of(ours, x, cos, sin, grad), results_of(_rotate_interleaved, x, cos, sin,
                                grad), exact, peer_name="stock", reference_name="the rotation in float64")
        times = {label: timings(fn, x, cos, sin, grad, device) for label, fn in (("ours", ours), *peers.items())}
        gigabytes = (2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()) / 1e9
        forward, both = times["ours"]
        cells = [name, f"(1, {tokens:,}, {heads}, {head_dim})"]
        gigabytes_per_s = gigabytes / (forward / 1e3)  # times are in ms
        cells += [f"{times[p][0] * 1e3:.0f}" for p in peers] + [f"{forward * 1e3:.0f}", f"{gigabytes_per_s:,.0f}"]
        cells += [f"{times[p][0] / forward:.2f}x" for p in peers]
        cells += [f"{times[p][1] * 1e3:.0f}" for p in peers] + [f"{both * 1e3:.0f}"]
        cells += [f"{times[p][1] / both:.2f}x" for p in peers] + [worst(check)]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows, list(peers)


def table(rows: list[str], peers: list[str], device: str) -> str:
    columns = (["case", "x shape"] + [f"fwd {p} us" for p in peers] + ["fwd ours us", "fwd ours GB/s"]
               + [f"fwd vs {p}" for p in peers] + [f"f+b {p} us" for p in peers] + ["f+b ours us"]
               + [f"f+b vs {p}" for p in peers] + ["check: worst tensor, error ours/stock"])
    return "\n".join([
        "# Rotary embedding (Wan's interleaved RoPE): mmattn's kernel vs the stock rotation",
        "",
        provenance(device, ("diffusers",)),
        "",
        "\"vs\" columns are peer time / our time (above 1: mmattn is faster). Forward+backward differentiates x only "
        "(the tables are constants in Wan). Check, before each case was timed: out and dx of ours and of the stock "
        "rotation against the rotation in float64; max|ours - exact| <= 2 x max|stock - exact| + 1e-3 x max(1, "
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
