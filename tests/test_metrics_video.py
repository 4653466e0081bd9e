"""Tests of dit_sparse.metrics_video: PSNR and SSIM against hand-computed values and identities."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.metrics_video import gaussian_window, psnr, ssim

C1, C2 = 0.01**2, 0.03**2


def _video(seed, f=3, h=20, w=24, c=3):
    return np.random.default_rng(seed).integers(0, 256, size=(f, h, w, c), dtype=np.uint8)


# ---------------------------------------------------------------- PSNR
def test_psnr_identical_is_inf():
    v = _video(0)
    assert psnr(v, v) == math.inf
    assert psnr(torch.from_numpy(v), v.copy()) == math.inf


@pytest.mark.parametrize("delta", [1, 5, 16, 40])
def test_psnr_known_noise_level(delta):
    # +-delta in a checkerboard around mid-grey: every pixel's squared error is exactly delta^2.
    base = np.full((4, 8, 8, 3), 128, dtype=np.int16)
    sign = np.where((np.indices((8, 8)).sum(0) % 2) == 0, 1, -1)[None, :, :, None]
    noisy = (base + delta * sign).astype(np.uint8)
    expected = 10 * math.log10(255.0**2 / delta**2)
    assert psnr(base.astype(np.uint8), noisy) == pytest.approx(expected, abs=1e-9)


def test_psnr_gaussian_noise_matches_sigma():
    rng = np.random.default_rng(1)
    clean = rng.uniform(0.2, 0.8, size=(4, 32, 32, 3))
    sigma = 0.01  # -> PSNR close to 20*log10(1/sigma) = 40 dB
    noisy = clean + rng.normal(0, sigma, size=clean.shape)
    assert psnr(clean, noisy) == pytest.approx(40.0, abs=0.2)


def test_uint8_and_float_scaling_agree():
    a, b = _video(2), _video(3)
    af, bf = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    assert psnr(a, b) == pytest.approx(psnr(af, bf), rel=1e-5)
    assert ssim(a, b) == pytest.approx(ssim(af, bf), rel=1e-5)
    assert psnr(a, af) > 100  # a video and its float32 export differ only by rounding


# ---------------------------------------------------------------- SSIM
def test_ssim_identical_is_one():
    v = _video(4)
    assert ssim(v, v) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_frames_is_luminance_term():
    # Flat frames have zero variance, so SSIM reduces to (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    m1, m2 = 0.25, 0.75
    a = np.full((2, 16, 16, 3), m1)
    b = np.full((2, 16, 16, 3), m2)
    expected = (2 * m1 * m2 + C1) / (m1**2 + m2**2 + C1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_single_window_matches_hand_computation():
    # An 11x11 frame holds exactly one window position: SSIM is the formula on Gaussian-weighted stats.
    rng = np.random.default_rng(5)
    x, y = rng.uniform(size=(11, 11)), rng.uniform(size=(11, 11))
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    wgt = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (wgt * x).sum(), (wgt * y).sum()
    vx, vy = (wgt * (x - mx) ** 2).sum(), (wgt * (y - my) ** 2).sum()
    cxy = (wgt * (x - mx) * (y - my)).sum()
    expected = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    assert ssim(x[None, :, :, None], y[None, :, :, None]) == pytest.approx(expected, rel=1e-9)


def test_ssim_averages_over_frames():
    a, b = _video(6, f=1), _video(7, f=1)
    c, d = _video(8, f=1), _video(9, f=1)
    both = ssim(np.concatenate([a, c]), np.concatenate([b, d]))
    assert both == pytest.approx((ssim(a, b) + ssim(c, d)) / 2, rel=1e-9)


def test_ssim_drops_with_noise():
    clean = np.random.default_rng(10).uniform(size=(2, 32, 32, 3))
    rng = np.random.default_rng(11)
    scores = [ssim(clean, np.clip(clean + rng.normal(0, s, clean.shape), 0, 1)) for s in (0.01, 0.05, 0.2)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_gaussian_window_is_normalized_and_symmetric():
    win = gaussian_window(11, 1.5)
    assert win.sum().item() == pytest.approx(1.0)
    assert torch.equal(win, win.T) and torch.equal(win, win.flip(0))
    assert win[5, 5] == win.max()


@settings(max_examples=25, deadline=None)
@given(
    f=st.integers(1, 3), h=st.integers(1, 20), w=st.integers(1, 20), c=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_metrics_symmetric_and_bounded(f, h, w, c, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(f, h, w, c), dtype=np.uint8)
    b = rng.integers(0, 256, size=(f, h, w, c), dtype=np.uint8)
    s = ssim(a, b)
    assert -1.0 <= s <= 1.0
    assert s == pytest.approx(ssim(b, a), abs=1e-12)
    assert psnr(a, b) == pytest.approx(psnr(b, a))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((2, 8, 8, 3)), np.zeros((3, 8, 8, 3)), "differ in shape"),
        (np.zeros((8, 8)), np.zeros((8, 8)), r"\[F, H, W, C\]"),
        (np.zeros((2, 8, 8, 3), dtype=np.int32), np.zeros((2, 8, 8, 3), dtype=np.int32), "dtype"),
        ([[0.0]], [[0.0]], "numpy array or torch tensor"),
        (np.zeros((0, 8, 8, 3)), np.zeros((0, 8, 8, 3)), "empty"),
    ],
)
def test_bad_input_raises(a, b, match):
    with pytest.raises(ValueError, match=match):
        psnr(a, b)
    with pytest.raises(ValueError, match=match):
        ssim(a, b)


def test_bad_window_raises():
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(4)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_window(5, 0.0)
