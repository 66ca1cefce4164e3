"""Vision tab: predictions and attention maps through the running app, and the maps against the designs' rules."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("timm")

from mmattn.demo import vision_tab
from mmattn.demo.vision_maps import attention_maps


@pytest.fixture(scope="module")
def demo() -> vision_tab.VisionDemo:
    return vision_tab.VisionDemo()


def _maps(demo, name: str, query: tuple[float, float]) -> list:
    model, _ = demo.model(name)
    pixels, _ = demo._input(model, vision_tab.sample_image("chelsea"))
    return attention_maps(name, model, pixels, query)


def test_predict_through_the_app(client, tmp_path) -> None:
    from gradio_client import handle_file

    path = tmp_path / "coffee.png"
    vision_tab.sample_image("coffee").save(path)
    label, note, gallery = client.predict("nat_mini", handle_file(str(path)), "", False, 0.2, 0.7,
                                          api_name="/vision_predict")
    assert len(label["confidences"]) == 5
    assert sum(c["confidence"] for c in label["confidences"]) <= 1.0 + 1e-6
    assert "Random weights" in note
    assert [item["caption"].split(":")[0] for item in gallery] == ["block 1", "block 2"]


def test_bad_input_is_a_message(client, demo) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="^Image: expected a picture"):
        client.predict("biformer_tiny", None, "", False, 0.5, 0.5, api_name="/vision_predict")
    with pytest.raises(ValueError, match="^Checkpoint path: expected the path of a file on the server"):
        demo.model("biformer_tiny", "/no/such.pth")


def test_large_pictures_are_reduced_as_decoded(tmp_path) -> None:
    from PIL import Image

    photo = Image.new("RGB", (3000, 2000), "teal")
    photo.save(tmp_path / "photo.jpg")
    assert vision_tab.IMAGE(str(tmp_path / "photo.jpg")).size == (1024, 683)
    assert vision_tab.IMAGE(photo).size == (1024, 683) and photo.size == (3000, 2000)
    with pytest.raises(ValueError, match="^Image: expected a picture .* of at most 50 megapixels$"):
        vision_tab.IMAGE(Image.new("L", (10000, 5001)))


def test_bra_map_shows_the_routed_regions(demo) -> None:
    model, _ = demo.model("biformer_tiny")
    (bra,) = [m for m in model.modules() if type(m).__name__ == "BiLevelRoutingAttention" and m.topk > 1][:1]
    (_, grid), = _maps(demo, "biformer_tiny", (0.9, 0.1))
    assert grid.shape == (bra.n_win, bra.n_win)
    assert grid[int(0.1 * bra.n_win), int(0.9 * bra.n_win)] == 0.5  # the query's own region
    routed = np.isfinite(grid).sum()
    assert bra.topk <= routed <= bra.topk + 1  # the query region may or may not be among the top-k


@pytest.mark.parametrize(("name", "dilations"), [("nat_mini", (1, 1)), ("dinat_mini", (1, 8))])
@pytest.mark.parametrize("query", [(0.5, 0.5), (0.0, 0.0), (0.99, 0.4)])
def test_neighborhood_window_has_kernel_squared_keys_on_the_dilated_grid(demo, name, dilations, query) -> None:
    maps = _maps(demo, name, query)
    assert len(maps) == 2
    for (caption, grid), dilation in zip(maps, dilations):
        assert f"dilation {dilation}" in caption
        keys = np.argwhere(np.isfinite(grid))
        assert len(keys) == 49  # 7x7, shifted inward at the borders
        row, col = int(query[1] * grid.shape[0]), int(query[0] * grid.shape[1])
        assert ((keys - [row, col]) % dilation == 0).all()  # same dilated sub-grid as the query
        assert np.ptp(keys[:, 0]) == np.ptp(keys[:, 1]) == 6 * dilation


def test_hilo_and_agent_maps(demo) -> None:
    hifi, lofi = _maps(demo, "litv2_small", (0.5, 0.5))
    assert "Hi-Fi" in hifi[0] and "Lo-Fi" in lofi[0] and hifi[1].shape == lofi[1].shape
    assert np.isfinite(hifi[1]).all() and hifi[1].min() >= 0
    (_, agent), = _maps(demo, "agent_deit_tiny", (0.5, 0.5))
    assert agent.shape == (14, 14) and 0 < agent.sum() <= 1 + 1e-5  # a softmax over the cls token and the patches
    assert _maps(demo, "ela_resnet18", (0.5, 0.5)) == []


def test_backend_timings(client) -> None:
    table = client.predict(256, api_name="/vision_timings")
    rows = table["data"]
    assert {row[2] for row in rows} == {"fa4", "triton", "flex", "torch"}
    assert [row[0].split(" ")[0] for row in rows if row[2] == "fa4"] == ["block-sparse"]  # FA4 runs that family only
    assert all(row[3] is not None and row[3] > 0 for row in rows if row[2] == "torch")
    # the interpreter (every CPU test run) would time Python, not a kernel
    triton = [row for row in rows if row[2] == "triton"]
    assert len(triton) == 2 and all(row[3] is None and row[4].startswith("not timed: interpreted") for row in triton)
