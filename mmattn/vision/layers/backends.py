"""The check of the ``attn_backend`` argument shared by the vision layers and models."""

from __future__ import annotations

__all__ = ["check_backend"]


def check_backend(attn_backend: str, backends: tuple[str, ...]) -> str:
    """``attn_backend`` if it is one of ``backends``; a ValueError that names the argument otherwise."""
    if attn_backend not in backends:
        raise ValueError(f"attn_backend must be one of {backends}, got {attn_backend!r}")
    return attn_backend
