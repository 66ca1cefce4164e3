"""The tiny models' random weights come from a generator of their own, whatever else draws from torch's global one."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mmattn.demo.video_pipeline import _tiny_wan_pipeline
from mmattn.demo.vlm_models import _tiny_llava


@pytest.mark.parametrize("build", [lambda: _tiny_wan_pipeline().transformer, _tiny_llava], ids=["wan", "llava"])
def test_tiny_weights_ignore_the_global_generator(build) -> None:
    """Issue 22: the tiny models seeded torch's global generator, which other requests draw from meanwhile."""
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.randn(64)

    competitor = threading.Thread(target=draw)
    competitor.start()
    try:
        weights = [torch.cat([p.detach().flatten() for p in build().parameters()]) for _ in range(4)]
    finally:
        stop.set()
        competitor.join()
    assert all(torch.equal(w, weights[0]) for w in weights)
