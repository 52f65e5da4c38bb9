"""Settings that the Python API and the command line share: one definition each, no torch import.

The command line builds its flags from these dataclasses (`compress.cli.add_dataclass_arguments`), so a
default or a choice is written once, here, and `python -m compress --help` answers without loading torch.
Every `__post_init__` check names the flag a user would fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Colour alignment after decoding (compress.colorfix). TSD-SR's test script defaults to wavelet.
COLOR_FIX_METHODS = ("wavelet", "adain", "none")
DEFAULT_COLOR_FIX = "wavelet"
TILE_MODES = ("auto", "on", "off")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
VAE_STATISTICS = ("sampled", "whole", "downsampled")


def check_dtype_for_device(dtype: str, device: str) -> str:
    """float16/bfloat16 are refused on the CPU: PyTorch runs them there many times slower than float32
    (`python -m benchmarks.precision`, docs/precision/precision.md); they are for CUDA."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if dtype != "float32" and not device.startswith("cuda"):
        raise ValueError(
            f"--dtype {dtype} on {device}: PyTorch's CPU kernels ran it 114x (bfloat16) and 119x (float16) slower than float32 on a 2-core EPYC "
            "with no memory this model needs back; use --dtype float32 on the CPU, float16/bfloat16 with "
            "--device cuda, or an fp16 ONNX artifact (python -m export onnx --precision fp16)"
        )
    return dtype


def check_color_fix(name: str, flag: str = "--color-fix") -> str:
    if name not in COLOR_FIX_METHODS:
        raise ValueError(f"{flag} must be one of {', '.join(COLOR_FIX_METHODS)}, got {name!r}")
    return name


@dataclass(frozen=True)
class VAETiling:
    """How the VAE handles an image too large to run in one piece (see compress.tiled_vae).

    Images whose longer side is at most `max_side` run whole; larger ones run in `tile`-pixel tiles with
    `pad` context pixels, one after another, normalised with GroupNorm statistics (and attending to
    attention keys/values) measured on windows sampled over the image, `max_side`^2 pixels in all. So
    `max_side` bounds the VAE's memory, whatever the image size. `always` tiles even small images.
    `statistics` picks how the image-wide statistics are measured: "sampled" (default, above), "whole"
    (the whole image at full resolution: exact, but the memory of an untiled pass) or "downsampled" (the
    whole image shrunk to `max_side`, multidiffusion-upscaler's fast mode; biased, kept for comparison).
    """

    tile: int = 512
    pad: int = 64
    max_side: int = 1024
    always: bool = False
    sample_core: int = 64  # core of one sampled statistics window, pixels
    sample_pad: int = 32  # context around it, pixels (only the core is measured)
    statistics: str = "sampled"

    def __post_init__(self):
        if self.tile < 64 or self.tile % 64:
            raise ValueError(f"--vae-tile must be a multiple of 64 (>= 64), got {self.tile}")
        if self.pad < 0 or self.pad % 16:
            raise ValueError(f"--vae-pad must be a non-negative multiple of 16 pixels, got {self.pad}")
        if self.max_side < 128 or self.max_side % 64:
            raise ValueError(f"--vae-max-side must be a multiple of 64 (>= 128), got {self.max_side}")
        if self.sample_core < 16 or self.sample_core % 16 or self.sample_pad < 0 or self.sample_pad % 16:
            raise ValueError(
                f"sample_core and sample_pad must be multiples of 16 (core >= 16), got {self.sample_core}, {self.sample_pad}"
            )
        if self.statistics not in VAE_STATISTICS:
            raise ValueError(f"statistics must be one of {', '.join(VAE_STATISTICS)}, got {self.statistics!r}")

    def applies(self, height: int, width: int) -> bool:
        """Whether an image of height x width pixels is tiled."""
        return self.always or max(height, width) > self.max_side


@dataclass(frozen=True)
class TileSettings:
    """How whole-image upscaling splits a large image.

    The transformer runs on latent tiles blended with a Gaussian window, as TSD-SR's test script does; the
    VAE tiles as `VAETiling` says. `mode`: auto tiles only what needs it, on tiles everything, off never.
    """

    mode: str = field(default="auto", metadata={"choices": TILE_MODES, "flag": "--tile",
                                                 "help": "auto tiles only images that need it"})
    latent_tile: int = field(default=64, metadata={"help": "transformer tile side in latents (64 = 512 px)"})
    latent_overlap: int = field(default=8, metadata={"help": "transformer tile overlap in latents"})
    vae_tile: int = field(default=512, metadata={"help": "VAE tile side in output pixels (multiple of 64)"})
    vae_pad: int = field(default=64, metadata={"help": "context pixels around each VAE tile (multiple of 16)"})
    vae_max_side: int = field(default=1024, metadata={
        "help": "longest side the VAE runs in one piece; larger images are VAE-tiled with image-wide "
                "GroupNorm statistics sampled over this many pixels squared, so it bounds the VAE's memory"})

    def __post_init__(self):
        if self.mode not in TILE_MODES:
            raise ValueError(f"--tile must be one of {', '.join(TILE_MODES)}, got {self.mode!r}")
        if self.latent_tile < 8 or self.latent_tile % 2:
            raise ValueError(f"--latent-tile must be an even number >= 8, got {self.latent_tile}")
        if not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError(f"--latent-overlap must be in [0, latent tile), got {self.latent_overlap}")
        self.vae  # validates the VAE fields, naming their flags

    @property
    def vae(self) -> VAETiling:
        return VAETiling(tile=self.vae_tile, pad=self.vae_pad, max_side=self.vae_max_side, always=self.mode == "on")
