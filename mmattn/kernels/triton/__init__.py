"""Triton kernels of mmattn (imported only where triton is installed)."""


def kernel_switches() -> dict[str, tuple[bool, bool]]:
    """The kernels' environment switches (`MMATTN_TRITON_*`, read at import): variable -> (on, default). A switch
    set to anything but unset, "0" or "1" raises a ValueError naming it."""
    from . import block_sparse, block_sparse_tma, neighborhood_tma  # noqa: F401  (importing reads the switches)
    from .launch import SWITCHES

    return dict(sorted(SWITCHES.items()))
