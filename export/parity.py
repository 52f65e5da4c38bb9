"""Parity of exported graphs with the PyTorch student they came from, on real photos.

PSNR of the runtime's output against PyTorch's (float32) output, in dB, over the output's natural range:
1 for the SR image in [0, 1], 2 for images in [-1, 1], and the reference's own max - min for latents and
velocities. A non-finite runtime output is a failure whatever its PSNR would be (fp16 overflow shows as
inf/NaN, then as black images).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from compress.models.student import OneStepSR

PEAKS = {"sr": 1.0, "image": 2.0}
DEFAULT_PARITY_SIZES = ((64, 64), (37, 53))  # LR sizes: a multiple of every stride, and one of none


def parity_psnr(output: np.ndarray, reference: np.ndarray, peak: float | None = None) -> dict:
    """{"psnr_db", "max_abs_diff", "finite"} of `output` against `reference` (shapes must match)."""
    output, reference = np.asarray(output, np.float64), np.asarray(reference, np.float64)
    if output.shape != reference.shape:
        raise ValueError(f"runtime output has shape {output.shape}, PyTorch's {reference.shape}")
    finite = bool(np.isfinite(output).all())
    if not finite:
        return {"psnr_db": None, "max_abs_diff": None, "finite": False}
    peak = peak if peak is not None else float(reference.max() - reference.min()) or 1.0
    mse = float(np.mean((output - reference) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
    return {"psnr_db": psnr, "max_abs_diff": float(np.abs(output - reference).max()), "finite": True}


def parity_photos(sizes=DEFAULT_PARITY_SIZES) -> list[tuple[str, torch.Tensor]]:
    """LR crops of the built-in validation photos (Real-ESRGAN degradation) at each size, successive sizes
    from successive photos that are large enough."""
    from compress.data.pairs import fixed_validation_pairs

    needed = max(max(h, w) for h, w in sizes)
    pairs = fixed_validation_pairs("realesrgan", hr_size=256 if needed <= 64 else None)
    photos = []
    for index, (height, width) in enumerate(sizes):
        fitting = [(name, lr) for name, lr, _ in pairs if lr.shape[-2] >= height and lr.shape[-1] >= width]
        if not fitting:
            raise ValueError(f"no validation photo has an LR image of at least {height}x{width}; use smaller sizes")
        name, lr = fitting[index % len(fitting)]
        photos.append((f"{name}@{height}x{width}", lr[None, :, :height, :width].contiguous()))
    return photos


@torch.no_grad()
def stage_inputs(student: OneStepSR, lr: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each graph's input and PyTorch output for one LR batch, by running the student's stages in order."""
    lr_padded = student.pad_lr(lr)
    image = student.upsample(lr_padded.clone())
    latent = student.encode(image)
    velocity = student.velocity(latent)
    restored = latent - velocity
    decoded = student.decode(restored)
    scale = student.settings.upscale
    sr = ((decoded + 1.0) * 0.5).clamp(0.0, 1.0)[..., : lr.shape[-2] * scale, : lr.shape[-1] * scale]
    return {
        "end_to_end": (lr, sr),
        "upsample": (lr_padded, image),
        "vae_encoder": (image, latent),
        "transformer": (latent, velocity),
        "vae_decoder": (restored, decoded),
    }
