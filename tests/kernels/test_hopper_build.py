"""The Triton kernels build for Hopper (sm_90a) on a machine without a GPU: the real compiler and ptxas catch what
the interpreter cannot (type and layout errors, a tile that overflows shared memory)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = ("block-sparse 128x128 D128", "block-sparse TMA 128x128 D128", "block-sparse atomic dQ 128x128 D128",
         "video 3D", "video 3D TMA", "routed BiFormer-T stage 1", "column sets: GIFT decode row",
         "column sets: VAR 75 prompt rows")
# the neighborhood Hopper forward; the backward that adds dQ atomically (the block-sparse Hopper case has all three);
# the column-set kernel (VAR's and GIFT's fused rows) has no backward
ONLY = {"video 3D TMA": ("fwd",), "atomic dQ": ("dkdv",), "column sets": ("fwd",)}


def test_untuned_tiles_of_every_kernel_family_build_for_hopper_within_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--only", ",".join(CASES), "--first",
         "--out", str(out)],
        check=False, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    built = {(row[0].removeprefix("| "), row[1]) for row in rows[1:]}
    every = ("fwd", "dq", "dkdv")
    kernels = {case: next((parts for key, parts in ONLY.items() if key in case), every) for case in CASES}
    assert built == {(case, kernel) for case in CASES for kernel in kernels[case]}
    assert not [row for row in rows if "too much shared memory" in row[-1]]
