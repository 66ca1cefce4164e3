"""timm's classifier API, shared by the backbones whose head is a linear layer over average-pooled features."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.init import trunc_normal_


class PooledClassifierMixin:
    """`forward_head` / `forward` / `get_classifier` / `reset_classifier` over `self.head`, `self.head_drop`,
    `self.global_pool` ("avg" or "") and `self.num_features`; `pool_dims` are the axes the average pools over."""

    pool_dims: tuple[int, ...] = (2, 3)

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
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = next(self.parameters())  # the new head lives where the model does, in its mode
        dd = {"device": like.device, "dtype": like.dtype}
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=self.pool_dims)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
