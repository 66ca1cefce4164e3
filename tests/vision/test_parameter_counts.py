"""Every released variant has exactly the official model's parameter count (spec sections 1.3, 2.3, 4.2, 5.2)."""

import pytest
import timm
import torch

import mmattn.vision  # noqa: F401  (registers the models)

PARAMS = {
    "biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968,
    "litv2_small": 27_844_000, "litv2_medium": 48_830_368, "litv2_base": 86_520_704,
    "agent_deit_tiny": 6_015_640, "agent_deit_small": 22_647_112, "agent_deit_base": 87_204_904,
    "agent_pvt_tiny": 11_570_352, "agent_pvt_small": 20_635_066, "agent_pvt_medium": 35_921_746,
    "agent_pvt_large": 48_738_180, "agent_swin_tiny": 28_902_964, "agent_swin_small": 49_666_684,
    "agent_swin_base": 88_095_096,
    "nat_mini": 19_984_174, "nat_tiny": 27_901_582, "nat_small": 50_743_297, "nat_base": 89_769_652,
    "dinat_mini": 19_984_174, "dinat_tiny": 27_901_582, "dinat_small": 50_719_681, "dinat_base": 89_769_652,
}  # fmt: skip

# Released models at another input size (Agent attention's biases depend on the grid).
OTHER_SIZES = [("agent_deit_small", 448, 23_070_472), ("agent_pvt_medium", 256, 36_083_682)]


def parameter_count(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, **kwargs).parameters())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_the_released_models(name):
    assert parameter_count(name) == PARAMS[name]


@pytest.mark.parametrize("name, img_size, params", OTHER_SIZES)
def test_parameter_counts_of_the_other_released_resolutions(name, img_size, params):
    assert parameter_count(name, img_size=img_size) == params
