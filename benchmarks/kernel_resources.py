"""Registers, spills and shared memory of mmattn's Triton kernels on Hopper, without a GPU.

Compiles the block-sparse, fused neighborhood and routed kernels (forward, dQ, dK/dV; the Hopper forwards) and the
column-set kernel (VAR's and GIFT's fused rows, as a decoding step and a prompt's rows launch it) for
sm_90a with the local Triton and its bundled ptxas, for every tile config the autotuner would keep on representative
cases (for neighborhood attention, the cases of benchmarks/neighborhood.py), and reads `ptxas -v`. A build error,
spills (local memory traffic) or shared memory above the 227 KiB an H100 block may use show before a GPU is at hand.
Writes benchmarks/results/kernel_resources.md.

    python benchmarks/kernel_resources.py [--only "NAT stage 1,video 3D"] [--kernels fwd,dq,dkdv] [--first] [--out ...]

`--only` names cases (of any family); `--first` compiles only the tile taken without autotuning (MMATTN_AUTOTUNE=0),
the first the pruner keeps.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py compiles for the GPU: unset TRITON_INTERPRET")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, command_line, results_target
from neighborhood import CASES as NEIGHBORHOOD_CASES

from mmattn.kernels import Neighborhood
from mmattn.kernels.triton import block_sparse, block_sparse_tma, column_sets, routed
from mmattn.kernels.triton import neighborhood as fna
from mmattn.kernels.triton import neighborhood_tma as na_tma
from mmattn.kernels.triton.launch import DESCRIPTOR_HEAD_DIMS

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024
_DATA = {"Q", "K", "V", "Out", "OUT", "Rpb", "DOut", "DQ", "DK", "DV"}
_FLOATS = {"Lse", "Delta", "DS", "COLUMNS", "PARTS", "STAT_OUT", "MASSES", "WEIGHTED"}
_INDICES = {"KvNum", "KvIdx", "QNum", "QIdx", "Idx", "QStart", "QCount", "QList", "ARRIVALS"}
_FLAGS = {"VISIBLE", "SELECTED"}
_SCALARS = {"sm_scale", "scale", "share", "rho", "min_mass", "beta"}


@dataclass(frozen=True)
class Build:
    """One kernel on one case: its compile-time arguments and the tiles the autotuner keeps for them."""

    case: str
    kernel: str
    fn: object
    constants: dict
    tiles: list


def _meta_tokens(tokens: int, head_dim: int) -> torch.Tensor:
    """A shape-only bf16 `(B, H, tokens, D)` tensor: the launchers derive the compile-time arguments from it."""
    return torch.empty(1, 1, tokens, head_dim, dtype=torch.bfloat16, device="meta")


def _neighborhood_builds() -> list[Build]:
    builds = []
    for name, _, _, spatial, head_dim, kernel_size, dilation in NEIGHBORHOOD_CASES:
        pattern = fna.pattern_ints(Neighborhood.create(spatial, kernel_size, dilation, 1, False))
        constants = fna.compile_time_args(pattern, 1, head_dim, False, "tf32")
        tiles = fna.prune_configs(fna.CONFIGS, {**constants, "L0": pattern[0], "L1": pattern[1], "L2": pattern[2]})
        for kernel, fn, extra in (("fwd", fna._fwd_kernel, {}), ("dq", fna._dq_kernel, {"WRITE_DS": False}),
                                  ("dkdv", fna._dkdv_kernel, {})):
            builds.append(Build(name, kernel, fn, {**constants, **extra}, tiles))
        if head_dim in DESCRIPTOR_HEAD_DIMS and not na_tma.pattern_reason(False, list(pattern)):
            hopper_tiles = na_tma._prune(na_tma.CONFIGS, {"L0": pattern[0], "L1": pattern[1], "L2": pattern[2]})
            builds.append(Build(f"{name} TMA", "fwd", na_tma._fwd_kernel, constants, hopper_tiles))
    return builds


def _block_sparse_builds() -> list[Build]:
    """The pointer-load kernels and the Hopper kernels (TMA descriptors, warp specialization), 128x128 blocks."""
    builds = []
    deterministic, atomic = {"ATOMIC_DQ": False}, {"ATOMIC_DQ": True}
    families = {
        "block-sparse": (("fwd", block_sparse._fwd_kernel, block_sparse.FWD_CONFIGS, {}),
                         ("dq", block_sparse._bwd_dq, block_sparse.DQ_CONFIGS, {}),
                         ("dkdv", block_sparse._bwd_dkdv, block_sparse.DKDV_CONFIGS, deterministic)),
        "block-sparse TMA": (("fwd", block_sparse_tma._fwd_kernel, block_sparse_tma.FWD_CONFIGS, {}),
                             ("dq", block_sparse_tma._bwd_dq_kernel, block_sparse_tma.DQ_CONFIGS, {}),
                             ("dkdv", block_sparse_tma._bwd_dkdv_kernel, block_sparse_tma.DKDV_CONFIGS, {})),
        "block-sparse atomic dQ": (("dkdv", block_sparse._bwd_dkdv, block_sparse.DKDVQ_CONFIGS, atomic),),
    }
    for family, kernels in families.items():
        for head_dim in (64, 128):
            q = _meta_tokens(4096, head_dim)
            constants = block_sparse.launch_args(q, q, 128, 128)
            for kernel, fn, configs, extra in kernels:
                tiles = block_sparse.prune_configs(configs, constants)
                builds.append(Build(f"{family} 128x128 D{head_dim}", kernel, fn, {**constants, **extra}, tiles))
    return builds


def _routed_builds() -> list[Build]:
    """BiFormer-T's stages 1-3 at 224: regions of 64, 16 and 4 tokens, top-1, 4 and 16 regions, head dim 32."""
    builds = []
    for stage, (region, topk) in enumerate(((64, 1), (16, 4), (4, 16)), start=1):
        q = _meta_tokens(49 * region, 32)
        constants = routed.launch_args(q, q, region, region, topk, has_valid=False)
        for kernel, fn, configs in (("fwd", routed._fwd_kernel, routed.FWD_CONFIGS),
                                    ("dq", routed._dq_kernel, routed.DQ_CONFIGS),
                                    ("dkdv", routed._dkdv_kernel, routed.DKDV_CONFIGS)):
            builds.append(Build(f"routed BiFormer-T stage {stage}", kernel, fn, constants,
                                routed._prune(configs, constants)))
    return builds


def _column_set_builds() -> list[Build]:
    """LLaVA-1.5-7B's fused rows (32 heads of 128, 700 keys, 3 column sets) on a 132-SM GPU: GIFT's and VAR's
    decoding-step rows and VAR's 75 prompt rows after the image, planned as `column_sets._launch` plans them."""
    cases = (("GIFT decode row", column_sets.RANK_HEADS, 1, False),
             ("VAR decode row", column_sets.REDISTRIBUTE, 1, True),
             ("VAR 75 prompt rows", column_sets.REDISTRIBUTE, 75, True))
    builds = []
    for name, epilogue, rows, selected in cases:
        plan = column_sets.launch_plan(batch=1, heads=32, kv_heads=32, rows=rows, head_dim=128, kv_len=700, sets=3,
                                       epilogue=epilogue.value, multiprocessors=132)
        constants = dict(plan.constants)
        warps = constants.pop("num_warps")
        tile = triton.Config({key: constants.pop(key) for key in ("BLOCK_T", "BLOCK_R", "BLOCK_S", "SETS")},
                             num_warps=warps, num_stages=3)
        constants.update(HAS_VISIBLE=True, HAS_SELECTED=selected)
        builds.append(Build(f"column sets: {name}", "fwd", column_sets.column_set_kernel, constants, [tile]))
    return builds


def _signature(fn, constants: dict) -> dict[str, str]:
    """Triton types of the kernel's arguments for bf16 tensors: data and fp32 row-statistic pointers, int32 index
    pointers, byte flags, the fp32 scalars, int32 sizes and strides."""
    def kind(name):
        if name in constants:
            return "constexpr"
        if name == "DQ" and constants.get("ATOMIC_DQ"):
            return "*fp32"  # the float32 buffer dQ is added into atomically
        if name in _DATA:
            return "*bf16"
        if name in _FLOATS:
            return "*fp32"
        if name in _INDICES:
            return "*i32"
        return "*i1" if name == "Valid" else "*u8" if name in _FLAGS else "fp32" if name in _SCALARS else "i32"

    return {name: kind(name) for name in fn.arg_names}


def compile_for_hopper(fn, constants: dict, config: triton.Config):
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    source = ASTSource(fn=fn, signature=_signature(fn, constants),
                       constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
    return triton.compile(source, target=HOPPER,
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def ptxas_report(compiled) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from `ptxas -v` on the kernel's PTX, with the ptxas Triton itself
    takes for Hopper (Triton 3.9 emits PTX 9.4, which its plain `bin/ptxas` 12.9 refuses, and picks another)."""
    ptxas = get_ptxas(HOPPER.arch).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", log)[1]), int(re.search(r"(\d+) bytes spill stores", log)[1])


def tile_name(config: triton.Config) -> str:
    tiles = config.kwargs
    if "BLOCK_R" in tiles:
        shape = f"rows {tiles['BLOCK_R']} sets {tiles['SETS']} splits {tiles['BLOCK_S']}"
    elif "BLOCK_M" in tiles:
        shape = f"M {tiles['BLOCK_M']} N {tiles['BLOCK_N']}"
    else:
        shape = " KV ".join("x".join(str(tiles[f"{p}{a}"]) for a in range(3)) for p in ("TQ", "TK"))
        shape = f"Q {shape}"
    return f"{shape} w{config.num_warps} s{config.num_stages}"


def build_rows(build: Build, first_only: bool) -> list[str]:
    rows = []
    for config in build.tiles[:1] if first_only else build.tiles:
        compiled = compile_for_hopper(build.fn, {**build.constants, **config.kwargs}, config)
        registers, spills = ptxas_report(compiled)
        shared = compiled.metadata.shared
        verdict = "too much shared memory" if shared > SHARED_LIMIT else "spills" if spills else "ok"
        rows.append(f"| {build.case} | {build.kernel} | {tile_name(config)} | {registers} | {spills} | "
                    f"{shared // 1024} | {verdict} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--kernels", default="fwd,dq,dkdv", help="comma-separated subset of fwd,dq,dkdv")
    parser.add_argument("--first", action="store_true", help="only the tile taken without autotuning")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/kernel_resources.md, for a run of every case)")
    args = parser.parse_args()
    builds = _block_sparse_builds() + _neighborhood_builds() + _routed_builds() + _column_set_builds()
    cases = list(dict.fromkeys(build.case for build in builds))
    only = args.only.split(",") if args.only else cases
    kernels = args.kernels.split(",")
    if not set(only) <= set(cases) or not set(kernels) <= {"fwd", "dq", "dkdv"}:
        parser.error(f"--only must name cases of {cases}; --kernels a subset of fwd,dq,dkdv")
    complete = set(only) == set(cases) and set(kernels) == {"fwd", "dq", "dkdv"} and not args.first
    out = results_target(parser, args.out, RESULTS / "kernel_resources.md", complete, "--only, --kernels or --first")
    lines = [
        "# mmattn's Triton kernels on Hopper: registers, spills, shared memory",
        "",
        (f"Compiled for sm_90a without a GPU: Triton {triton.__version__} and its ptxas; bf16, no rpb. Every tile the "
         "autotuner keeps for the case; spills are ptxas spill-store bytes per thread."),
        "",
        f"Command: `{command_line()}`. Every row below comes from this one run.",
        "",
        "| case | kernel | tile | registers | spill bytes | shared KiB | verdict |",
        "|---|---|---|---|---|---|---|",
        *(row for build in builds if build.case in only and build.kernel in kernels
          for row in build_rows(build, args.first)),
        "",
    ]
    if out is None:
        print("\n".join(lines))
        print("(not written: a subset run writes only where --out says)")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
