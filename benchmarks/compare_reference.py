"""Quality table of the shipped reference students beside bicubic, in both degradation settings.

Runs `compress.evaluate.evaluate` (the code behind `python -m compress eval`) for every model and
degradation on the 7 built-in validation photos and prints one markdown table with every offline
metric; unavailable metrics are listed as skipped with the missing file. A second table says what the
shared VAE allows, with the same colour fix: its reconstruction of the HR crop (what a perfect latent
would give) and its round trip of the bicubic input (a student whose velocity is zero). Writes
OUT/comparison.md and OUT/comparison.json (with machine and package versions).

    python -m benchmarks.compare_reference --out runs/compare
    python -m benchmarks.compare_reference --color-fix none --out runs/compare-none
    python -m benchmarks.compare_reference --model tsd=compress/assets/reference \
        --model rec=compress/assets/reference-rec --base-model compress/assets/reference/base
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress.models.resolve import REFERENCE_DIR, REFERENCE_REC_DIR
from compress.options import COLOR_FIX_METHODS, DEFAULT_COLOR_FIX

DEFAULT_MODELS = {
    "TSD student (shipped default)": str(REFERENCE_DIR),
    "reconstruction-only student": str(REFERENCE_REC_DIR),
}


def vae_reference_rows(student, degradation: str, hr_size: int, color_fix: str) -> tuple[dict, list[dict]]:
    """PSNR-Y / SSIM-Y of a student's VAE alone: its reconstruction of the HR crop (what a perfect latent would
    give) and its round trip of the bicubic input (a student whose velocity is zero), colour-fixed like the
    students; returns (means, per-image rows). Pass a release loaded with `merge=False` inside
    `compress.models.lora.lora_disabled` to measure the shared base VAE."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from compress.colorfix import apply_color_fix
    from compress.data import fixed_validation_pairs
    from compress.quality.fidelity import psnr_y, ssim_y

    per_image = []
    for name, lr, hr in fixed_validation_pairs(degradation, hr_size=hr_size):
        bicubic = F.interpolate(lr[None], size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        row = {"image": name}
        for label, source in (("vae_hr_reconstruction", hr[None]), ("vae_bicubic_round_trip", bicubic)):
            with torch.no_grad():
                image = ((student.decode(student.encode(source * 2 - 1)) + 1) / 2).float()
            image = apply_color_fix(color_fix, image, lr[None])
            row[label] = {"psnr": float(psnr_y(image, hr[None])[0]), "ssim": float(ssim_y(image, hr[None])[0])}
        per_image.append(row)
    means = {label: {metric: float(np.mean([r[label][metric] for r in per_image])) for metric in ("psnr", "ssim")}
             for label in ("vae_hr_reconstruction", "vae_bicubic_round_trip")}
    return means, per_image


def main(argv: list[str] | None = None) -> int:
    from compress.evaluate import EvalArgs, evaluate
    from compress.quality.cost import machine_info
    from compress.quality.report import format_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                        help="model to score (repeatable); default: the shipped TSD and reconstruction-only students")
    parser.add_argument("--base-model", type=Path, default=REFERENCE_DIR / "base",
                        help="base folder for releases that ship only LoRA + embeddings")
    parser.add_argument("--hr-size", type=int, default=256)
    parser.add_argument("--color-fix", default=DEFAULT_COLOR_FIX, choices=COLOR_FIX_METHODS,
                        help=f"colour fix of every student output (default: {DEFAULT_COLOR_FIX}, as upscale and eval)")
    parser.add_argument("--no-vae-rows", action="store_true", help="skip the table of what the shared VAE allows")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metric names (default: every offline metric, as `compress eval`)")
    ns = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in ns.model) if ns.model else DEFAULT_MODELS
    for label, path in models.items():
        if not Path(path).exists():
            print(f"error: model {label!r}: {path} does not exist", file=sys.stderr)
            return 2

    from compress.cli import comma_separated

    metric_args = {"metrics": comma_separated(ns.metrics)} if ns.metrics else {}
    results = {}
    rows = []
    for degradation in ("realesrgan", "bicubic"):
        bicubic = None
        for label, path in models.items():
            args = EvalArgs(degradation=degradation, hr_size=ns.hr_size, color_fix=ns.color_fix, **metric_args)
            base = ns.base_model if not (Path(path) / "base").is_dir() else None
            slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
            payload = evaluate(path, ns.out / f"{degradation}-{slug}", args, base_model=base)
            results[f"{degradation}/{label}"] = payload
            bicubic = payload["mean"]["bicubic"]
            rows.append({"degradation": degradation, "method": label,
                         **{m: f"{v:.4f}" for m, v in payload["mean"]["student"].items()}})
        rows.append({"degradation": degradation, "method": "bicubic",
                     **{m: f"{v:.4f}" for m, v in bicubic.items()}})
    vae_rows, vae_results = [], {}
    if not ns.no_vae_rows:
        from compress.models.lora import lora_disabled
        from compress.models.release import is_release_root, load_tsdsr_release
        from compress.models.resolve import load_model

        first = Path(next(iter(models.values())))
        if is_release_root(first):  # the base VAE all the release's students share: LoRAs loaded, switched off
            base = ns.base_model if not (first / "base").is_dir() else None
            student = load_tsdsr_release(first, base=base, merge=False)
            vae_dir = f"the base VAE of {first}"
        else:
            student = load_model(str(first)).model
            vae_dir = f"the VAE of {first}"
        for degradation in ("realesrgan", "bicubic"):
            with lora_disabled(student):
                means, per_image = vae_reference_rows(student, degradation, ns.hr_size, ns.color_fix)
            vae_results[degradation] = {"mean": means, "per_image": per_image, "vae": vae_dir}
            for label, text in (("vae_hr_reconstruction", "VAE reconstruction of the HR crop (perfect latent)"),
                                ("vae_bicubic_round_trip", "VAE round trip of the bicubic input (zero velocity)")):
                vae_rows.append({"degradation": degradation, "method": text,
                                 **{m: f"{v:.4f}" for m, v in means[label].items()}})
            bicubic = results[f"{degradation}/{next(iter(models))}"]["mean"]["bicubic"]
            vae_rows.append({"degradation": degradation, "method": "bicubic",
                             **{m: f"{bicubic[m]:.4f}" for m in ("psnr", "ssim") if m in bicubic}})
    metrics = [k for k in rows[0] if k not in ("degradation", "method")]
    table = format_table(rows, ["degradation", "method", *metrics])
    skipped = next(iter(results.values()))["skipped_metrics"]
    info = machine_info()
    lines = [
        "Validation: 7 built-in photos, 256x256 HR centre crops, x4, degradation seed 0; "
        f"colour fix: {ns.color_fix}. Higher is better for psnr, ssim, musiq, maniqa, clipiqa; lower for the rest.",
        "",
        table,
        "",
    ]
    if vae_rows:
        lines += [f"What the shared VAE allows ({vae_dir}, LoRAs off), same colour fix ({ns.color_fix}):", "",
                  format_table(vae_rows, ["degradation", "method", "psnr", "ssim"]), ""]
    lines += [f"- skipped {m}: {reason}" for m, reason in skipped.items()]
    lines += ["", f"Machine: {info.get('cpu_model', '')}; torch {info.get('packages', {}).get('torch', '')}."]
    from benchmarks import write_results

    write_results(ns.out, "comparison", {"rows": rows, "vae_rows": vae_rows, "vae": vae_results,
                                         "skipped": skipped, "machine": info}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
