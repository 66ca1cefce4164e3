"""STA and NABLA through `apply_sparse_attention` on tiny random diffusers transformers.

The oracle is the stock model whose every self-attention call over the video (and the joined text) gets the
token-level mask of the pattern in the model's own token order: STA from the paper's clamped-centre tile rule
on each token's (frame, row, column); NABLA from `nabla_block_mask` of that call's Q/K, expanded through a
tile order computed here from the tile definition (sort by tile, then raster inside the tile). The kernel runs
in tile order, so a forgotten (un)permutation or a text segment on the wrong side fails these tests.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mmattn.diffusion import (
    NABLAConfig,
    RadialConfig,
    STAConfig,
    VideoGrid,
    apply_radial_attention,
    apply_sparse_attention,
    load_preset,
    preset_names,
)
from mmattn.diffusion.patterns import nabla_block_mask

from . import tiny_models
from .test_radial import _double

diffusers = pytest.importorskip("diffusers")

GRID = (4, 8, 8)  # latent frames x rows x columns after patchify: 256 video tokens
STA = STAConfig(tile=(2, 4, 2), window=(1, 1, 3), block_size=None)  # 16-token tiles = blocks; 2 x 2 x 4 tiles
NABLA = NABLAConfig(threshold=0.6, tile=(1, 4, 4), window=(1, 1, 1))  # 16-token blocks, Kandinsky's unclamped STA

# name -> (builder, kwargs, text tokens joined to the video, text first)
MODELS_UNDER_TEST = {
    "wan": (tiny_models.wan, {"frames": 4, "height": 16, "width": 16}, 0, False),
    "hunyuan": (tiny_models.hunyuan, {"frames": 4, "size": 8, "valid_text": (12, 7)}, 12, False),  # text after
    "cogvideox": (tiny_models.cogvideox, {"frames": 4, "size": 16, "sample_frames": 13}, 8, True),  # text first
    "kandinsky5": (tiny_models.kandinsky5, {"frames": 4, "size": 16}, 0, False),
    # 3 image (padding in T2V) + 4 ByT5 + 6 Qwen tokens after the video; the prompts have 4+6 and 2+3 valid ones
    "hunyuan15": (tiny_models.hunyuan15, {"frames": 4, "size": 8, "valid_text": (6, 3), "valid_text_2": (4, 2)}, 13, False),
    "ltx2": (tiny_models.ltx2, {"frames": 4, "size": 8}, 0, False),
}


def _build(name, batch=2):
    builder, kwargs, _, _ = MODELS_UNDER_TEST[name]
    model, inputs = builder(batch=batch, **kwargs)
    model, inputs = model.double(), _double(inputs)
    if name == "kandinsky5":
        model.time_embeddings.float()  # it casts the timestep to float32 whatever the model's dtype
    return model, inputs


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    out = out.sample if hasattr(out, "sample") else out
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _coords():
    """(frame, row, column) of each frame-major video token."""
    return list(itertools.product(*(range(n) for n in GRID)))


def _tile_positions(tile):
    """Position of each frame-major video token in the tile order: tiles in raster order, raster inside a tile."""
    keyed = sorted(range(len(_coords())), key=lambda i: (*(c // s for c, s in zip(_coords()[i], tile)), i))
    positions = torch.empty(len(keyed), dtype=torch.long)
    positions[torch.tensor(keyed)] = torch.arange(len(keyed))
    return positions


def _joint_index(text, text_first):
    """For each position of the model's sequence, its index in [video | text] (text after the video)."""
    video = len(_coords())
    if not text_first:
        return torch.arange(video + text)
    return torch.cat([video + torch.arange(text), torch.arange(video)])


def _sta_token_mask(config, text, text_first):
    """STA at token level (paper: per axis the window's centre is clamped into the grid) in the model's order."""
    tiles = [-(-n // s) for n, s in zip(GRID, config.tile)]
    coords = torch.tensor(_coords())
    tile_of = coords // torch.tensor(config.tile)
    keep = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for axis, (n, w) in enumerate(zip(tiles, config.window)):
        centre = tile_of[:, axis].clamp(w // 2, n - 1 - w // 2)
        keep &= (centre[:, None] - tile_of[None, :, axis]).abs() <= w // 2
    video = len(coords)
    joint = torch.ones(video + text, video + text, dtype=torch.bool)
    joint[:video, :video] = keep
    index = _joint_index(text, text_first)
    return joint[index][:, index]


def _nabla_token_mask(query, key, config, text, text_first):
    """NABLA's block mask of this call's Q/K, expanded to tokens through the tile order, in the model's order."""
    index = _joint_index(text, text_first)
    inverse = torch.argsort(index)
    q, k = query[:, :, inverse], key[:, :, inverse]  # model order -> [video | text]
    blocks = nabla_block_mask(q, k, GRID, config, text_tokens=text).to_dense()
    video = len(_coords())
    position = torch.cat([_tile_positions(config.tile), video + torch.arange(text)])  # text stays after the video
    block = config.tile[0] * config.tile[1] * config.tile[2]
    tokens = position[index] // block
    return blocks[:, :, tokens][:, :, :, tokens]


def _masked_stock(model, inputs, monkeypatch, token_mask, text):
    """The stock model with `token_mask(query, key)` ANDed into every self-attention over video (+ text)."""
    video, sdpa, calls = len(_coords()), F.scaled_dot_product_attention, []

    def masked_sdpa(query, key, value, attn_mask=None, **kwargs):
        if key.shape[-2] == query.shape[-2] == video + text:
            mask = token_mask(query, key)
            calls.append(mask.float().mean().item())
            attn_mask = mask if attn_mask is None else attn_mask & mask
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", masked_sdpa)
    try:
        return _outputs(model, inputs), calls
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("name", sorted(MODELS_UNDER_TEST))
@pytest.mark.parametrize("pattern", ["sta", "nabla"])
def test_sparse_equals_stock_attention_given_the_token_mask(name, pattern, monkeypatch):
    """Float64, a batch of two prompts (the CFG branches; HunyuanVideo's second one with padded text)."""
    _, _, text, text_first = MODELS_UNDER_TEST[name]
    model, inputs = _build(name)
    stock = _outputs(model, inputs)
    config = STA if pattern == "sta" else NABLA
    with apply_sparse_attention(model, pattern, config) as handle:
        sparse = _outputs(model, inputs)
        assert handle.radial[0].grid == VideoGrid(*GRID)
    if pattern == "sta":
        mask = _sta_token_mask(STA, text, text_first)
        expected, calls = _masked_stock(model, inputs, monkeypatch, lambda q, k: mask, text)
    else:
        expected, calls = _masked_stock(
            model, inputs, monkeypatch, lambda q, k: _nabla_token_mask(q, k, NABLA, text, text_first), text
        )
    assert calls and max(calls) < 0.8, calls  # the oracle saw every layer, at sparse density
    for s, e in zip(sparse, expected, strict=True):
        torch.testing.assert_close(s, e, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(sparse[0], stock[0], atol=1e-6)  # the mask mattered
    for r, s in zip(_outputs(model, inputs), stock, strict=True):  # removal restores the stock model
        assert torch.equal(r, s)


def test_config_object_as_pattern_and_default_pattern_is_radial():
    model, inputs = _build("wan")
    with apply_sparse_attention(model, STA) as handle:
        assert handle.radial[0].config is STA
        via_object = _outputs(model, inputs)
    with apply_sparse_attention(model, "sta", STA):
        assert torch.equal(_outputs(model, inputs)[0], via_object[0])
    radial = RadialConfig(block_size=16, decay_factor=0.5)
    with apply_radial_attention(model, radial):
        expected = _outputs(model, inputs)
    with apply_sparse_attention(model, config=radial) as handle:  # pattern defaults to "radial"
        assert type(handle.radial[0].config) is RadialConfig
        assert torch.equal(_outputs(model, inputs)[0], expected[0])


def test_dense_layers_and_steps_apply_to_every_pattern():
    model, inputs = _build("wan")
    stock = _outputs(model, inputs)
    for config in (STAConfig(tile=(2, 4, 2), window=(1, 1, 1), dense_layers=2),
                   NABLAConfig(threshold=0.5, tile=(1, 4, 4), window=None, dense_steps=1)):
        with apply_sparse_attention(model, config, step_source=lambda: (0, 4)):
            assert torch.equal(_outputs(model, inputs)[0], stock[0])
        with apply_sparse_attention(model, config, step_source=lambda: (2, 4)) as handle:
            sparse = _outputs(model, inputs)[0]
            if isinstance(config, STAConfig):  # dense layers hold at every step
                assert torch.equal(sparse, stock[0])
            else:
                assert not torch.allclose(sparse, stock[0], atol=1e-6)
                assert handle.radial[0].pattern.cache.builds == 2  # one per layer


def _count_mask_calls(handle):
    """Wraps the pattern's `mask_for` to record (layer, step, branch, mask object) of every sparse call."""
    pattern, seen = handle.radial[0].pattern, []
    mask_for = pattern.mask_for

    def recording(*args, **kwargs):
        mask, order = mask_for(*args, **kwargs)
        seen.append((kwargs["layer"], kwargs["step"], kwargs["branch"], mask))
        return mask, order

    pattern.mask_for = recording
    return seen


def test_nabla_built_once_per_step_layer_and_branch_across_a_denoising_loop():
    """A tiny Wan pipeline, 3 steps with CFG (cond and uncond calls, diffusers' cache_context names)."""
    transformer, _ = tiny_models.wan(frames=4, height=16, width=16)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    text, negative = torch.randn(1, 12, 16, generator=generator), torch.randn(1, 12, 16, generator=generator)
    config = NABLAConfig(threshold=0.5, tile=(1, 4, 4), window=None)
    steps, layers = 3, len(transformer.blocks)
    with apply_sparse_attention(pipe, "nabla", config) as handle:
        seen = _count_mask_calls(handle)
        pipe(prompt_embeds=text, negative_prompt_embeds=negative, height=32, width=32, num_frames=13,
             num_inference_steps=steps, guidance_scale=2.0, output_type="latent")
        cache = handle.radial[0].pattern.cache
        assert cache.builds == steps * layers * 2
        keys = {(layer, step[0], branch) for layer, step, branch, _ in seen}
        assert keys == {(l, s, b) for l in range(layers) for s in range(steps) for b in ("cond", "uncond")}
        assert len(seen) == len(keys)


def test_nabla_repeated_call_reuses_the_mask_and_gradient_checkpointing_recompute_gets_the_same_object():
    model, inputs = tiny_models.wan(frames=4, height=16, width=16)
    config = NABLAConfig(threshold=0.5, tile=(1, 4, 4), window=None)
    step = [0]
    with apply_sparse_attention(model, config, step_source=lambda: (step[0], 10)) as handle:
        seen = _count_mask_calls(handle)
        cache = handle.radial[0].pattern.cache
        with model.cache_context("cond"):
            first = _outputs(model, inputs)
        with model.cache_context("uncond"):
            _outputs(model, {**inputs, "encoder_hidden_states": -inputs["encoder_hidden_states"]})
        assert cache.builds == 4
        with model.cache_context("cond"):  # the same inputs again in the same step: nothing is rebuilt
            again = _outputs(model, inputs)
        assert cache.builds == 4 and torch.equal(first[0], again[0])
        assert seen[4][3] is seen[0][3] and seen[5][3] is seen[1][3]
        step[0] = 1  # a new step rebuilds
        with model.cache_context("cond"):
            _outputs(model, inputs)
        assert cache.builds == 6

        model.train()
        model.enable_gradient_checkpointing()
        seen.clear()
        hidden = inputs["hidden_states"].clone().requires_grad_(True)
        out = model(**{**inputs, "hidden_states": hidden})[0]
        builds = cache.builds
        out.square().mean().backward()  # the backward recomputes each block's forward
        assert cache.builds == builds
        assert len(seen) == 2 * len(model.blocks)  # forward, then the recompute: the very same mask objects
        forward, recompute = seen[: len(model.blocks)], seen[len(model.blocks) :]  # the backward runs layers in reverse
        assert [layer for layer, *_ in recompute] == [layer for layer, *_ in reversed(forward)]
        assert all(a[3] is b[3] for a, b in zip(forward, reversed(recompute)))
        assert torch.isfinite(hidden.grad).all()
    model.disable_gradient_checkpointing()


def test_nabla_permutes_once_and_pools_once_per_call_also_on_a_cache_hit(monkeypatch):
    """Each sparse NABLA call permutes Q, K and V into tile order once (the pooling reads the permuted Q/K, it
    does not permute them again) and pools Q and K once: across a denoising loop's steps, layers and CFG calls,
    and on a repeated call that reuses the cached mask. The masks are bit-identical to `nabla_block_mask` of
    the call's frame-major Q/K (the pre-existing definition)."""
    from mmattn.diffusion import attention, patterns, sparse

    permutes, pools, full_pools, kernel_calls = [], [], [], []
    permute, pool, pooled = patterns.TileOrder.permute, sparse._pool_blocks, patterns._pooled
    monkeypatch.setattr(
        patterns.TileOrder, "permute", lambda self, x, dim=1: permutes.append(1) or permute(self, x, dim)
    )
    monkeypatch.setattr(sparse, "_pool_blocks", lambda x, block: pools.append(1) or pool(x, block))
    monkeypatch.setattr(patterns, "_pooled", lambda *args: full_pools.append(1) or pooled(*args))
    kernel = attention.block_sparse_attention
    monkeypatch.setattr(
        attention, "block_sparse_attention",
        lambda q, k, v, mask, **kw: kernel_calls.append((q, k, mask)) or kernel(q, k, v, mask, **kw),
    )
    transformer, inputs = tiny_models.wan(frames=4, height=16, width=16)
    pipe = diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    text, negative = torch.randn(1, 12, 16, generator=generator), torch.randn(1, 12, 16, generator=generator)
    config = NABLAConfig(threshold=0.5, tile=(1, 4, 4), window=(1, 1, 1))
    steps, layers = 2, len(transformer.blocks)
    with apply_sparse_attention(pipe, "nabla", config) as handle:
        pipe(prompt_embeds=text, negative_prompt_embeds=negative, height=128, width=128, num_frames=13,
             num_inference_steps=steps, guidance_scale=2.0, output_type="latent")  # latent grid: GRID
        calls = steps * layers * 2
        assert handle.radial[0].pattern.cache.builds == len(kernel_calls) == calls
        assert (len(permutes), len(pools), len(full_pools)) == (3 * calls, 2 * calls, 0)
    with apply_sparse_attention(transformer, config, step_source=lambda: (0, 1)) as handle:
        with torch.no_grad():
            first = transformer(**inputs)[0]
            again = transformer(**inputs)[0]  # the same step and inputs: the cached masks are reused
        assert handle.radial[0].pattern.cache.builds == layers and torch.equal(first, again)
        calls += 2 * layers
        assert (len(permutes), len(pools), len(full_pools)) == (3 * calls, 2 * calls, 0)
        assert all(kernel_calls[-layers + i][2] is kernel_calls[-2 * layers + i][2] for i in range(layers))
    monkeypatch.undo()
    order = patterns.tile_order(GRID, config.tile)
    for q, k, mask in kernel_calls:
        expected = nabla_block_mask(order.unpermute(q, dim=2), order.unpermute(k, dim=2), GRID, config)
        assert torch.equal(mask.to_dense(), expected.to_dense())


def test_sta_default_block_is_the_tile_volume():
    config = STAConfig()
    assert config.tile == (6, 8, 8) and config.block_size is None
    model, inputs = tiny_models.wan(frames=6, height=16, width=32)  # 6 x 8 x 16 tokens: two 384-token tiles
    stock = _outputs(model, inputs)
    with apply_sparse_attention(model, "sta") as handle:
        out = _outputs(model, inputs)
        mask, order = handle.radial[0].pattern.mask_for(VideoGrid(6, 8, 16), 0, None, torch.device("cpu"))
    assert mask.block_size == (384, 384) and order is not None
    torch.testing.assert_close(out[0], stock[0], atol=2e-5, rtol=1e-5)  # a 3-tile window over 2 tiles: dense


def test_presets_of_every_pattern():
    assert {"sta-hunyuan-video", "sta-wan2.1-t2v-14b"} <= set(preset_names("sta"))
    assert "nabla-kandinsky-5" in preset_names("nabla")
    assert not set(preset_names("sta")) & set(preset_names())  # preset_names() lists the Radial ones
    sta = load_preset("sta-hunyuan-video")
    assert sta == STAConfig(tile=(6, 8, 8), window=(3, 3, 3), clamp=True)
    nabla = load_preset("nabla-kandinsky-5")
    assert nabla == NABLAConfig(threshold=0.9, tile=(1, 8, 8), window=(3, 3, 3), clamp=False)
    assert isinstance(load_preset("wan2.1-t2v-14b"), RadialConfig)
    model, _ = tiny_models.wan()
    with apply_sparse_attention(model, "nabla", "nabla-kandinsky-5") as handle:
        assert handle.radial[0].config == nabla
    with pytest.raises(ValueError, match="name"):
        RadialConfig.preset("sta-hunyuan-video")


def test_errors_name_the_argument():
    model, inputs = _build("wan")
    with pytest.raises(ValueError, match="pattern must be one of"):
        apply_sparse_attention(model, "sliding")
    with pytest.raises(TypeError, match="config must be a STAConfig"):
        apply_sparse_attention(model, "sta", NABLA)
    with pytest.raises(ValueError, match="^config: pattern is already"):
        apply_sparse_attention(model, STA, STA)
    with pytest.raises(ValueError, match="^name must be one of"):
        load_preset("no-such-preset")
    with pytest.raises(ValueError, match="^window must be"):
        STAConfig(window=(0, 1, 1))
    with pytest.raises(ValueError, match="^dense_steps must be"):
        NABLAConfig(dense_steps=-1)
    with pytest.raises(ValueError, match="^step_source is required"):
        apply_sparse_attention(model, STAConfig(tile=(2, 4, 2), dense_steps=1))

    class ContextParallel:
        ring_degree, ulysses_degree = 1, 2

    class Parallel:
        context_parallel_config = ContextParallel()

    with apply_sparse_attention(model, STA):  # context parallel: the processors get one shard, not all 256 tokens
        for block in model.blocks:
            block.attn1.processor._parallel_config = Parallel()
        with pytest.raises(ValueError, match="^query: expected a shard of 256 video tokens"):
            _outputs(model, inputs)
