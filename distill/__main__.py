"""python -m distill: re-distil one-step SR students (TSD-SR's TSD, TinySR's KD stages, TAD-SR).

Examples:
  # list the presets
  python -m distill presets
  # TSD-train the reference student from the prior that scripts/train_reference.py wrote
  python -m distill train --preset reference-tsd --prior runs/reference --out runs/reference-student
  # the same for 10 steps, then continue to the end
  python -m distill train --preset reference-tsd --prior runs/reference --out runs/s --max-steps 10
  python -m distill train --preset reference-tsd --prior runs/reference --out runs/s --resume
  # re-distil a pruned student from the built-in reference student (TinySR stage 1, then 2)
  python -m distill train --preset redistill-stage1 --student runs/pruned/model --out runs/kd1
  python -m distill train --preset redistill-stage2 --student runs/kd1/model --out runs/kd2
  # override any preset key
  python -m distill train --preset reference-tsd --prior runs/reference --out runs/s --set loss.tsd=0.5 --set train.steps=200
  # train on your own HR photos (any folder tree: DIV2K, LSDIR, FFHQ)
  python -m distill train --preset reference-tsd --prior runs/reference --data /data/DIV2K_train_HR --out runs/div2k
  # or on pre-degraded pairs, matched by name (DIV2K's 0001x4.png matches 0001.png)
  python -m distill train --preset reference-tsd --prior runs/reference --pairs /data/DIV2K_train_LR_bicubic/X4 /data/DIV2K_train_HR --out runs/div2k-pairs
  # with each image's own HQ prompt embeddings for the teacher and the fake score (TSD-SR's training)
  python -m distill train --preset reference-tsd --prior runs/reference --data /data/DIV2K_train_HR --prompt-embeds /data/DIV2K_embeds --out runs/div2k
  # two processes, no code change (on a machine without GPUs, --multi_gpu runs 2 CPU processes over gloo)
  accelerate launch --multi_gpu --num_processes 2 -m distill train --preset reference-tsd --prior runs/reference --out runs/ddp
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import ConfigError, RecipeConfig, list_presets, resolve_preset

CHECKPOINT_DIR = "checkpoints"  # distill.training.CHECKPOINT_DIR (that module imports torch; this one must not)


@dataclass
class TrainArgs:
    """Arguments of `python -m distill train` (each is a flag), checked before anything heavy is loaded."""

    preset: str = field(metadata={"help": "preset name (see `python -m distill presets`) or a YAML file"})
    out: Path = field(metadata={"help": "run folder (config.yaml, log.csv, checkpoints/, model/, metrics.json)"})
    prior: str | None = field(default=None, metadata={
        "help": "prior folder (base/ + dataset/{default,null}/, TSD-SR release layout) from "
                "scripts/train_reference.py, a release root, or 'builtin'"})
    student: str | None = field(default=None, metadata={
        "help": "student to re-distil: model folder, release root, preset:NAME, or 'builtin'"})
    teacher: str | None = field(default=None, metadata={
        "help": "KD teacher student (default of the preset; 'builtin' = the shipped reference student)"})
    data: str | None = field(default=None, metadata={
        "help": "a folder of HR images, any depth (DIV2K, LSDIR, FFHQ...): random crops of train.hr_size; "
                "unreadable files are listed and skipped, smaller images counted and skipped (overrides train.data)"})
    pairs: list[str] | None = field(default=None, metadata={
        "nargs": 2, "metavar": ("LR_DIR", "HR_DIR"),
        "help": "pre-degraded LR/HR pairs: two folder trees whose files match by name (an LR name may end in "
                "x4, as DIV2K's do); HR must be 4x LR (overrides train.pairs)"})
    prompt_embeds: str | None = field(default=None, metadata={
        "metavar": "DIR", "help": "per-image HQ prompt embeddings for the teacher and the fake score, as TSD-SR "
        "trains: DIR/NAME.safetensors (prompt_embeds, pool_embeds) or TSD-SR's DIR/prompt_embeds/NAME.pt + "
        "DIR/pool_embeds/NAME.pt, NAME = each training image's file name without extension; without it they see "
        "the fixed prompt (overrides train.prompt_embeds)"})
    steps: int | None = field(default=None, metadata={"help": "total steps of the schedule (overrides train.steps)"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many steps (continue later with --resume)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    overrides: list[str] = field(default_factory=list, metadata={
        "flag": "--set", "action": "append", "metavar": "KEY=VALUE",
        "help": "override a preset key, e.g. --set loss.tsd=0.5 (repeatable)"})

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
        for item in self.overrides:
            if "=" not in item or item.startswith("="):
                raise ConfigError(f"--set expects section.key=value, got {item!r}")
        resolve_preset(self.preset)
        if self.resume and not (Path(self.out) / CHECKPOINT_DIR).is_dir():
            raise ConfigError(f"--resume: {Path(self.out) / CHECKPOINT_DIR} does not exist; start without --resume")
        # the same test as DistillRecipe's, made here so that it answers before torch is imported
        finished = list((Path(self.out) / CHECKPOINT_DIR).glob("step-*/trainer_state.json"))
        if not self.resume and (finished or (Path(self.out) / "model").exists()):
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")

    def config(self) -> RecipeConfig:
        overrides = dict(item.split("=", 1) for item in self.overrides)
        for flag, key in ((self.prior, "model.prior"), (self.student, "model.student_init"),
                          (self.teacher, "model.kd_teacher"), (self.steps, "train.steps"), (self.data, "train.data"),
                          (self.pairs, "train.pairs"), (self.prompt_embeds, "train.prompt_embeds")):
            if flag is not None:
                overrides[key] = flag
        return RecipeConfig.from_yaml(self.preset, overrides)


def check_inputs(cfg: RecipeConfig, out: Path) -> None:
    """Refuse in a second, before torch is imported: an output that cannot be written, damaged model folders."""
    from compress.io import check_output_folder
    from compress.models.preflight import check_model_files, check_prior

    check_output_folder(out, "--out")
    if cfg.model.prior:
        check_prior(cfg.model.prior)
    if cfg.model.teacher_lora:
        cfg.model.teacher_lora_file()
    if cfg.model.student_init not in ("lora", "builtin"):
        check_model_files(cfg.model.student_init, flag="--student")
    if cfg.loss.needs_kd_teacher:
        check_model_files(None if cfg.model.kd_teacher == "builtin" else cfg.model.kd_teacher, flag="--teacher")


def train(args: TrainArgs) -> int:
    """Run one distillation recipe into a self-describing run folder."""
    cfg = args.config()
    check_inputs(cfg, args.out)
    from distill.recipe import run_recipe

    recipe = run_recipe(cfg, args.out, resume=args.resume, max_steps=args.max_steps)
    if recipe.accelerator.is_main_process:
        print(f"{cfg.name}: step {recipe.state.step}/{cfg.train.steps}; run folder {args.out}")
    return 0


def presets() -> int:
    """Print every preset with its description."""
    for name in list_presets():
        cfg = RecipeConfig.from_yaml(name)
        print(f"{name:24s} {cfg.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from compress.cli import (
        OneLineParser,
        add_dataclass_arguments,
        dataclass_from_namespace,
        run_command,
    )

    parser = OneLineParser(prog="python -m distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run a distillation recipe", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, TrainArgs)
    p.set_defaults(run=lambda ns: train(dataclass_from_namespace(TrainArgs, ns)))
    sub.add_parser("presets", help="list presets").set_defaults(run=lambda ns: presets())
    ns = parser.parse_args(argv)
    return run_command(ns, interrupted_note=f"resume with --resume from the last checkpoint in {getattr(ns, 'out', '')}"
                       if ns.command == "train" else "")


if __name__ == "__main__":
    sys.exit(main())
