"""Registers, spills and shared memory of the fused neighborhood-attention kernels on Hopper, without a GPU.

Compiles the forward, dQ and dK/dV kernels for sm_90a with the local Triton and its bundled ptxas, for every tile
config the autotuner would keep on the cases of benchmarks/neighborhood.py, and reads `ptxas -v`. Spills (local
memory traffic) and shared memory above the 227 KiB an H100 block may use show which tiles cannot be fast before a
GPU is at hand. Writes benchmarks/results/kernel_resources.md.

    python benchmarks/kernel_resources.py [--only "NAT stage 1,video 3D"] [--kernels fwd,dq,dkdv] [--first] [--out ...]

`--first` compiles only the tile taken without autotuning (MMATTN_AUTOTUNE=0), the first the pruner keeps.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py compiles for the GPU: unset TRITON_INTERPRET")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neighborhood import CASES

from mmattn.kernels import Neighborhood
from mmattn.kernels.na_ops import _compile_time_args, _pattern
from mmattn.kernels.triton import neighborhood as kernels

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024
KERNELS = {"fwd": kernels._fwd_kernel, "dq": kernels._dq_kernel, "dkdv": kernels._dkdv_kernel}
_POINTERS = {"Q", "K", "V", "Out", "Rpb", "DOut", "DQ", "DK", "DV"}
_FP32_POINTERS = {"Lse", "Delta", "DS"}


def _signature(fn, constants: dict) -> dict[str, str]:
    """Triton types of the kernel's arguments for bf16 tensors: pointers, the fp32 scale, int32 sizes/strides."""
    def kind(name):
        if name in constants:
            return "constexpr"
        if name in _POINTERS:
            return "*bf16"
        return "*fp32" if name in _FP32_POINTERS else "fp32" if name == "sm_scale" else "i32"

    return {name: kind(name) for name in fn.arg_names}


def compile_for_hopper(fn, constants: dict, config: triton.Config):
    source = ASTSource(fn=fn, signature=_signature(fn, constants),
                       constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
    return triton.compile(source, target=HOPPER,
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def ptxas_report(compiled) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from `ptxas -v` on the kernel's PTX."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", log)[1]), int(re.search(r"(\d+) bytes spill stores", log)[1])


def tile_name(config: triton.Config) -> str:
    def tile(prefix):
        return "x".join(str(config.kwargs[f"{prefix}{a}"]) for a in range(3))

    return f"Q {tile('TQ')} KV {tile('TK')} w{config.num_warps} s{config.num_stages}"


def case_rows(case, kernel_names: list[str], first_only: bool) -> list[str]:
    name, _, _, spatial, head_dim, kernel_size, dilation = case
    pattern = _pattern(Neighborhood.create(spatial, kernel_size, dilation, 1, False))
    constants = _compile_time_args(pattern, 1, head_dim, False, "tf32")
    kept = kernels.prune_configs(kernels.CONFIGS, {**constants, "L0": pattern[0], "L1": pattern[1], "L2": pattern[2]})
    kept = kept[:1] if first_only else kept
    rows = []
    for kernel_name in kernel_names:
        fn = KERNELS[kernel_name]
        extra = {"WRITE_DS": False} if "WRITE_DS" in fn.arg_names else {}
        for config in kept:
            compiled = compile_for_hopper(fn, {**constants, **extra, **config.kwargs}, config)
            registers, spills = ptxas_report(compiled)
            shared = compiled.metadata.shared
            verdict = "too much shared memory" if shared > SHARED_LIMIT else "spills" if spills else "ok"
            rows.append(f"| {name} | {kernel_name} | {tile_name(config)} | {registers} | {spills} | "
                        f"{shared // 1024} | {verdict} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case names of benchmarks/neighborhood.py")
    parser.add_argument("--kernels", default="fwd,dq,dkdv", help="comma-separated subset of fwd,dq,dkdv")
    parser.add_argument("--first", action="store_true", help="only the tile taken without autotuning")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernel_resources.md")
    args = parser.parse_args()
    cases = [case for case in CASES if not args.only or case[0] in args.only.split(",")]
    kernel_names = args.kernels.split(",")
    if not cases or not set(kernel_names) <= set(KERNELS):
        parser.error(f"--only must name cases of {[c[0] for c in CASES]}, --kernels a subset of {list(KERNELS)}")
    lines = [
        "# Fused neighborhood attention on Hopper: registers, spills, shared memory",
        "",
        (f"Compiled for sm_90a without a GPU: Triton {triton.__version__} and its ptxas; bf16, no rpb. Every tile the "
         "autotuner keeps for the case; spills are ptxas spill-store bytes per thread."),
        "",
        "| case | kernel | tile | registers | spill bytes | shared KiB | verdict |",
        "|---|---|---|---|---|---|---|",
        *(row for case in cases for row in case_rows(case, kernel_names, args.first)),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
