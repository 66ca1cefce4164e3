"""One test per tab in a real headless Chromium: click the tab's main button and check what appears."""

from __future__ import annotations

import re


def test_vision_tab(page) -> None:
    page.click("#vision-run")
    page.wait_for_selector("#vision-maps img", timeout=120_000)
    assert "Random weights" in page.inner_text("#vision-source")
    assert page.locator("#vision-maps img").count() >= 1


def test_vlm_tab(page) -> None:
    page.get_by_role("tab", name="VLM").click()
    page.click("#vlm-run")
    page.wait_for_selector("#vlm-maps img", timeout=180_000)
    text = page.inner_text("#vlm-answers")
    for name in ("no intervention", "VAR", "GIFT", "FastV", "PyramidDrop"):
        assert name in text


def test_video_tab(page) -> None:
    page.get_by_role("tab", name="Video").click()
    page.click("#video-mask")
    page.wait_for_function("document.querySelector('#video-summary').innerText.includes('density')", timeout=120_000)
    assert re.search(r"density \d\.\d{3}", page.inner_text("#video-summary"))
    assert page.locator("#video-mask-image img").count() == 1
