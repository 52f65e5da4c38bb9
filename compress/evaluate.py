"""`python -m compress eval`: quality of a student on validation photos, beside bicubic upsampling.

Writes OUT/metrics.json and OUT/report.md and prints the table. Metrics whose weights are not on this
machine are listed as skipped with the missing file, never reported as a number.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from compress.cli import comma_separated
from compress.options import (
    COLOR_FIX_METHODS, DEFAULT_COLOR_FIX, DTYPE_NAMES, TILE_MODES, check_color_fix, check_dtype_for_device,
)

if TYPE_CHECKING:  # torch is imported when a command runs, not to build the parser
    import torch

DEFAULT_METRICS = ("psnr", "ssim", "stlpips", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa")
DEGRADATIONS = ("realesrgan", "bicubic")
EXAMPLES = """examples:
  python -m compress eval -o runs/eval-default
  python -m compress eval --model runs/tiny-student --degradation bicubic -o runs/eval-bicubic
  python -m compress eval --model /data/tsdsr-release --data /data/DIV2K_valid_HR --metrics psnr,ssim,stlpips -o runs/eval
"""


@dataclass
class EvalArgs:
    """Options of `eval` (each is a flag of the same name); validation names the offending flag."""

    data: str = field(default="val", metadata={"help": "'val' (built-in validation photos) or a folder of HR images"})
    degradation: str = field(default="realesrgan", metadata={
        "choices": DEGRADATIONS, "help": "how LR inputs are made from the HR images"})
    metrics: tuple[str, ...] = field(default=DEFAULT_METRICS, metadata={
        "parse": comma_separated, "help": "comma-separated metric names"})
    seed: int = field(default=0, metadata={"help": "degradation seed"})
    hr_size: int = field(default=256, metadata={"help": "HR crop side for the built-in photos (multiple of 64)"})
    color_fix: str = field(default=DEFAULT_COLOR_FIX, metadata={
        "choices": COLOR_FIX_METHODS, "help": "colour alignment of the student's output, as in upscale"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    dtype: str = field(default="float32", metadata={"choices": DTYPE_NAMES, "help": "compute precision"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N images"})
    tile: str = field(default="auto", metadata={"choices": TILE_MODES, "help": "tiling, as upscale's --tile"})

    def __post_init__(self):
        if self.degradation not in DEGRADATIONS:
            raise ValueError(f"--degradation must be realesrgan or bicubic, got {self.degradation!r}")
        unknown = [m for m in self.metrics if m not in DEFAULT_METRICS]
        if unknown:
            raise ValueError(f"--metrics: unknown {unknown}; choose from {','.join(DEFAULT_METRICS)}")
        if self.hr_size % 64:
            raise ValueError(f"--hr-size must be a multiple of 64, got {self.hr_size}")
        check_color_fix(self.color_fix)
        check_dtype_for_device(self.dtype, self.device)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


def load_pairs(args: EvalArgs) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, LR 1x3xhxw, HR 1x3xHxW) pairs: built-in validation photos or a folder of HR images."""
    from compress.data.pairs import fixed_validation_pairs

    if args.data == "val":
        pairs = fixed_validation_pairs(args.degradation, seed=args.seed, hr_size=args.hr_size)
    else:
        pairs = folder_pairs(Path(args.data), args)
    pairs = [(name, _batch(lr), _batch(hr)) for name, lr, hr in pairs]
    return pairs[: args.limit] if args.limit else pairs


def _batch(tensor):
    return tensor if tensor.dim() == 4 else tensor[None]


def folder_pairs(folder: Path, args: EvalArgs):
    """HR images of a folder, centre-cropped to multiples of 64 and degraded at a fixed seed."""
    import numpy as np
    import torch

    from compress.data.degradations import degrade_bicubic, degrade_realesrgan
    from compress.imaging import ImageInputError, iter_image_paths, load_image

    pairs = []
    for index, path in enumerate(iter_image_paths([folder])):
        try:
            image = load_image(path)
        except ImageInputError as err:
            print(f"skipped: {err}", file=sys.stderr)
            continue
        hr = image.rgb
        height, width = (hr.shape[-2] // 64) * 64, (hr.shape[-1] // 64) * 64
        if height == 0 or width == 0:
            print(f"skipped: {path} is smaller than 64x64", file=sys.stderr)
            continue
        top, left = (hr.shape[-2] - height) // 2, (hr.shape[-1] - width) // 2
        hr = hr[:, top : top + height, left : left + width]
        hr_np = hr.permute(1, 2, 0).numpy()
        if args.degradation == "bicubic":
            lr_np = degrade_bicubic(hr_np)
        else:
            lr_np = degrade_realesrgan(hr_np, np.random.default_rng([args.seed, index]))
        pairs.append((path.stem, torch.from_numpy(np.ascontiguousarray(lr_np)).permute(2, 0, 1), hr))
    if not pairs:
        raise ValueError(f"--data {folder}: no usable HR images found")
    return pairs


def evaluate(model: str | None = None, output: Path = Path("runs/eval"), args: EvalArgs | None = None,
             base_model: Path | None = None) -> dict:
    """Run the student and bicubic upsampling on the pairs and score both with every requested metric."""
    from compress.io import check_inputs_exist, check_output_folder
    from compress.models.preflight import check_model_files

    args = args or EvalArgs()
    if args.data != "val":
        check_inputs_exist([Path(args.data)], "--data")
    check_output_folder(output)
    check_model_files(model, base_model)  # a damaged folder fails in a second, before torch is imported
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from compress.models.resolve import load_model, parse_dtype
    from compress.options import TileSettings
    from compress.pipeline import upscale_tensor
    from compress.quality.cost import machine_info
    from compress.quality.report import format_table, write_metrics_json

    loaded = load_model(model, base_model=base_model, device=args.device, dtype=parse_dtype(args.dtype))
    print(f"model: {loaded.description}", file=sys.stderr)
    print(f"settings: colour fix {args.color_fix}; tiling {args.tile}; degradation {args.degradation}, seed "
          f"{args.seed}; {args.device} {args.dtype}", file=sys.stderr)
    pairs = load_pairs(args)

    scorers, skipped = build_scorers(args.metrics, args.device)

    methods = {"student": [], "bicubic": []}
    per_image = []
    seconds = []
    for name, lr, hr in tqdm(pairs, desc="eval", unit="img", disable=None):
        start = time.perf_counter()
        sr = upscale_tensor(loaded.model, lr, TileSettings(mode=args.tile), args.color_fix)
        seconds.append(time.perf_counter() - start)
        bicubic = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        row = {"image": name}
        for method, output_image in (("student", sr), ("bicubic", bicubic)):
            scores = {}
            for metric_name, (kind, _, fn) in scorers.items():
                with torch.no_grad():
                    value = fn(output_image.float().cpu(), hr.float().cpu()) if kind == "fr" else fn(output_image.float().cpu())
                scores[metric_name] = float(torch.as_tensor(value).float().mean())
            methods[method].append(scores)
            row[method] = scores
        per_image.append(row)

    means = {
        method: {m: _finite_mean([s[m] for s in rows]) for m in scorers} for method, rows in methods.items()
    }
    payload = {
        "command": "eval",
        "model": loaded.description,
        "random_weights": loaded.is_random,
        "data": args.data,
        "degradation": args.degradation,
        "images": len(pairs),
        "settings": asdict(args),
        "higher_is_better": {m: hib for m, (_, hib, _) in scorers.items()},
        "mean": means,
        "skipped_metrics": skipped,
        "seconds_per_image_student": seconds,
        "per_image": per_image,
        "machine": machine_info(),
    }
    rows = [{"method": method, **{m: f"{v:.4f}" for m, v in values.items()}} for method, values in means.items()]
    table = format_table(rows, ["method", *scorers])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_metrics_json(output / "metrics.json", payload)
    report = [
        f"# eval: {loaded.description}",
        "",
        f"Data: {args.data} ({len(pairs)} images, degradation {args.degradation}, seed {args.seed}); "
        f"colour fix {args.color_fix}.",
        "Higher is better for " + ", ".join(m for m, (_, hib, _) in scorers.items() if hib)
        + "; lower for the rest." if scorers else "",
        "",
        table,
        "",
    ]
    if skipped:
        report += ["Skipped metrics:", ""] + [f"- {m}: {reason}" for m, reason in skipped.items()] + [""]
    from compress.io import atomic_path

    with atomic_path(output / "report.md") as tmp:
        tmp.write_text("\n".join(report))
    print(table)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return payload


def build_scorers(names, device="cpu") -> tuple[dict, dict]:
    """name -> (kind "fr"/"nr", higher_is_better, fn) for each available metric, and name -> reason for the rest.

    PSNR and SSIM are measured on the Y channel, as the SR literature (and TSD-SR's evaluation) reports them.
    """
    from compress.quality.fidelity import psnr_y, ssim_y
    from compress.quality.perceptual import build_metric

    scorers, skipped = {}, {}
    for name in names:
        if name == "psnr":
            scorers[name] = ("fr", True, lambda sr, hr: psnr_y(sr, hr))
        elif name == "ssim":
            scorers[name] = ("fr", True, lambda sr, hr: ssim_y(sr, hr))
        else:
            metric = build_metric(name, device)
            if getattr(metric, "reason", None):
                skipped[name] = metric.reason
                continue
            scorers[name] = (metric.kind, not metric.lower_is_better, metric)
    return scorers, skipped


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def add_parser(subparsers) -> None:
    from compress.cli import add_dataclass_arguments

    parser = subparsers.add_parser(
        "eval",
        help="score a student and bicubic upsampling on validation photos",
        description=evaluate.__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="saved student, TSD-SR release root or preset:NAME")
    parser.add_argument("--base-model", type=Path, default=None, help="SD3 base folder for a TSD-SR release")
    add_dataclass_arguments(parser, EvalArgs)
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/eval"), help="run folder")
    parser.set_defaults(run=run_from_args)


def run_from_args(ns: argparse.Namespace) -> int:
    from compress.cli import dataclass_from_namespace

    evaluate(ns.model, ns.output, dataclass_from_namespace(EvalArgs, ns), ns.base_model)
    return 0
