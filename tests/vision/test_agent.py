"""Agent attention against the paper's equations, and Agent-DeiT / Agent-PVT / Agent-Swin as timm models."""

import re

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
import mmattn.vision  # noqa: F401
from mmattn.vision.layers.agent import AgentAttention
from mmattn.vision.models.agent_swin import WindowAttention

from .gradients import assert_same_gradients, parameter_gradients


def agent_attention_oracle(module: AgentAttention, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Spec 4.1 written out step by step, one head at a time, for a module trained on an h x w grid."""
    b, _n, c = x.shape
    m, a, p = module.num_heads, module.agent_num, module.num_prefix_tokens
    d = c // m
    q, k, v = module.qkv(x).split(c, dim=-1)
    pooled = F.adaptive_avg_pool2d(q[:, p:].transpose(1, 2).reshape(b, c, h, w), module.agent_pool)
    agents = pooled.reshape(b, c, a).transpose(1, 2)  # (b, a, c)
    an = F.interpolate(module.an_bias, size=(h, w), mode="bilinear", align_corners=False)
    na = F.interpolate(module.na_bias, size=(h, w), mode="bilinear", align_corners=False)
    outs = []
    for head in range(m):
        cols = slice(head * d, (head + 1) * d)
        pb = (an[head] + module.ah_bias[0, head] + module.aw_bias[0, head]).reshape(a, h * w)
        ab = (na[head].reshape(a, h * w).T + (module.ha_bias[0, head] + module.wa_bias[0, head]).reshape(h * w, a))
        if p:
            pb = torch.cat([module.ac_bias[0, head], pb], dim=1)
            ab = torch.cat([module.ca_bias[0, head], ab], dim=0)
        qa = agents[..., cols] * d**-0.5
        agent_v = torch.softmax(qa @ k[..., cols].transpose(1, 2) + pb, -1) @ v[..., cols]
        outs.append(torch.softmax(q[..., cols] * d**-0.5 @ agents[..., cols].transpose(1, 2) + ab, -1) @ agent_v)
    out = torch.cat(outs, dim=-1)
    dwc = module.dwc(v[:, p:].transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
    out = torch.cat([out[:, :p], out[:, p:] + dwc], dim=1)
    return module.proj(out)


def spread_biases(module: torch.nn.Module) -> torch.nn.Module:
    """Agent and relative position biases drawn at std 0.5 instead of their init's 0.02, so that a wrong bias moves
    the outputs well beyond rounding."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("_bias", "_bias_table")):
                param.normal_(0.0, 0.5)
    return module


@pytest.mark.parametrize(("prefix", "grid"), [(0, (6, 6)), (1, (5, 5)), (0, (4, 7))])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_agent_attention_equals_the_paper_equations(prefix, grid, backend):
    """In inference (auto: the agent biases kept between forwards) and in the gradient of every parameter."""
    torch.manual_seed(0)
    module = spread_biases(AgentAttention(32, 4, 9, grid, num_prefix_tokens=prefix, backend=backend).double())
    x = torch.randn(2, prefix + grid[0] * grid[1], 32, dtype=torch.float64)
    want = agent_attention_oracle(module, x, *grid)
    with torch.no_grad():
        torch.testing.assert_close(module(x, grid), want)
    g = torch.randn_like(want)
    assert_same_gradients(parameter_gradients(module, module(x, grid), g), parameter_gradients(module, want, g))


def test_other_grids_resize_the_biases_bilinearly_and_fast_path_gradients_match():
    torch.manual_seed(0)
    module = AgentAttention(32, 2, 4, (6, 6)).double()
    x = torch.randn(1, 24, 32, dtype=torch.float64, requires_grad=True)
    out = module(x, (4, 6))
    reference = AgentAttention(32, 2, 4, (4, 6)).double()
    state = module.state_dict()
    for name, size in (("ah_bias", (4, 1)), ("aw_bias", (1, 6)), ("ha_bias", (4, 1)), ("wa_bias", (1, 6))):
        bias = state[name][0]
        bias = bias.permute(0, 3, 1, 2) if name[1] == "a" else bias
        bias = F.interpolate(bias, size=size, mode="bilinear", align_corners=False)
        state[name] = (bias.permute(0, 2, 3, 1) if name[1] == "a" else bias)[None]
    reference.load_state_dict(state)
    torch.testing.assert_close(out, reference(x, (4, 6)))
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    module.backend = "torch"
    want = torch.autograd.grad(module(x, (4, 6)).square().sum(), [x, *module.parameters()])
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="agent_num"):
        AgentAttention(32, 2, 10, (4, 4))
    with pytest.raises(ValueError, match="backend"):
        AgentAttention(32, 2, 9, (4, 4), backend="flash")
    with pytest.raises(ValueError, match="hw"):
        AgentAttention(32, 2, 9, (4, 4))(torch.randn(1, 16, 32), (3, 4))
    with pytest.raises(ValueError, match="square"):
        AgentAttention(32, 2, 9, (4, 4))(torch.randn(1, 15, 32))


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "agent_swin_tiny", "agent_swin_base"])
@pytest.mark.parametrize("size", [(224, 224), (200, 264)])
def test_stage_maps_at_224_and_at_a_size_not_a_multiple_of_the_window(name, size):
    with torch.device("meta"):
        features = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3))
        shapes = [tuple(f.shape) for f in features(torch.empty(2, 3, *size))]
    dims = features.feature_info.channels()
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    want = []
    for dim in dims:
        want.append((2, dim, h, w))
        h, w = -(-h // 2), -(-w // 2)
    assert shapes == want


def test_deit_tokens_at_224_and_448():
    with torch.device("meta"):
        for size in (224, 448):
            model = timm.create_model("agent_deit_small", img_size=size)
            assert model.forward_features(torch.empty(1, 3, size, size)).shape == (1, 1 + (size // 16) ** 2, 384)
            assert model.blocks[0].attn.grid_size == (size // 16, size // 16)
    blocks = timm.create_model("agent_deit_base", depth=6, embed_dim=48, num_heads=2).blocks
    assert isinstance(blocks[3].attn, AgentAttention)
    assert not isinstance(blocks[4].attn, AgentAttention)


def window_attention_oracle(attn: WindowAttention, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Swin (shifted) window attention per token pair, on a map larger than the window: the map padded to whole
    windows and rolled by -shift; a query attends the real keys of its window and shift region, with the RPB of
    their offset (query minus key)."""
    b, n, c = x.shape
    size, shift, m = attn.window_size, attn.shift_size, attn.num_heads
    hp, wp = -(-h // size) * size, -(-w // size) * size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ry, rx = ((ys - shift) % hp).flatten(), ((xs - shift) % wp).flatten()

    def region(pos, extent):  # Swin's slices (0, -window), (-window, -shift), (-shift, None)
        return (pos >= extent - size).long() + (shift > 0) * (pos >= extent - shift).long()

    window = (ry // size) * (wp // size) + rx // size
    label = region(ry, hp) * 3 + region(rx, wp)
    allowed = (window[:, None] == window[None]) & (label[:, None] == label[None])
    dy, dx = ry[:, None] - ry[None] + size - 1, rx[:, None] - rx[None] + size - 1
    table = attn.relative_position_bias_table
    index = (dy * (2 * size - 1) + dx).clamp(0, table.shape[0] - 1)  # pairs in different windows are masked
    bias = table[index].permute(2, 0, 1).masked_fill(~allowed, float("-inf"))
    q, k, v = attn.qkv(x).reshape(b, n, 3, m, c // m).permute(2, 0, 3, 1, 4)
    out = torch.softmax(q * (c // m) ** -0.5 @ k.transpose(-1, -2) + bias, -1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize(("window", "shift", "hw"), [(3, 1, (5, 4)), (3, 0, (5, 7)), (2, 1, (4, 5)), (3, 1, (6, 9))])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_swin_window_attention_masks_padding_and_shifted_regions(window, shift, hw, backend):
    """Each real query attends exactly the real tokens of its (shifted) window and region, with the RPB: in inference
    (auto: fused SDPA on the kept bias) and in the gradient of every parameter."""
    torch.manual_seed(0)
    attn = spread_biases(WindowAttention(16, 2, window, shift, backend=backend).double())
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64)
    want = window_attention_oracle(attn, x, *hw)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, hw), want)
    g = torch.randn_like(want)
    assert_same_gradients(parameter_gradients(attn, attn(x, hw), g), parameter_gradients(attn, want, g))


@pytest.mark.parametrize(("module", "table_name"), [(AgentAttention(16, 2, 4, (4, 4)), "an_bias"),
                                                    (WindowAttention(16, 2, 2, 1), "relative_position_bias_table")])
def test_inference_reuses_the_bias_until_a_parameter_changes_and_training_rebuilds_it(module, table_name):
    torch.manual_seed(0)
    module = module.double().eval()
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    table = getattr(module, table_name)
    with torch.no_grad():
        module(x, (4, 4))
        cached = module._bias_cache._value
        module(x, (4, 4))
        assert module._bias_cache._value is cached
        table.add_(0.5)  # an in-place update, as an optimizer step or load_state_dict makes
        out = module(x, (4, 4))
    assert module._bias_cache._value is not cached
    (grad,) = torch.autograd.grad(module(x, (4, 4)).square().sum(), [table])
    module.backend = "torch"
    (want,) = torch.autograd.grad(module(x, (4, 4)).square().sum(), [table])
    torch.testing.assert_close(grad, want)
    with torch.no_grad():
        torch.testing.assert_close(out, module(x, (4, 4)))


def test_inference_bias_follows_a_state_dict_loaded_with_assign():
    torch.manual_seed(0)
    module, source = AgentAttention(16, 2, 4, (4, 4)).eval(), AgentAttention(16, 2, 4, (4, 4)).eval()
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        module(x, (4, 4))
        module.load_state_dict(source.state_dict(), assign=True)
        torch.testing.assert_close(module(x, (4, 4)), source(x, (4, 4)))


TINY = {
    "agent_deit_tiny": {"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 64, "agent_num": 4},
    "agent_pvt_tiny": {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 48, 64), "num_heads": (1, 2, 2, 4)},
    "agent_swin_tiny": {"depths": (2, 2, 2, 2), "agent_depths": (2, 1, 0, 0), "embed_dim": 16,
                        "num_heads": (1, 2, 2, 4), "img_size": 96, "window_size": 3},
}  # fmt: skip
TINY_INPUT = {"agent_deit_tiny": (64, 64), "agent_pvt_tiny": (70, 90), "agent_swin_tiny": (92, 100)}


TRAINED_INPUT = {"agent_deit_tiny": (64, 64), "agent_pvt_tiny": (224, 224), "agent_swin_tiny": (96, 96)}


def attention_backends(model) -> set[str]:
    """The backends the model's agent and window attention layers run."""
    return {m.backend for m in model.modules() if isinstance(m, (AgentAttention, WindowAttention))}


@pytest.mark.parametrize("name", sorted(TINY))
def test_fast_path_matches_the_reference_path_in_training_and_inference(name):
    """A model built with backend="auto" and its copy built with "torch": the gradient of each parameter after
    a training step, and the outputs in inference (auto: fused SDPA windows, kept biases), at the trained grid and at
    a padded one with resized biases (features before the pooling and head)."""
    torch.manual_seed(0)
    fast = spread_biases(timm.create_model(name, num_classes=5, drop_path_rate=0.0, **TINY[name]).double())
    reference = timm.create_model(name, num_classes=5, drop_path_rate=0.0, backend="torch", **TINY[name]).double()
    reference.load_state_dict(fast.state_dict())
    assert attention_backends(fast) == {"auto"} and attention_backends(reference) == {"torch"}
    x = torch.randn(2, 3, *TINY_INPUT[name], dtype=torch.float64)
    for model in (fast, reference):
        F.cross_entropy(model(x), torch.tensor([1, 3])).backward()
    assert_same_gradients(*({n: p.grad for n, p in model.named_parameters()} for model in (fast, reference)))
    fast.eval()
    reference.eval()
    with torch.no_grad():
        for size in (TINY_INPUT[name], TRAINED_INPUT[name]):
            x = torch.randn(1, 3, *size, dtype=torch.float64)
            torch.testing.assert_close(fast.forward_features(x), reference.forward_features(x))


@pytest.mark.parametrize("name", sorted(TINY))
def test_timm_interface(name):
    model = timm.create_model(name, **TINY[name])
    x = torch.randn(1, 3, *TINY_INPUT[name])
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (1, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (1, 7)
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    assert model.no_weight_decay() and all(isinstance(n, str) for n in model.no_weight_decay())


def _to_official_pvt(state):
    out = {}
    for key, value in state.items():
        key = re.sub(r"^stages\.(\d)\.(patch_embed|pos_embed|blocks)", lambda m: f"{m[2]}{int(m[1]) + 1}", key)
        key = re.sub(r"^blocks(\d)", r"block\1", key)
        if ".attn.qkv." in key:
            dim = value.shape[0] // 3
            out[key.replace(".qkv.", ".q.")], out[key.replace(".qkv.", ".kv.")] = value[:dim], value[dim:]
        else:
            out[key] = value
    return out


def _to_official_swin(state):
    out = dict(state)
    for key in state:
        if key.endswith("relative_position_bias_table"):
            index = key.replace("relative_position_bias_table", "relative_position_index")
            out[index] = torch.zeros(9, 9, dtype=torch.long)
    return out


OFFICIAL = {"agent_deit_tiny": dict, "agent_pvt_tiny": _to_official_pvt, "agent_swin_tiny": _to_official_swin}


@pytest.mark.parametrize("name", sorted(TINY))
def test_official_checkpoint_round_trip_loads_strict(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY[name]).eval()
    official = OFFICIAL[name](model.state_dict())
    if name == "agent_pvt_tiny":
        assert "block1.0.attn.q.weight" in official and "patch_embed1.proj.weight" in official
    torch.save({"model": official}, tmp_path / "ckpt.pth")
    overlay = {"file": str(tmp_path / "ckpt.pth")}
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **TINY[name]).eval()
    x = torch.randn(1, 3, *TINY_INPUT[name])
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_checkpoint_at_another_resolution_resizes_pos_embed_and_agent_biases(tmp_path):
    args = dict(TINY["agent_pvt_tiny"])
    official = _to_official_pvt(timm.create_model("agent_pvt_tiny", **args).state_dict())
    torch.save({"model": official}, tmp_path / "c.pth")
    overlay = {"file": str(tmp_path / "c.pth")}
    model = timm.create_model("agent_pvt_tiny", img_size=256, pretrained=True, pretrained_cfg_overlay=overlay, **args)
    assert model.stages[0].pos_embed.shape == (1, 64 * 64, 16) and model.stages[0].blocks[0].attn.ah_bias.shape[3] == 64


def test_features_only_out_indices():
    features = timm.create_model("agent_pvt_tiny", features_only=True, out_indices=(1, 3), **TINY["agent_pvt_tiny"])
    assert [f.shape[1] for f in features(torch.randn(1, 3, 64, 64))] == [32, 64] == features.feature_info.channels()


def test_compiles():
    torch.manual_seed(0)
    model = timm.create_model("agent_pvt_tiny", **TINY["agent_pvt_tiny"]).eval()
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), model(x))
