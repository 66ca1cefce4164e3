"""timm's stage-level API, shared by the hierarchical backbones: the stage maps (`forward_features`,
`forward_intermediates`), gradient checkpointing per stage, pruning the stages past the last feature map taken, and
the parameter groups of layer-wise learning-rate decay. Also what building the stages shares: the drop-path rates
per stage and timm's `feature_info`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn


def stage_drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic depth rising linearly from 0 to `drop_path_rate` over all the blocks, one list per stage."""
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    return [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(len(depths))]


class StagesMixin:
    """Over the stage list named by `stages_attr`; each stage has a `grad_checkpointing` flag and takes and gives maps
    in `output_fmt`. With `trailing_downsample` a stage may END in a `downsample` feeding the next stage
    (NAT, Agent-Swin) and returns (its map before the downsampler, the next stage's input); without, each stage
    begins with its own (BiFormer, LITv2, Agent-PVT's patch embedding; as in timm's ConvNeXt) and returns its map.
    A final `norm`, where the model has one, is sized for the last stage."""

    stages_attr: str = "stages"
    output_fmt: str = "NCHW"
    """The layout of the stage maps, "NCHW" or "NHWC" (timm's attribute)."""
    trailing_downsample: bool = True
    stem_pattern: str = r"^patch_embed"
    """The parameters before the first stage (a regular expression over parameter names)."""
    downsample_pattern: str = "downsample"
    """A stage's downsampler, by its names within the stage."""

    @property
    def _stages(self) -> nn.ModuleList | nn.Sequential:
        return getattr(self, self.stages_attr)

    def _stage_feature_info(self, num_chs: Sequence[int]) -> list[dict]:
        """timm's `feature_info`: stage i gives a map of `num_chs[i]` channels at stride `4 * 2**i`."""
        module = self.stages_attr
        return [{"num_chs": c, "reduction": 4 * 2**i, "module": f"{module}.{i}"} for i, c in enumerate(num_chs)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, then stage by stage (`coarse`) or block
        by block, each downsampler with the block beside it in the data flow, the final norm with the last block."""
        stage = rf"^{self.stages_attr}\.(\d+)"
        if coarse:
            return {"stem": self.stem_pattern, "blocks": stage}
        downsample = MATCH_PREV_GROUP if self.trailing_downsample else (0,)  # after its stage's blocks, or before
        blocks = [(rf"{stage}\.blocks\.(\d+)", None), (rf"{stage}\.{self.downsample_pattern}", downsample),
                  (r"^norm", MATCH_PREV_GROUP)]
        return {"stem": self.stem_pattern, "blocks": blocks}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self._stages:
            stage.grad_checkpointing = enable

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self._stages), indices)
        prune_end = max_index < len(self._stages) - 1
        setattr(self, self.stages_attr, self._stages[: max_index + 1])
        # The last kept stage's downsampler fed the stages just removed: its output would go unused and its
        # parameters get no gradient, which DistributedDataParallel rejects (unless find_unused_parameters).
        if self.trailing_downsample and getattr(self._stages[-1], "downsample", None) is not None:
            self._stages[-1].downsample = None
        if (prune_norm or prune_end) and hasattr(self, "norm"):
            self.norm = nn.Identity()
        if prune_end:  # the features now end at the last kept stage
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """The image to the first stage's input (the stem); identity where the first stage embeds itself."""
        return x

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the stage's map, the next stage's input): two maps where the stage ends in a downsampler."""
        if self.trailing_downsample:
            return stage(x)
        x = stage(x)
        return x, x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm on the last stage's map; identity where the model has none."""
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map after the final norm, in `output_fmt`."""
        x = self._embed(x)
        for stage in self._stages:
            _, x = self._run_stage(stage, x)
        return self._final_norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's API: each stage's map at `indices` (before its trailing downsampler, if any); `norm` applies the
        final norm to the last stage's map."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self._stages), indices)
        stages = self._stages if not stop_early else self._stages[: max_index + 1]
        last = len(self._stages) - 1
        x = self._embed(x)
        intermediates = []
        for i, stage in enumerate(stages):
            feature, x = self._run_stage(stage, x)
            if i in take_indices:
                feature = self._final_norm(feature) if norm and i == last else feature
                if output_fmt != self.output_fmt:
                    feature = feature.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feature.permute(0, 3, 1, 2)
                intermediates.append(feature)
        if intermediates_only:
            return intermediates
        return (self._final_norm(x) if len(stages) - 1 == last else x), intermediates
