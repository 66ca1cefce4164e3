"""timm's classifier API, shared by the backbones whose head is a linear layer over average-pooled features."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.init import trunc_normal_


class PooledClassifierMixin:
    """`forward_head` / `forward` / `get_classifier` / `reset_classifier` over `self.head`, `self.head_drop`,
    `self.global_pool` ("avg" or "") and `self.num_features`; `pool_dims` are the axes the average pools over. A
    model's `__init__` calls `_init_classifier` first and `_init_head` after its other modules."""

    pool_dims: tuple[int, ...] = (2, 3)

    def _init_classifier(self, in_chans: int, num_classes: int, global_pool: str, num_features: int) -> None:
        """timm's classifier attributes (`global_pool` checked); the head itself comes last, in `_init_head`."""
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, _checked_pool(global_pool)
        self.num_features = self.head_hidden_size = num_features

    def _init_head(self, drop_rate: float, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """The head, after the model's other modules: dropout, then `_linear_head`."""
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._linear_head(self.num_classes, device, dtype)

    def _linear_head(self, num_classes: int, device: torch.device | str | None, dtype: torch.dtype | None) -> nn.Module:
        """`num_features` -> `num_classes` logits (identity for 0 classes)."""
        if num_classes > 0:
            return nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
        return nn.Identity()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = _checked_pool(global_pool)
        self.num_classes = num_classes
        like = next(self.parameters())  # the new head lives where the model does, in its mode
        self.head = self._linear_head(num_classes, like.device, like.dtype)
        self.head.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=self.pool_dims)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _checked_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
    return global_pool
