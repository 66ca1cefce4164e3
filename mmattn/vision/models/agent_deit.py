"""Agent-DeiT (Agent Attention, ECCV 2024): DeiT whose first blocks use agent attention, on timm's VisionTransformer.

Official code: LeapLabTHU/Agent-Attention, agent_transformer/models/agent_deit.py. The cls token gets its own agent
biases (``ac_bias`` agent->cls, ``ca_bias`` cls->agents) and no DWC; agents are pooled from the patch queries only.
"""

from __future__ import annotations

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from timm.models.vision_transformer import (
    checkpoint_filter_fn as vit_checkpoint_filter_fn,
)

from mmattn.kernels.backends import check_backend

from ..layers.agent import AGENT_BACKENDS, AgentAttention, resize_grid_bias
from ._factory import agent_attention_cfg, build_getter_model

__all__ = ["AgentVisionTransformer", "checkpoint_filter_fn"]


class AgentVisionTransformer(VisionTransformer):
    """DeiT whose first ``agent_layers`` blocks run agent attention; ``agent_num`` is one count or one per block.

    ``backend`` of the agent blocks: "auto" (agent attention with fewer launches) or "torch" (the official order).
    """

    def __init__(
        self,
        *,
        agent_num: int | list[int] = 49,
        agent_layers: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        check_backend(backend, AGENT_BACKENDS)
        super().__init__(device=device, dtype=dtype, **kwargs)
        depth = len(self.blocks)
        agent_layers = depth if agent_layers is None else agent_layers
        if not 0 <= agent_layers <= depth:
            raise ValueError(f"agent_layers must be in [0, {depth}], got {agent_layers}")
        counts = [agent_num] * depth if isinstance(agent_num, int) else list(agent_num)
        if len(counts) != depth:
            raise ValueError(f"agent_num must be an int or {depth} ints (one per block), got {agent_num!r}")
        dim, heads = self.embed_dim, self.blocks[0].attn.num_heads
        for block, count in zip(self.blocks[:agent_layers], counts):
            block.attn = AgentAttention(
                dim,
                heads,
                count,
                self.patch_embed.grid_size,
                num_prefix_tokens=self.num_prefix_tokens,
                qkv_bias=block.attn.qkv.bias is not None,
                attn_drop=block.attn.attn_drop.p,
                proj_drop=block.attn.proj_drop.p,
                backend=backend,
                device=device,
                dtype=dtype,
            )
            block.attn.apply(init_weights_vit_timm)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentVisionTransformer) -> dict[str, torch.Tensor]:
    """Official Agent-DeiT checkpoint (``ckpt['model']``) -> ours: timm's ViT conversion (pos_embed resampling)
    plus the fine-tune loader's linear resize of the row/column agent biases to the model's patch grid."""
    state_dict = vit_checkpoint_filter_fn(state_dict, model)
    grid = model.patch_embed.grid_size
    return {key: resize_grid_bias(key.rsplit(".", 1)[-1], value, grid) for key, value in state_dict.items()}


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    kwargs.setdefault("dynamic_img_size", True)  # square inputs of any size; agent biases follow the grid
    return build_getter_model(AgentVisionTransformer, variant, pretrained, checkpoint_filter_fn, 3, **kwargs)


def _cfg(file_id: str, **kwargs) -> dict:
    return agent_attention_cfg(file_id, pool_size=None, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "agent_deit_tiny.in1k": _cfg("57e0904221824ee7b7af"),
        "agent_deit_small.in1k": _cfg("fdd43304372541db8ea7"),
        "agent_deit_small.in1k_448": _cfg("a228f86241c445f1969b", input_size=(3, 448, 448), crop_pct=1.0),
        "agent_deit_base.in1k": _cfg("5115f15fdd7e4ab58fbc"),
    }
)


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    model_args = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, "agent_num": 49}
    return _create_agent_deit("agent_deit_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    model_args = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "agent_num": 49,
                  "drop_path_rate": 0.1}  # fmt: skip
    return _create_agent_deit("agent_deit_small", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    model_args = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "agent_num": 81, "agent_layers": 4,
                  "drop_path_rate": 0.3}  # fmt: skip
    return _create_agent_deit("agent_deit_base", pretrained, **dict(model_args, **kwargs))
