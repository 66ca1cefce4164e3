"""LITv2 and HiLo attention against vision.md section 2 (and the acceptance list of section 7)."""

import pytest
import timm
import torch
import torch.nn.functional as F

import mmattn.vision  # noqa: F401  (registers the models)
from mmattn.kernels import backend_info
from mmattn.vision.layers import HiLoAttention
from mmattn.vision.models.litv2 import DeformableTokenMerging

from .gradients import assert_same_gradients

TINY = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 4)}


def softmax_attention(q, k, v, scale, key_ok=None):
    scores = q @ k.transpose(-1, -2) * scale
    if key_ok is not None:
        scores = scores.masked_fill(~key_ok, float("-inf"))
    return scores.softmax(-1) @ v


def reference_hilo(layer: HiLoAttention, x: torch.Tensor) -> torch.Tensor:
    """HiLo written per window and per pooled cell with Python loops (vision.md 2.1); partial border windows
    attend to their real tokens only and pool over their real pixels only."""
    batch, height, width, _ = x.shape
    s, hd = layer.window_size, layer.head_dim
    outs = []
    if layer.h_heads:
        qkv = layer.h_qkv(x).view(batch, height, width, 3, layer.h_heads, hd)
        hifi = torch.zeros(batch, height, width, layer.h_heads, hd, dtype=x.dtype)
        for y in range(0, height, s):
            for xx in range(0, width, s):
                win = qkv[:, y:y + s, xx:xx + s].flatten(1, 2)  # (B, n, 3, heads, hd) real tokens only
                q, k, v = (win[:, :, i].transpose(1, 2) for i in range(3))
                out = softmax_attention(q, k, v, layer.scale).transpose(1, 2)
                hifi[:, y:y + s, xx:xx + s] = out.view(batch, *win.shape[1:2], layer.h_heads, hd).view(
                    batch, min(s, height - y), min(s, width - xx), layer.h_heads, hd)
        outs.append(layer.h_proj(hifi.flatten(3)))
    if layer.l_heads:
        cells = [x[:, y:y + s, xx:xx + s].mean((1, 2)) for y in range(0, height, s) for xx in range(0, width, s)]
        pooled = torch.stack(cells, 1)  # (B, cells, C)
        q = layer.l_q(x).view(batch, -1, layer.l_heads, hd).transpose(1, 2)
        k, v = layer.l_kv(pooled).view(batch, -1, 2, layer.l_heads, hd).permute(2, 0, 3, 1, 4)
        lofi = softmax_attention(q, k, v, layer.scale).transpose(1, 2).reshape(batch, height, width, -1)
        outs.append(layer.l_proj(lofi))
    return torch.cat(outs, -1)


@pytest.mark.parametrize("size, window, alpha", [((8, 8), 2, 0.5), ((7, 9), 2, 0.75), ((5, 6), 3, 0.25),
                                                 ((4, 5), 1, 0.9), ((6, 6), 2, 0.0), ((6, 6), 2, 1.0)])
def test_hilo_equals_the_per_window_reference(size, window, alpha):
    torch.manual_seed(0)
    layer = HiLoAttention(32, num_heads=4, qkv_bias=True, window_size=window, alpha=alpha,
                          backend="torch").double()
    x = torch.randn(2, *size, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_hilo(layer, x), rtol=1e-9, atol=1e-10)


def test_hilo_head_split_and_official_parameter_names():
    layer = HiLoAttention(384, num_heads=12, qkv_bias=True, window_size=2, alpha=0.9)
    assert (layer.l_heads, layer.h_heads, layer.l_dim, layer.h_dim) == (10, 2, 320, 64)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes["l_q.weight"] == (320, 384) and shapes["l_kv.weight"] == (640, 384)
    assert shapes["h_qkv.weight"] == (192, 384) and shapes["h_proj.weight"] == (64, 64)
    assert shapes["l_proj.weight"] == (320, 320)
    msa = HiLoAttention(768, num_heads=24, qkv_bias=True, window_size=1, alpha=0.9)
    assert msa.h_heads == 0 and not any(n.startswith("h_") for n, _ in msa.named_parameters())


def test_dtm_with_zero_offsets_is_a_2x2_stride_2_conv():
    torch.manual_seed(0)
    dtm = DeformableTokenMerging(8, 16).eval()
    x = torch.randn(2, 8, 6, 10)
    expected = F.gelu(dtm.norm(F.conv2d(x, dtm.conv.weight, dtm.conv.bias, stride=2)))
    torch.testing.assert_close(dtm(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not backend_info("cpu")["triton"][0], reason="needs TRITON_INTERPRET=1")
def test_training_step_through_the_triton_kernel_matches_the_reference_path():
    torch.manual_seed(0)
    fast = timm.create_model("litv2_small", num_classes=5, backend="triton", **TINY)
    ref = timm.create_model("litv2_small", num_classes=5, backend="torch", **TINY)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 52, 60)  # stage 3 is 3x3 (padded Hi-Fi windows), DTM inputs odd
    for model in (fast, ref):
        torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3])).backward()
    grads = ({n: p.grad for n, p in model.named_parameters()} for model in (fast, ref))
    assert_same_gradients(*grads, rtol=1e-3, atol=1e-5)


def test_stage_shapes_at_224_and_at_an_odd_size():
    model = timm.create_model("litv2_small", features_only=True).eval()
    assert model.feature_info.channels() == [96, 192, 384, 768]
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in model(torch.randn(1, 3, 224, 224))]
        assert shapes == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
        shapes = [tuple(f.shape) for f in model(torch.randn(1, 3, 200, 260))]
        assert shapes == [(1, 96, 50, 65), (1, 192, 25, 33), (1, 384, 13, 17), (1, 768, 7, 9)]


def official_state_dict(embed_dim, depths, heads, alpha=0.9, mlp_ratio=4, num_classes=1000) -> dict:
    """Random tensors under the official ziplab/LITv2 key names and shapes (vision.md 2.4)."""
    sd = {}

    def vec(key, c):
        sd[key] = torch.randn(c) * 0.1

    def linear(prefix, c_out, c_in):
        sd[f"{prefix}.weight"] = torch.randn(c_out, c_in) * 0.02
        vec(f"{prefix}.bias", c_out)

    sd["patch_embed.proj.weight"] = torch.randn(embed_dim, 3, 4, 4) * 0.1
    vec("patch_embed.proj.bias", embed_dim)
    vec("patch_embed.norm.weight", embed_dim)
    vec("patch_embed.norm.bias", embed_dim)
    for i, depth in enumerate(depths):
        dim, head_dim = embed_dim * 2 ** i, embed_dim * 2 ** i // heads[i]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            if i >= 2:
                vec(f"{p}.norm1.weight", dim)
                vec(f"{p}.norm1.bias", dim)
                l_heads = int(heads[i] * alpha) if i == 2 else heads[i]
                l_dim, h_dim = l_heads * head_dim, (heads[i] - l_heads) * head_dim
                linear(f"{p}.attn.l_q", l_dim, dim)
                linear(f"{p}.attn.l_kv", 2 * l_dim, dim)
                linear(f"{p}.attn.l_proj", l_dim, l_dim)
                if h_dim:
                    linear(f"{p}.attn.h_qkv", 3 * h_dim, dim)
                    linear(f"{p}.attn.h_proj", h_dim, h_dim)
            vec(f"{p}.norm2.weight", dim)
            vec(f"{p}.norm2.bias", dim)
            linear(f"{p}.mlp.fc1", mlp_ratio * dim, dim)
            sd[f"{p}.mlp.dwconv.dwconv.weight"] = torch.randn(mlp_ratio * dim, 1, 3, 3) * 0.1
            vec(f"{p}.mlp.dwconv.dwconv.bias", mlp_ratio * dim)
            linear(f"{p}.mlp.fc2", dim, mlp_ratio * dim)
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample"
            sd[f"{p}.dconv.weight"] = torch.randn(2 * dim, dim, 2, 2) * 0.1
            vec(f"{p}.dconv.bias", 2 * dim)
            sd[f"{p}.dconv.conv_offset.weight"] = torch.randn(8, dim, 2, 2) * 0.01
            vec(f"{p}.dconv.conv_offset.bias", 8)
            for stat in ("weight", "bias", "running_mean"):
                vec(f"{p}.norm_layer.{stat}", 2 * dim)
            sd[f"{p}.norm_layer.running_var"] = torch.rand(2 * dim) + 0.5
            sd[f"{p}.norm_layer.num_batches_tracked"] = torch.tensor(3)
    dim = embed_dim * 2 ** (len(depths) - 1)
    vec("norm.weight", dim)
    vec("norm.bias", dim)
    linear("head", num_classes, dim)
    return sd


def test_official_checkpoint_loads_strictly_through_timm(tmp_path):
    official = official_state_dict(96, (2, 2, 6, 2), (3, 6, 12, 24))
    assert official["layers.2.blocks.0.attn.l_q.weight"].shape == (320, 384)
    path = tmp_path / "litv2_s.pth"
    torch.save({"model": official}, path)
    model = timm.create_model("litv2_small", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    state = model.state_dict()
    assert len(state) == len(official)
    pairs = {"stages.1.downsample.conv.weight": "layers.0.downsample.dconv.weight",
             "stages.3.downsample.conv_offset.bias": "layers.2.downsample.dconv.conv_offset.bias",
             "stages.2.downsample.norm.running_var": "layers.1.downsample.norm_layer.running_var",
             "stages.0.blocks.1.mlp.dwconv.weight": "layers.0.blocks.1.mlp.dwconv.dwconv.weight",
             "stages.2.blocks.5.attn.h_qkv.weight": "layers.2.blocks.5.attn.h_qkv.weight",
             "stages.3.blocks.1.attn.l_kv.bias": "layers.3.blocks.1.attn.l_kv.bias", "head.weight": "head.weight"}
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], official[theirs]), ours
