"""Train the built-in miniature TSD-SR reference kit (preset `reference`), stage by stage, resumably.

    python scripts/train_reference.py --out runs/reference --stage all --vae-steps 3000 --prior-steps 3000
    python scripts/train_reference.py --out runs/reference --stage vae --vae-steps 3000      # stage 1 only
    python scripts/train_reference.py --out runs/reference --stage prior --prior-steps 3000  # needs stage 1

Stages: 1 `vae` (AutoencoderKL on HR crops), 1b `decoder` (more decoder-only training on the frozen encoder;
it can run beside stage 2), 2 `prior` (SD3 transformer trained as a rectified-flow prior on the VAE's latents),
3 `student` (TSD distillation with `python -m distill`, preset reference-tsd, plus the reconstruction-only
baseline reference-rec). `all` runs 1, 1b, 2, 3.
Rerunning the same command continues from the newest OUT/<stage>/checkpoints/step-*/ with the same loss curve
as an uninterrupted run; finished stages are skipped. --restart discards a stage's progress and trains it again;
--extend continues a finished stage to a larger step count (e.g. a longer VAE run for a better PSNR).
Outputs (a prior folder in the TSD-SR release layout): OUT/base/{vae,transformer,scheduler},
OUT/dataset/{default,null}/{prompt_embeds,pool_embeds}.pt, OUT/kit/ (what stage 3 trains from),
OUT/<stage>/{log.csv,checkpoints/,metrics.json}. The code is the package distill.reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

STAGE_CHOICES = ("vae", "decoder", "prior", "student", "all")


def stage_student(args: argparse.Namespace) -> None:
    """Stage 3: the one-step students, distilled with `python -m distill` from the kit (prior + VAE + embeddings).

    `reference-tsd` is the shipped student; `reference-rec` (same budget, reconstruction losses only) is the
    baseline reported beside it. Each run folder resumes on its own (`--resume` semantics of distill).
    """
    from distill.config import RecipeConfig
    from distill.recipe import MODEL_DIR, run_recipe
    from distill.reference import assemble_kit
    from distill.training import list_checkpoints

    kit = assemble_kit(args.out)
    for preset, folder in (("reference-tsd", "student"), ("reference-rec", "student-rec")):
        run = Path(args.out) / folder
        if (run / MODEL_DIR).is_dir():
            print(f"[student] {run / MODEL_DIR} exists; skipping {preset}", flush=True)
            continue
        overrides = {"model.prior": str(kit), "train.steps": args.student_steps}
        cfg = RecipeConfig.from_yaml(preset, overrides)
        run_recipe(cfg, run, resume=bool(list_checkpoints(run)), progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output root (e.g. runs/reference)")
    parser.add_argument("--stage", default="all", help="vae | decoder | prior | student | all (default all)")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--prior-steps", type=int, default=3000)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-crop", type=int, default=64, help="HR crop side for stage 1 (multiple of 8)")
    parser.add_argument("--vae-lr", type=float, default=4e-4)
    parser.add_argument("--prior-batch", type=int, default=16)
    parser.add_argument("--prior-crop", type=int, default=128, help="HR crop side for stage 2 (multiple of 16)")
    parser.add_argument("--prior-lr", type=float, default=3e-4)
    parser.add_argument("--decoder-steps", type=int, default=1500, help="stage 1b: decoder-only steps")
    parser.add_argument("--student-steps", type=int, default=700, help="stage 3: steps of each distill run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--preset", default="reference", help="geometry preset (reference; tiny for quick checks)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--val-every", type=int, default=500, help="stage-1 steps between validation PSNR logs")
    parser.add_argument("--val-size", type=int, default=256, help="validation centre-crop side (multiple of 64)")
    parser.add_argument("--no-lpips", action="store_true", help="stage 1 without the ST-LPIPS term (faster, tests)")
    parser.add_argument("--color-aug", action="store_true",
                        help="stages vae and decoder: random RGB channel permutation and saturation per crop, so the "
                        "VAE learns colours the 12 training photos lack")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--restart", action="store_true", help="discard the selected stages' progress first")
    parser.add_argument(
        "--extend", action="store_true",
        help="continue finished stages to a larger --vae-steps/--prior-steps (cosine schedule re-planned; a "
        "VAE extended after the prior was trained needs --stage prior --restart afterwards)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    def fail(message: str) -> None:
        parser.error(message)

    if args.stage not in STAGE_CHOICES:
        fail(f"--stage must be one of {', '.join(STAGE_CHOICES)}, got {args.stage!r}")
    for flag in ("vae_steps", "prior_steps", "decoder_steps", "student_steps", "vae_batch", "prior_batch", "vae_crop", "prior_crop",
                 "checkpoint_every", "val_every", "val_size"):
        value = getattr(args, flag)
        if value < 1:
            fail(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.vae_crop % 8:
        fail(f"--vae-crop must be a multiple of 8 (the VAE downsamples 8x), got {args.vae_crop}")
    if args.prior_crop % 16:
        fail(f"--prior-crop must be a multiple of 16 (8x VAE and 2x2 patches), got {args.prior_crop}")
    if args.val_size % 64:
        fail(f"--val-size must be a multiple of 64, got {args.val_size}")
    for flag in ("vae_lr", "prior_lr"):
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.seed < 0:
        fail(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        fail(f"--threads must be >= 1, got {args.threads}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        fail(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    import torch  # after the cheap checks, so a typo is reported at once

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__})")
    from compress.models.presets import PRESETS

    if args.preset not in PRESETS:
        fail(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {args.preset!r}")
    out = Path(args.out)
    if args.restart and args.extend:
        fail("--restart and --extend exclude each other")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder")
    from compress.models.release import prior_paths

    vae_dir = prior_paths(out).vae
    if args.stage in ("prior", "decoder") and not (vae_dir / "config.json").is_file():
        fail(f"--stage {args.stage} needs the stage-1 VAE at {vae_dir}; run --stage vae first (same --out)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)

    import torch

    from distill.reference import (
        DecoderConfig,
        PriorConfig,
        VAEConfig,
        finetune_decoder,
        train_prior,
        train_vae,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = ("vae", "decoder", "prior", "student") if args.stage == "all" else (args.stage,)
    common = {"seed": args.seed, "preset": args.preset, "device": args.device,
              "checkpoint_every": args.checkpoint_every, "progress": not args.no_progress}
    if "vae" in stages:
        train_vae(out, VAEConfig(
            steps=args.vae_steps, batch_size=args.vae_batch, crop=args.vae_crop, lr=args.vae_lr,
            val_every=args.val_every, val_size=args.val_size, lpips_weight=0.0 if args.no_lpips else 0.1,
            color_aug=args.color_aug, **common,
        ), restart=args.restart, extend=args.extend)
    if "decoder" in stages:
        finetune_decoder(out, DecoderConfig(
            steps=args.decoder_steps, seed=args.seed + 7, device=args.device, color_aug=args.color_aug,
            checkpoint_every=args.checkpoint_every, val_every=args.val_every, val_size=args.val_size,
            progress=not args.no_progress,
        ), restart=args.restart, extend=args.extend)
    if "prior" in stages:
        train_prior(out, PriorConfig(
            steps=args.prior_steps, batch_size=args.prior_batch, crop=args.prior_crop, lr=args.prior_lr, **common,
        ), restart=args.restart, extend=args.extend)
    if "student" in stages:
        stage_student(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
