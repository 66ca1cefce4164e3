"""The ``mmattn`` command and the lazy top-level package, run in fresh subprocesses."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import mmattn

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_info() -> None:
    result = _run("-m", "mmattn", "info")
    assert result.returncode == 0, result.stderr
    assert mmattn.__version__ in result.stdout
    for backend in ("triton", "flex", "torch"):
        assert f"\n{backend} " in result.stdout
    assert re.search(r"^MMATTN_TRITON_TMA_BWD +on +\(default on\)$", result.stdout, re.M), result.stdout


def test_info_lists_a_switch_set_off_and_refuses_a_bad_value(monkeypatch) -> None:
    monkeypatch.setenv("MMATTN_TRITON_TMA_BWD", "0")
    stdout = _run("-m", "mmattn", "info").stdout
    assert re.search(r"^MMATTN_TRITON_TMA_BWD +off +\(default on\)$", stdout, re.M), stdout
    monkeypatch.setenv("MMATTN_TRITON_TMA_BWD", "yes")
    _assert_one_line_error(_run("-m", "mmattn", "info"), "MMATTN_TRITON_TMA_BWD", "'yes'")


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


def test_masks_radial_png(tmp_path) -> None:
    from PIL import Image

    from mmattn.diffusion import radial_block_mask

    out = tmp_path / "mask.png"
    result = _run("-m", "mmattn", "masks", "radial", "--frames", "21", "--tokens-per-frame", "1560", "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected = radial_block_mask(21, 1560)
    assert f"density {expected.float().mean():.4f}" in result.stdout
    picture = Image.open(out)
    assert picture.size[0] % expected.shape[1] == 0 and picture.size[0] // expected.shape[1] >= 1


def test_masks_neighborhood_png(tmp_path) -> None:
    out = tmp_path / "na.png"
    result = _run("-m", "mmattn", "masks", "neighborhood", "--height", "8", "--width", "8", "--kernel-size", "3",
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "density 0.1406" in result.stdout  # every token attends 3x3 = 9 of 64 keys
    assert out.is_file()


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit status 2 and a single stderr line (no traceback) that contains every one of `words`."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.stderr


def test_masks_bad_arguments_name_them(tmp_path) -> None:
    result = _run("-m", "mmattn", "masks", "radial", "--frames", "0", "--tokens-per-frame", "4", "--out",
                  str(tmp_path / "m.png"))
    _assert_one_line_error(result, "--frames", "expected an int >= 1", "'0'")
    result = _run("-m", "mmattn", "masks", "radial", "--frames", "2", "--tokens-per-frame", "4", "--out",
                  str(tmp_path / "m.jpg"))
    _assert_one_line_error(result, "--out", ".png", "m.jpg")


def test_masks_missing_output_folder(tmp_path) -> None:
    out = tmp_path / "no-such-folder" / "m.png"
    result = _run("-m", "mmattn", "masks", "radial", "--frames", "2", "--tokens-per-frame", "4", "--out", str(out))
    _assert_one_line_error(result, "--out", "existing", str(out))


@pytest.mark.parametrize("kind", [
    ("neighborhood", "--height", "300", "--width", "300"),  # 90,000 tokens: a 90,000 x 90,000 mask (8.1 G entries)
    ("radial", "--frames", "21", "--tokens-per-frame", "1560", "--block-size", "16", "--text-tokens", "40000"),
], ids=["neighborhood", "radial"])
def test_masks_too_big_is_refused_before_allocating(tmp_path, kind) -> None:
    result = _run("-m", "mmattn", "masks", *kind, "--out", str(tmp_path / "m.png"))
    _assert_one_line_error(result, kind[1], "at most 4096 x 4096")
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:99"])
def test_info_bad_device(device) -> None:
    _assert_one_line_error(_run("-m", "mmattn", "info", "--device", device), "--device", f"got {device!r}")


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_demo_port_out_of_range(port) -> None:
    _assert_one_line_error(_run("-m", "mmattn", "demo", "--port", port), "--port", "[0, 65535]", f"got {port!r}")


@pytest.mark.parametrize("host", ["999.1.1.1", "::1"])
def test_demo_bad_host(host) -> None:
    _assert_one_line_error(_run("-m", "mmattn", "demo", "--host", host), "--host", f"got {host!r}")


def test_demo_port_in_use() -> None:
    pytest.importorskip("gradio")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        _assert_one_line_error(_run("-m", "mmattn", "demo", "--port", port), "--port", port, "cannot serve")


@pytest.mark.parametrize("name,row", [("diffusion", "| tiny wan |"), ("context_parallel", "| tiny wan |"),
                                      ("block_sparse", "| B1 H2 L300 D64 | random |"),
                                      ("rotary", "| tiny | (1, 96, 2, 16) |")])
def test_bench_quick_prints_the_table(name, row) -> None:
    result = _run("-m", "mmattn", "bench", name, "--quick")
    assert result.returncode == 0, result.stderr
    assert row in result.stdout and f"[{name}]" in result.stderr  # rows of the table, progress on stderr


def test_bench_unknown_name() -> None:
    result = _run("-m", "mmattn", "bench", "nope")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_demo_help() -> None:
    result = _run("-m", "mmattn", "demo", "--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--share"):
        assert option in result.stdout
