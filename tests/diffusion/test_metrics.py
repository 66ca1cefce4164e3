"""Metrics: CSCV with a random-weight open_clip model, PSNR/SSIM against their definitions, decord reading."""

import numpy as np
import pytest
import torch

from mmattn.diffusion import metrics


def _video(seed, frames=4, size=32):
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def test_psnr_and_ssim():
    a = _video(0)
    assert metrics.frame_ssim(a, a) == pytest.approx(1.0)
    assert metrics.frame_psnr(a, a) >= 99
    b = np.clip(a.astype(int) + 4, 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).reshape(4, -1).mean(-1)
    assert metrics.frame_psnr(a, b) == pytest.approx(float(np.mean(10 * np.log10(255**2 / mse))))
    assert metrics.frame_ssim(a, _video(1)) < 0.2
    with pytest.raises(ValueError, match="candidate"):
        metrics.frame_psnr(a, a[:2])
    with pytest.raises(ValueError, match="video"):
        metrics.frame_psnr(a.astype(np.float32), a)


def test_cscv_is_std_over_mean_of_consecutive_similarities():
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model, preprocess = metrics.load_clip("ViT-B-32")
    video = _video(2, frames=5, size=48)
    sims = metrics.clip_frame_similarities(video, model, preprocess).double()
    assert sims.shape == (4,)
    assert metrics.cscv(video, model, preprocess) == pytest.approx(float(sims.std(unbiased=False) / sims.mean()))
    static = np.repeat(video[:1], 5, axis=0)
    assert metrics.cscv(static, model, preprocess) == pytest.approx(0.0, abs=1e-6)


def test_read_video_with_decord(tmp_path):
    av = pytest.importorskip("av")
    pytest.importorskip("decord")
    path = tmp_path / "clip.mp4"
    frames = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    frames[:, 8:24, 8:24] = 200
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    read = metrics.read_video(path)
    assert read.shape == frames.shape
    assert metrics.frame_psnr(frames, read) > 25
