"""The Gradio demo of mmattn (`mmattn demo`): a Vision, a VLM and a Video tab, on embedded defaults.

Needs the ``demo`` extra: ``pip install "mmattn[demo]"``.
"""

try:
    import gradio  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('the mmattn demo needs gradio: pip install "mmattn[demo]"') from err

from .app import build_app, launch

__all__ = ["build_app", "launch"]
