"""Shared pytest setup."""

import os

# CI has no GPU: Triton kernels run on the CPU through the interpreter, which reads TRITON_INTERPRET
# when triton is imported, so set it before any test module imports triton. MMATTN_TEST_GPU=1 runs them
# compiled on a real GPU instead.
if os.environ.get("MMATTN_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
