"""How a callback's results and failures reach the page: one-line messages, and output files of their own."""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image

from .fields import InputError

__all__ = ["handler", "output_path"]

logger = logging.getLogger(__name__)


def output_path(suffix: str) -> Path:
    """A new, empty file in Gradio's cache folder under a name of its own.

    Gradio names the files it writes for returned images by their content, so identical requests would rewrite one
    file while another visitor downloads it; a file already in the cache is served as it is, and deleted with the
    app's other temporary files.
    """
    folder = Path(get_upload_folder()) / "mmattn"
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(suffix=suffix, dir=folder)
    os.close(handle)
    return Path(name)


def _as_files(result: Any) -> Any:
    """`result` with every PIL image in it (also inside tuples and lists) saved to an `output_path` PNG."""
    if isinstance(result, Image.Image):
        path = output_path(".png")
        result.save(path)
        return str(path)
    if isinstance(result, (tuple, list)):
        return type(result)(_as_files(item) for item in result)
    return result


def handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` as an event handler: its PIL images returned as files of their own, an `InputError` shown as its one-line
    message, and any other failure as a one-line notice (the traceback goes to the server log, never to the page)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return _as_files(fn(*args, **kwargs))
        except gr.Error:
            raise
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception:
            logger.exception("demo callback %s failed", getattr(fn, "__name__", fn))
            message = "This request failed on the server (its log has the details)."
            raise gr.Error(message, print_exception=False) from None

    return wrapper
