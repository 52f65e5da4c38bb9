"""Colour alignment of a super-resolved image to its low-resolution input, as in TSD-SR.

One-step diffusion SR tends to drift in colour (a global tint or a contrast change). TSD-SR fixes
this after decoding (``--align_method`` of TSD-SR's ``test/test_tsdsr.py``, from StableSR's
``wavelet_color_fix``):

* ``adain``: per-channel mean and standard deviation of the SR output are matched to those of the
  original-size LR image.
* ``wavelet``: the SR image keeps its high frequencies and takes its low frequencies (colour,
  shading) from the LR image resized to the SR size. Frequencies are split by a 5-level a-trous
  decomposition with the [1,2,1]^T[1,2,1]/16 kernel, dilation 2^i and replicate padding.
* ``none`` (TSD-SR: ``nofix``): no change.

Tensors are Bx3xHxW (3xHxW is accepted too) in [0, 1]; outputs are float32, clamped to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "COLOR_FIX_METHODS",
    "adain_color_fix",
    "apply_color_fix",
    "wavelet_color_fix",
]

from compress.options import COLOR_FIX_METHODS  # noqa: E402 (one definition, shared with the CLI)
_ALIASES = {"nofix": "none", "no": "none", "off": "none"}
_EPS = 1e-5
_WAVELET_LEVELS = 5


def _as_batch(
    sr: torch.Tensor, lr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Accept 3xHxW or Bx3xHxW; check that SR and LR agree on batch and channels."""
    if sr.dim() != lr.dim() or sr.dim() not in (3, 4):
        raise ValueError(
            f"colour fix expects SR and LR as 3xHxW or Bx3xHxW tensors, got {tuple(sr.shape)} "
            f"and {tuple(lr.shape)}"
        )
    unbatched = sr.dim() == 3
    if unbatched:
        sr, lr = sr.unsqueeze(0), lr.unsqueeze(0)
    if sr.shape[:2] != lr.shape[:2]:
        raise ValueError(
            f"colour fix: SR {tuple(sr.shape)} and LR {tuple(lr.shape)} differ in batch or channels"
        )
    return sr, lr, unbatched


def adain_color_fix(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and std of ``sr`` to ``lr`` (the original-size LR image).

    As TSD-SR: std = sqrt(unbiased var + 1e-5), computed per image and channel. The LR may be
    any size, since only its statistics are used. Computed as one affine map per channel, so only
    the output tensor is allocated at full size.
    """
    sr, lr, unbatched = _as_batch(sr, lr)
    b, c = sr.shape[:2]
    lr_flat = lr.reshape(b, c, -1).float()
    sr_flat = sr.reshape(b, c, -1).float()
    lr_var, lr_mean = torch.var_mean(lr_flat, dim=2)
    sr_var, sr_mean = torch.var_mean(sr_flat, dim=2)
    lr_std = (lr_var + _EPS).sqrt()
    sr_std = (sr_var + _EPS).sqrt()
    gain = (lr_std / sr_std).reshape(b, c, 1, 1)
    bias = lr_mean.reshape(b, c, 1, 1) - sr_mean.reshape(b, c, 1, 1) * gain
    out = torch.mul(sr.float(), gain).add_(bias).clamp_(0.0, 1.0)
    return out[0] if unbatched else out


def _blur_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """[1, 2, 1]/4 filter with taps ``radius`` apart along ``dim`` and replicate padding.

    Written with shifted slices instead of a dilated conv2d: the 3x3 kernel is separable, and
    replicate padding commutes with the separation, so two 1-D passes give the same result with
    no padded copy and no im2col buffer on large images.
    """
    n = x.shape[dim]
    out = x * 2.0
    if n > radius:
        out.narrow(dim, radius, n - radius).add_(
            x.narrow(dim, 0, n - radius)
        )  # left tap
        out.narrow(dim, 0, n - radius).add_(
            x.narrow(dim, radius, n - radius)
        )  # right tap
    k = min(radius, n)
    out.narrow(dim, 0, k).add_(x.narrow(dim, 0, 1))  # left taps falling off the edge
    out.narrow(dim, n - k, k).add_(
        x.narrow(dim, n - 1, 1)
    )  # right taps falling off the edge
    return out.mul_(0.25)


def _wavelet_lowpass(x: torch.Tensor, levels: int = _WAVELET_LEVELS) -> torch.Tensor:
    """Low-frequency residual of the a-trous decomposition: the blur applied at dilations
    1, 2, ..., 2^(levels-1) in turn (x = sum of high bands + this)."""
    for i in range(levels):
        r = 2**i
        x = _blur_1d(_blur_1d(x, r, dim=-1), r, dim=-2)
    return x


def wavelet_color_fix(
    sr: torch.Tensor, lr: torch.Tensor, levels: int = _WAVELET_LEVELS
) -> torch.Tensor:
    """SR high frequencies + LR low frequencies (TSD-SR / StableSR wavelet reconstruction).

    The LR is first resized to the SR size. TSD-SR does this with PIL's default resize (bicubic
    with a = -0.5, on 8-bit data); here it is torch bicubic (a = -0.75, ``antialias=False``,
    ``align_corners=False``) in float, clamped to [0, 1] as 8-bit data would be, so results differ
    slightly from TSD-SR near edges. LR already at SR size is used as is.

    The reference computes high(SR) + low(LR) = SR - lowpass(SR) + lowpass(LR_up). The blur is
    linear, so this equals SR + lowpass(LR_up - SR): one decomposition instead of two. Work is
    done one image channel at a time in float32, so a 6000x4000 output needs roughly the output
    tensor plus a few single-channel buffers (~100 MB each), not several full RGB copies.
    """
    sr, lr, unbatched = _as_batch(sr, lr)
    b, c, h, w = sr.shape
    out = torch.empty((b, c, h, w), dtype=torch.float32, device=sr.device)
    same_size = lr.shape[-2:] == sr.shape[-2:]
    for i in range(b):
        for j in range(c):
            low_src = lr[i : i + 1, j : j + 1].to(device=sr.device, dtype=torch.float32)
            if same_size:
                diff = low_src - sr[i, j].float()
            else:
                diff = F.interpolate(
                    low_src,
                    size=(h, w),
                    mode="bicubic",
                    align_corners=False,
                    antialias=False,
                ).clamp_(0.0, 1.0)
                diff.sub_(sr[i, j].float())
            del low_src
            low = _wavelet_lowpass(diff[0, 0], levels)
            del diff
            torch.add(sr[i, j].float(), low, out=out[i, j])
            del low
    out.clamp_(0.0, 1.0)
    return out[0] if unbatched else out


def apply_color_fix(name: str, sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Dispatch on the method name: 'adain', 'wavelet' or 'none' ('nofix' is accepted, as in
    TSD-SR). 'none' returns ``sr`` itself, unchanged."""
    key = (
        _ALIASES.get(name.lower().strip(), name.lower().strip())
        if isinstance(name, str)
        else name
    )
    if key == "adain":
        return adain_color_fix(sr, lr)
    if key == "wavelet":
        return wavelet_color_fix(sr, lr)
    if key == "none":
        return sr
    raise ValueError(
        f"unknown colour fix {name!r}; choose one of: {', '.join(COLOR_FIX_METHODS)}"
    )
