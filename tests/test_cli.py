"""The ``mmattn`` command and the lazy top-level package, run in fresh subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mmattn

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_info() -> None:
    result = _run("-m", "mmattn", "info")
    assert result.returncode == 0, result.stderr
    assert mmattn.__version__ in result.stdout
    for backend in ("triton", "flex", "torch"):
        assert f"\n{backend} " in result.stdout


def test_no_subcommand_prints_help() -> None:
    result = _run("-m", "mmattn")
    assert result.returncode == 2
    assert "usage: mmattn" in result.stderr
    assert "info" in result.stderr


def test_help() -> None:
    result = _run("-m", "mmattn", "--help")
    assert result.returncode == 0
    assert "usage: mmattn" in result.stdout
    assert "info" in result.stdout


def test_import_is_lazy() -> None:
    heavy = ["timm", "transformers", "diffusers", "gradio", "mmattn.kernels"]
    code = f"import sys, mmattn; print([m for m in {heavy!r} if m in sys.modules])"
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_lazy_subpackage_attribute() -> None:
    result = _run("-c", "import mmattn; print(mmattn.kernels.__name__); print('kernels' in dir(mmattn))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mmattn.kernels", "True"]
