"""Whole-image super-resolution with a one-step student: latent tiling and the colour fix.

`upscale_tensor` is the one place an image is upscaled whole (used by `compress upscale`, `compress eval`
and the benchmarks). It calls only the student's stages (`preprocess`, `encode`, `velocity`, `decode`,
`postprocess`); the VAE's own tiling lives behind `encode` / `decode` (compress.tiled_vae).

Latent tiling follows TSD-SR's test script (Wu et al., CVPR 2025; `test/test_tsdsr.py`): tiles of 64
latents (512 px) with an overlap of 8, the last row/column shifted inside the image, each tile's
*velocity* weighted by a separable Gaussian window (variance 0.01 on normalised coordinates) and
normalised by the summed weights before the one-step update. TSD-SR centres the y window at h/2 and x at
(w - 1)/2; we use (n - 1)/2 on both axes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from compress.memory import return_free_memory
from compress.models.student import OneStepSR
from compress.options import DEFAULT_COLOR_FIX, TileSettings


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


def tiled_velocity(
    model: OneStepSR, latent: torch.Tensor, tile: int, overlap: int, progress: Callable[[int], None] | None = None
) -> torch.Tensor:
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
            if progress is not None:
                progress(1)
    return velocity.div_(weight_sum)


def latent_tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    return len(tile_starts(height, min(tile, height), overlap)) * len(tile_starts(width, min(tile, width), overlap))


@contextmanager
def _stage_bar(desc: str, total: int, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on stderr (with ETA) for one stage of a tiled upscale, or None when not shown."""
    if not enabled or total <= 1:
        yield None
        return
    from tqdm import tqdm

    # A terminal gets a live bar; a log file a line every 15 s rather than a stream of carriage returns.
    interval = 0.5 if sys.stderr.isatty() else 15.0
    with tqdm(total=total, desc=desc, unit="tile", file=sys.stderr, leave=False, dynamic_ncols=True,
              mininterval=interval) as bar:
        yield bar.update


class NumericalFailure(RuntimeError):
    """A stage produced NaN/inf, or the output collapsed to a constant image: an error, never an output."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def check_stage(stage: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` if finite; else NumericalFailure naming the stage (fp16 overflow, a damaged model...)."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NumericalFailure(stage, f"the {stage} produced {bad} NaN/inf value(s) of {tensor.numel()}; no image "
                                      "written (try --dtype float32, or check the model with `compress eval`)")
    return tensor


def check_not_constant(sr: torch.Tensor, lr: torch.Tensor) -> None:
    """An output saturated to one value from an input that is not flat is a failure, not a picture."""
    if float(sr.amax() - sr.amin()) == 0.0 and float(lr.amax() - lr.amin()) > 0.0:
        raise NumericalFailure("output", f"the output is a constant image (every pixel {float(sr.flatten()[0]):.3f}) "
                                         "although the input is not; no image written")


def check_whole_image(model, lr: torch.Tensor) -> None:
    """Refuse an image too large for one untiled transformer call (SD3's position table), naming the fix."""
    side = model.max_latent_side
    multiple, scale, down = model.pixel_multiple, model.settings.upscale, model.vae_downsample
    latent = [-(-lr.shape[i] * scale // multiple) * multiple // down for i in (-2, -1)]
    if side is not None and max(latent) > side:
        raise ValueError(
            f"a {lr.shape[-2] * scale}x{lr.shape[-1] * scale} output needs a {latent[0]}x{latent[1]} latent, larger "
            f"than the transformer's position table ({side}); export the model with --components so the "
            "transformer can be tiled"
        )


def decode_with_fp32_fallback(model, latent: torch.Tensor, tiling, progress=None) -> torch.Tensor:
    """`model.decode`, redone with the VAE in float32 when a float16 decode overflows.

    fp16 VAE decoders overflow to inf on some images (the SD/SDXL VAE's known failure; diffusers' `force_upcast`),
    where float32 is fine; bfloat16 has float32's range and does not. The fallback runs only for the image that
    overflowed, says so, and puts the VAE back in float16, so memory stays what the user chose."""
    decoded = model.decode(latent, tiling=tiling, progress=progress)
    if decoded.dtype != torch.float16 or bool(torch.isfinite(decoded).all()):
        return decoded
    import sys

    print("note: the VAE decoder overflowed in float16 on this image; decoded it again in float32", file=sys.stderr)
    model.vae.float()
    try:
        return model.decode(latent.float(), tiling=tiling, progress=None)
    finally:
        model.vae.half()


@torch.no_grad()
def upscale_tensor(
    model: OneStepSR,
    lr: torch.Tensor,
    tiles: TileSettings | None = None,
    color_fix: str = DEFAULT_COLOR_FIX,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """LR 1 x 3 x h x w in [0, 1] -> SR 1 x 3 x 4h x 4w in [0, 1] (float32), tiling when the image needs it.

    `color_fix` (compress.colorfix: wavelet, adain or none) aligns the output's colours to the LR input;
    `progress` shows one bar per tiled stage (VAE encoder, transformer, VAE decoder) with its ETA.
    """
    from compress.colorfix import apply_color_fix
    from compress.tiled_vae import tile_count

    tiles = tiles or TileSettings()
    lr_size = tuple(lr.shape[-2:])
    if not getattr(model, "has_stages", True):  # a runtime artifact with only its end-to-end graph
        check_whole_image(model, lr)
        sr = check_stage("end-to-end graph", model(lr).float()).clamp_(0.0, 1.0)
        check_not_constant(sr, lr)
        return apply_color_fix(color_fix, sr, lr)
    image = model.preprocess(lr)
    # Bounded-memory VAE tiling walks PyTorch modules; a runtime artifact runs its VAE graphs whole.
    vae_tiling = None if tiles.mode == "off" or not getattr(model, "supports_vae_tiling", True) else tiles.vae
    height, width = image.shape[-2:]
    vae_tiles = tile_count(height, width, vae_tiling) if vae_tiling is not None and vae_tiling.applies(height, width) else 0
    with _stage_bar("VAE encoder", vae_tiles, progress) as step:
        latent_lr = check_stage("VAE encoder", model.encode(image, generator, tiling=vae_tiling, progress=step))
    del image
    if tiles.mode == "off":
        if model.max_latent_side is not None and max(latent_lr.shape[-2:]) > model.max_latent_side:
            raise ValueError(
                f"a {height}x{width} output needs a {latent_lr.shape[-2]}x{latent_lr.shape[-1]} latent, larger than "
                f"the transformer's position table ({model.max_latent_side}); use --tile auto or on"
            )
        velocity = model.velocity(latent_lr)
    else:
        latent_tile = tiles.latent_tile
        if model.max_latent_side is not None:
            latent_tile = min(latent_tile, model.max_latent_side)
        count = latent_tile_count(*latent_lr.shape[-2:], latent_tile, tiles.latent_overlap)
        with _stage_bar("transformer", count, progress) as step:
            velocity = tiled_velocity(model, latent_lr, latent_tile, tiles.latent_overlap, step)
    latent = latent_lr.sub_(check_stage("transformer", velocity))
    del velocity
    return_free_memory()
    with _stage_bar("VAE decoder", vae_tiles, progress) as step:
        decoded = decode_with_fp32_fallback(model, latent, vae_tiling, step)
    del latent
    sr = model.postprocess(check_stage("VAE decoder", decoded), lr_size).float().clamp_(0.0, 1.0)
    del decoded
    return_free_memory()
    check_not_constant(sr, lr)
    return check_stage("colour fix", apply_color_fix(color_fix, sr, lr))
