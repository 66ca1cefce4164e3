"""timm registration shared by the model families: the default-cfg base and the builder of getter backbones."""

from __future__ import annotations

from collections.abc import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from torch import nn


def imagenet_cfg(url: str = "", **kwargs) -> dict:
    """timm's default cfg of an ImageNet-1k classifier at 224 (bicubic, 0.875 crop, 7x7 last map); `kwargs`
    override or add keys."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


def agent_attention_cfg(file_id: str, **kwargs) -> dict:
    """`imagenet_cfg` of an official Agent Attention checkpoint (LeapLabTHU's Tsinghua cloud file `file_id`)."""
    url = f"https://cloud.tsinghua.edu.cn/f/{file_id}/?dl=1"
    return imagenet_cfg(url, paper_ids="arXiv:2312.08874", **kwargs)


def build_getter_model(
    cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    checkpoint_filter_fn: Callable,
    default_out_indices: int | tuple[int, ...],
    **kwargs,
) -> nn.Module:
    """timm's `build_model_with_cfg`, whose ``features_only`` model gives the maps of ``forward_intermediates`` (timm's
    feature getter) at the ``out_indices`` keyword, else at ``default_out_indices`` (the keyword is ignored without
    ``features_only``)."""
    feature_cfg = {"out_indices": kwargs.pop("out_indices", default_out_indices), "feature_cls": "getter"}
    return build_model_with_cfg(
        cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **kwargs
    )
