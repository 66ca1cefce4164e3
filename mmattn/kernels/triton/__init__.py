"""Triton kernels of mmattn (imported only where triton is installed)."""
