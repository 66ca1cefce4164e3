"""Radial attention under diffusers' own context parallelism (`enable_parallelism`), in gloo processes on the CPU:
the parallel output equals the single-process output on a tiny Wan transformer."""

import pytest
import torch

from mmattn.diffusion import RadialConfig, VideoGrid, apply_radial_attention, attention
from mmattn.diffusion.masks import radial_mask

from ..gloo import run_gloo
from .tiny_models import wan

diffusers = pytest.importorskip("diffusers")

CONFIG = RadialConfig(block_size=16, decay_factor=0.5)
GRID = {"frames": 5, "height": 16, "width": 32}  # 5 frames x 128 tokens: shards of 320 or 160 tokens
# LTX, the other transformer with a diffusers context-parallel plan, cannot run it on the CPU: under Ulysses its
# masked cross-attention hits diffusers' unsharded mask heads (huggingface/diffusers#14316), and ring needs the
# log-sum-exp that diffusers' only CPU backend ("native") does not give.
MODELS = {"wan": lambda: wan(**GRID)}


def test_the_radial_mask_is_sparse_on_the_test_grid():
    mask = radial_mask(GRID["frames"], 128, block_size=CONFIG.block_size, decay_factor=CONFIG.decay_factor)
    assert mask.density() < 0.8


def _parallel_equals_single_process(rank, world, family, degrees):
    # diffusers places rank r on accelerator r % device_count, which is 0 on a CPU-only machine.
    torch.accelerator.device_count = lambda: 1
    model, inputs = MODELS[family]()
    calls = []
    sharded_attention = attention.context_parallel_attention
    attention.context_parallel_attention = lambda *args, **kwargs: calls.append(1) or sharded_attention(*args, **kwargs)
    with torch.no_grad(), apply_radial_attention(model, CONFIG):
        expected = model(**inputs)[0]
        model.enable_parallelism(config=diffusers.ContextParallelConfig(**degrees))
        sharded = model(**inputs)[0]
    assert len(calls) == len(model.blocks), "every self-attention layer runs the sharded Radial attention"
    torch.testing.assert_close(sharded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("degrees", [{"ulysses_degree": 2}, {"ring_degree": 2}], ids=["ulysses", "ring"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_context_parallel_radial_matches_one_process(family, degrees):
    run_gloo(_parallel_equals_single_process, 2, family, degrees)


def _sharded_tokens_must_match_the_grid(rank, world):
    torch.accelerator.device_count = lambda: 1
    model, _ = wan(**GRID)
    with apply_radial_attention(model, CONFIG):
        model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=2))
        radial = model.blocks[1].attn1.processor.radial
        radial.set_grid(VideoGrid(5, 8, 16))
        query = torch.zeros(1, 7, 2, 12)
        with pytest.raises(ValueError, match="query: expected a shard of 640 video tokens"):
            radial.attend(query, query, query, layer_index=1, dense=None, parallel_config=model._parallel_config)


def test_shard_mismatch_is_named():
    run_gloo(_sharded_tokens_must_match_the_grid, 2)
