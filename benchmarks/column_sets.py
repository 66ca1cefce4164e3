"""Column-set kernels (VAR's and GIFT's fused decode rows, VAR's prompt rows after the image) against SDPA on the same
rows (the unedited attention they replace), at LLaVA-1.5-7B's attention shape (32 heads of 128) in bfloat16.

GPU:  python benchmarks/column_sets.py     (writes benchmarks/results/column_sets.md)
CPU:  TRITON_INTERPRET=1 python benchmarks/column_sets.py --quick     (tiny shapes, the checks, no timing)

Two times per call: the GPU time (CUDA-graph replays of `CALLS` back-to-back calls, so no host time), and the host
time of an eager call (issuing `CALLS` calls back to back, before synchronizing: the Python and launch cost that a
host-bound decoding step pays). Before timing, each output is checked against the float64 reference
(`mmattn/kernels/reference.py`): its error may be at most `common.FACTOR` x SDPA's own error against float64 attention
on the same rows + `common.SLACK` (benchmarks/common.py `judge`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, judge, provenance, results_target, write_results  # noqa: E402

from mmattn.kernels import ranked_head_attention, reference, sink_redistribution_attention  # noqa: E402

CALLS = 20
"""Calls per CUDA graph and per host-time sample."""
HEADS, HEAD_DIM, PROMPT, IMAGE = 32, 128, 651, (5, 581)
"""LLaVA-1.5-7B: 32 heads of 128; a 651-token prompt whose tokens 5-580 are the image's 576."""


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    rows: int  # 1: a decoding step; more: the prompt's last rows, causal
    keys: int


CASES = [Case("decode row, 700 keys", 1, 1, 700), Case("decode row, 2,048 keys", 1, 1, 2048),
         Case("decode row, 8,192 keys", 1, 1, 8192), Case("decode rows, batch 8, 2,048 keys", 8, 1, 2048),
         Case("VAR prompt rows: 75 after the image, 651 keys", 1, 75, PROMPT)]
QUICK_CASES = [Case("decode row", 2, 1, 48), Case("prompt rows", 1, 5, 40)]


def inputs(case: Case, device: str, heads: int, head_dim: int, prompt: int, image: tuple[int, int],
           sinks: float) -> dict:
    """q, k, v (bf16 on CUDA, float32 on the CPU), the columns of VAR's sets (image, receivers, sinks) and GIFT's
    (image, boost, query) with a share `sinks` of the image tokens as sinks, and what each row sees (causal prompt
    rows; every key in a decoding step)."""
    generator = torch.Generator().manual_seed(case.keys + case.rows)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(case.batch, heads, n, head_dim, generator=generator).to(device, dtype)
               for n in (case.rows, case.keys, case.keys))
    is_image = torch.zeros(case.batch, prompt)
    is_image[:, image[0]:image[1]] = 1
    is_sink = is_image * (torch.rand(case.batch, prompt, generator=generator) < sinks)
    boost = is_image * 3 * torch.rand(case.batch, prompt, generator=generator)
    var = torch.stack([is_image, is_image - is_sink, is_sink], -1).to(device)
    gift = torch.stack([is_image, boost, 1 - is_image], -1).to(device)
    positions = torch.arange(case.keys - case.rows, case.keys)
    visible = (torch.arange(case.keys) <= positions[:, None]).expand(case.batch, -1, -1).to(device)
    return {"q": q, "k": k, "v": v, "var": var, "gift": gift, "visible": visible}


def methods(x: dict) -> dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    """Per row kind: (the call, its float64 reference)."""
    q, k, v, visible = x["q"], x["k"], x["v"], x["visible"]
    seen = visible[:, -1] if q.shape[2] == 1 else visible
    scale = q.shape[-1] ** -0.5
    wide = [t.double() for t in (q, k, v)]
    var = dict(share=0.6, rho=0.5, min_mass=0.2)
    found = {
        "SDPA": (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None]),
                 lambda: reference.column_set_attention(*wide, x["var"].double(), seen, scale)[0]),
        "VAR": (lambda: sink_redistribution_attention(q, k, v, x["var"], visible=seen, backend="triton", **var),
                lambda: reference.sink_redistribution(
                    *reference.column_set_attention(*wide, x["var"].double(), seen, scale), *var.values())),
    }
    if q.shape[2] == 1:  # GIFT edits decoding steps (and the prompt's last row) only
        found["GIFT"] = (lambda: ranked_head_attention(q, k, v, x["gift"], visible=seen, backend="triton"),
                         lambda: reference.ranked_head_enhancement(
                             *reference.column_set_attention(*wide, x["gift"].double(), seen, scale), 1.0))
    return found


def gpu_us(fn: Callable[[], object]) -> float:
    """Least GPU microseconds per call over 3 timings of 10 replays of a CUDA graph of `CALLS` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the graph
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (10 * CALLS))
    return best


def host_us(fn: Callable[[], object]) -> float:
    """Least microseconds of host time per eager call over 5 samples of `CALLS` calls issued back to back."""
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        best = min(best, (time.perf_counter() - start) * 1e6 / CALLS)
    torch.cuda.synchronize()
    return best


def measure(case: Case, device: str, shape: dict) -> list[str]:
    """The table rows of one case: the checks first (a row that disagrees is not timed), then the times."""
    found = methods(inputs(case, device, **shape))
    outputs = {name: (call(), exact()) for name, (call, exact) in found.items()}
    peer_err = (outputs["SDPA"][0].double() - outputs["SDPA"][1]).abs().max().item()
    rows = []
    for name, (call, _) in found.items():
        ours, exact = outputs[name]
        error = (ours.double() - exact).abs().max().item()
        if name != "SDPA":
            judge(f"{case.name}, {name}", "output", error, peer_err,
                  (ours.double() - outputs["SDPA"][0].double()).abs().max().item(), scale=exact.abs().max().item(),
                  peer_name="SDPA", reference_name="float64")
        times = (gpu_us(call), host_us(call)) if device == "cuda" else None
        rows.append((name, error, times))
    base = rows[0][2]
    return [f"| {case.name} | {name} | {error:.1e} | "
            + (f"{t[0]:.1f} | {t[0] / base[0]:.2f} | {t[1]:.1f} | {t[1] / base[1]:.2f} |" if t else "- | - | - | - |")
            for name, error, t in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (Triton interpreter): checks only")
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/column_sets.md)")
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --quick for the CPU smoke test")
    target = results_target(parser, args.out, RESULTS / "column_sets.md", complete=not args.quick, why="--quick")
    shape = (dict(heads=4, head_dim=32, prompt=40, image=(2, 30), sinks=0.3) if args.quick
             else dict(heads=HEADS, head_dim=HEAD_DIM, prompt=PROMPT, image=IMAGE, sinks=0.02))
    lines = ["# Column-set kernels: VAR's and GIFT's fused rows against SDPA", "",
             provenance(device, settings=f"GPU time: CUDA-graph replays of {CALLS} back-to-back calls (least of 3 x "
                                         f"10 replays); host time: {CALLS} eager calls issued back to back, least "
                                         "of 5"), "",
             f"{shape['heads']} heads of {shape['head_dim']}, {'float32' if args.quick else 'bfloat16'}; columns "
             f"over a {shape['prompt']}-token prompt. error: max abs against the float64 reference.", "",
             "| case | rows | error | GPU us | x SDPA | host us | x SDPA |", "|---|---|---:|---:|---:|---:|---:|"]
    for case in QUICK_CASES if args.quick else CASES:
        lines += measure(case, device, shape)
    write_results("\n".join(lines), target)


if __name__ == "__main__":
    main()
