"""Our Triton block-sparse forward+backward under each form of its backward, on the GPU: the deterministic pointer
kernels, the deterministic Hopper kernels (TMA descriptors, warp specialization: `block_sparse_tma.backward`) and the
pointer dK/dV kernel adding dQ atomically (`block_sparse.atomic_dq`), timed in one process in interleaved rounds on
the masks of block_sparse.py and a Radial mask, with FlashAttention-4 beside them where it is installed. What it
measures sets `block_sparse.FAST_BACKWARD_HEAD_DIMS`, where the default backward takes a Hopper form. Writes
benchmarks/results/block_sparse_backward.md.

    python benchmarks/block_sparse_backward.py [--out FILE]

Each form's gradients are compared with the pointer kernels' (the TMA kernels must give the same bits; the atomic
additions land in any order: their largest difference is reported).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_sparse import backward_form, band_blocks, fa4_direct, has_fa4, random_blocks
from common import RESULTS, provenance, write_results

from mmattn.diffusion import radial_mask
from mmattn.kernels import BlockSparseMask, backends, block_sparse_attention
from mmattn.kernels.triton import block_sparse as pointer
from mmattn.kernels.triton import block_sparse_tma as tma

ROUNDS = 2
DEFAULT_OUT = RESULTS / "block_sparse_backward.md"


FORM_SWITCHES = {"pointer": (False, False), "TMA": (False, True), "atomic dQ": (True, False)}
"""Form -> `block_sparse.backward_form`'s (atomic, tma)."""
FORMS = tuple(FORM_SWITCHES)


@contextlib.contextmanager
def forced_form(form: str):
    """Our Triton backward in `form` at every head dim, host-bound calls too; yields spies on the TMA backward and
    the atomic dK/dV/dQ kernel."""
    with backward_form(*FORM_SWITCHES[form]), mock.patch.object(backends, "HOST_BOUND_WORK", 0.0), \
            mock.patch.object(tma, "backward", wraps=tma.backward) as tma_spy, \
            mock.patch.object(pointer.dkdvq_kernel, "launch", wraps=pointer.dkdvq_kernel.launch) as atomic_spy:
        yield tma_spy, atomic_spy


def masks(heads: int, length: int):
    """(name, mask) on the GPU: every block, band and random masks as in block_sparse.py."""
    n = -(-length // 128)

    def of(blocks):
        return BlockSparseMask.from_dense(blocks, 128, length, length).to("cuda")

    yield "all", of(torch.ones(1, heads, n, n, dtype=torch.bool))
    for density in (0.5, 0.25, 0.1, 0.05):
        yield "band", of(band_blocks(heads, n, density))
    for density in (0.25, 0.1):
        yield "random", of(random_blocks(heads, n, density))


CASES = [
    ((1, 24, 32760, 128), lambda: masks(24, 32760)),
    ((1, 12, 32760, 128), lambda: [("Radial, Wan 480p 81f", radial_mask(21, 1560, block_size=128, decay_factor=0.2,
                                                                          model="wan", device="cuda"))]),
    ((1, 12, 16384, 64), lambda: masks(12, 16384)),
]


def row(shape, name: str, mask: BlockSparseMask, fa4: bool) -> str:
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def step(attend):
        def run():
            q.grad = k.grad = v.grad = None
            attend(q, k, v).backward(grad)
        return run

    ours = step(lambda q, k, v: block_sparse_attention(q, k, v, mask, backend="triton"))
    grads, times = {}, {name: [] for name in (*FORMS, "FA4")}
    for form in FORMS:
        with forced_form(form) as (tma_spy, atomic_spy):
            ours()
        atomic, hopper = FORM_SWITCHES[form]
        if (atomic_spy.called, tma_spy.called) != (atomic, hopper):
            raise RuntimeError(f"{shape} {name}: the {form} backward did not run")
        grads[form] = [t.grad.clone() for t in (q, k, v)]
    for _ in range(ROUNDS):
        for form in FORMS:
            with forced_form(form):
                times[form].append(triton.testing.do_bench(ours, warmup=25, rep=150, return_mode="median"))
        if fa4:
            times["FA4"].append(triton.testing.do_bench(step(lambda q, k, v: fa4_direct(q, k, v, mask)), warmup=25,
                                                        rep=150, return_mode="median"))
    best = {form: min(values) for form, values in times.items() if values}
    same = all(torch.equal(a, b) for a, b in zip(grads["pointer"], grads["TMA"]))
    atomic_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads["pointer"], grads["atomic dQ"]))
    batch, heads, length, head_dim = shape
    cells = [f"B{batch} H{heads} L{length} D{head_dim}", name, f"{mask.density():.3f}",
             *(f"{best[form]:.3f}" for form in FORMS),
             f"{best['TMA'] / best['pointer']:.3f}", f"{best['atomic dQ'] / best['pointer']:.3f}"]
    if fa4:
        cells += [f"{best['FA4']:.3f}", f"{best['FA4'] / min(best[form] for form in FORMS):.2f}"]
    cells += ["yes" if same else "NO", f"{atomic_diff:.1e}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the backward forms differ only in compiled Triton kernels")
    fa4 = has_fa4()
    header = ["shape", "mask", "density", *(f"{form} ms" for form in FORMS), "TMA / pointer", "atomic / pointer"]
    if fa4:
        header += ["FA4 ms", "FA4 / best ours"]
    header += ["TMA grads = pointer's", "atomic: max grad diff"]
    rows = []
    for shape, case_masks in CASES:
        for name, mask in case_masks():
            rows.append(row(shape, name, mask, fa4))
            print(rows[-1], flush=True)
    peer = ("FlashAttention-4 (`flash_attn.cute.flash_attn_func`, the same block lists) timed in the same rounds."
            if fa4 else "FlashAttention-4 was not installed: no FA4 column.")
    text = "\n".join([
        "# Block-sparse backward forms: pointer, TMA (Hopper) and atomic dQ", "",
        provenance(settings=f"medians of `triton.testing.do_bench` (warm-up 25 ms, repeats 150 ms), the least of "
                            f"{ROUNDS} interleaved rounds"), "",
        "Forward+backward of `block_sparse_attention(backend=\"triton\")`, bf16, N(0, 1) inputs, 128x128 blocks; the "
        "forward is the same in every column (the Hopper TMA forward). Backward forms: pointer = the deterministic "
        "dK/dV and dQ kernels; TMA = `block_sparse_tma.backward` (deterministic, gradients must equal the pointer "
        "kernels' bit for bit); atomic dQ = the pointer dK/dV kernel adding dQ into float32 atomically (no dQ "
        "kernel). Ratios below 1: faster than the pointer kernels. " + peer, "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows,
    ])
    write_results(text, args.out)


if __name__ == "__main__":
    main()
