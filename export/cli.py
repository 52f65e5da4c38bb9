"""`python -m export onnx | coreml | validate`: one function per verb, flags from the dataclasses below.

Flags are parsed and checked here without torch, so `--help` and a bad flag answer at once. Exit codes:
0 the artifact passed its budget; 3 it was written but failed (report.md names what and by how much);
2 bad input (one line naming it and the fix); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

PRECISIONS_ONNX = ("fp32", "fp16", "int8")
PRECISIONS_COREML = ("fp16", "fp32")
PALETTE_BITS = (1, 2, 3, 4, 6, 8)

ONNX_EXAMPLES = """examples:
  python -m export onnx -o artifacts/builtin-onnx                      # the built-in student, fp32, end to end
  python -m export onnx --model runs/small --components -o artifacts/small-onnx   # + one graph per stage
  python -m export onnx --model runs/small --precision fp16 -o artifacts/small-fp16
  python -m export onnx --model runs/small --precision int8 -o artifacts/small-int8   # for CPUs
  python -m compress upscale photo.png --model artifacts/small-onnx -o outputs/   # run it in ONNX Runtime
"""
COREML_EXAMPLES = """examples:
  python -m export coreml -o artifacts/builtin-coreml                  # fp16, LR input 64x64
  python -m export coreml --model runs/small --palettize 6 --shape 128x128 --shape 64x96 -o artifacts/small-ml
"""
VALIDATE_EXAMPLES = """examples:
  python -m export validate artifacts/small-onnx
  python -m export validate artifacts/small-onnx --budgets my_budget.toml --model runs/small
"""


def parse_size(text: str) -> tuple[int, int]:
    """'64x48' -> (64, 48): an LR height x width."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not HxW (e.g. 64x64)") from None
    if height < 1 or width < 1:
        raise ValueError(f"{text!r}: sides must be >= 1")
    return height, width


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(parse_size(part) for part in text.split(",") if part.strip())


@dataclass
class CommonArgs:
    budgets: str | None = field(default=None, metadata={
        "help": "budget TOML (default: compress/assets/budgets/export.toml: parity floors + quality limits)"})
    parity_sizes: tuple = field(default=((64, 64), (37, 53)), metadata={
        "parse": parse_sizes, "help": "LR sizes of the parity photos, comma-separated HxW"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    quality_images: int | None = field(default=None, metadata={
        "help": "score the quality budget on the first N validation photos (default: all 7)"})


@dataclass
class OnnxArgs(CommonArgs):
    precision: str = field(default="fp32", metadata={
        "choices": PRECISIONS_ONNX, "help": "fp16 / int8 keep any component that fails its parity floor in fp32 "
        "(int8: static QDQ convolutions in the VAE, dynamic int8 linear layers in the transformer, for the CPU)"})
    calibration_images: int = field(default=8, metadata={
        "help": "int8: LR crops of the training photos that calibrate the activation ranges"})
    opset: int = field(default=17, metadata={"help": "ONNX opset"})
    components: bool = field(default=False, metadata={
        "help": "also write one graph per stage (upsample, VAE encoder, transformer, VAE decoder) for tiling"})
    skip_quality: bool = field(default=False, metadata={
        "help": "check parity only, not the quality budget on the validation photos"})

    def __post_init__(self):
        if self.opset < 14 or self.opset > 21:
            raise ValueError(f"--opset must be between 14 and 21, got {self.opset}")
        if self.calibration_images < 1:
            raise ValueError(f"--calibration-images must be >= 1, got {self.calibration_images}")


@dataclass
class CoremlArgs(CommonArgs):
    precision: str = field(default="fp16", metadata={"choices": PRECISIONS_COREML, "help": "compute precision"})
    palettize: int | None = field(default=None, metadata={
        "help": "k-means palettize the weights to this many bits (1, 2, 3, 4, 6, 8)"})
    int8: bool = field(default=False, metadata={"help": "int8 linear weight quantization"})
    shape: list = field(default_factory=list, metadata={
        "parse": parse_size, "action": "append", "metavar": "HxW",
        "help": "LR input shape (repeat for enumerated shapes; default 64x64)"})
    components: bool = field(default=False, metadata={"help": "also write one package per stage"})

    def __post_init__(self):
        if self.palettize is not None and self.palettize not in PALETTE_BITS:
            raise ValueError(f"--palettize must be one of {PALETTE_BITS}, got {self.palettize}")
        if self.palettize is not None and self.int8:
            raise ValueError("--palettize and --int8 are alternatives; give one")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="student: saved folder, prune/distill run folder, TSD-SR release root, preset:NAME "
                             "(default: the built-in student)")
    parser.add_argument("--base-model", type=Path, default=None, help="SD3 base folder for a TSD-SR release")
    parser.add_argument("-o", "--output", type=Path, required=True, help="artifact folder to write")


def build_parser() -> argparse.ArgumentParser:
    from compress.cli import OneLineParser, add_dataclass_arguments

    parser = OneLineParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{onnx,coreml,validate}")
    onnx = sub.add_parser("onnx", help="ONNX graphs validated in ONNX Runtime", epilog=ONNX_EXAMPLES,
                          description=run_onnx.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(onnx)
    add_dataclass_arguments(onnx, OnnxArgs)
    onnx.set_defaults(run=run_onnx)
    coreml = sub.add_parser("coreml", help="Core ML .mlpackage (mlprogram)", epilog=COREML_EXAMPLES,
                            description=run_coreml.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(coreml)
    add_dataclass_arguments(coreml, CoremlArgs)
    coreml.set_defaults(run=run_coreml)
    validate = sub.add_parser("validate", help="re-check an artifact against its manifest and a budget",
                              epilog=VALIDATE_EXAMPLES, description=run_validate.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    validate.add_argument("artifact", type=Path, help="artifact folder (with manifest.json)")
    validate.add_argument("--model", default=None, help="the source student (default: the one the manifest names)")
    validate.add_argument("--budgets", default=None, help="budget TOML (default: the shipped export budget)")
    validate.add_argument("--parity-sizes", type=parse_sizes, default=((64, 64), (37, 53)),
                          help="LR sizes of the parity photos, comma-separated HxW")
    validate.add_argument("--quality-images", type=int, default=None,
                          help="score the quality budget on the first N validation photos (default: all 7)")
    validate.set_defaults(run=run_validate)
    return parser


def _check_inputs(ns) -> None:
    """What can be refused in a second, before torch is imported: the output path and the model's files."""
    from compress.io import check_output_folder
    from compress.models.preflight import check_model_files

    check_output_folder(ns.output, overwrite=ns.overwrite)
    check_model_files(ns.model, ns.base_model)


def _load(ns):
    from compress.models.errors import ModelLoadError
    from compress.models.resolve import load_model
    from compress.models.student import OneStepSR

    loaded = load_model(ns.model, base_model=ns.base_model)
    if not isinstance(loaded.model, OneStepSR):
        raise ModelLoadError(f"--model {ns.model} is already an exported artifact; export from the student it came from")
    print(f"model: {loaded.description}", file=sys.stderr)
    return loaded


def _finish(report: dict, output: Path) -> int:
    from compress.budget import BUDGET_EXIT_CODE

    if report["passed"]:
        print(f"{output}: validation passed (report: {output / 'report.md'})", file=sys.stderr)
        for line in report.get("skipped", []):
            print(f"  skipped (not passed): {line}", file=sys.stderr)
        return 0
    print(f"{output}: FAILED validation:", file=sys.stderr)
    for line in report["failed"]:
        print(f"  {line}", file=sys.stderr)
    return BUDGET_EXIT_CODE


def run_onnx(ns: argparse.Namespace) -> int:
    """Export a student to ONNX: the end-to-end graph (LR -> SR, bicubic included; batch, height and width
    dynamic, sides a multiple of the stride), optionally its components, fp32 or fp16 with a measured fp32
    fallback, validated (parity with PyTorch on photos, quality budget). Writes OUT/*.onnx, manifest.json,
    report.json and report.md."""
    from compress.cli import dataclass_from_namespace

    args = dataclass_from_namespace(OnnxArgs, ns)
    _check_inputs(ns)
    from export.artifact import export_onnx

    loaded = _load(ns)
    report = export_onnx(loaded.model, ns.output, model_arg=ns.model, description=loaded.description,
                         precision=args.precision, opset=args.opset, components=args.components,
                         budget_path=args.budgets, parity_sizes=args.parity_sizes, overwrite=args.overwrite,
                         check_quality=not args.skip_quality, quality_images=args.quality_images,
                         calibration_images=args.calibration_images)
    return _finish(report, ns.output)


def run_coreml(ns: argparse.Namespace) -> int:
    """Export a student to Core ML (.mlpackage, mlprogram, iOS 17+) through torch.export, with fixed or
    enumerated LR shapes and optional weight compression. On Linux the package is checked as a spec (names,
    shapes, precision, compression, size) and its numerical parity is reported as skipped (Core ML runs
    only on macOS). Writes OUT/*.mlpackage, manifest.json, report.json and report.md."""
    from compress.cli import dataclass_from_namespace

    args = dataclass_from_namespace(CoremlArgs, ns)
    _check_inputs(ns)
    from export.artifact import export_coreml

    loaded = _load(ns)
    report = export_coreml(loaded.model, ns.output, model_arg=ns.model, description=loaded.description,
                           precision=args.precision, palettize_bits=args.palettize, int8=args.int8,
                           shapes=tuple(args.shape) or ((64, 64),), components=args.components,
                           budget_path=args.budgets, parity_sizes=args.parity_sizes, overwrite=args.overwrite)
    return _finish(report, ns.output)


def run_validate(ns: argparse.Namespace) -> int:
    """Validate an artifact: every file against manifest.json's sha256, the source student against its recorded
    weights hash, parity of every graph with PyTorch on real photos, and the quality budget. Writes
    ARTIFACT/report.json and report.md; exits 3 naming each failed check."""
    from export.artifact import validate

    report = validate(ns.artifact, budget_path=ns.budgets, model_arg=ns.model, parity_sizes=ns.parity_sizes,
                      quality_images=ns.quality_images)
    return _finish(report, ns.artifact)


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ns = build_parser().parse_args(argv)
    from compress.cli import run_command

    return run_command(ns, interrupted_note="no artifact folder was written")
