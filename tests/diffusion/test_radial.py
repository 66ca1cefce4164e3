"""Radial processors on tiny random diffusers transformers: fidelity to the stock processors, sparsity, removal."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmattn.diffusion import (
    RadialConfig,
    STAConfig,
    VideoGrid,
    apply_radial_attention,
    apply_sparse_attention,
    radial_block_mask,
)
from mmattn.diffusion.attention import SparseAttention
from mmattn.kernels.backends import backend_info

from . import tiny_models

SPARSE_ANYWHERE = RadialConfig(block_size=16)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


# (builder, grid the mask sees (frames, tokens per frame), text tokens in the joint sequence)
FULL_DENSITY = {
    "wan": (tiny_models.wan, {}, (2, 128)),
    "hunyuan": (tiny_models.hunyuan, {}, (2, 256)),
    "hunyuan_padded_text": (tiny_models.hunyuan, {"valid_text": 7, "batch": 2}, (2, 256)),
    "cogvideox": (tiny_models.cogvideox, {}, (1, 16)),
    "cogvideox_rope": (tiny_models.cogvideox, {"rotary": True}, (1, 16)),
    "mochi": (tiny_models.mochi, {"rotary": True}, (2, 256)),
    "ltx": (tiny_models.ltx, {}, (2, 256)),
}


@pytest.mark.parametrize("name", sorted(FULL_DENSITY))
def test_full_density_equals_stock_processor(name):
    builder, kwargs, (frames, per_frame) = FULL_DENSITY[name]
    model_rule = "wan" if name.startswith(("wan", "ltx")) else "hunyuan"
    assert radial_block_mask(frames, per_frame, block_size=16, model=model_rule).all()
    model, inputs = builder(**kwargs)
    stock = _run(model, inputs)
    with apply_radial_attention(model, SPARSE_ANYWHERE) as handle:
        assert handle.radial[0].grid is None
        radial = _run(model, inputs)
        assert handle.radial[0].grid == VideoGrid(frames, *_hw(per_frame, name))
    torch.testing.assert_close(radial, stock, atol=2e-5, rtol=1e-5)
    assert torch.equal(_run(model, inputs), stock)  # removal restores the stock processors


def _hw(per_frame, name):
    side = int(per_frame**0.5)
    return (8, 16) if name == "wan" else (side, side)


@pytest.mark.parametrize("name", ["wan", "hunyuan", "cogvideox", "mochi", "ltx"])
def test_dense_layers_are_bitwise_stock_and_sparse_layers_differ(name):
    builder = getattr(tiny_models, name)
    model, inputs = builder(**({"frames": 2, "size": 16} if name == "cogvideox" else {"frames": 4}))
    stock = _run(model, inputs)
    with apply_radial_attention(model, RadialConfig(block_size=16, dense_layers=100)):
        assert torch.equal(_run(model, inputs), stock)
    with apply_radial_attention(model, RadialConfig(block_size=16, decay_factor=0.1)):
        sparse = _run(model, inputs)
    assert torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, stock, atol=1e-4)
    assert torch.equal(_run(model, inputs), stock)


# Models whose RoPE turns channel pairs by real tables (builder, kwargs): two layers, so one dense and one sparse.
FUSED_ROTARY_MODELS = {
    "wan": (tiny_models.wan, {"frames": 4}),
    "hunyuan": (tiny_models.hunyuan, {}),  # one double-stream and one single-stream block
    "hunyuan15": (tiny_models.hunyuan15, {}),
    "cogvideox": (tiny_models.cogvideox, {"frames": 2, "size": 16, "rotary": True}),
    "ltx": (tiny_models.ltx, {"num_layers": 2}),
    "ltx2": (tiny_models.ltx2, {}),  # "interleaved" RoPE, the default type
    "ltx2_split": (tiny_models.ltx2, {"rope_type": "split"}),  # halves paired, tables of one entry per pair
    "mochi": (tiny_models.mochi, {"rotary": True}),  # tables of one entry per pair and head
}


@pytest.mark.parametrize("name", sorted(FUSED_ROTARY_MODELS))
def test_fused_rotary_runs_the_kernel_on_sparse_layers_only(name, monkeypatch):
    """`fused_rotary` (the default): the sparse layer's queries and keys go through `rotary_embedding` (the rotation
    agrees with the stock ops to float32 rounding), the dense layer's do not."""
    from mmattn.diffusion import processors

    builder, kwargs = FUSED_ROTARY_MODELS[name]
    model, inputs = builder(**kwargs)
    config = RadialConfig(block_size=16, decay_factor=0.1, dense_layers=1)
    with apply_radial_attention(model, config):
        monkeypatch.setattr(processors.RadialProcessor, "fused_rotary", False)
        stock_rotary = _run(model, inputs)
        rotated, kernel = [], processors.rotary_embedding

        def counting(x, cos, sin, **kwargs):
            rotated.append(x.shape)
            return kernel(x, cos, sin, **kwargs)

        monkeypatch.setattr(processors, "rotary_embedding", counting)
        monkeypatch.setattr(processors.RadialProcessor, "fused_rotary", True)
        fused = _run(model, inputs)
    assert len(rotated) == 2  # queries and keys of the one sparse layer (of two)
    torch.testing.assert_close(fused, stock_rotary, atol=2e-5, rtol=1e-5)


def _token_mask(block_mask, block, q_len, kv_len):
    expanded = block_mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return expanded[:q_len, :kv_len]


def _double(value):
    """`value` with every floating tensor (also inside dicts and tuples) in float64."""
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(map(_double, value))
    return value.double() if torch.is_tensor(value) and value.is_floating_point() else value


SPARSE_FRAMES, SPARSE_PER_FRAME = 5, 169  # 13 x 13 tokens after patchify: frames straddle 16-token blocks
SPARSE = RadialConfig(block_size=16, decay_factor=0.5)
# (builder, kwargs for a batch of 2 with different prompts, default mask rule, text first in the joint sequence)
SPARSE_MODELS = {
    "wan": (tiny_models.wan, {"frames": 5, "height": 26, "width": 26, "batch": 2}, "wan", False),
    "hunyuan": (tiny_models.hunyuan, {"frames": 5, "size": 13, "batch": 2, "valid_text": (12, 5)}, "hunyuan", False),
    "cogvideox": (tiny_models.cogvideox, {"frames": 5, "size": 26, "rotary": True}, "hunyuan", True),
    "mochi": (tiny_models.mochi, {"frames": 5, "size": 26, "rotary": True}, "hunyuan", False),
    "ltx": (tiny_models.ltx, {"frames": 5, "size": 13}, "wan", False),
}


@pytest.mark.parametrize("name", sorted(SPARSE_MODELS))
def test_sparse_equals_stock_attention_given_the_token_mask(name, monkeypatch):
    """At sparse density, Radial == the stock model whose joint self-attention calls get the Radial mask.

    The oracle expands the block mask to tokens and puts the text segment where the stock model does (after
    the video; before it in CogVideoX); Wan and LTX self-attention has no text. Batch of 2 with different
    prompts (the CFG branches), Hunyuan with padded keys and Mochi with a dropped padded prompt in one of them.
    """
    builder, kwargs, rule, text_first = SPARSE_MODELS[name]
    video = SPARSE_FRAMES * SPARSE_PER_FRAME
    model, inputs = builder(**kwargs)
    model, inputs = model.double(), _double(inputs)
    with apply_radial_attention(model, SPARSE):
        radial = _run(model, inputs)

    def token_mask(text):
        blocks = radial_block_mask(
            SPARSE_FRAMES, SPARSE_PER_FRAME, block_size=SPARSE.block_size, decay_factor=SPARSE.decay_factor,
            model=rule, text_tokens=text,
        )
        assert blocks.float().mean() < 0.8
        mask = _token_mask(blocks, SPARSE.block_size, video + text, video + text)  # [video | text]
        order = torch.cat([torch.arange(video, video + text), torch.arange(video)]) if text_first else torch.arange(video + text)
        return mask[order][:, order]

    sdpa = F.scaled_dot_product_attention

    def masked_sdpa(query, key, value, attn_mask=None, **kwargs):
        tokens = query.shape[-2]
        if key.shape[-2] == tokens >= video:  # joint self-attention, not cross-attention or Hunyuan's text refiner
            mask = token_mask(tokens - video)
            attn_mask = mask if attn_mask is None else attn_mask & mask
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", masked_sdpa)
    expected = _run(model, inputs)
    torch.testing.assert_close(radial, expected, atol=1e-12, rtol=1e-12)  # float64; only the summation order differs


@pytest.mark.parametrize("text_first", [False, True])
def test_attend_with_text_segment_and_padded_keys(text_first):
    grid, text = VideoGrid(5, 4, 8), 11
    radial = SparseAttention(RadialConfig(block_size=16, decay_factor=0.3), "hunyuan", None)
    radial.set_grid(grid)
    n = grid.tokens + text
    q, k, v = (torch.randn(3, n, 2, 16, dtype=torch.float64) for _ in range(3))
    valid = torch.tensor([11, 4, 11])
    out = radial.attend(q, k, v, layer_index=0, dense=None, text_tokens=text, text_first=text_first, valid_text_tokens=valid)
    blocks = radial_block_mask(5, 32, block_size=16, decay_factor=0.3, model="hunyuan", text_tokens=text)
    mask = _token_mask(blocks, 16, n, n)[None].repeat(3, 1, 1)
    mask[:, :, grid.tokens :] &= torch.arange(text)[None, None] < valid[:, None, None]
    order = torch.cat([torch.arange(text, n), torch.arange(text)]) if text_first else torch.arange(n)
    inverse = torch.argsort(order)
    qs, ks, vs = (t[:, order].transpose(1, 2) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None]).transpose(1, 2)[:, inverse]
    torch.testing.assert_close(out, ref)


def test_mask_follows_the_grid_of_each_call():
    model, inputs = tiny_models.wan(frames=2)
    with apply_radial_attention(model, SPARSE_ANYWHERE) as handle:
        _run(model, inputs)
        assert handle.radial[0].grid == VideoGrid(2, 8, 16)
        _other_model, other = tiny_models.wan(frames=5, height=8, width=16)
        out = _run(model, other)
        assert handle.radial[0].grid == VideoGrid(5, 4, 8)
        assert out.shape == other["hidden_states"].shape


def test_step_policy_dense_first_and_last_steps():
    model, inputs = tiny_models.wan(frames=4)
    stock = _run(model, inputs)
    step = {"now": (0, 10)}
    config = RadialConfig(block_size=16, decay_factor=0.1, dense_steps=2, dense_last_steps=1)
    with apply_radial_attention(model, config, step_source=lambda: step["now"]):
        results = {}
        for index in (0, 1, 2, 8, 9):
            step["now"] = (index, 10)
            results[index] = _run(model, inputs)
    for index in (0, 1, 9):
        assert torch.equal(results[index], stock)
    for index in (2, 8):
        assert not torch.allclose(results[index], stock, atol=1e-4)


def test_invalid_configs_and_targets():
    with pytest.raises(ValueError, match="decay_factor"):
        RadialConfig(decay_factor=0)
    with pytest.raises(ValueError, match="block_size"):
        RadialConfig(block_size=100)
    with pytest.raises(ValueError, match="model"):
        RadialConfig(model="sora")
    with pytest.raises(ValueError, match="dense_steps"):
        RadialConfig(dense_steps=-1)
    with pytest.raises(ValueError, match="name"):
        RadialConfig.preset("no-such-model")
    model, _ = tiny_models.wan()
    with pytest.raises(ValueError, match="step_source"):
        apply_radial_attention(model, RadialConfig(dense_steps=3))
    with pytest.raises(ValueError, match=r"Radial attention supports \[.*'WanTransformer3DModel'.*\], got Linear"):
        apply_radial_attention(torch.nn.Linear(2, 2), RadialConfig())
    with pytest.raises(TypeError, match="pipe_or_transformer"):
        apply_radial_attention("wan", RadialConfig())
    with apply_radial_attention(model, RadialConfig()), pytest.raises(ValueError, match="already has Radial"):
        apply_radial_attention(model, RadialConfig())


def test_presets_load():
    from mmattn.diffusion import preset_names

    assert {
        "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "hunyuan-video", "hunyuan-video-1.5",
        "cogvideox", "mochi-1", "ltx-video", "ltx-2", "kandinsky-5",
    } <= set(preset_names())
    wan22 = RadialConfig.preset("wan2.2-t2v-a14b")
    assert (wan22.block_size, wan22.decay_factor, wan22.dense_steps, wan22.dense_layers) == (64, 0.8, 11, 1)
    hunyuan = RadialConfig.preset("hunyuan-video")
    assert (hunyuan.decay_factor, hunyuan.dense_steps, hunyuan.dense_layers, hunyuan.model) == (0.95, 12, 0, "hunyuan")
    hunyuan15, ltx2, kandinsky5 = (RadialConfig.preset(n) for n in ("hunyuan-video-1.5", "ltx-2", "kandinsky-5"))
    assert (hunyuan15.model, hunyuan15.decay_factor, hunyuan15.dense_steps) == ("hunyuan", 0.95, 12)
    assert (ltx2.model, ltx2.decay_factor, ltx2.dense_steps, ltx2.dense_layers) == ("wan", 1.0, 7, 1)
    assert (kandinsky5.model, kandinsky5.decay_factor, kandinsky5.dense_steps, kandinsky5.dense_layers) == ("wan", 0.2, 12, 1)
    for name in ("wan2.2-i2v-a14b", "wan2.2-ti2v-5b"):
        wan22_variant = RadialConfig.preset(name)
        assert (wan22_variant.block_size, wan22_variant.decay_factor, wan22_variant.dense_layers) == (64, 0.8, 1)


class _CopyCounter(TorchDispatchMode):
    """Counts the ops that copy a tensor of `numel` elements (forward and autograd's backward alike)."""

    COPIES = frozenset({"copy_", "clone", "_to_copy", "cat", "index", "index_put", "index_put_", "slice_scatter"})

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.copies = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket.__name__ in self.COPIES:
            outputs = out if isinstance(out, (tuple, list)) else [out]
            self.copies += sum(isinstance(t, torch.Tensor) and t.numel() == self.numel for t in outputs)
        return out


def _training_step_copies(model, inputs, numel):
    with _CopyCounter(numel) as counter:
        model(**inputs)[0].square().mean().backward()
    return counter.copies


@pytest.mark.skipif(not backend_info("cpu")["triton"][0], reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("pattern, config", [
    ("radial", RadialConfig(block_size=16, backend="triton")),
    ("sta", STAConfig(tile=(2, 4, 4), window=(1, 1, 3), backend="triton")),  # reorders tokens into tiles
])
def test_sparse_kernel_path_copies_no_attention_tensor(pattern, config):
    """The kernels take diffusers' (B, L, H, D) projections as (B, H, L, D) views and return the output and the
    q, k, v gradients in that layout: a training step (forward and backward) makes no more copies of an
    attention-sized tensor with the sparse kernel path than with the stock processors (STA's reordering gathers
    are index ops, not counted)."""
    model, inputs = tiny_models.wan(head_dim=16)
    numel = 1 * 256 * 2 * 16  # batch, video tokens (2 x 8 x 16 patches), heads, head dim
    stock = _training_step_copies(model.train(), inputs, numel)
    with apply_sparse_attention(model, pattern, config):
        sparse = _training_step_copies(model, inputs, numel)
    assert sparse <= stock, f"{sparse} attention-sized copies with {pattern}, {stock} with the stock processors"
