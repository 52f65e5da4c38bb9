"""Whole-image super-resolution with the one-step student: latent tiling, VAE tiling, colour fix.

Latent tiling follows TSD-SR's test script (brief section 1.6): tiles of 64 latents (512 px) with an
overlap of 8, the last row/column shifted inside the image, each tile's *velocity* weighted by a separable
Gaussian window (variance 0.01 on normalised coordinates) and normalised by the summed weights before the
one-step update. TSD-SR centres the y window at h/2 and x at (w-1)/2; we use (n-1)/2 on both axes.
VAE tiling is `compress.tiled_vae`: tiles with context padding whose GroupNorm statistics and mid-block
attention are pooled over the whole image (TSD-SR's vaehook idea), so tiled output stays close to untiled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.models.student import OneStepSR, pad_to_multiple
from compress.tiled_vae import tiled_decode, tiled_encode


@dataclass
class TileSettings:
    """How a large image is split. `mode`: auto (tile only when needed), on, off."""

    mode: str = "auto"
    latent_tile: int = 64
    latent_overlap: int = 8
    vae_tile: int = 512
    vae_pad: int = 64

    def __post_init__(self):
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"--tile must be auto, on or off, got {self.mode!r}")
        if self.latent_tile < 8 or self.latent_tile % 2:
            raise ValueError(f"--latent-tile must be an even number >= 8, got {self.latent_tile}")
        if not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError(f"--latent-overlap must be in [0, latent tile), got {self.latent_overlap}")
        if self.vae_tile < 64 or self.vae_tile % 64:
            raise ValueError(f"--vae-tile must be a multiple of 64 (>= 64), got {self.vae_tile}")
        if self.vae_pad < 0 or self.vae_pad % 16:
            raise ValueError(f"--vae-pad must be a non-negative multiple of 16 pixels, got {self.vae_pad}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile`, the last one shifted to end at `length`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def gaussian_window(height: int, width: int, device, dtype, variance: float = 0.01) -> torch.Tensor:
    """Separable Gaussian blending weights (TSD-SR's), 1 x 1 x height x width."""

    def axis(n: int) -> torch.Tensor:
        coords = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / n
        return torch.exp(-(coords**2) / (2 * variance)) / math.sqrt(2 * math.pi * variance)

    window = axis(height)[:, None] * axis(width)[None, :]
    return window.to(device=device, dtype=dtype)[None, None]


def tiled_velocity(model: OneStepSR, latent: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """The transformer's velocity over a large latent, tile by tile, Gaussian-blended."""
    height, width = latent.shape[-2:]
    if height <= tile and width <= tile:
        return model.velocity(latent)
    tile_h, tile_w = min(tile, height), min(tile, width)
    window = gaussian_window(tile_h, tile_w, latent.device, latent.dtype)
    velocity = torch.zeros_like(latent)
    weight_sum = torch.zeros_like(latent[:, :1])
    for top in tile_starts(height, tile_h, overlap):
        for left in tile_starts(width, tile_w, overlap):
            crop = latent[..., top : top + tile_h, left : left + tile_w]
            velocity[..., top : top + tile_h, left : left + tile_w] += model.velocity(crop) * window
            weight_sum[..., top : top + tile_h, left : left + tile_w] += window
    return velocity / weight_sum


def encode_image(model: OneStepSR, image: torch.Tensor, tiled: bool, tiles: TileSettings, generator=None):
    """model.encode, optionally through the synchronised tiled VAE encoder."""
    if not tiled:
        return model.encode(image, generator)
    posterior = tiled_encode(model.vae, image, tile=tiles.vae_tile, pad=tiles.vae_pad)
    latent = posterior.sample(generator) if model.settings.sample_posterior else posterior.mode()
    return latent * model.settings.latent_scaling_factor


def decode_latent(model: OneStepSR, latent: torch.Tensor, tiled: bool, tiles: TileSettings) -> torch.Tensor:
    """model.decode, optionally through the synchronised tiled VAE decoder."""
    if not tiled:
        return model.decode(latent)
    factor = model.vae_downsample
    scaled = latent / model.settings.latent_scaling_factor
    return tiled_decode(model.vae, scaled, tile=tiles.vae_tile // factor, pad=tiles.vae_pad // factor).clamp(-1.0, 1.0)


@torch.no_grad()
def upscale_tensor(
    model: OneStepSR,
    lr: torch.Tensor,
    tiles: TileSettings | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LR 1 x 3 x h x w in [0, 1] -> SR 1 x 3 x 4h x 4w in [0, 1], tiling when the image needs it."""
    tiles = tiles or TileSettings()
    scale = model.settings.upscale
    height, width = lr.shape[-2] * scale, lr.shape[-1] * scale
    lr = lr.to(device=model.device, dtype=model.dtype)
    upsampled = F.interpolate(lr, size=(height, width), mode="bicubic", align_corners=False)
    image = pad_to_multiple((upsampled * 2.0 - 1.0).clamp(-1.0, 1.0), model.pixel_multiple)

    latent_tile = tiles.latent_tile
    if model.max_latent_side is not None:
        latent_tile = min(latent_tile, model.max_latent_side)
    big_image = max(image.shape[-2:]) > tiles.vae_tile
    use_vae_tiles = tiles.mode == "on" or (tiles.mode == "auto" and big_image)
    latent_lr = encode_image(model, image, use_vae_tiles, tiles, generator)
    if tiles.mode == "off":
        if model.max_latent_side is not None and max(latent_lr.shape[-2:]) > model.max_latent_side:
            raise ValueError(
                f"a {height}x{width} output needs a {latent_lr.shape[-2]}x{latent_lr.shape[-1]} latent, larger than "
                f"the transformer's position table ({model.max_latent_side}); use --tile auto or on"
            )
        velocity = model.velocity(latent_lr)
    else:
        velocity = tiled_velocity(model, latent_lr, latent_tile, tiles.latent_overlap)
    sr = decode_latent(model, latent_lr - velocity, use_vae_tiles, tiles)
    return ((sr[..., :height, :width] + 1.0) / 2.0).float().clamp(0.0, 1.0)
