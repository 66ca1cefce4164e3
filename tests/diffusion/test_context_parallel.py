"""Radial, STA and NABLA attention under diffusers' own context parallelism (`enable_parallelism`), in gloo
processes on the CPU: the parallel output equals the single-process output on a tiny Wan transformer."""

import pytest
import torch
import torch.distributed as dist

from mmattn.diffusion import (
    NABLAConfig,
    RadialConfig,
    STAConfig,
    VideoGrid,
    apply_radial_attention,
    apply_sparse_attention,
    attention,
)
from mmattn.diffusion.masks import radial_mask
from mmattn.kernels import BlockSparseMask
from mmattn.kernels.distributed import context_parallel_attention

from ..gloo import run_gloo
from .test_radial import _double
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


# STA and NABLA: the mask lives in a 3D tile order. Ulysses permutes after its all-to-all (each rank then holds the
# whole sequence), so any shard works; ring attention needs every ring shard to hold whole tile layers (frames).
STA = STAConfig(tile=(2, 4, 4), window=(1, 1, 3))  # 32-token tiles = blocks
NABLA = NABLAConfig(threshold=0.6, tile=(1, 8, 4), window=(1, 1, 1))  # 32-token blocks, a mask per layer and call
TILED = {"sta": STA, "nabla": NABLA}
UNEVEN = {"frames": 5, "height": 16, "width": 32}  # 2 shards of 2.5 frames (8 x 16 tokens): tiles straddle them
EVEN = {"frames": 4, "height": 16, "width": 32}  # 2 shards of 2 frames: whole tile layers per shard


def _record_masks(module, name, calls):
    """Wraps `module.name` (a kernel entry point taking the mask as 4th argument) to record its masks."""
    function = getattr(module, name)
    setattr(module, name, lambda *args, **kwargs: calls.append(args[3]) or function(*args, **kwargs))
    return function


def _tiled_parallel_equals_single_process(rank, world, grid, degrees):
    torch.accelerator.device_count = lambda: 1
    for pattern, config in TILED.items():
        model, inputs = wan(**grid)
        model, inputs = model.double(), _double(inputs)
        with torch.no_grad():
            stock = model(**inputs)[0]
        step = [0]  # NABLA builds its masks anew in a new step: the sharded run cannot reuse the single-process ones
        with torch.no_grad(), apply_sparse_attention(model, config, step_source=lambda: (step[0], 10)) as handle:
            single, sharded = [], []
            kernel = _record_masks(attention, "block_sparse_attention", single)
            expected = model(**inputs)[0]
            attention.block_sparse_attention = kernel
            model.enable_parallelism(config=diffusers.ContextParallelConfig(**degrees))
            step[0] = 1
            cp = _record_masks(attention, "context_parallel_attention", sharded)
            out = model(**inputs)[0]
            attention.context_parallel_attention = cp
            if pattern == "nabla":
                assert handle.radial[0].pattern.cache.builds == 2 * len(model.blocks)
        assert len(sharded) == len(single) == len(model.blocks), f"{pattern}: every layer runs sparse, sharded"
        for s, e in zip(sharded, single):  # every rank builds the very mask of the single process
            assert torch.equal(s.to_dense(), e.to_dense()), pattern
            assert s.density() < 0.8, (pattern, s.density())
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{pattern}: {m}")
        assert not torch.allclose(out, stock, atol=1e-6), f"{pattern}: the mask mattered"


@pytest.mark.parametrize(
    "grid, degrees",
    [(UNEVEN, {"ulysses_degree": 2}), (EVEN, {"ring_degree": 2}), (EVEN, {"ring_degree": 2, "ulysses_degree": 2})],
    ids=["ulysses-tiles-straddle-shards", "ring-whole-tile-layers", "ring-x-ulysses"],
)
def test_context_parallel_sta_and_nabla_match_one_process(grid, degrees):
    """Float64, tiny Wan: the sharded STA / NABLA output equals the single-process one, with the same masks.
    Ring x Ulysses: 4 ranks of 1 frame (128 tokens) each, Ulysses inside each ring rank of 2 frames."""
    world = degrees.get("ring_degree", 1) * degrees.get("ulysses_degree", 1)
    run_gloo(_tiled_parallel_equals_single_process, world, grid, degrees)


def _ring_needs_whole_tile_layers(rank, world):
    torch.accelerator.device_count = lambda: 1
    for config in TILED.values():
        model, inputs = wan(**UNEVEN)
        with torch.no_grad(), apply_sparse_attention(model, config, step_source=lambda: (0, 10)):
            model.enable_parallelism(config=diffusers.ContextParallelConfig(ring_degree=2))
            message = rf"^parallel_config: ring attention \(ring_degree=2\) runs {type(config).__name__} only when"
            with pytest.raises(ValueError, match=message):
                model(**inputs)
    # the kernel itself: a token order that moves tokens between ring shards is refused on every rank
    q = torch.randn(1, 2, 16, 4)
    order = torch.arange(32).roll(1)
    mask = BlockSparseMask.from_dense(torch.ones(2, 2, dtype=torch.bool), 16, 32, 32)
    with pytest.raises(ValueError, match="^order: ring attention keeps the query shards in place"):
        context_parallel_attention(q, q, q, mask, ring_group=dist.group.WORLD, order=order)


def test_ring_refuses_tiles_that_straddle_shards():
    run_gloo(_ring_needs_whole_tile_layers, 2)
