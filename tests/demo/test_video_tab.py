"""Video tab: Radial mask and density, DiTCtrl plan, video reading and the tiny pipeline runs (every model, every
attention pattern), through the app."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from mmattn.demo import video_tab
from mmattn.demo.rendering import write_video
from mmattn.demo.video_pipeline import TINY_MODELS, run_tiny, sparse_config
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
    video, note = client.predict(5, 2, "wan2.1", "radial", api_name="/video_run")
    frames, _, _ = video_tab.VIDEO.probe(video if isinstance(video, str) else video["video"])
    assert frames == 2  # (5-1)//4+1 latent frames
    assert re.search(r"Wan 2.1 T2V transformer \(Radial attention\), 2 latent", note)
    video, note = client.predict(9, 2, "kandinsky-5", "nabla", api_name="/video_run")
    assert video_tab.VIDEO.probe(video if isinstance(video, str) else video["video"])[0] == 3
    assert re.search(r"Kandinsky 5 transformer \(NABLA attention\), 3 latent", note)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"^Model: expected one of wan2.1, wan2.2-ti2v, hunyuanvideo-1.5, ltx-2, kandinsky-5"):
        client.predict(5, 2, "mochi", "radial", api_name="/video_run")
    with pytest.raises(AppError, match=r"^Attention: expected one of dense, radial, sta, nabla"):
        client.predict(5, 2, "wan2.1", "svg", api_name="/video_run")


def test_tab_offers_every_tiny_model_and_pattern() -> None:
    assert set(video_tab.MODEL.options) == {"wan2.1", "wan2.2-ti2v", "hunyuanvideo-1.5", "ltx-2", "kandinsky-5"}
    assert video_tab.PATTERN.options == ("dense", "radial", "sta", "nabla")


@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_every_tiny_model_runs_every_pattern(model) -> None:
    """Same seed: each pattern runs through the model's sparse processors, is finite and differs from dense (the
    first step is dense, so the sparse steps are what differ); the dense run is reproducible."""
    dense = run_tiny(model, 9, 3, "dense")
    assert dense.shape == (4, 3, 8, 16) and torch.equal(dense, run_tiny(model, 9, 3, "dense"))
    for pattern in ("radial", "sta", "nabla"):
        sparse = run_tiny(model, 9, 3, pattern)
        assert sparse.shape == dense.shape and torch.isfinite(sparse).all()
        assert not torch.equal(sparse, dense), pattern  # random weights of std 0.02: small, but not nothing


def test_sparse_run_installs_the_pattern_on_the_transformer(monkeypatch) -> None:
    """The run goes through `apply_sparse_attention` with the tab's config, and removes it afterwards."""
    import mmattn.diffusion as diffusion

    applied = []
    apply = diffusion.apply_sparse_attention

    def spy(target, pattern, config=None, **kwargs):
        handle = apply(target, pattern, config, **kwargs)
        applied.append((type(handle.radial[0].config).__name__, handle))
        return handle

    monkeypatch.setattr(diffusion, "apply_sparse_attention", spy)
    run_tiny("hunyuanvideo-1.5", 5, 2, "sta")
    ((name, handle),) = applied
    assert name == "STAConfig" and handle.radial == []  # removed after the run
    assert sparse_config("sta").dense_steps == 1

