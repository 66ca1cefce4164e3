"""VLM tab: answers with and without each intervention through the app; the kept-token maps follow the plans."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from mmattn.demo import vlm_tab
from mmattn.demo.vision_tab import sample_image


def _quiet(*args, **kwargs) -> None:
    return None


def test_compare_through_the_app(client, tmp_path) -> None:
    from gradio_client import handle_file

    path = tmp_path / "chelsea.png"
    sample_image("chelsea").save(path)
    answers, gallery, note = client.predict("", "What animal is this?", handle_file(str(path)), ["FastV", "GIFT"], 4,
                                            api_name="/vlm_compare")
    assert [row[0] for row in answers["data"]] == ["no intervention", "FastV", "GIFT"]
    assert all(len(row[1]) == 4 for row in answers["data"])  # 4 new tokens, one character each
    assert [item["caption"].split(":")[0] for item in gallery] == ["FastV", "GIFT"]
    assert "random weights" in note


def test_pruning_maps_keep_the_planned_share() -> None:
    demo = vlm_tab.VLMDemo()
    answers, maps, _ = demo.compare("", "Describe it.", sample_image("astronaut"), ["FastV", "PyramidDrop", "VAR"], 3,
                                    progress=_quiet)
    captions = [caption for _, caption in maps]
    assert captions[0].startswith("FastV: 32 of 64")  # ratio R = 0.5 pruned after layer K = 2
    assert captions[1].startswith("PyramidDrop: 8 of 64")  # lambda^3 = 0.125 after three stages
    assert captions[2].startswith("VAR: sink score")
    assert len(answers) == 4


def test_gift_reads_a_short_prompt() -> None:
    demo = vlm_tab.VLMDemo()
    _, maps, _ = demo.compare("", "hi", sample_image("coffee"), ["GIFT"], 2, progress=_quiet)
    assert [caption.split(":")[0] for _, caption in maps] == ["GIFT"]


def test_bad_input() -> None:
    demo = vlm_tab.VLMDemo()
    with pytest.raises(ValueError, match="^Prompt: expected text of 1 to 1000 characters$"):
        demo.compare("", "  ", sample_image("coffee"), [], progress=_quiet)
    with pytest.raises(ValueError, match="^Interventions: expected any of VAR, GIFT, FastV, PyramidDrop$"):
        demo.compare("", "hi", sample_image("coffee"), ["SparseVLM"], progress=_quiet)
    with pytest.raises(ValueError, match="^Model: expected .* model directory on the server"):
        demo.compare("/no/such/model", "hi", sample_image("coffee"), [], progress=_quiet)
