"""What each vision attention design looks at, read from one forward pass of a timm model.

Every map is a `(rows, cols)` grid over the attention layer's token map, for `rendering.grid_overlay`:
BiFormer's routed regions (Bi-level Routing Attention) for a query, NAT/DiNAT's neighborhood window,
LITv2's HiLo Hi-Fi / Lo-Fi outputs and the agent tokens' attention of Agent Attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from mmattn.kernels import Neighborhood

__all__ = ["AttentionMap", "attention_maps"]

AttentionMap = tuple[str, np.ndarray]  # (caption, (rows, cols) values; NaN = not attended)


@contextlib.contextmanager
def _recorded_inputs(module: nn.Module) -> Iterator[list[tuple[tuple, dict]]]:
    """Records the (args, kwargs) of every call of `module` while the block runs; the hook is removed after."""
    calls: list[tuple[tuple, dict]] = []
    hook = module.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


@contextlib.contextmanager
def _recorded_results(module: nn.Module, method: str) -> Iterator[list]:
    """Records what `module.<method>` returns while the block runs (an instance attribute, deleted after)."""
    results: list = []
    original: Callable = getattr(module, method)

    def recording(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    setattr(module, method, recording)
    try:
        yield results
    finally:
        delattr(module, method)


def _first(model: nn.Module, kind: str, accept: Callable[[nn.Module], bool] = lambda _: True) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == kind and accept(m)]


def _cell(query: tuple[float, float], rows: int, cols: int) -> tuple[int, int]:
    """The (row, col) of a query given as (x, y) fractions of the image width and height."""
    x, y = (min(max(float(v), 0.0), 1.0 - 1e-9) for v in query)
    return int(y * rows), int(x * cols)


def _routing_maps(model: nn.Module, image: torch.Tensor, query: tuple[float, float]) -> list[AttentionMap]:
    (bra, *_) = _first(model, "BiLevelRoutingAttention", lambda m: m.topk > 1)
    with _recorded_inputs(bra) as calls, _recorded_results(bra, "route") as routes:
        model(image)
    height, width = calls[0][0][0].shape[1:3]
    n_win = bra.n_win
    region = _cell(query, n_win, n_win)
    grid = np.full((n_win, n_win), np.nan)
    for index in routes[0][0, region[0] * n_win + region[1]].tolist():
        grid[divmod(index, n_win)] = 1.0
    grid[region] = 0.5
    caption = (f"BRA, first block routing to several regions ({height}x{width} tokens, {n_win}x{n_win} regions): the query's region (teal) "
               f"and the top-{bra.topk} regions it routes to (yellow)")
    return [(caption, grid)]


def _neighborhood_maps(model: nn.Module, image: torch.Tensor, query: tuple[float, float]) -> list[AttentionMap]:
    layers = _first(model, "NeighborhoodAttention", lambda m: m.spatial_dims == 2)[:2]
    with contextlib.ExitStack() as stack:
        calls = [stack.enter_context(_recorded_inputs(layer)) for layer in layers]
        model(image)
    maps = []
    for index, (layer, recorded) in enumerate(zip(layers, calls)):
        rows, cols = recorded[0][0][0].shape[1:3]
        nbhd = Neighborhood.create((rows, cols), layer.kernel_size, layer.dilation)
        row, col = _cell(query, rows, cols)
        keys, valid, _ = nbhd.neighbors(row * cols + col, row * cols + col + 1)
        grid = np.full(rows * cols, np.nan)
        grid[keys[valid].numpy()] = 1.0
        grid[row * cols + col] = 0.5
        caption = (f"block {index + 1}: {layer.kernel_size[0]}x{layer.kernel_size[1]} neighborhood, "
                   f"dilation {layer.dilation[0]}, on {rows}x{cols} tokens")
        maps.append((caption, grid.reshape(rows, cols)))
    return maps


def _hilo_maps(model: nn.Module, image: torch.Tensor, query: tuple[float, float]) -> list[AttentionMap]:
    (hilo, *_) = _first(model, "HiLoAttention", lambda m: m.h_heads > 0 and m.l_heads > 0)
    with _recorded_inputs(hilo) as calls:
        model(image)
    x = calls[0][0][0]
    return [
        (f"Hi-Fi heads ({hilo.h_heads}, {hilo.window_size}x{hilo.window_size} windows): output norm, high frequencies",
         hilo.hifi(x)[0].norm(dim=-1).numpy()),
        (f"Lo-Fi heads ({hilo.l_heads}, keys pooled {hilo.window_size}x): output norm, low frequencies",
         hilo.lofi(x)[0].norm(dim=-1).numpy()),
    ]


def _agent_maps(model: nn.Module, image: torch.Tensor, query: tuple[float, float]) -> list[AttentionMap]:
    (agent, *_) = _first(model, "AgentAttention", lambda m: m.agent_num > 0)
    with _recorded_inputs(agent) as calls:
        model(image)
    (x, *rest), kwargs = calls[0]
    batch, tokens, channels = x.shape
    hw = kwargs.get("hw", rest[0] if rest else None)
    h, w = agent._grid(tokens, hw)
    heads, prefix = agent.num_heads, agent.num_prefix_tokens
    q, k, _ = agent.qkv(x).reshape(batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4).unbind(0)
    grid_q = q[:, :, prefix:].transpose(-1, -2).reshape(batch, channels, h, w)
    agents = torch.nn.functional.adaptive_avg_pool2d(grid_q, agent.agent_pool)
    agents = agents.reshape(batch, heads, channels // heads, -1).transpose(-1, -2)
    agent_to_key, _ = agent._agent_biases(h, w)
    attention = torch.softmax((agents * agent.scale) @ k.transpose(-1, -2) + agent_to_key, dim=-1)
    patches = attention[0, :, :, prefix:].mean(0).reshape(-1, h, w)  # (agents, h, w), head mean
    pool = agent.agent_pool
    picked = _cell(query, pool, pool)
    chosen = picked[0] * pool + picked[1]
    caption = (f"agent token {chosen} (pooled from query cell {picked} of {pool}x{pool}): its attention over the "
               f"{h}x{w} patches, head mean")
    return [(caption, patches[chosen].numpy())]


_FAMILIES: dict[str, Callable[[nn.Module, torch.Tensor, tuple[float, float]], list[AttentionMap]]] = {
    "biformer": _routing_maps,
    "nat": _neighborhood_maps,
    "dinat": _neighborhood_maps,
    "litv2": _hilo_maps,
    "agent": _agent_maps,
}


@torch.no_grad()
def attention_maps(model_name: str, model: nn.Module, image: torch.Tensor, query: tuple[float, float]) -> list[AttentionMap]:
    """The maps of `model`'s family (from the timm name) for a `(1, 3, H, W)` image and a query point `(x, y)`
    given as fractions of the width and height; an empty list for families without attention maps (ELA)."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, 3, H, W), got shape {tuple(image.shape)}")
    family = model_name.split("_")[0]
    maps = _FAMILIES.get(family)
    if maps is None:
        return []
    return maps(model, image, query)
