"""`python -m compress upscale`: 4x super-resolution of image files and folders with a one-step student."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compress.options import (
    COLOR_FIX_METHODS, DEFAULT_COLOR_FIX, DTYPE_NAMES, TileSettings, check_color_fix, check_dtype_for_device,
)

EXAMPLES = """examples:
  python -m compress upscale compress/assets/samples/astronaut_lr.png -o outputs/
  python -m compress upscale photos/ -o outputs/ --model runs/tiny-student --color-fix adain
  python -m compress upscale big.jpg -o outputs/ --tile on --latent-tile 64 --vae-tile 512
  python -m compress upscale lq/ -o sr/ --model /data/tsdsr-release --base-model /data/sd3-medium-diffusers
"""


@dataclass
class UpscaleArgs:
    """Options of `upscale` (each is a flag of the same name); validation names the offending flag."""

    color_fix: str = field(default=DEFAULT_COLOR_FIX, metadata={
        "choices": COLOR_FIX_METHODS, "help": "align the output's colours to the input (TSD-SR's default: wavelet)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    dtype: str = field(default="float32", metadata={"choices": DTYPE_NAMES, "help": "compute precision"})
    sample_posterior: bool = field(default=False, metadata={
        "help": "sample the VAE posterior as TSD-SR does (default: its mode, deterministic)"})
    seed: int = field(default=0, metadata={"help": "seed for --sample-posterior"})
    recursive: bool = field(default=False, metadata={"help": "descend into sub-folders of folder inputs"})
    max_megapixels: float = field(default=100.0, metadata={"help": "refuse outputs larger than this"})
    tiles: TileSettings = field(default_factory=TileSettings)

    def __post_init__(self):
        check_color_fix(self.color_fix)
        check_dtype_for_device(self.dtype, self.device)
        if self.max_megapixels <= 0:
            raise ValueError(f"--max-megapixels must be positive, got {self.max_megapixels}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: CUDA is not available on this machine; use --device cpu")

    def describe(self) -> str:
        """One line of the settings that shape the output, printed before a run starts."""
        tiles = self.tiles
        return (
            f"settings: colour fix {self.color_fix}; tiling {tiles.mode} (transformer tiles of {tiles.latent_tile} "
            f"latents, overlap {tiles.latent_overlap}; VAE whole up to {tiles.vae_max_side} px, else tiles of "
            f"{tiles.vae_tile} px + {tiles.vae_pad} px context); {self.device} {self.dtype}"
            + ("; sampled posterior, seed " + str(self.seed) if self.sample_posterior else "")
        )


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

    Unreadable images are reported and skipped; the others are still written (each file atomically). Missing
    inputs, an output that cannot be written and a damaged model folder fail before anything heavy is imported.
    """
    from compress.io import check_inputs_exist, check_output_folder
    from compress.models.preflight import check_model_files

    check_inputs_exist(list(inputs))
    check_output_folder(output)
    check_model_files(model, base_model)
    import torch
    from tqdm import tqdm

    from compress.imaging import ImageInputError, iter_image_paths, load_image, save_image, upscale_alpha
    from compress.io import write_json
    from compress.models.resolve import load_model, parse_dtype
    from compress.pipeline import NumericalFailure, upscale_tensor

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
    print(args.describe(), file=sys.stderr)
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
        try:
            sr = upscale_tensor(loaded.model, image.rgb[None], args.tiles, args.color_fix, generator, progress=True)
        except NumericalFailure as err:  # this image failed numerically; the batch goes on
            summary.failed[str(path)] = str(err)
            tqdm.write(f"failed: {path}: {err}", file=sys.stderr)
            continue
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
    from compress.cli import add_dataclass_arguments

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
    add_dataclass_arguments(parser, UpscaleArgs)
    parser.set_defaults(run=run_from_args)


def run_from_args(ns: argparse.Namespace) -> int:
    from compress.cli import dataclass_from_namespace

    args = dataclass_from_namespace(UpscaleArgs, ns)
    summary = upscale(ns.inputs, ns.output, ns.model, ns.base_model, args)
    print(f"wrote {len(summary.written)} image(s) to {ns.output}; {len(summary.failed)} failed", file=sys.stderr)
    for path, reason in summary.failed.items():
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0
