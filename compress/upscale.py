"""`python -m compress upscale`: 4x super-resolution of image files and folders with a one-step student."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compress.pipeline import TileSettings

EXAMPLES = """examples:
  python -m compress upscale compress/assets/samples/astronaut_lr.png -o outputs/
  python -m compress upscale photos/ -o outputs/ --model runs/tiny-student --color-fix adain
  python -m compress upscale big.jpg -o outputs/ --tile on --latent-tile 64 --vae-tile 512
  python -m compress upscale lq/ -o sr/ --model /data/tsdsr-release --base-model /data/sd3-medium-diffusers
"""


@dataclass
class UpscaleArgs:
    """Options of `upscale`; validation names the offending flag."""

    color_fix: str = "wavelet"
    device: str = "cpu"
    dtype: str = "float32"
    sample_posterior: bool = False
    seed: int = 0
    recursive: bool = False
    max_megapixels: float = 100.0
    tiles: TileSettings = field(default_factory=TileSettings)

    def __post_init__(self):
        if self.color_fix not in ("adain", "wavelet", "none"):
            raise ValueError(f"--color-fix must be adain, wavelet or none, got {self.color_fix!r}")
        if self.max_megapixels <= 0:
            raise ValueError(f"--max-megapixels must be positive, got {self.max_megapixels}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine; use --device cpu")


@dataclass
class UpscaleSummary:
    model: str
    written: list[str]
    failed: dict[str, str]
    seconds_per_image: list[float]


def upscale(
    inputs: list[Path],
    output: Path,
    model: str | None = None,
    base_model: Path | None = None,
    args: UpscaleArgs | None = None,
) -> UpscaleSummary:
    """Upscale every image in `inputs` (files and folders) 4x into the folder `output`.

    Unreadable images are reported and skipped; the others are still written (each file atomically).
    """
    from tqdm import tqdm

    from compress.colorfix import apply_color_fix
    from compress.imaging import ImageInputError, iter_image_paths, load_image, save_image, upscale_alpha
    from compress.io import write_json
    from compress.models.resolve import load_model, parse_dtype
    from compress.pipeline import upscale_tensor

    args = args or UpscaleArgs()
    paths = iter_image_paths(list(inputs), recursive=args.recursive)
    if not paths:
        raise ImageInputError(f"no images found in {', '.join(map(str, inputs))} (png, jpg, bmp, tif, webp)")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise ImageInputError(
                f"{path} and {stems[path.stem]} would both be written as {path.stem}.png; rename one or run them separately"
            )
        stems[path.stem] = path

    loaded = load_model(
        model, base_model=base_model, device=args.device, dtype=parse_dtype(args.dtype),
        sample_posterior=args.sample_posterior,
    )
    print(f"model: {loaded.description}", file=sys.stderr)
    scale = loaded.model.settings.upscale
    output.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    summary = UpscaleSummary(loaded.description, [], {}, [])
    for path in tqdm(paths, desc="upscale", unit="img", disable=None):
        try:
            image = load_image(path, scale=scale, max_output_pixels=int(args.max_megapixels * 1e6))
        except ImageInputError as err:
            summary.failed[str(path)] = str(err)
            tqdm.write(f"skipped: {err}", file=sys.stderr)
            continue
        start = time.perf_counter()
        lr = image.rgb[None]
        sr = upscale_tensor(loaded.model, lr, args.tiles, generator)
        sr = apply_color_fix(args.color_fix, sr, lr)
        summary.seconds_per_image.append(time.perf_counter() - start)
        alpha = upscale_alpha(image.alpha, scale) if image.alpha is not None else None
        target = output / f"{path.stem}.png"
        save_image(target, sr[0], alpha=alpha, mode=image.mode, bit_depth=image.bit_depth)
        summary.written.append(str(target))
    write_json(
        output / "upscale_run.json",
        {"command": "upscale", "model": loaded.description, "random_weights": loaded.is_random,
         "settings": asdict(args), "written": summary.written, "failed": summary.failed,
         "seconds_per_image": summary.seconds_per_image},
    )
    return summary


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "upscale",
        help="4x super-resolve images with a one-step student",
        description=upscale.__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files and/or folders")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (PNG files, same names)")
    parser.add_argument("--model", default=None,
                        help="saved student folder, TSD-SR release root, or preset:NAME (default: built-in)")
    parser.add_argument("--base-model", type=Path, default=None,
                        help="SD3 base folder (diffusers layout) for a TSD-SR release that does not contain it")
    parser.add_argument("--color-fix", default="wavelet", choices=["adain", "wavelet", "none"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--sample-posterior", action="store_true",
                        help="sample the VAE posterior as TSD-SR does (default: its mode, deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --sample-posterior")
    parser.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    parser.add_argument("--max-megapixels", type=float, default=100.0, help="refuse outputs larger than this")
    parser.add_argument("--tile", default="auto", choices=["auto", "on", "off"],
                        help="latent + VAE tiling: auto tiles only images that need it")
    parser.add_argument("--latent-tile", type=int, default=64, help="latent tile side (64 = 512 px)")
    parser.add_argument("--latent-overlap", type=int, default=8, help="latent tile overlap")
    parser.add_argument("--vae-tile", type=int, default=512, help="VAE tile side in output pixels (multiple of 64)")
    parser.add_argument("--vae-pad", type=int, default=64,
                        help="context pixels around each VAE tile (multiple of 16); GroupNorm and attention are image-wide")
    parser.set_defaults(run=run_from_args)


def run_from_args(ns: argparse.Namespace) -> int:
    tiles = TileSettings(mode=ns.tile, latent_tile=ns.latent_tile, latent_overlap=ns.latent_overlap, vae_tile=ns.vae_tile,
                         vae_pad=ns.vae_pad)
    args = UpscaleArgs(
        color_fix=ns.color_fix, device=ns.device, dtype=ns.dtype, sample_posterior=ns.sample_posterior,
        seed=ns.seed, recursive=ns.recursive, max_megapixels=ns.max_megapixels, tiles=tiles,
    )
    summary = upscale(ns.inputs, ns.output, ns.model, ns.base_model, args)
    print(f"wrote {len(summary.written)} image(s) to {ns.output}; {len(summary.failed)} failed", file=sys.stderr)
    for path, reason in summary.failed.items():
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0
