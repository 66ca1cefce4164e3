"""Video tab: Radial mask and density, DiTCtrl plan, video reading and the tiny Wan run, through the app."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("diffusers")

from mmattn.demo import video_tab
from mmattn.demo.rendering import write_video
from mmattn.diffusion import radial_block_mask


def test_radial_through_the_app(client) -> None:
    image, summary, plot = client.predict(12, 256, 64, 1.0, "wan", api_name="/video_radial")
    expected = radial_block_mask(12, 256, block_size=64, decay_factor=1.0, model="wan")
    assert f"density **{expected.float().mean():.3f}**" in summary
    assert f"{expected.shape[0]}x{expected.shape[1]} blocks" in summary
    assert image and plot


def test_density_curve_follows_the_mask() -> None:
    figure = video_tab.density_curve(24, 256, 64, 1.0, "hunyuan")
    (line,) = figure.axes[0].get_lines()
    for frames, density in zip(*line.get_data()):
        mask = radial_block_mask(int(frames), 256, block_size=64, model="hunyuan")
        assert density == pytest.approx(mask.float().mean().item())
    assert line.get_ydata()[-1] < line.get_ydata()[0]  # sparser as the video grows


def test_plan_bars_follow_segment_plan(client) -> None:
    from mmattn.diffusion.ditctrl import segment_plan

    plan = segment_plan(3, segment_frames=13, overlap=9, transitions=2)
    bars = video_tab.plan_figure(3, 13, 9, 2).axes[0].patches
    assert [(bar.get_x(), bar.get_width()) for bar in bars] == [(start, 13) for start in plan.starts]
    assert client.predict(3, 13, 9, 2, api_name="/video_plan")
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"^Overlap: expected a whole number from 0 to 12 \(less than the segment"):
        client.predict(3, 13, 13, 2, api_name="/video_plan")


def test_video_grid_from_a_clip(tmp_path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (9, 48, 64, 3), dtype=np.uint8)
    path = write_video(frames, tmp_path / "clip.mp4")
    assert video_tab.VIDEO.probe(str(path)) == (9, 48, 64)
    grid_frames, tokens, *_ = video_tab.radial_from_video(str(path), 16, 1.0, "wan")
    assert (grid_frames, tokens) == (3, 12)  # (9-1)//4+1 latent frames, (48/16)*(64/16) tokens
    with pytest.raises(ValueError, match="^Video: expected a video file"):
        video_tab.VIDEO(str(tmp_path / "missing.mp4"))


def test_tiny_run_through_the_app(client) -> None:
    video, note = client.predict(5, 2, True, api_name="/video_run")
    frames, _, _ = video_tab.VIDEO.probe(video if isinstance(video, str) else video["video"])
    assert frames == 2  # (5-1)//4+1 latent frames
    assert re.search(r"Radial attention\), 2 latent", note)

