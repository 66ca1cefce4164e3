"""ELA layer against the paper's formula, and the ELA CNNs (timm ResNet / MobileNetV2 with ELA gates)."""

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
import mmattn.vision  # noqa: F401
from mmattn.vision.layers.ela import ELA, ELA_VARIANTS

# variant -> (kernel size, conv channels per group or None for depthwise, GroupNorm groups), spec section 3
PAPER_CONSTANTS = {"T": (5, None, 32), "B": (7, None, 16), "S": (5, 8, 16), "L": (7, 8, 16)}


def ela_params(channels: int, variant: str) -> int:
    k, per_group, _ = PAPER_CONSTANTS[variant]
    return k * channels * (per_group or 1) + 2 * channels


@pytest.mark.parametrize("variant", "TBSL")
def test_output_is_x_times_row_and_column_gates_with_shared_conv_and_norm(variant):
    torch.manual_seed(0)
    ela = ELA(64, variant).double()
    torch.nn.init.normal_(ela.norm.weight)
    torch.nn.init.normal_(ela.norm.bias)
    x = torch.randn(2, 64, 9, 13, dtype=torch.float64)
    k, _, groups = PAPER_CONSTANTS[variant]

    def gate(strip):
        conv = F.conv1d(strip, ela.conv.weight, padding=k // 2, groups=ela.conv.groups)
        return torch.sigmoid(F.group_norm(conv, groups, ela.norm.weight, ela.norm.bias))

    want = x * gate(x.mean(3)).unsqueeze(3) * gate(x.mean(2)).unsqueeze(2)
    torch.testing.assert_close(ela(x), want)


@pytest.mark.parametrize("variant", "TBSL")
@pytest.mark.parametrize("channels", [64, 256])
def test_parameter_count_is_k_c_c_over_g_plus_2c(variant, channels):
    assert sum(p.numel() for p in ELA(channels, variant).parameters()) == ela_params(channels, variant)
    assert ELA_VARIANTS[variant].norm_groups == PAPER_CONSTANTS[variant][2]


@pytest.mark.parametrize(("channels", "variant"), [(144, "T"), (24, "B"), (40, "S"), (0, "S")])
def test_channel_counts_the_norm_or_conv_groups_cannot_split_raise(channels, variant):
    with pytest.raises(ValueError, match="channels"):
        ELA(channels, variant)


def test_bad_variant_and_bad_input_raise():
    with pytest.raises(ValueError, match="variant"):
        ELA(64, "X")
    with pytest.raises(ValueError, match="x must be"):
        ELA(64)(torch.randn(1, 32, 4, 4))


def mobilenetv2_gate_channels() -> list[int]:
    """The depthwise-separable block gates its 32 input channels; each inverted residual its 6x expanded input."""
    channels, in_chs = [32], 16
    for out_chs, repeats in ((24, 2), (32, 3), (64, 4), (96, 3), (160, 3), (320, 1)):
        for _ in range(repeats):
            channels.append(6 * in_chs)
            in_chs = out_chs
    return channels


# model -> (base timm model, gate variant, channels of every gate in build order)
MODELS = {
    "ela_resnet18": ("resnet18", "B", [c for c in (64, 128, 256, 512) for _ in range(2)]),
    "ela_resnet50": ("resnet50", "S", [c * 4 for c, n in ((64, 3), (128, 4), (256, 6), (512, 3)) for _ in range(n)]),
    "ela_mobilenetv2": ("mobilenetv2_100", "S", mobilenetv2_gate_channels()),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count_is_the_base_cnn_plus_one_gate_per_block(name):
    base, variant, channels = MODELS[name]
    with torch.device("meta"):
        model, reference = timm.create_model(name), timm.create_model(base)
    gates = [m for m in model.modules() if isinstance(m, ELA)]
    assert [g.conv.in_channels for g in gates] == channels and {g.variant for g in gates} == {variant}
    want = sum(p.numel() for p in reference.parameters()) + sum(ela_params(c, variant) for c in channels)
    assert sum(p.numel() for p in model.parameters()) == want


@pytest.mark.parametrize("name", sorted(MODELS))
def test_feature_maps_at_224_and_at_a_non_square_size(name):
    with torch.device("meta"):
        features = timm.create_model(name, features_only=True)
        for size in ((224, 224), (160, 288)):
            shapes = [tuple(f.shape) for f in features(torch.empty(1, 3, *size))]
            info = features.feature_info
            want = [(1, c, -(-size[0] // r), -(-size[1] // r)) for c, r in zip(info.channels(), info.reduction())]
            assert shapes == want


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trains_and_loads_a_checkpoint_with_the_de_facto_key_names(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name)
    model(torch.randn(2, 3, 64, 80)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    de_facto = {
        k.replace(".se.conv.", ".se.con1.").replace(".se.norm.", ".se.GN."): v for k, v in model.state_dict().items()
    }
    assert any(".se.GN." in k for k in de_facto)
    torch.save({"state_dict": de_facto}, tmp_path / "ela.pth")
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "ela.pth")})
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_resnet_gate_sits_after_the_last_bn_before_the_residual_add():
    model = timm.create_model("ela_resnet18").eval()
    block = model.layer1[0]
    x = torch.randn(1, 64, 8, 8)
    branch = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), block.act2(block.se(branch) + x))
