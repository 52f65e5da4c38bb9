"""`python -m compress prune`: compress a student to a parameter target, or step by step, into a self-describing folder.

Flags come from `PruneArgs`; the step list is parsed and checked here, without torch, so that a bad flag
fails at once. The work itself is compress.prune.run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from compress.cli import comma_separated

STEP_NAMES = ("precache", "textless", "depth", "heads", "mlp", "vae", "vae-encoder", "vae-decoder", "vae-attn",
              "narrow-encoder", "narrow-decoder", "separable-encoder", "separable-decoder")
STEPS_WITH_RATIO = ("depth", "heads", "mlp", "vae", "vae-encoder", "vae-decoder")
STEPS_WITH_WIDTH = ("narrow-encoder", "narrow-decoder")  # the value is a channel count, e.g. narrow-decoder:64
VAE_STEPS = ("vae", "vae-encoder", "vae-decoder", "vae-attn", "narrow-encoder", "narrow-decoder",
             "separable-encoder", "separable-decoder")
STEP_GRAMMAR = ("precache, textless, depth:R, heads:R, mlp:R, vae:R, vae-encoder:R, vae-decoder:R, vae-attn, "
                "narrow-encoder:W, narrow-decoder:W, separable-encoder, separable-decoder")
DEPTH_METHODS = ("learnable", "sensitivity", "similarity", "random")
LOSSLESS_STEPS = ("precache",)
IMPORTANCE_METHODS = ("magnitude", "taylor")
WIDTH_SCOPES = ("uniform", "global")
# Measured on the built-in student at 50 % depth with the same recovery (docs/prune/depth-methods.md).
DEFAULT_DEPTH_METHOD = "sensitivity"
# Recovery steps when --recover-steps is not given and a step is lossy: what the built-in student needs at
# --target-params 0.2 to fit this machine's 15-minute budget (docs/prune/target-0.2.md).
DEFAULT_RECOVER_STEPS = 300

EXAMPLES = """examples:
  # the toolkit's first command: a student with 0.2 of the parameters, planned, recovered, checked
  python -m compress prune --target-params 0.2 -o runs/small
  # the plan only (measures every candidate step, prints the steps and the parameter count)
  python -m compress prune --target-params 0.2 --dry-run
  # replay a run's plan exactly; continue an interrupted run
  python -m compress prune --plan runs/small/plan.json -o runs/small-again
  python -m compress prune --target-params 0.2 -o runs/small --resume
  # what would go, and the parameter count, without writing anything
  python -m compress prune --steps precache,textless,depth:0.5 --dry-run
  # the built-in student: fold the constant conditioning, drop the text stream, half the blocks, recover
  python -m compress prune --steps precache,textless,depth:0.5 --recover-steps 300 -o runs/pruned
  # heads and MLP widths too, ranked by Taylor importance on calibration photos, widths free per block
  python -m compress prune --steps precache,textless,depth:0.5,heads:0.5,mlp:0.5 --importance taylor \\
      --width-scope global -o runs/pruned-small
  # the learnable N:M depth search (TinyFusion + TinySR's DIA/ECS)
  python -m compress prune --steps precache,depth:0.5 --method learnable --search-steps 200 -o runs/pruned-l
"""


@dataclass(frozen=True)
class Step:
    """One compression step (see STEP_GRAMMAR): `ratio` is the fraction removed, or for narrow-* the width kept."""

    name: str
    ratio: float | None = None

    def __str__(self) -> str:
        if self.ratio is None:
            return self.name
        return f"{self.name}:{int(self.ratio)}" if self.name in STEPS_WITH_WIDTH else f"{self.name}:{self.ratio:.6g}"


def parse_steps(text: str | tuple[str, ...]) -> tuple[Step, ...]:
    """'precache,textless,depth:0.5' -> Steps, checked; precache is put first when a later step needs it."""
    items = comma_separated(text) if isinstance(text, str) else tuple(text)
    if not items:
        raise ValueError("--steps is empty; e.g. --steps precache,textless,depth:0.5")
    steps = []
    for item in items:
        name, _, value = item.partition(":")
        name = name.strip()
        if name not in STEP_NAMES:
            raise ValueError(f"--steps: unknown step {name!r}; allowed: {STEP_GRAMMAR}")
        if name in STEPS_WITH_RATIO:
            try:
                ratio = float(value)
            except ValueError:
                raise ValueError(f"--steps: {name} needs a ratio in (0, 1), e.g. {name}:0.5; got {item!r}") from None
            if not 0.0 < ratio < 1.0:
                raise ValueError(f"--steps: {name}:{value} is out of range; the ratio removed must be in (0, 1)")
            steps.append(Step(name, ratio))
        elif name in STEPS_WITH_WIDTH:
            if not value.strip().isdigit() or int(value) < 1:
                raise ValueError(f"--steps: {name} needs a channel width, e.g. {name}:64; got {item!r}")
            steps.append(Step(name, float(int(value))))
        else:
            if value:
                raise ValueError(f"--steps: {name} takes no ratio; got {item!r}")
            steps.append(Step(name))
    names = [s.name for s in steps]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--steps: {', '.join(repeated)} given more than once")
    if "precache" in names and names[0] != "precache":
        raise ValueError("--steps: precache must come first (the other steps work on the pre-cached model)")
    if "precache" not in names and any(n not in VAE_STEPS for n in names):
        steps.insert(0, Step("precache"))  # lossless, and every transformer step needs the compact model
    return tuple(steps)


@dataclass
class PruneArgs:
    """Options of `prune` (each is a flag of the same name); validation names the offending flag."""

    target_params: float | None = field(default=None, metadata={
        "metavar": "R", "help": "plan the steps so that the student keeps this fraction of its parameters "
        "(transformer + VAE), within 2 %%; the planner measures each candidate step on calibration photos"})
    plan: Path | None = field(default=None, metadata={
        "metavar": "FILE", "help": "replay the plan.json of an earlier run (its steps and settings)"})
    steps: tuple[Step, ...] | None = field(default=None, metadata={
        "parse": parse_steps, "metavar": "STEP[,STEP...]",
        "help": "steps in order: precache, textless, depth:R, heads:R, mlp:R, vae:R / vae-encoder:R / "
                "vae-decoder:R (VAE channels), vae-attn (VAE mid-block attention), narrow-encoder:W / "
                "narrow-decoder:W (every VAE width W), separable-encoder / separable-decoder (depthwise-separable "
                "3x3 convolutions); R = fraction removed"})
    method: str = field(default=DEFAULT_DEPTH_METHOD, metadata={
        "choices": DEPTH_METHODS, "help": "how depth:R chooses the blocks"})
    importance: str = field(default="magnitude", metadata={
        "choices": IMPORTANCE_METHODS, "help": "channel importance for heads:R / mlp:R (taylor uses calibration photos)"})
    width_scope: str = field(default="uniform", metadata={
        "choices": WIDTH_SCOPES, "help": "uniform: the same fraction in every block; global: widths free per block"})
    round_to: int = field(default=8, metadata={"help": "kept MLP widths are multiples of this"})
    calibration_images: int = field(default=8, metadata={
        "help": "training-photo crops that score blocks and channels (sensitivity, similarity, taylor)"})
    search_steps: int = field(default=200, metadata={"help": "steps of the learnable depth search"})
    recover_steps: int | None = field(default=None, metadata={
        "help": "recovery steps towards the uncompressed student after pruning (TinySR stage 1; slimmed VAEs "
                f"by distillation); default {DEFAULT_RECOVER_STEPS} when a step is lossy, 0 skips it"})
    checkpoint_every: int = field(default=50, metadata={"help": "recovery steps between checkpoints"})
    resume: bool = field(default=False, metadata={
        "help": "continue the interrupted run that writes -o OUT (from OUT.partial: plan, pruned student, "
                "recovery checkpoint)"})
    budget: Path | None = field(default=None, metadata={
        "metavar": "FILE", "help": "quality budget (TOML; default: compress/assets/budgets/default.toml); a "
        "result outside it exits with code 3, the model still written"})
    recover_lr: float = field(default=1e-4, metadata={"help": "learning rate of the recovery"})
    batch_size: int = field(default=4, metadata={"help": "crops per step (search and recovery)"})
    hr_size: int = field(default=128, metadata={"help": "HR crop side of the search/recovery crops"})
    metrics: tuple[str, ...] = field(default=("all",), metadata={
        "parse": comma_separated, "help": "quality metrics on the validation photos: all (every offline one), "
        "none, or names as in eval"})
    latency_size: int = field(default=128, metadata={"help": "LR side of the latency/MACs measurement (x4 output)"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice (same seed, same result)"})
    dry_run: bool = field(default=False, metadata={
        "help": "print what would be removed and the resulting parameter count; write nothing"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})

    def __post_init__(self):
        if isinstance(self.steps, str):
            self.steps = parse_steps(self.steps)
        given = [flag for flag, value in (("--steps", self.steps), ("--target-params", self.target_params),
                                          ("--plan", self.plan)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"give one of --target-params, --steps, --plan; got {' and '.join(given)}")
        if not given and not self.resume:
            raise ValueError("say what to remove: --target-params R (e.g. 0.2), --steps LIST or --plan FILE")
        if self.target_params is not None and not 0.0 < self.target_params < 1.0:
            raise ValueError(f"--target-params must be a fraction in (0, 1), got {self.target_params:g}")
        for name, values in (("--method", DEPTH_METHODS), ("--importance", IMPORTANCE_METHODS),
                             ("--width-scope", WIDTH_SCOPES)):
            value = getattr(self, name[2:].replace("-", "_"))
            if value not in values:
                raise ValueError(f"{name} must be one of {', '.join(values)}, got {value!r}")
        for name in ("round_to", "calibration_images", "batch_size", "latency_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("search_steps", "recover_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.method == "learnable" and self.search_steps < 1 and any(s.name == "depth" for s in self.steps or ()):
            raise ValueError("--search-steps must be >= 1 for --method learnable")
        if self.recover_lr <= 0:
            raise ValueError(f"--recover-lr must be positive, got {self.recover_lr}")
        if self.hr_size % 64:
            raise ValueError(f"--hr-size must be a multiple of 64, got {self.hr_size}")
        if self.latency_size % 16:
            raise ValueError(f"--latency-size must be a multiple of 16, got {self.latency_size}")

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps or () if s.name == name), None)


def add_parser(subparsers) -> None:
    from compress.cli import add_dataclass_arguments

    parser = subparsers.add_parser(
        "prune",
        help="compress the student to a parameter target (or by explicit steps): transformer and VAE",
        description=__doc__.split("\n\n")[0] + "\n\nWrites OUT/model (a saved student), OUT/plan.json, OUT/prune_report.json "
        "and OUT/report.md.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="student to compress: saved folder, TSD-SR release root, "
                        "preset:NAME (default: the built-in student)")
    parser.add_argument("--base-model", type=Path, default=None, help="SD3 base folder for a TSD-SR release")
    add_dataclass_arguments(parser, PruneArgs)
    parser.add_argument("-o", "--output", type=Path, default=None, help="output folder (required unless --dry-run)")
    parser.set_defaults(run=run_from_args)


def run_from_args(ns: argparse.Namespace) -> int:
    from compress.cli import dataclass_from_namespace

    args = dataclass_from_namespace(PruneArgs, ns)
    if ns.output is None and not args.dry_run:
        raise ValueError("-o/--output is required (or pass --dry-run)")
    from compress.io import check_output_folder
    from compress.models.preflight import check_model_files

    if ns.output is not None and not args.dry_run:
        check_output_folder(ns.output, overwrite=args.overwrite)
    check_model_files(ns.model, ns.base_model)  # a damaged folder fails in a second, before torch is imported
    from compress.budget import BUDGET_EXIT_CODE
    from compress.prune.run import prune

    report = prune(ns.model, ns.output, args, base_model=ns.base_model)
    if args.dry_run or report["budget"]["passed"]:
        return 0
    return BUDGET_EXIT_CODE
