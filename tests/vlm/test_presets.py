import pytest

from mmattn import vlm
from mmattn.vlm.presets import PRESET_DIR, load_preset


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_builds(name):
    import yaml

    for method in yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()):
        intervention = load_preset(name, method)
        assert isinstance(intervention, vlm.Intervention)


def test_spec_defaults_and_overrides():
    assert load_preset("llava-1.5-7b", "var") == vlm.VAR(sink_dims=(2533, 1415))  # the released configuration
    assert load_preset("qwen2-vl-7b", "gift").alpha == 4.0
    assert load_preset("llava-1.5-7b", "fastv", ratio=0.75).ratio == 0.75
    with pytest.raises(ValueError, match="model"):
        load_preset("nope", "var")
