"""CNNs with ELA (Efficient Local Attention, arXiv 2403.01123) gates: ela_resnet18, ela_resnet50, ela_mobilenetv2.

Where ELA is inserted, and why: like SE and Coordinate Attention (the gates ELA replaces in the paper), it sits in
every residual block's residual branch, on the branch's final feature map, before the addition. ResNet: after the
last conv + BN of each BasicBlock / Bottleneck, before the shortcut sum (timm's ``attn_layer`` slot), so the gate
re-weights exactly what the block adds to the identity path. MobileNetV2: after the depthwise conv + BN + ReLU6 of
each (inverted) residual block, before the linear projection (timm's ``se_layer`` slot), where the expanded map
still carries the spatial detail the strip convolutions localize. Variants: ELA-B for ResNet-18 (shallow net),
ELA-S for ResNet-50 and MobileNetV2 (the paper's MobileNetV2 result; its widths 32..960 all fit GroupNorm(16) and
8-channel conv groups, while 144 breaks ELA-T's GroupNorm(32)). Pass ``ela_variant=`` to pick another one.

There are no official checkpoints; ``checkpoint_filter_fn`` loads the de-facto ELA key names (``con1``, ``GN``).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._efficientnet_builder import (
    decode_arch_def,
    resolve_act_layer,
    resolve_bn_args,
)
from timm.models.efficientnet import EfficientNet, _create_effnet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ..layers.ela import ELA
from ._factory import imagenet_cfg

__all__ = ["checkpoint_filter_fn", "ela_gate"]

# MobileNetV2 (timm's ``mobilenetv2_100`` arch strings) with a gate slot (``se1``) in every block.
_MOBILENETV2_ARCH = [
    ["ds_r1_k3_s1_se1_c16"],
    ["ir_r2_k3_s2_e6_se1_c24"],
    ["ir_r3_k3_s2_e6_se1_c32"],
    ["ir_r4_k3_s2_e6_se1_c64"],
    ["ir_r3_k3_s1_e6_se1_c96"],
    ["ir_r3_k3_s2_e6_se1_c160"],
    ["ir_r1_k3_s1_e6_se1_c320"],
]
_DEFACTO_KEY_NAMES = ((".con1.", ".conv."), (".GN.", ".norm."))


def ela_gate(variant: str):
    """An ELA factory with the signature of timm's attention slots (``attn_layer`` / ``se_layer``)."""

    def make(channels: int, act_layer: type[nn.Module] | None = None, **factory) -> ELA:
        return ELA(channels, variant, **factory)  # ELA has no activation besides its sigmoid: act_layer is unused

    return make


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Unwrap ``model``/``state_dict`` containers and rename the de-facto ELA keys (``con1``, ``GN``) to ours."""
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    out = {}
    for key, value in state_dict.items():
        for old, new in _DEFACTO_KEY_NAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def _create_ela_resnet(variant: str, pretrained: bool, ela_variant: str, **kwargs) -> ResNet:
    block_args = dict(kwargs.pop("block_args", {}), attn_layer=ela_gate(ela_variant))
    return build_model_with_cfg(
        ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, block_args=block_args, **kwargs
    )


def _create_ela_mobilenetv2(variant: str, pretrained: bool, ela_variant: str, **kwargs) -> EfficientNet:
    model_kwargs = dict(
        block_args=decode_arch_def(_MOBILENETV2_ARCH),
        num_features=1280,
        stem_size=32,
        se_layer=ela_gate(ela_variant),
        norm_layer=kwargs.pop("norm_layer", None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, "relu6"),
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )
    return _create_effnet(variant, pretrained, **model_kwargs)


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(interpolation="bilinear", license="apache-2.0", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "ela_resnet18.untrained": _cfg(first_conv="conv1", classifier="fc"),
        "ela_resnet50.untrained": _cfg(first_conv="conv1", classifier="fc"),
        "ela_mobilenetv2.untrained": _cfg(first_conv="conv_stem", classifier="classifier"),
    }
)


@register_model
def ela_resnet18(pretrained: bool = False, ela_variant: str = "B", **kwargs) -> ResNet:
    """ResNet-18 with an ELA-B gate in every BasicBlock."""
    return _create_ela_resnet("ela_resnet18", pretrained, ela_variant, block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)


@register_model
def ela_resnet50(pretrained: bool = False, ela_variant: str = "S", **kwargs) -> ResNet:
    """ResNet-50 with an ELA-S gate in every Bottleneck."""
    return _create_ela_resnet("ela_resnet50", pretrained, ela_variant, block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)


@register_model
def ela_mobilenetv2(pretrained: bool = False, ela_variant: str = "S", **kwargs) -> EfficientNet:
    """MobileNetV2 (width 1.0) with an ELA-S gate after every depthwise conv."""
    return _create_ela_mobilenetv2("ela_mobilenetv2", pretrained, ela_variant, **kwargs)
