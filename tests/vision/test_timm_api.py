"""The timm model API on every family beyond what timm's own tests check (test_timm_model_tests.py): factory
device/dtype on every variant, `backend` errors, `forward_intermediates`/`prune_intermediate_layers` values,
layer-decay parameter groups, torch.fx graphs run at another input size than traced."""

import copy
import re

import pytest
import timm
import torch
from timm.models import GraphExtractNet, get_graph_node_names, group_parameters

import mmattn.vision  # noqa: F401  (registers the models)

from .test_distributed import CASES
from .timm_tests_plugin import MMATTN_MODELS

HIERARCHICAL = ["biformer", "litv2_hilo", "nat", "dinat", "agent_pvt", "agent_swin"]


def _tiny(case: str, **kwargs) -> torch.nn.Module:
    name, args, _ = CASES[case]
    torch.manual_seed(0)
    return timm.create_model(name, **args, **kwargs).eval()


@pytest.mark.parametrize("name", MMATTN_MODELS)
def test_factory_device_and_dtype_reach_every_parameter_and_buffer(name):
    model = timm.create_model(name, device="meta", dtype=torch.float64)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    misplaced = [n for n, t in tensors.items() if t.device.type != "meta" or t.dtype not in (torch.float64, torch.long)]
    assert misplaced == []


@pytest.mark.parametrize("name, kwargs", [
    ("biformer_tiny", {}), ("litv2_small", {}), ("nat_mini", {}), ("dinat_mini", {}), ("agent_deit_tiny", {}),
    ("agent_deit_tiny", {"agent_layers": 0}), ("agent_pvt_tiny", {}), ("agent_swin_tiny", {}),
])  # fmt: skip
def test_a_bad_backend_is_named_as_the_user_passed_it(name, kwargs):
    with pytest.raises(ValueError, match=r"^backend must be one of \(.*\), got 'bogus'$"):
        timm.create_model(name, backend="bogus", device="meta", **kwargs)


def _nchw(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else x


@pytest.mark.parametrize("case", HIERARCHICAL)
def test_forward_intermediates_are_the_feature_maps(case):
    model = _tiny(case)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        features = _tiny(case, features_only=True, out_indices=(0, 1, 2, 3))(x)
        assert len(taps) == len(features) == 4
        for tap, feature in zip(taps, features):
            torch.testing.assert_close(tap, feature)
        nhwc = model.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc, [taps[1].permute(0, 2, 3, 1), taps[3].permute(0, 2, 3, 1)])
        for i in range(4):
            early, (tap,) = model.forward_intermediates(x, indices=[i], stop_early=True)
            torch.testing.assert_close(tap, taps[i])
            assert early.shape[0] == 2
        (normed,) = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed, _nchw(model, final))


@pytest.mark.parametrize("case", HIERARCHICAL)
@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_pruned_model_ends_at_the_tap_and_trains_every_parameter(case, index):
    model = _tiny(case)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([index], prune_norm=True) == [index]
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=[index], intermediates_only=True)[0],
                                   taps[index])
        torch.testing.assert_close(_nchw(pruned, pruned.forward_features(x)), taps[index])
    pruned = copy.deepcopy(model)
    pruned.prune_intermediate_layers([index])  # the final norm and head are kept only with the last stage
    pruned.reset_classifier(5, "avg")
    pruned.train()(x).sum().backward()
    assert pruned.num_features == pruned.head_hidden_size == model.feature_info[index]["num_chs"]
    assert [n for n, p in pruned.named_parameters() if p.grad is None] == []


# Per family: the stem's module, the stage list, a stage's downsampler (its names) and whether it comes first or last.
DATA_FLOW = {
    "biformer": ("stem", "stages", "downsample", "first"),
    "litv2_hilo": ("patch_embed", "stages", "downsample", "first"),
    "nat": ("patch_embed", "levels", "downsample", "last"),
    "dinat": ("patch_embed", "levels", "downsample", "last"),
    "agent_pvt": (None, "stages", "patch_embed|pos_embed", "first"),  # stage 0's patch embedding is the stem
    "agent_swin": ("patch_embed", "layers", "downsample", "last"),
}


@pytest.mark.parametrize("case", HIERARCHICAL)
def test_layer_decay_groups_follow_the_data_flow(case):
    """timm's layer-wise learning-rate decay groups (`group_parameters(model, model.group_matcher())`): the stem,
    then one group per block in data-flow order, a downsampler with the block beside it, the final norm with the
    last block, the head last; coarse: the stem, one group per stage, the rest."""
    model = _tiny(case)
    stem, stages, downsample, side = DATA_FLOW[case]
    depths = [len(stage.blocks) for stage in getattr(model, stages)]
    last_block = (len(depths) - 1, depths[-1] - 1)

    def block_of(name: str) -> tuple[int, int]:
        parts = name.split(".")
        if parts[0] == stages and parts[2] == "blocks":
            return int(parts[1]), int(parts[3])
        if parts[0] == stages and re.fullmatch(downsample, parts[2]):
            stage = int(parts[1])
            if stage == 0 and stem is None:
                return (-1, 0)
            return (stage, 0) if side == "first" else (stage, depths[stage] - 1)
        if parts[0] == stem:
            return (-1, 0)
        if parts[0] == "norm":
            return last_block
        assert parts[0] == "head", name
        return (len(depths), 0)

    names = [name for name, _ in model.named_parameters()]
    rank = {block: i for i, block in enumerate(sorted({block_of(name) for name in names}))}
    assert group_parameters(model, model.group_matcher(), reverse=True) == {n: rank[block_of(n)] for n in names}

    def stage_of(name: str) -> int:
        stage = block_of(name)[0]
        return len(depths) if name.startswith("norm") else stage
    assert group_parameters(model, model.group_matcher(coarse=True), reverse=True) == {
        name: stage_of(name) + 1 for name in names
    }


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing the model in eval mode")
@pytest.mark.parametrize("case", [*HIERARCHICAL, "agent_deit", "ela_resnet"])
def test_fx_graph_runs_at_another_input_size(case):
    """The shape-dependent code sits in notrace modules/functions, so the graph is not tied to the traced size."""
    model = _tiny(case)
    graph = GraphExtractNet(model, [get_graph_node_names(model)[1][-1]])
    for size in (64, 80):
        x = torch.randn(1, 3, size, size + (0 if case == "agent_deit" else 16))  # Agent-DeiT: square grids
        with torch.no_grad():
            torch.testing.assert_close(graph(x), model(x))
