"""VAE encode/decode of large images in tiles, one after another, with image-wide GroupNorm and attention.

Plain VAE tiling (diffusers' `enable_tiling`) normalises every tile with its own GroupNorm statistics and
lets attention see only the tile, so tiles drift apart in colour and contrast and the seams show. The
Tiled VAE of the multidiffusion-upscaler family (TSD-SR's `utils/vaehook.py`) shares the statistics
across tiles; done exactly, that holds every tile's activations at each GroupNorm (an image-sized
feature map: 3 GB at 32 channels for a 6000x4000 output) and attends over the whole image (quadratic in
its area). Here memory is bounded instead, in two steps:

1. **Statistics.** If the image has at most `max_side`^2 pixels, the network runs on it whole and
   every GroupNorm's per-group mean/variance and every attention layer's keys/values are those of the
   image: exact. Otherwise windows of `sample_core` pixels plus `sample_pad` context are cut on an even
   grid over the image, `max_side`^2 pixels in all, and run as one batch through the network; each
   GroupNorm normalises all of them with the statistics pooled over the windows' cores (and records
   them), and each attention layer attends to the keys/values of all cores (and records them). This is
   a stratified sample of the full-resolution image, so the estimates are unbiased; a downsampled copy
   of the image (multidiffusion-upscaler's fast mode) biases them because blurring removes variance.
   `python -m benchmarks.tiled_vae` compares both.
2. **Tiles.** Tiles (a partition cell, the *core*, plus `pad` context pixels on each side) run one after
   another; each GroupNorm normalises with the recorded statistics, each attention layer's queries
   attend to the recorded keys/values. Only the core of each tile is kept, so nothing is blended.

Peak memory is that of a `max_side`^2-pixel pass or of one tile, plus the input and the output; time is
proportional to the area. Layers are called through their own submodules (convolutions, activations,
attention projections), never patched, so the same model can be used untiled, hooked or compiled at the
same time. The walk follows diffusers' `Encoder` / `Decoder` of `AutoencoderKL` or of a slimmed
`CompactAutoencoder` (ResnetBlock2D, Downsample2D, Upsample2D, UNetMidBlock2D with spatial self-attention;
a depthwise-separable convolution is called like the dense one it replaces); any other layer is refused with
an error naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.memory import return_free_memory
from compress.options import VAETiling

__all__ = ["TileBox", "VAETiling", "plan_tiles", "sample_windows", "tile_count", "tiled_decode", "tiled_encode"]


@dataclass(frozen=True)
class TileBox:
    """One tile in input coordinates: the crop [top:bottom, left:right] and its core inside the crop."""

    top: int
    bottom: int
    left: int
    right: int
    core_top: int
    core_bottom: int
    core_left: int
    core_right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left


def plan_tiles(height: int, width: int, core: int, pad: int, align: int = 1) -> list[TileBox]:
    """Partition [0, height) x [0, width) into cores of `core` (the last row/column smaller) plus context.

    All boundaries are multiples of `align` so that downsampled feature maps split at whole pixels.
    """
    if core % align or pad % align:
        raise ValueError(f"tile core {core} and pad {pad} must be multiples of {align}")

    def spans(length: int) -> list[tuple[int, int, int, int]]:
        out = []
        for start in range(0, length, core):
            end = min(start + core, length)
            lo, hi = max(0, start - pad), min(length, end + pad)
            out.append((lo, hi, start - lo, end - lo))
        return out

    return [
        TileBox(t, b, l, r, ct, cb, cl, cr)
        for t, b, ct, cb in spans(height)
        for l, r, cl, cr in spans(width)
    ]


def sample_windows(height: int, width: int, window: int, budget: int, align: int = 1) -> list[tuple[int, int]]:
    """Top-left corners of `window`-sized squares on an even grid over the image, about `budget` pixels in all.

    Every window lies inside the image (which must be at least `window` on both sides); corners are
    multiples of `align`.
    """
    count = max(1, budget // (window * window))
    rows = max(1, min(math.ceil(height / window), round(math.sqrt(count * height / width))))
    cols = max(1, min(math.ceil(width / window), count // rows))

    def starts(length: int, n: int) -> list[int]:
        last = (length - window) // align * align
        return sorted({round(last * i / max(1, n - 1) / align) * align for i in range(n)})

    return [(top, left) for top in starts(height, rows) for left in starts(width, cols)]


# ----------------------------------------------------------------------------------------------------------
# The walk: diffusers' Encoder / Decoder layer by layer, with GroupNorm and attention handed to a context
# ----------------------------------------------------------------------------------------------------------
class _Context:
    """What GroupNorm and attention do in one pass.

    "measure": statistics and keys/values come from the batch itself (the whole image, or the sampled
    windows: `windows` of them per image, measured on their `core` cells) and are recorded;
    "apply": they come from a measure pass, for one tile at a time.
    """

    def __init__(self, phase: str, windows: int = 1, core: tuple[int, int, int] | None = None, recorded=None):
        self.phase = phase
        self.windows = windows
        self.core = core  # (offset, size, window) in input pixels; None: the whole input is measured
        self.stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {} if recorded is None else recorded.stats
        self.keys_values: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = (
            {} if recorded is None else recorded.keys_values
        )

    def measured_part(self, x: torch.Tensor) -> torch.Tensor:
        """x (windows*B, C, h, w) -> the measured cells, as (B, C, windows, n) pixels."""
        if self.core is not None:
            offset, size, window = self.core
            scale = x.shape[-1] / window
            lo, hi = round(offset * scale), round((offset + size) * scale)
            x = x[..., lo:hi, lo:hi]
        batch = x.shape[0] // self.windows
        return x.reshape(self.windows, batch, x.shape[1], -1).permute(1, 2, 0, 3)


def _group_norm(ctx: _Context, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm with statistics measured now (phase "measure") or recorded earlier (phase "apply")."""
    if type(norm) is not nn.GroupNorm:
        raise NotImplementedError(f"tiled VAE: expected nn.GroupNorm, found {type(norm).__name__}")
    rows, channels = x.shape[:2]
    groups = norm.num_groups
    if ctx.phase == "measure":
        part = ctx.measured_part(x)  # (B, C, windows, n)
        var, mean = torch.var_mean(part.reshape(part.shape[0], groups, -1), dim=-1, unbiased=False)
        ctx.stats[norm] = (mean.detach(), var.detach())  # constants: gradients flow through x only
    mean, var = ctx.stats[norm]
    batch = mean.shape[0]
    per_channel = channels // groups
    # eval-mode batch_norm applies given per-channel statistics in one fused pass (one output tensor):
    # image b's rows are b, B + b, 2B + b, ... (the window crops were concatenated), so fold the image
    # index into the channel axis.
    folded = x.reshape(rows // batch, batch * channels, *x.shape[2:])
    weight = norm.weight.repeat(batch) if norm.affine else None
    bias = norm.bias.repeat(batch) if norm.affine else None
    out = F.batch_norm(
        folded,
        mean.repeat_interleave(per_channel, dim=1).reshape(-1).to(x.dtype),
        var.repeat_interleave(per_channel, dim=1).reshape(-1).to(x.dtype),
        weight, bias, training=False, eps=norm.eps,
    )
    return out.reshape_as(x)


def _attention(ctx: _Context, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' spatial self-attention (AttnProcessor2_0 arithmetic) with image-wide keys/values."""
    if x.ndim != 4 or getattr(attn, "spatial_norm", None) is not None or getattr(attn, "is_cross_attention", False):
        raise NotImplementedError("tiled VAE attention supports plain spatial self-attention only")
    residual = x
    rows, channels, height, width = x.shape
    hidden = _group_norm(ctx, attn.group_norm, x) if attn.group_norm is not None else x
    query = attn.to_q(hidden.flatten(2).transpose(1, 2))
    if ctx.phase == "measure":
        part = ctx.measured_part(hidden)  # (B, C, windows, n)
        tokens = part.reshape(part.shape[0], channels, -1).transpose(1, 2)
        ctx.keys_values[attn] = (attn.to_k(tokens), attn.to_v(tokens))
    key, value = ctx.keys_values[attn]
    head_dim = key.shape[-1] // attn.heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = heads(query), heads(key.to(query.dtype)), heads(value.to(query.dtype))
    if ctx.windows > 1:  # every window of image b attends to the keys of all of image b's windows
        key = key.unsqueeze(0).expand(ctx.windows, *key.shape).reshape(rows, *key.shape[1:])
        value = value.unsqueeze(0).expand(ctx.windows, *value.shape).reshape(rows, *value.shape[1:])
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value)
    out = out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    out = out.transpose(1, 2).reshape(rows, channels, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _resnet(ctx: _Context, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from diffusers.models.resnet import ResnetBlock2D

    if type(block) is not ResnetBlock2D or block.upsample is not None or block.downsample is not None:
        raise NotImplementedError(f"tiled VAE: unsupported block {type(block).__name__}")
    if block.time_emb_proj is not None:
        raise NotImplementedError("tiled VAE: time-conditioned resnet blocks are not supported")
    hidden = block.nonlinearity(_group_norm(ctx, block.norm1, x))
    hidden = block.conv1(hidden)
    hidden = block.nonlinearity(_group_norm(ctx, block.norm2, hidden))
    hidden = block.conv2(block.dropout(hidden))
    shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    return (shortcut + hidden) / block.output_scale_factor


def _downsample(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from diffusers.models.downsampling import Downsample2D

    if type(block) is not Downsample2D or block.norm is not None or not block.use_conv:
        raise NotImplementedError(f"tiled VAE: unsupported downsampler {type(block).__name__}")
    if block.padding == 0:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
    return block.conv(x)


def _upsample(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from diffusers.models.upsampling import Upsample2D

    if type(block) is not Upsample2D or block.norm is not None or block.use_conv_transpose or not block.interpolate:
        raise NotImplementedError(f"tiled VAE: unsupported upsampler {type(block).__name__}")
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    if block.use_conv:
        x = block.conv(x) if block.name == "conv" else block.Conv2d_0(x)
    return x


def _mid_block(ctx: _Context, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = _resnet(ctx, block.resnets[0], x)
    for attn, resnet in zip(block.attentions, block.resnets[1:]):
        if attn is not None:
            x = _attention(ctx, attn, x)
        x = _resnet(ctx, resnet, x)
    return x


def _run_encoder(ctx: _Context, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = encoder.conv_in(x)
    for down in encoder.down_blocks:
        for resnet in down.resnets:
            x = _resnet(ctx, resnet, x)
        for sampler in down.downsamplers or []:
            x = _downsample(sampler, x)
    x = _mid_block(ctx, encoder.mid_block, x)
    x = encoder.conv_act(_group_norm(ctx, encoder.conv_norm_out, x))
    return encoder.conv_out(x)


def _run_decoder(ctx: _Context, decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    x = decoder.conv_in(z)
    upscale_dtype = next(iter(decoder.up_blocks.parameters())).dtype
    x = _mid_block(ctx, decoder.mid_block, x).to(upscale_dtype)
    for up in decoder.up_blocks:
        for resnet in up.resnets:
            x = _resnet(ctx, resnet, x)
        for sampler in up.upsamplers or []:
            x = _upsample(sampler, x)
    x = decoder.conv_act(_group_norm(ctx, decoder.conv_norm_out, x))
    return decoder.conv_out(x)


# ----------------------------------------------------------------------------------------------------------
# Passes
# ----------------------------------------------------------------------------------------------------------
Progress = Callable[[int], None]


def _measure(run, x: torch.Tensor, tiling: VAETiling, factor: float, align: int) -> tuple[_Context, torch.Tensor | None]:
    """Record statistics and keys/values as `tiling.statistics` says; returns (context, output of a whole pass).

    The output is not None only when the whole input ran at full resolution within the budget: then it is the
    untiled result and no tile needs to run. `factor` converts the tiling's pixel sizes to this input's units.
    """
    height, width = x.shape[-2:]
    budget = round(tiling.max_side * factor) ** 2
    core, pad = round(tiling.sample_core * factor), round(tiling.sample_pad * factor)
    window = core + 2 * pad
    whole = height * width <= budget or height < window or width < window
    if tiling.statistics == "whole" or (tiling.statistics == "sampled" and whole):
        ctx = _Context("measure")
        out = run(ctx, x)
        return ctx, out if height * width <= budget and not tiling.always else None
    if tiling.statistics == "downsampled":
        scale = round(tiling.max_side * factor) / max(height, width)
        small = F.interpolate(x, scale_factor=scale, mode="area") if scale < 1 else x
        ctx = _Context("measure")
        run(ctx, small)
        return ctx, None
    corners = sample_windows(height, width, window, budget, align)
    batch = torch.cat([x[..., top : top + window, left : left + window] for top, left in corners])
    ctx = _Context("measure", windows=len(corners), core=(pad, core, window))
    run(ctx, batch)
    del batch
    return ctx, None


def _tiled(run, x: torch.Tensor, tiling: VAETiling, factor: float, out_scale: float, align: int,
           progress: Progress | None) -> torch.Tensor:
    """Run `run` over `x` in tiles as `tiling` says.

    `factor`: units of `x` per image pixel (1 for the encoder's image, 1/8 for the decoder's latent);
    `out_scale`: output pixels per input unit; `align`: tile boundaries fall on multiples of it (the
    encoder's downsampling factor, so every feature map splits at whole pixels).
    """
    height, width = x.shape[-2:]
    core, pad = round(tiling.tile * factor), round(tiling.pad * factor)
    boxes = plan_tiles(height, width, core, pad, align)
    measured, whole = _measure(run, x, tiling, factor, align)
    return_free_memory()
    if whole is not None:  # the whole input fitted the budget: that pass was the untiled one
        if progress is not None:
            progress(len(boxes))
        return whole
    ctx = _Context("apply", recorded=measured)
    canvas = None
    for box in boxes:
        out = run(ctx, x[..., box.top : box.bottom, box.left : box.right])
        if canvas is None:
            canvas = out.new_empty(out.shape[0], out.shape[1], round(height * out_scale), round(width * out_scale))
        rows = slice(round(box.core_top * out_scale), round(box.core_bottom * out_scale))
        cols = slice(round(box.core_left * out_scale), round(box.core_right * out_scale))
        top, left = round((box.top + box.core_top) * out_scale), round((box.left + box.core_left) * out_scale)
        kept = out[..., rows, cols]
        canvas[..., top : top + kept.shape[-2], left : left + kept.shape[-1]] = kept
        del out, kept
        return_free_memory()
        if progress is not None:
            progress(1)
    return canvas


def downsample_factor(vae: nn.Module) -> int:
    from compress.models.student import vae_downsample_factor

    return vae_downsample_factor(vae)


def tile_count(height: int, width: int, tiling: VAETiling) -> int:
    """Tiles of an image of height x width pixels (what a progress display counts)."""
    return math.ceil(height / tiling.tile) * math.ceil(width / tiling.tile)


def _check_vae(vae: nn.Module) -> None:
    for part in ("encoder", "decoder"):
        module = getattr(vae, part, None)
        if module is None or not all(hasattr(module, a) for a in ("conv_in", "mid_block", "conv_norm_out", "conv_out")):
            raise NotImplementedError(
                f"tiled VAE: {type(vae).__name__} is not an AutoencoderKL-style VAE (no {part}.conv_in / mid_block / "
                "conv_norm_out / conv_out); run it untiled (--tile off) or give it a tiled path of its own"
            )


def tiled_encode(vae: nn.Module, image: torch.Tensor, tiling: VAETiling = VAETiling(),
                 progress: Progress | None = None):
    """Posterior of an AutoencoderKL-style VAE for an image in [-1, 1] whose sides are multiples of its factor."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    _check_vae(vae)
    factor = downsample_factor(vae)
    moments = _tiled(lambda ctx, x: _run_encoder(ctx, vae.encoder, x), image, tiling, 1.0, 1 / factor, factor, progress)
    if getattr(vae, "quant_conv", None) is not None:
        moments = vae.quant_conv(moments)  # 1x1 conv: per pixel, safe after stitching
    return DiagonalGaussianDistribution(moments)


def tiled_decode(vae: nn.Module, latent: torch.Tensor, tiling: VAETiling = VAETiling(),
                 progress: Progress | None = None) -> torch.Tensor:
    """Decoder output for a large latent (already divided by the scaling factor), tile by tile."""
    _check_vae(vae)
    factor = downsample_factor(vae)
    if getattr(vae, "post_quant_conv", None) is not None:
        latent = vae.post_quant_conv(latent)
    return _tiled(lambda ctx, z: _run_decoder(ctx, vae.decoder, z), latent, tiling, 1 / factor, factor, 1, progress)
