"""Full-reference fidelity metrics (PSNR, SSIM) computed the way the SR papers report them.

TSD-SR and TinySR (via OSEDiff's ``test_metrics.py``) score with pyiqa:
``pyiqa.create_metric('psnr', test_y_channel=True, color_space='ycbcr')`` and
``pyiqa.create_metric('ssim', test_y_channel=True, color_space='ycbcr')``. This module re-implements exactly
those two computations (checked against pyiqa 0.1.16 and against pyiqa's published calibration table in
``tests/test_quality.py``) so that evaluation does not depend on pyiqa's heavy import and so the conventions are
visible in one place:

* Luma: ITU-R BT.601 "studio swing" Y as in MATLAB ``rgb2ycbcr`` / BasicSR,
  ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B in [0, 1].
* PSNR: computed on the *unrounded* Y in [0, 1] with peak 1 (pyiqa passes ``data_range=1`` to the Y conversion,
  so it never rounds for PSNR), MSE averaged over the image, per batch element.
* SSIM: Y is scaled to [0, 255] and **rounded** to integers (MATLAB reads uint8), then float64 SSIM with an
  11x11 Gaussian window (sigma 1.5, MATLAB ``fspecial``), 'valid' filtering (no padding),
  ``C1 = (0.01*255)^2``, ``C2 = (0.03*255)^2``, the contrast-structure term clamped at 0 (pyiqa's ReLU), and the
  mean of the SSIM map. pyiqa's SSIM has an optional MATLAB-style average-pool downsampling, which is **off** in
  its defaults and in the papers' call; ``downsample=True`` reproduces it.

One deliberate difference: pyiqa adds ``eps=1e-8`` to the MSE, so identical images score 80 dB there. Here
identical images give ``inf`` (the mathematically correct value, and it makes "lossless" impossible to confuse
with "very good"). Otherwise the two differ by ``10*log10(1 + 1e-8/MSE)`` dB: below 5e-4 dB for PSNR <= 40 dB
(every SR result in the papers), 0.02 dB for a near-lossless 57 dB pair.

To reproduce paper numbers exactly, SR outputs must be quantised to 8 bits first (the papers save PNGs and
read them back); :func:`quantize_to_uint8_levels` does that without leaving tensor land.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

# BT.601 studio-swing luma coefficients for RGB in [0, 1], output in [0, 255] (MATLAB rgb2ycbcr, BasicSR).
_YCBCR_Y_WEIGHTS = (65.481, 128.553, 24.966)
_YCBCR_Y_OFFSET = 16.0
# NTSC YIQ luma (full swing, output in [0, 1]); pyiqa's default colour space for SSIM/NIQE when none is given,
# and the one its published calibration table was produced with.
_YIQ_Y_WEIGHTS = (0.299, 0.587, 0.114)

_SSIM_WINDOW_SIZE = 11
_SSIM_WINDOW_SIGMA = 1.5
_SSIM_DATA_RANGE = 255.0

__all__ = [
    "psnr",
    "psnr_y",
    "quantize_to_uint8_levels",
    "read_image_as_tensor",
    "rgb_to_luma",
    "ssim",
    "ssim_y",
]


def _check_image_pair(sr: torch.Tensor, hr: torch.Tensor) -> None:
    """Reject inputs that would silently give a wrong number (wrong layout, shape mismatch, wrong range)."""
    if sr.ndim != 4 or hr.ndim != 4:
        raise ValueError(f"expected B x C x H x W tensors, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if sr.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {sr.shape[1]}")
    tolerance = 1e-6
    for label, image in (("sr", sr), ("hr", hr)):
        low, high = float(image.min()), float(image.max())
        if low < -tolerance or high > 1 + tolerance:
            raise ValueError(f"{label} must be in [0, 1] (got min {low:.4f}, max {high:.4f}); clamp it first")


def _crop(image: torch.Tensor, crop_border: int) -> torch.Tensor:
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border == 0:
        return image
    return image[..., crop_border:-crop_border, crop_border:-crop_border]


def rgb_to_luma(rgb: torch.Tensor, color_space: str = "ycbcr") -> torch.Tensor:
    """Luma (B x 1 x H x W, nominally in [0, 1]) of RGB images in [0, 1].

    ``color_space='ycbcr'`` is the SR-paper convention (Y in [16/255, 235/255]); ``'yiq'`` is pyiqa's default
    for SSIM and is only needed to reproduce its calibration table.
    """
    if rgb.shape[1] != 3:
        raise ValueError(f"expected 3 RGB channels, got {rgb.shape[1]}")
    red, green, blue = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    color_space = color_space.lower()
    if color_space == "ycbcr":
        w_r, w_g, w_b = _YCBCR_Y_WEIGHTS
        return (_YCBCR_Y_OFFSET + w_r * red + w_g * green + w_b * blue) / 255.0
    if color_space == "yiq":
        w_r, w_g, w_b = _YIQ_Y_WEIGHTS
        return w_r * red + w_g * green + w_b * blue
    raise ValueError(f"unknown color_space {color_space!r}; use 'ycbcr' or 'yiq'")


def _select_channels(image: torch.Tensor, y_channel: bool, color_space: str) -> torch.Tensor:
    if y_channel and image.shape[1] == 3:
        return rgb_to_luma(image, color_space)
    return image


def psnr(
    sr: torch.Tensor,
    hr: torch.Tensor,
    *,
    crop_border: int = 0,
    y_channel: bool = True,
    color_space: str = "ycbcr",
) -> torch.Tensor:
    """PSNR in dB per batch element (tensor of shape B); ``inf`` where SR equals HR.

    ``y_channel=False`` averages the MSE over the RGB channels (pyiqa's plain ``'psnr'`` metric).
    """
    _check_image_pair(sr, hr)
    sr_plane = _select_channels(_crop(sr, crop_border).to(torch.float64), y_channel, color_space)
    hr_plane = _select_channels(_crop(hr, crop_border).to(torch.float64), y_channel, color_space)
    mse = (sr_plane - hr_plane).pow(2).mean(dim=(1, 2, 3))
    # 10*log10(1/0) = +inf: identical images are reported as lossless, not as a large finite number.
    return (-10.0 * torch.log10(mse)).to(torch.float32)


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """PSNR on the BT.601 Y channel: the number TSD-SR / TinySR report as "PSNR"."""
    return psnr(sr, hr, crop_border=crop_border, y_channel=True, color_space="ycbcr")


def _gaussian_kernel_1d(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """Normalised 1-D Gaussian whose outer product is MATLAB ``fspecial('gaussian', size, sigma)``.

    fspecial also zeroes taps below eps * max; for an 11-tap, sigma 1.5 window the smallest 2-D tap is 1.5e-5 of
    the largest, so that cut-off never applies and the 2-D window is exactly separable.
    """
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    kernel = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    return (kernel / kernel.sum()).to(dtype)


def _ssim_map_mean(x: torch.Tensor, y: torch.Tensor, downsample: bool) -> torch.Tensor:
    """Mean SSIM of two B x C x H x W float64 images in [0, 255] (pyiqa's ``ssim`` function)."""
    if downsample:
        # MATLAB ssim.m: average-pool by f = round(min(H, W) / 256) when f > 1.
        factor = max(1, round(min(x.shape[-2:]) / 256))
        if factor > 1:
            x = F.avg_pool2d(x, kernel_size=factor)
            y = F.avg_pool2d(y, kernel_size=factor)
    channels = x.shape[1]
    # All five local statistics in one depthwise pass, filtering rows then columns ('valid': no padding, like
    # filter2(..., 'valid')). Separable filtering is the same filter and ~8x faster in float64 on CPU.
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    groups = stacked.shape[1]
    taps = _gaussian_kernel_1d(_SSIM_WINDOW_SIZE, _SSIM_WINDOW_SIGMA, x.dtype).to(x.device)
    filtered = F.conv2d(stacked, taps.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    filtered = F.conv2d(filtered, taps.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = filtered.split(channels, dim=1)

    c1 = (0.01 * _SSIM_DATA_RANGE) ** 2
    c2 = (0.03 * _SSIM_DATA_RANGE) ** 2
    var_x = mean_xx - mu_x**2
    var_y = mean_yy - mu_y**2
    cov_xy = mean_xy - mu_x * mu_y
    contrast_structure = F.relu((2 * cov_xy + c2) / (var_x + var_y + c2))
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))


def ssim(
    sr: torch.Tensor,
    hr: torch.Tensor,
    *,
    crop_border: int = 0,
    y_channel: bool = True,
    color_space: str = "ycbcr",
    downsample: bool = False,
) -> torch.Tensor:
    """SSIM per batch element (tensor of shape B), MATLAB conventions (8-bit rounding, 11x11 Gaussian, valid).

    ``y_channel=False`` averages over RGB channels (pyiqa's ``'ssimc'``). Images smaller than 11 px per side
    have no valid window and raise.
    """
    _check_image_pair(sr, hr)
    sr, hr = _crop(sr, crop_border), _crop(hr, crop_border)
    if min(sr.shape[-2:]) < _SSIM_WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs at least {_SSIM_WINDOW_SIZE}x{_SSIM_WINDOW_SIZE} pixels, got {tuple(sr.shape[-2:])}"
        )
    with torch.no_grad():
        # Luma of the float image, then scaled to 0..255 and rounded, as MATLAB sees a uint8 image.
        sr_plane = (_select_channels(sr.to(torch.float64), y_channel, color_space) * 255.0).round()
        hr_plane = (_select_channels(hr.to(torch.float64), y_channel, color_space) * 255.0).round()
        return _ssim_map_mean(sr_plane, hr_plane, downsample).to(torch.float32)


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """SSIM on the BT.601 Y channel: the number TSD-SR / TinySR report as "SSIM"."""
    return ssim(sr, hr, crop_border=crop_border, y_channel=True, color_space="ycbcr")


def quantize_to_uint8_levels(image: torch.Tensor) -> torch.Tensor:
    """Round a [0, 1] image to the 256 levels an 8-bit PNG can hold (what the papers' metrics actually see)."""
    return (image.clamp(0, 1) * 255.0).round() / 255.0


def read_image_as_tensor(path: str | Path) -> torch.Tensor:
    """Load an image file as a 1 x 3 x H x W float32 tensor in [0, 1], exactly as pyiqa does.

    pyiqa opens files with PIL, converts to RGB and applies ``torchvision.transforms.functional.to_tensor``
    (x / 255). Using the same loader keeps calibration comparisons bit-exact.
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255.0)
    return tensor.unsqueeze(0)
