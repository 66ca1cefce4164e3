"""Shared pytest setup."""

import os

import pytest

# CI has no GPU: Triton kernels run on the CPU through the interpreter, which reads TRITON_INTERPRET
# when triton is imported, so set it before any test module imports triton. MMATTN_TEST_GPU=1 runs them
# compiled on a real GPU instead.
if os.environ.get("MMATTN_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# make test runs a pytest-xdist worker per core: one thread each (torch, and the subprocesses some tests start), so
# that the workers' thread pools do not oversubscribe the cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Modules whose every test runs on the GPU where there is one, although none is named for it.
GPU_MODULES = {"test_column_sets.py", "test_massive_activations.py", "test_rotary.py"}  # VAR, GIFT, Wan kernels


def is_gpu_test(item: pytest.Item) -> bool:
    """A GPU test: its module or its function has the word `gpu` in its name (test_gpu.py, test_gpu_biformer_shapes,
    test_var_gpu_fused_...), or its module is one of GPU_MODULES. Such tests skip without CUDA (or run an interpreter
    version on the CPU)."""
    module = item.path.name
    function = getattr(item, "originalname", item.name)
    return module in GPU_MODULES or "gpu" in module.removesuffix(".py").split("_") or "gpu" in function.split("_")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every GPU test `gpu`, so that `pytest -m gpu tests` (make test-gpu) selects them all."""
    for item in items:
        if is_gpu_test(item):
            item.add_marker(pytest.mark.gpu)
