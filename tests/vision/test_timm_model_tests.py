"""timm's own model tests (``tests/test_models.py`` of the installed timm's sdist) on the mmattn models.

The file comes from ``$MMATTN_TIMM_TESTS`` (a folder holding ``tests/test_models.py``), else from a cache folder
that ``pip download`` of timm's sdist fills on first use (``~/.cache/mmattn/timm-<version>``). It runs in a
subprocess with ``timm_tests_plugin.py``, which registers the models and keeps only the tests of ``MODELS``, as
timm's CI does: the tests that carry one of timm's markers. The smallest variant of every family runs by default;
``MMATTN_TIMM_MODELS=all`` (or a comma-separated list) runs others.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

from .timm_tests_plugin import MMATTN_MODELS, NON_STD, SKIPPED

SMALLEST = ["biformer_tiny", "litv2_small", "nat_mini", "dinat_mini", "agent_deit_tiny", "agent_pvt_tiny",
            "agent_swin_tiny", "ela_resnet18", "ela_mobilenetv2"]  # fmt: skip
_REQUESTED = os.environ.get("MMATTN_TIMM_MODELS", "")
MODELS = MMATTN_MODELS if _REQUESTED == "all" else (_REQUESTED.split(",") if _REQUESTED else SMALLEST)
MARKERS = "base or cfg or forward or backward or features or fxforward or fxbackward or torchscript"
_SDIST_FILES = ("pyproject.toml", "tests/__init__.py", "tests/conftest.py", "tests/test_models.py")


def _is_non_std(model: str) -> bool:
    return any(model.startswith(pattern.rstrip("*")) for pattern in NON_STD)


# timm test -> the models it must pass on (timm runs its feature test on hierarchical models only, its two config
# tests split the models into standard ones and ViT-like ones).
EXPECTED = {
    "test_model_forward": MODELS,
    "test_model_backward": MODELS,
    "test_model_default_cfgs": [m for m in MODELS if not _is_non_std(m)],
    "test_model_default_cfgs_non_std": [m for m in MODELS if _is_non_std(m)],
    "test_model_forward_features": [m for m in MODELS if not _is_non_std(m)],
    "test_model_forward_intermediates": MODELS,
    "test_model_forward_intermediates_features": MODELS,
    "test_model_forward_fx": MODELS,
    "test_model_backward_fx": MODELS,
}


def _fetch_timm_tests(root: Path) -> None:
    """Downloads timm's sdist and unpacks the files timm's model tests need into ``root``."""
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                   f"timm=={timm.__version__}", "-d", download]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            pytest.skip(f"timm {timm.__version__}'s sdist could not be downloaded: {result.stderr.strip()[-500:]}")
        (sdist,) = Path(download).glob("timm-*.tar.gz")
        staging = Path(tempfile.mkdtemp(dir=root.parent))
        with tarfile.open(sdist) as archive:
            prefix = archive.getnames()[0].split("/")[0]
            for name in _SDIST_FILES:
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(f"{prefix}/{name}").read())
        try:
            staging.rename(root)  # whole or not at all
        except OSError:  # another run unpacked it first
            shutil.rmtree(staging)


def _timm_tests_root() -> Path:
    if os.environ.get("MMATTN_TIMM_TESTS"):
        return Path(os.environ["MMATTN_TIMM_TESTS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache / "mmattn" / f"timm-{timm.__version__}"
    if not (root / "tests" / "test_models.py").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        _fetch_timm_tests(root)
    return root


def _outcome(case: ET.Element) -> str:
    for kind in ("failure", "error", "skipped"):
        element = case.find(kind)
        if element is not None:
            return f"{kind}: {element.get('message', '')[:300]}"
    return "passed"


@pytest.fixture(scope="module")
def timm_results(tmp_path_factory) -> dict[str, dict[str, str]]:
    """timm test -> {model: outcome} of one run of timm's test_models.py on MODELS."""
    root = _timm_tests_root()
    report = tmp_path_factory.mktemp("timm") / "report.xml"
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "MMATTN_TIMM_MODELS": ",".join(MODELS)}
    command = [sys.executable, "-m", "pytest", "tests/test_models.py", "-p", "timm_tests_plugin", "-p",
               "no:cacheprovider", "-q", "-m", MARKERS, f"--junitxml={report}"]  # fmt: skip
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if not report.exists():
        pytest.fail(f"timm's tests did not run:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    results: dict[str, dict[str, str]] = {}
    for case in ET.parse(report).iter("testcase"):
        test, _, params = case.get("name").partition("[")
        model = params.rstrip("]").split("-")[-1].split(".")[0]
        results.setdefault(test, {})[model] = _outcome(case)
    return results


@pytest.mark.parametrize("test", sorted(EXPECTED))
def test_timms_model_test_passes_on_every_model(timm_results, test):
    outcomes = {model: timm_results.get(test, {}).get(model, "not run") for model in EXPECTED[test]}
    assert outcomes == dict.fromkeys(EXPECTED[test], "passed")


def test_timms_other_tests_only_skip_for_the_stated_reasons(timm_results):
    others = {(test, model): outcome for test, outcomes in timm_results.items() if test not in EXPECTED
              for model, outcome in outcomes.items()}  # fmt: skip
    assert {key: o for key, o in others.items() if o.removeprefix("skipped: ") != SKIPPED.get(key[0])} == {}
