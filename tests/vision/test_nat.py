"""NeighborhoodAttention against a brute-force NATTEN oracle (spec 5.1), and NAT/DiNAT as timm models."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
import mmattn.vision  # noqa: F401
from mmattn.vision.layers.neighborhood import NeighborhoodAttention

from ..kernels.na_oracle import window_start
from .gradients import assert_same_gradients, parameter_gradients


def na_oracle(module: NeighborhoodAttention, x: torch.Tensor) -> torch.Tensor:
    """Per query: the k nearest keys per axis on the grid padded to k*d (NATTEN <= 0.15), padded keys dropped."""
    batch, *spatial, c = x.shape
    heads, ks, ds = module.num_heads, module.kernel_size, module.dilation
    q, k, v = module.qkv(x).reshape(batch, *spatial, 3, heads, c // heads).unbind(-3)
    out = torch.zeros_like(q)
    for pos in itertools.product(*(range(n) for n in spatial)):
        axes = []
        for i, n, kk, d in zip(pos, spatial, ks, ds):
            start = window_start(i, max(n, kk * d), kk, d)
            axes.append([(start + j * d, (j * d + start - i) // d + kk - 1) for j in range(kk) if start + j * d < n])
        keys = [tuple(a[0] for a in combo) for combo in itertools.product(*axes)]
        offsets = [tuple(a[1] for a in combo) for combo in itertools.product(*axes)]
        kk_ = torch.stack([k[(slice(None), *key)] for key in keys], dim=-2)  # (B, heads, n_keys, d)
        vv = torch.stack([v[(slice(None), *key)] for key in keys], dim=-2)
        qq = q[(slice(None), *pos)]
        logits = (qq.unsqueeze(-2) * (c // heads) ** -0.5 * kk_).sum(-1)
        if module.rpb is not None:
            logits = logits + torch.stack([module.rpb[(slice(None), *o)] for o in offsets], dim=-1)
        out[(slice(None), *pos)] = (torch.softmax(logits, -1).unsqueeze(-1) * vv).sum(-2)
    return module.proj(out.reshape(batch, *spatial, c))


@pytest.mark.parametrize(
    ("spatial", "kernel", "dilation"),
    [((9, 7), 3, 2), ((11, 10), 5, 2), ((5, 4), 3, 2), ((4, 9), 5, 1), ((13,), 3, 3), ((5,), 3, 2), ((6, 5, 4), 3, 1)],
)
def test_layer_equals_the_natten_neighborhoods_with_masked_padding(spatial, kernel, dilation):
    torch.manual_seed(0)
    module = NeighborhoodAttention(
        16, 2, kernel, dilation=dilation, spatial_dims=len(spatial), backend="torch"
    ).double()
    x = torch.randn(2, *spatial, 16, dtype=torch.float64)
    torch.testing.assert_close(module(x), na_oracle(module, x))


@pytest.mark.parametrize(("backend", "spatial"), [("torch", (6, 7)), ("triton", (6, 7)), ("torch", (4, 7))])
def test_rpb_and_projection_gradients_match_the_dense_oracle(backend, spatial):
    """d rpb, d qkv and d proj of the unfused reference (float64), of the fused kernel (float32, the interpreter on
    the CPU) and of the padded path of grids smaller than kernel x dilation (4 < 3 x 2), against autograd through
    na_oracle in float64. The RPB is drawn at std 0.5 (init: 0.02) so that misplaced bias terms show."""
    torch.manual_seed(0)
    exact = NeighborhoodAttention(32, 2, 3, dilation=2).double()
    with torch.no_grad():
        exact.rpb.normal_(0.0, 0.5)
    dtype = torch.float32 if backend == "triton" else torch.float64
    module = copy.deepcopy(exact).to(dtype)
    module.backend = backend
    x, g = torch.randn(2, 2, *spatial, 32, dtype=torch.float64).unbind(0)
    want = parameter_gradients(exact, na_oracle(exact, x), g)
    got = parameter_gradients(module, module(x.to(dtype)), g.to(dtype))
    assert_same_gradients(got, want, **({"atol": 1e-5, "rtol": 1e-4} if backend == "triton" else {}))


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodAttention(16, 2, 0)
    with pytest.raises(ValueError, match="rel_pos_bias"):
        NeighborhoodAttention(16, 2, 3, is_causal=True)
    with pytest.raises(ValueError, match="backend"):
        NeighborhoodAttention(16, 2, 3, backend="natten")
    with pytest.raises(ValueError, match="x must be"):
        NeighborhoodAttention(16, 2, 3)(torch.randn(1, 8, 16))


def test_dinat_dilations_cover_the_map_at_224_and_nat_has_none():
    with torch.device("meta"):
        dinat, nat = timm.create_model("dinat_tiny"), timm.create_model("nat_tiny")
    dilations = [[b.attn.dilation[0] for b in level.blocks] for level in dinat.levels]
    assert dilations == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    assert all(b.attn.dilation == (1, 1) and b.attn.kernel_size == (7, 7) for lv in nat.levels for b in lv.blocks)


@pytest.mark.parametrize("name", ["nat_tiny", "dinat_small"])
@pytest.mark.parametrize("size", [224, 320])
def test_stage_maps_at_224_and_320(name, size):
    with torch.device("meta"):
        features = timm.create_model(name, features_only=True)
        shapes = [tuple(f.shape) for f in features(torch.empty(1, 3, size, size))]
    dim = features.feature_info.channels()[0]
    assert shapes == [(1, dim * 2**i, math.ceil(size / 4 / 2**i), math.ceil(size / 4 / 2**i)) for i in range(4)]


TINY = {"embed_dim": 32, "depths": (2, 1, 1, 1), "num_heads": (2, 2, 2, 2), "kernel_size": 3,
        "dilations": ([1, 4], [2], [1], [1])}  # fmt: skip


def _set_backend(model, backend):
    for module in model.modules():
        if isinstance(module, NeighborhoodAttention):
            module.backend = backend


def test_training_step_through_the_triton_kernel_matches_the_reference_gradients():
    torch.manual_seed(0)
    model = timm.create_model("dinat_mini", num_classes=4, drop_path_rate=0.0, **TINY)
    x = torch.randn(1, 3, 52, 48)  # maps 13x12 (fits 3*4), 7x6, 4x3, 2x2 (smaller than the kernel: padded path)
    params = list(model.parameters())
    _set_backend(model, "triton")
    grads = torch.autograd.grad(F.cross_entropy(model(x), torch.tensor([3])), params)
    _set_backend(model, "torch")
    want = torch.autograd.grad(F.cross_entropy(model(x), torch.tensor([3])), params)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp, atol=2e-5, rtol=1e-3)


def test_timm_interface_and_grad_checkpointing():
    model = timm.create_model("nat_mini", **TINY)
    x = torch.randn(1, 3, 48, 40)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, model.num_features)
    model.reset_classifier(3)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert model.levels[0].blocks[0].attn.rpb.grad is not None
    assert "levels.0.blocks.0.attn.rpb" in model.no_weight_decay()
    features = timm.create_model("nat_mini", features_only=True, out_indices=(1, 3), **TINY)
    assert [f.shape[1] for f in features(x)] == [64, 256] == features.feature_info.channels()


def test_official_raw_state_dict_loads_strict(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("nat_small", **TINY).eval()
    state = model.state_dict()
    assert {"patch_embed.proj.0.weight", "levels.0.blocks.0.attn.rpb", "levels.0.blocks.0.gamma1",
            "levels.0.downsample.reduction.weight", "norm.weight", "head.weight"} <= set(state)  # fmt: skip
    assert state["levels.0.blocks.0.attn.rpb"].shape == (2, 5, 5)
    torch.save(state, tmp_path / "nat.pth")
    overlay = {"file": str(tmp_path / "nat.pth")}
    loaded = timm.create_model("nat_small", pretrained=True, pretrained_cfg_overlay=overlay, **TINY)
    x = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)


def test_compiles():
    torch.manual_seed(0)
    model = timm.create_model("dinat_mini", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), model(x))
