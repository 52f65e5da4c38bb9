"""Tests for compress.colorfix (TSD-SR colour alignment)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.colorfix import (
    COLOR_FIX_METHODS,
    _wavelet_lowpass,
    adain_color_fix,
    apply_color_fix,
    wavelet_color_fix,
)


def _smooth_image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A low-frequency image in [0.2, 0.8] (random coarse grid upsampled)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 4, 4, generator=g)
    img = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return 0.2 + 0.6 * img


# --- reference implementation (TSD-SR / StableSR colorfix.py), used to check ours -------------


def _ref_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=image.dtype) / 16
    k = k[None, None].repeat(3, 1, 1, 1)
    image = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(image, k, groups=3, dilation=radius)


def _ref_decompose(image: torch.Tensor, levels: int = 5):
    high = torch.zeros_like(image)
    for i in range(levels):
        low = _ref_blur(image, 2**i)
        high += image - low
        image = low
    return high, low


def _ref_wavelet(sr: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
    return (_ref_decompose(sr)[0] + _ref_decompose(lr_up)[1]).clamp(0, 1)


def _ref_adain(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    def stats(x):
        b, c = x.shape[:2]
        var = x.reshape(b, c, -1).var(dim=2) + 1e-5
        return x.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(
            b, c, 1, 1
        )

    lm, ls = stats(lr)
    sm, ss = stats(sr)
    return ((sr - sm) / ss * ls + lm).clamp(0, 1)


# --- adain -------------------------------------------------------------------------------------


def test_adain_matches_lr_statistics():
    torch.manual_seed(0)
    lr = torch.rand(2, 3, 24, 20) * 0.5 + 0.25
    sr = (
        F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False) * 0.6
        + 0.3
    ).clamp(0, 1)
    out = adain_color_fix(sr, lr)
    assert out.shape == sr.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    flat_o, flat_l = out.flatten(2), lr.flatten(2)
    torch.testing.assert_close(flat_o.mean(2), flat_l.mean(2), atol=2e-3, rtol=0)
    torch.testing.assert_close(flat_o.std(2), flat_l.std(2), atol=2e-3, rtol=0)
    torch.testing.assert_close(out, _ref_adain(sr, lr), atol=1e-5, rtol=0)


def test_adain_accepts_unbatched_and_half():
    lr = torch.rand(3, 10, 12)
    sr = torch.rand(3, 40, 48).half()
    out = adain_color_fix(sr, lr)
    assert out.shape == (3, 40, 48) and out.dtype == torch.float32


# --- wavelet -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(5, 7), (20, 33), (64, 48)])
def test_lowpass_matches_dilated_conv_reference(size):
    torch.manual_seed(1)
    x = torch.rand(1, 3, *size)
    ours = torch.stack([_wavelet_lowpass(x[0, c]) for c in range(3)])[None]
    torch.testing.assert_close(ours, _ref_decompose(x)[1], atol=1e-5, rtol=0)


def test_wavelet_matches_reference():
    torch.manual_seed(2)
    lr = torch.rand(2, 3, 12, 16)
    sr = torch.rand(2, 3, 48, 64)
    lr_up = F.interpolate(lr, size=(48, 64), mode="bicubic", align_corners=False).clamp(
        0, 1
    )
    out = wavelet_color_fix(sr, lr)
    assert out.shape == sr.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, _ref_wavelet(sr, lr_up), atol=1e-5, rtol=0)


def test_wavelet_of_upsampled_lr_is_identity():
    lr = _smooth_image(1, 32, 40)
    sr = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(
        0, 1
    )
    out = wavelet_color_fix(sr, lr)
    assert float((out - sr).abs().max()) < 1e-5


def test_wavelet_keeps_sr_detail_and_removes_colour_shift():
    lr = _smooth_image(1, 32, 32, seed=3)
    base = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(
        0, 1
    )
    h, w = base.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    detail = (
        0.08 * ((yy + xx) % 2 * 2 - 1).float()
    )  # 1-pixel checkerboard: highest frequency
    shift = torch.tensor([0.12, -0.08, 0.05]).view(1, 3, 1, 1)  # global colour cast
    sr = base + detail + shift
    out = wavelet_color_fix(sr, lr)
    # the colour cast is gone: channel means agree with the LR again
    torch.testing.assert_close(out.mean((2, 3)), lr.mean((2, 3)), atol=2e-3, rtol=0)
    # the checkerboard survives: out - base correlates with it almost perfectly
    residual = (out - base)[..., 8:-8, 8:-8]
    pattern = detail[8:-8, 8:-8].expand_as(residual)
    torch.testing.assert_close(residual, pattern, atol=5e-3, rtol=0)


def test_wavelet_same_size_lr_and_unbatched():
    lr = torch.rand(3, 20, 24)
    sr = torch.rand(3, 20, 24)
    out = wavelet_color_fix(sr, lr)
    assert out.shape == (3, 20, 24)
    torch.testing.assert_close(
        out[None], _ref_wavelet(sr[None], lr[None]), atol=1e-5, rtol=0
    )


def test_wavelet_does_not_modify_inputs():
    lr = torch.rand(1, 3, 8, 8)
    sr = torch.rand(1, 3, 32, 32)
    sr0, lr0 = sr.clone(), lr.clone()
    wavelet_color_fix(sr, lr)
    adain_color_fix(sr, lr)
    assert torch.equal(sr, sr0) and torch.equal(lr, lr0)


# --- dispatch ----------------------------------------------------------------------------------


def test_apply_color_fix_dispatch():
    lr = torch.rand(1, 3, 8, 8)
    sr = torch.rand(1, 3, 32, 32)
    assert apply_color_fix("none", sr, lr) is sr
    assert apply_color_fix("nofix", sr, lr) is sr
    torch.testing.assert_close(
        apply_color_fix("adain", sr, lr), adain_color_fix(sr, lr)
    )
    torch.testing.assert_close(
        apply_color_fix("Wavelet", sr, lr), wavelet_color_fix(sr, lr)
    )
    assert set(COLOR_FIX_METHODS) == {"adain", "wavelet", "none"}
    with pytest.raises(ValueError, match="adain"):
        apply_color_fix("histogram", sr, lr)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        adain_color_fix(torch.rand(2, 3, 8, 8), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError):
        wavelet_color_fix(torch.rand(1, 3, 8, 8), torch.rand(3, 4, 4))


@pytest.mark.slow
def test_wavelet_large_image_memory():
    """A 6000x4000 output must fit in a few GB (measured as growth of the peak RSS)."""
    import resource

    lr = torch.rand(1, 3, 1000, 1500)
    sr = torch.rand(1, 3, 4000, 6000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = wavelet_color_fix(sr, lr)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert out.shape == sr.shape
    assert grown_mb < 1500, f"peak memory grew by {grown_mb:.0f} MB"
