"""Clear errors for missing optional dependencies of `mmattn.diffusion`."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Imports `module`, or raises an ImportError naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is required for this feature: pip install 'mmattn[{extra}]'") from error
