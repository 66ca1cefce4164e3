"""The wheel built from this checkout, installed outside it: it carries everything mmattn reads at run time.

The wheel goes into a throwaway folder (`pip install --target`) that is the only entry of PYTHONPATH, and every
command runs from another throwaway folder, so nothing can come from the checkout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "mmattn")
"""What a build reads; copied, so that building leaves no build/ or egg-info behind in the checkout."""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True,
                   capture_output=True, text=True, timeout=300)


@dataclass
class Installed:
    """The wheel installed into `target`, the only entry of PYTHONPATH in `env`; commands run in `cwd`."""

    target: Path
    cwd: Path
    env: dict[str, str]

    @property
    def mmattn(self) -> str:
        """The installed console script."""
        return str(self.target / "bin" / "mmattn")

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(source))
    (built,) = dist.glob("mmattn-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Installed:
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--no-deps", "--target", str(target), str(wheel))
    env = {**os.environ, "PYTHONPATH": str(target), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    return Installed(target, tmp_path_factory.mktemp("cwd"), env)


def test_wheel_holds_only_the_mmattn_package(wheel) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"mmattn", "mmattn-0.1.0.dist-info"}
    for data in ("mmattn/presets/vlm/llava-1.5-7b.yaml", "mmattn/presets/diffusion/wan2.1-t2v-1.3b.yaml",
                 "mmattn/vlm/eval/coco_synonyms.json", "mmattn/demo/app.py"):
        assert data in names


def test_imports_come_from_the_install(installed) -> None:
    result = installed.run(sys.executable, "-c", "import mmattn; print(mmattn.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed.target)


def test_info(installed) -> None:
    result = installed.run(installed.mmattn, "info")
    assert result.returncode == 0, result.stderr
    assert "mmattn  0.1.0" in result.stdout and "\ntorch " in result.stdout


def test_presets(installed) -> None:
    code = ("from mmattn import vlm; from mmattn.diffusion import RadialConfig; "
            "print(vlm.load_preset('llava-1.5-7b', 'var').sink_dims, RadialConfig.preset('wan2.1-t2v-1.3b').decay_factor)")
    result = installed.run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(2533,", "1415)", "0.2"]


def test_vlm_eval_finds_the_preset(installed) -> None:
    def chair(preset: str) -> str:
        result = installed.run(sys.executable, "-m", "mmattn.vlm.eval", "chair", "--model", "no-model", "--coco",
                               "no-coco", "--preset", preset, "--intervention", "var")
        assert result.returncode != 0
        return result.stderr

    error = chair("llava-1.5-7b")  # the preset loads; the run stops at the missing COCO folder
    assert "preset" not in error and "--coco" in error and "no-coco" in error, error
    assert "'llava-1.5-7b'" in chair("no-such-preset")  # the error lists the shipped presets


def test_bench_says_it_needs_a_checkout(installed) -> None:
    result = installed.run(installed.mmattn, "bench", "block_sparse")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "source checkout" in result.stderr


def test_demo_serves(installed, tmp_path) -> None:
    pytest.importorskip("gradio")
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        demo = subprocess.Popen([installed.mmattn, "demo", "--port", str(port)], cwd=installed.cwd, env=installed.env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, status = time.monotonic() + 150, None
        while status != 200 and demo.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    status = response.status
            except OSError:
                time.sleep(1)
        assert status == 200, f"exit status {demo.poll()}: {log.read_text()[-2000:]}"
    finally:
        demo.terminate()
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
