"""A tensor derived from parameters (a position or agent bias), kept between forwards while no gradient is needed.

Inference at small batch is bound by host time, one launch per op; a bias rebuilt from its tables on every forward
costs several launches per layer. The cache is rebuilt when its key or any source parameter changes (new storage,
or an in-place update such as an optimizer step or ``load_state_dict``), and bypassed while gradients flow to the
parameters or under ``torch.compile`` (which folds the computation into its graph anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

__all__ = ["InferenceCache"]


class InferenceCache:
    """One cached value; ``get(key, params, compute)`` returns ``compute()``, reused while key and params hold.
    Callers check ``applies(params)`` first and compute directly where it fails."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Any = None

    @staticmethod
    def applies(params: Iterable[torch.Tensor]) -> bool:
        """True when no gradient flows to ``params`` and no graph is being compiled."""
        return not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in params)
        )

    def get(self, key: Hashable, params: Iterable[torch.Tensor], compute: Callable[[], Any]) -> Any:
        """The kept value, or a fresh ``compute()``; call it only where ``applies(params)`` holds."""
        full_key = (key, *((p.data_ptr(), p._version) for p in params))
        if full_key != self._key:
            self._key, self._value = full_key, compute()
        return self._value
