"""Errors of the demo's callbacks reach the page as a message, never as a traceback."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

import gradio as gr

__all__ = ["shown_as_message"]

logger = logging.getLogger(__name__)
Result = TypeVar("Result")


def shown_as_message(fn: Callable[..., Result]) -> Callable[..., Result]:
    """`fn` with any exception turned into a `gr.Error` carrying its message (the traceback goes to the log)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Result:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            logger.exception("demo callback %s failed", getattr(fn, "__name__", fn))
            raise gr.Error(f"{type(error).__name__}: {error}", print_exception=False) from error

    return wrapper
