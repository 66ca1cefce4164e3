"""The demo's inputs, each bounded where it is declared.

A field is one input as the page names it and what it accepts. It builds its Gradio component with those bounds
(`minimum=`/`maximum=`, `max_length=`, the choices), the callbacks run the same check for API and Python callers, and
whatever Gradio's own preprocessing refuses becomes the field's one-line message (`checked`). No message echoes the
value received: a visitor's 100k-character text or a server path stays out of it.
"""

from __future__ import annotations

import abc
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
from PIL import Image, ImageOps

__all__ = ["Choice", "Clip", "Flag", "InputError", "Number", "Picture", "Text", "checked"]

Component = TypeVar("Component", bound=gr.components.Component)


class InputError(ValueError):
    """A bad input: one line that names the field and what it accepts."""


def checked(component: Component, field: Field) -> Component:
    """`component` with `field` as the last step of its preprocessing and as its API type.

    Anything Gradio's own preprocessing raises (a corrupt upload, "NaN" for a number, a value out of range or not
    among the choices) becomes `gr.Error(field.message)`. Both methods are replaced on this instance only: a
    subclass of a Gradio component would make Gradio write a .pyi stub next to this module on import.
    """
    preprocess, api_info = component.preprocess, component.api_info

    def preprocess_and_check(payload: Any) -> Any:
        try:
            value = preprocess(payload)
        except Exception:
            raise gr.Error(field.message, print_exception=False) from None
        try:
            return field(value)
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None

    component.preprocess = preprocess_and_check
    component.api_info = lambda: field.api_info(api_info())
    return component


@dataclass(frozen=True)
class Field(abc.ABC):
    """One input: its label on the page, what it accepts and the check that returns the value the callback gets."""

    label: str

    @property
    @abc.abstractmethod
    def accepts(self) -> str: ...

    @abc.abstractmethod
    def __call__(self, value: Any) -> Any: ...

    @property
    def message(self) -> str:
        return f"{self.label}: expected {self.accepts}"

    def api_info(self, info: dict[str, Any]) -> dict[str, Any]:
        """The API type of the component's values, from Gradio's `info` for it."""
        return info


@dataclass(frozen=True)
class Number(Field):
    """A number in [low, high]; with `step` 1, a whole number (passed on as an int)."""

    low: float
    high: float
    step: float = 1

    @property
    def accepts(self) -> str:
        return f"a {'whole ' if self.step == 1 else ''}number from {self.low:g} to {self.high:g}"

    def __call__(self, value: Any) -> int | float:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not self.low <= value <= self.high or (self.step == 1 and value != int(value))):
            raise InputError(self.message)
        return int(value) if self.step == 1 else float(value)

    def slider(self, value: float, **kwargs: Any) -> gr.Slider:
        return checked(gr.Slider(self.low, self.high, value=value, step=self.step, label=self.label,
                                 precision=0 if self.step == 1 else None, **kwargs), self)

    def box(self, value: float, **kwargs: Any) -> gr.Number:
        return checked(gr.Number(value, minimum=self.low, maximum=self.high, label=self.label,
                                 precision=0 if self.step == 1 else None, **kwargs), self)


@dataclass(frozen=True)
class Choice(Field):
    """One of `options` (with `many`, a list of them); ints stay ints, in the API too."""

    options: tuple[str, ...] | tuple[int, ...]
    many: bool = False

    @property
    def accepts(self) -> str:
        return f"{'any' if self.many else 'one'} of {', '.join(map(str, self.options))}"

    def _option(self, value: Any) -> str | int:
        for option in self.options:
            if type(value) is type(option) and value == option:
                return option
        raise InputError(self.message)

    def __call__(self, value: Any) -> str | int | list[str | int]:
        if not self.many:
            return self._option(value)
        if not isinstance(value, (list, tuple)):
            raise InputError(self.message)
        return [self._option(item) for item in value]

    def api_info(self, info: dict[str, Any]) -> dict[str, Any]:
        """Ints as an integer with the options in its description: Gradio's client shows any enum as strings."""
        if not isinstance(self.options[0], int):
            return info
        return {"type": "integer", "description": self.accepts}

    def dropdown(self, value: str | int, **kwargs: Any) -> gr.Dropdown:
        return checked(gr.Dropdown(list(self.options), value=value, label=self.label, **kwargs), self)

    def radio(self, value: str | int, **kwargs: Any) -> gr.Radio:
        return checked(gr.Radio(list(self.options), value=value, label=self.label, **kwargs), self)

    def checkboxes(self, value: Sequence[str], **kwargs: Any) -> gr.CheckboxGroup:
        return checked(gr.CheckboxGroup(list(self.options), value=list(value), label=self.label, **kwargs), self)


@dataclass(frozen=True)
class Text(Field):
    """Text of at most `max_chars` characters; `required`: with something besides white space."""

    max_chars: int
    required: bool = False

    @property
    def accepts(self) -> str:
        return f"text of {'1 to' if self.required else 'at most'} {self.max_chars} characters"

    def __call__(self, value: Any) -> str:
        if value is None and not self.required:
            return ""
        if not isinstance(value, str) or len(value) > self.max_chars or (self.required and not value.strip()):
            raise InputError(self.message)
        return value

    def textbox(self, value: str, **kwargs: Any) -> gr.Textbox:
        return checked(gr.Textbox(value, label=self.label, max_length=self.max_chars, **kwargs), self)


@dataclass(frozen=True)
class Flag(Field):
    """A check box: true or false."""

    @property
    def accepts(self) -> str:
        return "true or false"

    def __call__(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise InputError(self.message)
        return value

    def checkbox(self, value: bool, **kwargs: Any) -> gr.Checkbox:
        return checked(gr.Checkbox(value, label=self.label, **kwargs), self)


@dataclass(frozen=True)
class Picture(Field):
    """A picture (a PIL image or an image file) of at most `max_pixels`, refused from its header before decoding;
    passed on as RGB, downscaled while it is decoded so that its longer side is at most `side`."""

    max_pixels: int
    side: int

    @property
    def accepts(self) -> str:
        return f"a picture (PNG, JPEG, WebP, ...) of at most {self.max_pixels / 1e6:g} megapixels"

    def __call__(self, value: Any) -> Image.Image:
        try:
            if isinstance(value, Image.Image):
                return self._reduced(self._bounded(value).copy())  # the caller's image stays as it is
            with Image.open(value) as picture:  # reads the header only
                return self._reduced(self._bounded(picture))
        except InputError:
            raise
        except Exception:  # PIL's errors for no picture, a file that is not one, truncated or too large to open
            raise InputError(self.message) from None

    def _bounded(self, picture: Image.Image) -> Image.Image:
        if picture.width * picture.height > self.max_pixels:
            raise InputError(self.message)
        return picture

    def _reduced(self, picture: Image.Image) -> Image.Image:
        picture.thumbnail((self.side, self.side))  # decodes JPEGs at a reduced scale (draft mode)
        return ImageOps.exif_transpose(picture).convert("RGB")

    def image(self, value: Image.Image | None, **kwargs: Any) -> gr.Image:
        return checked(gr.Image(value, type="filepath", image_mode=None, label=self.label, **kwargs), self)


@dataclass(frozen=True)
class Clip(Field):
    """A video file (its path passed on), read by PyAV from its header and packets: nothing is decoded."""

    max_frames: int
    min_side: int

    @property
    def accepts(self) -> str:
        return (f"a video file (MP4, WebM, ...) of 1 to {self.max_frames} frames of at least "
                f"{self.min_side}x{self.min_side} pixels")

    def __call__(self, value: Any) -> str:
        self.probe(value)
        return str(value)

    def probe(self, value: Any) -> tuple[int, int, int]:
        """(frames, height, width) of the video file `value`."""
        import av

        if not isinstance(value, (str, Path)):
            raise InputError(self.message)
        try:
            with av.open(str(value)) as container:
                stream = container.streams.video[0]
                height, width = stream.codec_context.height, stream.codec_context.width
                packets = (packet for packet in container.demux(stream) if packet.size)
                frames = stream.frames or sum(1 for _ in itertools.islice(packets, self.max_frames + 1))
        except Exception:  # PyAV's errors for files that are not videos or have no video stream
            raise InputError(self.message) from None
        if not 1 <= frames <= self.max_frames or min(height, width) < self.min_side:
            raise InputError(self.message)
        return frames, height, width

    def video(self, **kwargs: Any) -> gr.Video:
        return checked(gr.Video(label=self.label, sources=["upload"], **kwargs), self)
