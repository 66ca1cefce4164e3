"""timm's stage-level API, shared by the hierarchical backbones: gradient checkpointing per stage and pruning
the stages past the last feature map taken."""

from __future__ import annotations

import torch
from timm.models._features import feature_take_indices
from torch import nn


class StagesMixin:
    """Over the stage list named by `stages_attr`; each stage has a `grad_checkpointing` flag and may END in a
    `downsample` feeding the next stage (not for stages that begin with theirs, as BiFormer's and LITv2's)."""

    stages_attr: str = "stages"

    @property
    def _stages(self) -> nn.ModuleList | nn.Sequential:
        return getattr(self, self.stages_attr)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self._stages:
            stage.grad_checkpointing = enable

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self._stages), indices)
        setattr(self, self.stages_attr, self._stages[: max_index + 1])
        # The last kept stage's downsampler fed the stages just removed: its output would go unused and its
        # parameters get no gradient, which DistributedDataParallel rejects (unless find_unused_parameters).
        if getattr(self._stages[-1], "downsample", None) is not None:
            self._stages[-1].downsample = None
        if prune_norm and hasattr(self, "norm"):
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    @staticmethod
    def _check_output_fmt(output_fmt: str) -> None:
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
