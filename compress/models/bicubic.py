"""Bicubic upsampling by an integer factor as one fixed depthwise convolution + pixel shuffle.

PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` (Keys' cubic convolution, a = -0.75,
borders clamped) has no Core ML equivalent and freezes its padding branch when exported to ONNX. For an
integer factor s it is a polyphase filter: output pixel s*k + p reads source coordinate
k + (p + 0.5)/s - 0.5, whose four taps all lie in k-2 .. k+2. So each of the s*s output phases is a fixed
5x5 kernel (the outer product of two 1-D cubic weight vectors), applied to the input replicate-padded by
2 (PyTorch clamps out-of-range taps to the border, which is replicate padding), and `pixel_shuffle`
interleaves the phases. Convolution, padding and pixel shuffle exist in every runtime, so PyTorch, ONNX
and Core ML run this one implementation; tests/test_bicubic.py checks it against `F.interpolate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CUBIC_A = -0.75  # PyTorch's (and OpenCV's) cubic convolution coefficient


def _cubic_weights(t: float) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 from floor(x), t = x - floor(x)."""

    def near(x: float) -> float:  # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _phase_taps(scale: int) -> list[list[float]]:
    """scale x 5: the 1-D weights of each output phase over the source offsets -2 .. +2."""
    taps = [[0.0] * 5 for _ in range(scale)]
    for phase in range(scale):
        offset = (phase + 0.5) / scale - 0.5  # in (-0.5, 0.5)
        floor = -1 if offset < 0 else 0
        for index, weight in enumerate(_cubic_weights(offset - floor)):
            taps[phase][floor - 1 + index + 2] = weight
    return taps


def bicubic_kernel(scale: int, channels: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(channels * scale^2) x 1 x 5 x 5 depthwise kernel; output channel c * scale^2 + py * scale + px.

    Built from Python floats, so tracers and exporters see one constant rather than the ops that made it.
    """
    taps = _phase_taps(scale)
    phases = [[[[ty * tx for tx in taps[px]] for ty in taps[py]]] for py in range(scale) for px in range(scale)]
    return torch.tensor(phases * channels, dtype=dtype, device=device)


def bicubic_upsample(image: torch.Tensor, scale: int) -> torch.Tensor:
    """B x C x h x w -> B x C x (scale*h) x (scale*w), equal to F.interpolate(mode="bicubic",
    align_corners=False) up to float rounding, for any h, w >= 1."""
    if scale == 1:
        return image
    channels = image.shape[1]
    kernel = bicubic_kernel(scale, channels, image.dtype, image.device)
    padded = F.pad(image, (2, 2, 2, 2), mode="replicate")
    return F.pixel_shuffle(F.conv2d(padded, kernel, groups=channels), scale)
