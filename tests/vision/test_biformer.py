"""BiFormer and Bi-Level Routing Attention against vision.md section 1 (and the acceptance list of section 7)."""

import pytest
import timm
import torch

import mmattn.vision  # noqa: F401  (registers the models)
from mmattn.kernels import backend_info
from mmattn.vision.layers import BiLevelRoutingAttention

from .gradients import assert_same_gradients

TINY = {"depths": (1, 1, 1, 1), "embed_dims": (32, 64, 96, 128), "num_heads": (1, 2, 3, 8)}


def dense_bra(layer: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """BRA written as dense attention that masks non-routed regions and padding (vision.md 7: the unit test)."""
    batch, height, width, channels = x.shape
    s, heads = layer.n_win, layer.num_heads
    rh, rw = -(-height // s), -(-width // s)
    q, k, v = layer.qkv(x).split(channels, -1)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    region = ((ys // rh) * s + xs // rw).flatten()  # region of every real token
    one_hot = torch.nn.functional.one_hot(region, s * s).to(x.dtype)  # (HW, S^2)
    counts = one_hot.sum(0)
    q_r = torch.einsum("bnc,nr->brc", q.flatten(1, 2), one_hot) / counts.clamp_min(1)[:, None]
    k_r = torch.einsum("bnc,nr->brc", k.flatten(1, 2), one_hot) / counts.clamp_min(1)[:, None]
    affinity = (q_r * layer.scale) @ k_r.transpose(1, 2)
    routed = affinity.masked_fill(counts == 0, float("-inf")).topk(layer.topk, -1).indices  # (B, S^2, k)
    allowed = torch.zeros(batch, s * s, s * s, dtype=torch.bool).scatter_(2, routed, True)
    token_mask = allowed[:, region][:, :, region]  # (B, HW, HW)
    split = (t.flatten(1, 2).unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    qh, kh, vh = split
    scores = (qh @ kh.transpose(-1, -2) * layer.scale).masked_fill(~token_mask[:, None], float("-inf"))
    out = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(batch, height, width, channels)
    lepe = layer.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return layer.wo(out + lepe)


@pytest.mark.parametrize("size", [(14, 14), (15, 11)])
def test_bra_equals_dense_attention_masking_non_routed_regions(size):
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, num_heads=2, n_win=7, topk=3, backend="torch").double()
    x = torch.randn(2, *size, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_bra(layer, x), rtol=1e-9, atol=1e-10)


def test_bra_scale_is_full_width_and_each_query_sees_64_tokens_at_224():
    model = timm.create_model("biformer_tiny")
    bras = [b.attn for s in model.stages[:3] for b in s.blocks]
    assert all(a.scale == a.dim ** -0.5 for a in bras)
    maps = {0: 56, 1: 28, 2: 14}
    for i, stage in enumerate(model.stages[:3]):
        attn = stage.blocks[0].attn
        assert attn.topk * (maps[i] // attn.n_win) ** 2 == 64
    assert model.stages[3].blocks[0].attn.num_heads == 8


@pytest.mark.skipif(not backend_info("cpu")["triton"][0], reason="needs TRITON_INTERPRET=1")
def test_training_step_through_the_triton_kernel_matches_the_gather_path():
    torch.manual_seed(0)
    small = {**TINY, "n_win": 3, "topks": (1, 2, 4, -2)}  # few regions: the interpreter runs per program
    fast = timm.create_model("biformer_tiny", num_classes=5, backend="triton", **small)
    ref = timm.create_model("biformer_tiny", num_classes=5, backend="torch", **small)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 40, 44)  # padded regions at stages 1-3
    for model in (fast, ref):
        model.train()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3])).backward()
    grads = ({n: p.grad for n, p in model.named_parameters()} for model in (fast, ref))
    assert_same_gradients(*grads, rtol=1e-3, atol=1e-5)


def test_stage_shapes_at_224_and_at_a_size_not_divisible_by_the_regions():
    model = timm.create_model("biformer_tiny", features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in model(torch.randn(1, 3, 224, 224))]
        assert shapes == [(1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14), (1, 512, 7, 7)]
        shapes = [tuple(f.shape) for f in model(torch.randn(1, 3, 200, 260))]
        assert shapes == [(1, 64, 50, 65), (1, 128, 25, 33), (1, 256, 13, 17), (1, 512, 7, 9)]


def official_state_dict(depths, dims, heads=(8,), mlp_ratio=3, num_classes=1000) -> dict:
    """Random tensors under the official rayleizhu/BiFormer key names and shapes (vision.md 1.4)."""
    sd = {}

    def bn(prefix, c):
        sd.update({f"{prefix}.weight": torch.rand(c), f"{prefix}.bias": torch.randn(c),
                   f"{prefix}.running_mean": torch.randn(c), f"{prefix}.running_var": torch.rand(c) + 0.5,
                   f"{prefix}.num_batches_tracked": torch.tensor(7)})

    def linear(prefix, c_out, c_in, bias=True):
        sd[f"{prefix}.weight"] = torch.randn(c_out, c_in) * 0.02
        if bias:
            sd[f"{prefix}.bias"] = torch.randn(c_out) * 0.02

    def conv(prefix, c_out, c_in, k):
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = torch.randn(c_out, c_in, k, k) * 0.1, torch.randn(c_out) * 0.1

    conv("downsample_layers.0.0", dims[0] // 2, 3, 3)
    bn("downsample_layers.0.1", dims[0] // 2)
    conv("downsample_layers.0.3", dims[0], dims[0] // 2, 3)
    bn("downsample_layers.0.4", dims[0])
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        if i > 0:
            conv(f"downsample_layers.{i}.0", dim, dims[i - 1], 3)
            bn(f"downsample_layers.{i}.1", dim)
        for j in range(depth):
            p = f"stages.{i}.{j}"
            conv(f"{p}.pos_embed", dim, 1, 3)
            for norm in ("norm1", "norm2"):
                sd[f"{p}.{norm}.weight"], sd[f"{p}.{norm}.bias"] = torch.rand(dim), torch.randn(dim) * 0.1
            if i < 3:
                linear(f"{p}.attn.qkv.qkv", 3 * dim, dim)
                linear(f"{p}.attn.wo", dim, dim)
            else:
                linear(f"{p}.attn.qkv", 3 * dim, dim, bias=False)
                linear(f"{p}.attn.proj", dim, dim)
            conv(f"{p}.attn.lepe", dim, 1, 5)
            linear(f"{p}.mlp.0", mlp_ratio * dim, dim)
            linear(f"{p}.mlp.3", dim, mlp_ratio * dim)
    bn("norm", dims[-1])
    linear("head", num_classes, dims[-1])
    return sd


def test_official_checkpoint_loads_strictly_through_timm(tmp_path):
    official = official_state_dict((2, 2, 8, 2), (64, 128, 256, 512))
    assert official["stages.0.0.attn.qkv.qkv.weight"].shape == (192, 64)
    assert official["stages.3.1.attn.qkv.weight"].shape == (1536, 512)
    path = tmp_path / "biformer_tiny_in1k.pth"
    torch.save({"model": official}, path)
    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    state = model.state_dict()
    assert len(state) == len(official)
    pairs = {"stem.3.weight": "downsample_layers.0.3.weight", "stages.2.downsample.1.running_var":
             "downsample_layers.2.1.running_var", "stages.1.blocks.1.attn.qkv.bias": "stages.1.1.attn.qkv.qkv.bias",
             "stages.2.blocks.7.mlp.fc2.weight": "stages.2.7.mlp.3.weight", "stages.3.blocks.0.attn.proj.weight":
             "stages.3.0.attn.proj.weight", "norm.running_mean": "norm.running_mean", "head.bias": "head.bias"}
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], official[theirs]), ours
    # A different class count drops the official head, as timm does for every model.
    model = timm.create_model("biformer_tiny", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay={"file": str(path)})
    assert model.head.out_features == 3


def test_compiles_with_torch_compile():
    """A full graph (no breaks) through dynamo and AOT autograd; Inductor's C++ codegen is left to the GPU run."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", num_classes=4, **TINY).eval()
    x = torch.randn(1, 3, 56, 56)
    torch._dynamo.reset()  # no dynamic shapes marked by an earlier test's compile of the same timm layers
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
