"""The ``backend`` attribute of an attention module, checked whenever it is set (in the constructor and later)."""

from __future__ import annotations

from torch import nn

from mmattn.kernels.backends import check_backend


class CheckedBackend:
    """Class attribute ``backend = CheckedBackend(choices)``: setting a value outside ``choices`` raises
    ``check_backend``'s ValueError; the value is kept in ``_backend``."""

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> str | CheckedBackend:
        return self if module is None else module._backend

    def __set__(self, module: nn.Module, value: str) -> None:
        module._backend = check_backend(value, self.choices)
