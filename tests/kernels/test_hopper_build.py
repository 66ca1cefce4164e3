"""The fused neighborhood kernels build for Hopper (sm_90a) on a machine without a GPU: the real compiler and
ptxas catch what the interpreter cannot (type and layout errors, a tile that overflows shared memory)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_video_case_kernels_build_for_hopper_within_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--only", "video 3D", "--first",
         "--out", str(out)],
        check=False, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| video 3D")]
    assert [row.split(" | ")[1] for row in rows] == ["fwd", "dq", "dkdv"]
    assert not [row for row in rows if "too much shared memory" in row]
