"""`benchmarks/vlm.py --quick`: the whole benchmark (pruning on every benchmarked family, eager and compiled decoding,
every check) on tiny configs on the CPU, in a fresh process, prints its tables and writes where --out says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    """`python <arguments>` from the repository root in a fresh process, which must succeed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_quick_run_prints_every_table(tmp_path) -> None:
    out = tmp_path / "vlm.md"
    result = run_script("benchmarks/vlm.py", "--quick", "--out", str(out))
    text = out.read_text()
    for title in ("LLaVA-1.5-7B", "Qwen2.5-VL-7B", "Qwen3-VL-8B", "Gemma-3-4B"):
        assert f"## Pruning: {title}-shaped random model" in text
    for row in ("| eager | GIFT |", "| compiled | VAR |", "| compiled | GIFT |", "| VFlowOpt keep 0.1 | 70 x2, 42 x2 |",
                "| VisionZip 49+9 | 58 x4 |", "| DivPrune keep 0.1 |", "| random keep 0.1 |"):
        assert row in text
    assert "recompiles during the timed rounds: 0." in text
    assert "2 interleaved rounds eager and 6 compiled" in text  # --quick's 2 rounds, SHORT_ROUND_FACTOR for compiled
    assert "not timed" not in text and "Run in progress" not in text
    assert f"wrote {out}" in result.stdout


def test_host_overhead_counts_no_sync_added_per_decoding_step() -> None:
    """`benchmarks/vlm_host_overhead.py` on a tiny model: its table, and VAR and GIFT decode with the syncs per step
    of plain decoding (HF's own stopping check): an intervention that read a device value each step would stall a
    GPU's host-bound decoding."""
    result = run_script("benchmarks/vlm_host_overhead.py", "--size", "quick", "--new-tokens", "3", "--repeats", "1",
                        "--only", "VAR", "GIFT")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert set(rows) == {"none", "VAR", "GIFT"} and all(len(cells) == 10 for cells in rows.values())
    syncs_per_step = {name: float(cells[5]) for name, cells in rows.items()}
    assert syncs_per_step["none"] >= 1
    assert syncs_per_step["VAR"] == syncs_per_step["GIFT"] == syncs_per_step["none"]


def test_column_set_benchmark_checks_every_row_against_float64() -> None:
    """`benchmarks/column_sets.py --quick` (the Triton interpreter): VAR's and GIFT's fused rows and SDPA, each
    checked against the float64 reference before it would be timed."""
    result = run_script("benchmarks/column_sets.py", "--quick")
    lines = result.stdout.splitlines()
    rows = [line.split("|")[1:4] for line in lines if line.startswith("| ") and "error" not in line]
    assert [(case.strip(), name.strip()) for case, name, _ in rows] == [
        ("decode row", "SDPA"), ("decode row", "VAR"), ("decode row", "GIFT"), ("prompt rows", "SDPA"),
        ("prompt rows", "VAR")]
    assert all(float(error) < 1e-5 for _, _, error in rows)
