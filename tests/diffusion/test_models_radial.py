"""Radial on Wan 2.2 (TI2V, I2V, VACE, both A14B experts), HunyuanVideo 1.5, LTX-2 and Kandinsky 5.

Each model is checked against its stock diffusers processors: equal at full density, equal at sparse density
to the stock model whose self-attention gets the token-level expansion of the Radial mask (text after the
video where the model joins text), a batch of two prompts standing for the two CFG branches, and removal
restoring bit-identical outputs.
"""

import pytest
import torch
import torch.nn.functional as F

from mmattn.diffusion import RadialConfig, VideoGrid, apply_radial_attention, radial_block_mask
from mmattn.diffusion.models import MODELS

from . import tiny_models
from .test_radial import _double, _token_mask

diffusers = pytest.importorskip("diffusers")

FULL = RadialConfig(block_size=16)  # at two latent frames every block is kept
SPARSE = RadialConfig(block_size=16, decay_factor=0.5)
FRAMES, SIDE = 5, 13  # 13 x 13 tokens per frame: frames straddle 16-token blocks


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    out = out.sample if hasattr(out, "sample") else out
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _layer_outputs(model, inputs, modules) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The outputs of `modules` (all of them: Hunyuan's text stream too) and of the model, for one call."""
    seen = []
    record = lambda module, args, out: seen.extend(out if isinstance(out, tuple) else [out])  # noqa: E731
    hooks = [module.register_forward_hook(record) for module in modules]
    try:
        return seen, _outputs(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()


def _stg(inputs, mask):
    """LTX-2 spatio-temporal guidance on block 1 with a per-sample perturbation mask (0 = skip attention)."""
    return {**inputs, "spatio_temporal_guidance_blocks": [1], "perturbation_mask": torch.tensor(mask)}


def _grid_kwargs(builder, frames, side, batch):
    """Builder arguments for a latent grid of frames x side x side tokens after patchify."""
    if builder in (tiny_models.wan_ti2v, tiny_models.wan_i2v, tiny_models.wan_vace):
        return {"frames": frames, "height": 2 * side, "width": 2 * side, "batch": batch}
    if builder in (tiny_models.kandinsky5,):
        return {"frames": frames, "size": 2 * side, "batch": batch}
    return {"frames": frames, "size": side, "batch": batch}


# name -> (builder, extra builder kwargs, input edit, default mask rule, text tokens joined after the video)
MODELS_UNDER_TEST = {
    "wan2.2_ti2v": (tiny_models.wan_ti2v, {}, None, "wan", 0),
    "wan_i2v": (tiny_models.wan_i2v, {}, None, "wan", 0),
    "wan_vace": (tiny_models.wan_vace, {}, None, "wan", 0),
    # 3 image (padding in T2V) + 4 ByT5 + 6 Qwen tokens; the two prompts have 4+6 and 2+3 valid tokens
    "hunyuan15": (tiny_models.hunyuan15, {"valid_text": (6, 3), "valid_text_2": (4, 2)}, None, "hunyuan", 13),
    "hunyuan15_i2v": (
        tiny_models.hunyuan15, {"valid_text": (6, 3), "valid_text_2": (4, 2), "image": True}, None, "hunyuan", 13
    ),  # 3 valid image tokens first
    "ltx2": (tiny_models.ltx2, {}, None, "wan", 0),
    "ltx2_gated_split_rope": (tiny_models.ltx2, {"gated_attn": True, "rope_type": "split"}, None, "wan", 0),
    "ltx2_stg": (tiny_models.ltx2, {"perturbed_attn": True}, lambda i: _stg(i, [0.0, 1.0]), "wan", 0),
    "kandinsky5": (tiny_models.kandinsky5, {}, None, "wan", 0),
}


def _build(name, frames, side, batch, double=False):
    builder, extra, edit, _, _ = MODELS_UNDER_TEST[name]
    model, inputs = builder(**_grid_kwargs(builder, frames, side, batch), **extra)
    inputs = edit(inputs) if edit else inputs
    if double:  # float64: kernel and reference differ only in summation order, far below any real difference
        model, inputs = model.double(), _double(inputs)
        if name == "kandinsky5":
            model.time_embeddings.float()  # it casts the timestep to float32 whatever the model's dtype
    return model, inputs


@pytest.mark.parametrize("name", sorted(MODELS_UNDER_TEST))
def test_full_density_equals_stock_and_removal_restores(name):
    _, _, _, rule, text = MODELS_UNDER_TEST[name]
    side = 16  # 256 tokens per frame: no diagonal thinning at distance 1
    assert radial_block_mask(2, side * side, block_size=16, model=rule, text_tokens=text).all()
    model, inputs = _build(name, 2, side, 2, double=True)
    modules = [module for _, module in MODELS[type(model).__name__].attention_modules(model)]
    processors = [module.processor for module in modules]
    stock_layers, stock = _layer_outputs(model, inputs, modules)
    with apply_radial_attention(model, FULL) as handle:
        radial_layers, radial = _layer_outputs(model, inputs, modules)
        assert handle.radial[0].grid == VideoGrid(2, side, side)
    for r, s in zip(radial + radial_layers, stock + stock_layers, strict=True):  # every output of every layer
        torch.testing.assert_close(r, s, atol=1e-12, rtol=1e-12)
    assert all(module.processor is processor for module, processor in zip(modules, processors))
    assert model._diffusers_hook.get_hook("mmattn_grid_capture") is None
    for r, s in zip(_outputs(model, inputs), stock, strict=True):
        assert torch.equal(r, s)


@pytest.mark.parametrize("name", sorted(MODELS_UNDER_TEST))
def test_sparse_equals_stock_attention_given_the_token_mask(name, monkeypatch):
    """Float64, a batch of two prompts (the CFG branches); the oracle masks every
    self-attention call over the video (and the text joined after it)."""
    _, _, _, rule, text = MODELS_UNDER_TEST[name]
    video = FRAMES * SIDE * SIDE
    model, inputs = _build(name, FRAMES, SIDE, 2, double=True)
    stock = _outputs(model, inputs)
    with apply_radial_attention(model, SPARSE):
        radial = _outputs(model, inputs)

    blocks = radial_block_mask(
        FRAMES, SIDE * SIDE, block_size=16, decay_factor=SPARSE.decay_factor, model=rule, text_tokens=text
    )
    assert blocks.float().mean() < 0.8
    mask = _token_mask(blocks, 16, video + text, video + text)  # [video | text]
    sdpa, masked_calls = F.scaled_dot_product_attention, []

    def masked_sdpa(query, key, value, attn_mask=None, **kwargs):
        if key.shape[-2] == query.shape[-2] == video + text:  # self-attention over the video (+ text)
            masked_calls.append(1)
            attn_mask = mask if attn_mask is None else attn_mask & mask
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", masked_sdpa)
    expected = _outputs(model, inputs)
    assert masked_calls, "the oracle never saw the self-attention"
    for r, e in zip(radial, expected, strict=True):
        torch.testing.assert_close(r, e, atol=1e-12, rtol=1e-12)  # float64; only the summation order differs
    monkeypatch.undo()
    assert not torch.allclose(radial[0], stock[0], atol=1e-6)  # the mask mattered
    for r, s in zip(_outputs(model, inputs), stock, strict=True):  # removal restores the stock model
        assert torch.equal(r, s)


@pytest.mark.parametrize("name", sorted(MODELS_UNDER_TEST))
def test_dense_layers_are_bitwise_stock(name):
    model, inputs = _build(name, 4, 8, 2)
    modules = [module for _, module in MODELS[type(model).__name__].attention_modules(model)]
    stock_layers, stock = _layer_outputs(model, inputs, modules)
    with apply_radial_attention(model, RadialConfig(block_size=16, dense_layers=100)):
        radial_layers, radial = _layer_outputs(model, inputs, modules)
    for r, s in zip(radial + radial_layers, stock + stock_layers, strict=True):
        assert torch.equal(r, s)


@pytest.mark.parametrize(
    "name, radial_modules, stock_modules",
    [
        ("wan_i2v", ["blocks.0.attn1", "blocks.1.attn1"], ["blocks.0.attn2", "blocks.1.attn2"]),
        ("wan_vace", ["blocks.0.attn1", "blocks.1.attn1", "blocks.2.attn1", "vace_blocks.0.attn1", "vace_blocks.1.attn1"],
         ["blocks.0.attn2", "vace_blocks.1.attn2"]),
        ("hunyuan15", ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
         ["context_embedder.token_refiner.refiner_blocks.0.attn"]),
        ("ltx2", ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
         ["transformer_blocks.0.audio_attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.audio_attn2",
          "transformer_blocks.0.audio_to_video_attn", "transformer_blocks.1.video_to_audio_attn"]),
        ("kandinsky5", ["visual_transformer_blocks.0.self_attention", "visual_transformer_blocks.1.self_attention"],
         ["text_transformer_blocks.0.self_attention", "visual_transformer_blocks.0.cross_attention"]),
    ],
)
def test_radial_goes_on_self_attention_only(name, radial_modules, stock_modules):
    model, _ = _build(name, 2, 8, 2)
    support = MODELS[type(model).__name__]
    stock = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    with apply_radial_attention(model, FULL):
        processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
        assert sorted(n for n, p in processors.items() if isinstance(p, support.processor)) == sorted(radial_modules)
        for n in stock_modules:
            assert type(processors[n]) is stock[n]
        if name == "wan_vace":  # a VACE block counts as the main layer it feeds
            assert [processors[f"vace_blocks.{i}.attn1"].layer_index for i in range(2)] == [0, 2]


def test_ltx2_all_perturbed_skips_attention_like_stock():
    """Guidance on block 1 for every sample: its video self-attention passes the values through, unattended."""
    model, inputs = tiny_models.ltx2(perturbed_attn=True)
    inputs = _stg(inputs, [0.0, 0.0])
    stock = _outputs(model, inputs)
    with apply_radial_attention(model, FULL) as handle:
        attended, attend = [], handle.radial[0].attend
        handle.radial[0].attend = lambda *a, **k: attended.append(k["layer_index"]) or attend(*a, **k)
        for r, s in zip(_outputs(model, inputs), stock, strict=True):
            torch.testing.assert_close(r, s, atol=2e-5, rtol=1e-5)
    assert attended == [0]


def test_kandinsky5_nabla_is_refused():
    torch.manual_seed(0)
    model = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=32, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=48, ff_dim=128, num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 8, 8), attention_type="nabla",
    )
    with pytest.raises(ValueError, match="attention_type='regular'"):
        apply_radial_attention(model, FULL)


def test_unsupported_transformer_names_class_and_supported_ones():
    with pytest.raises(ValueError) as error:
        apply_radial_attention(torch.nn.Conv3d(1, 1, 1), FULL)
    message = str(error.value)
    assert "got Conv3d" in message and all(name in message for name in MODELS)
