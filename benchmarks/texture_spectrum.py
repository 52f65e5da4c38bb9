"""Measure periodic texture in a student's output: where does the spectrum of (output - bicubic) peak?

A one-step latent SR model can leave structure at the period of its token grid (patch 2 x VAE 8x = 16 px)
or of the VAE's latent grid (8 px). For each model this prints, per image axis, the amplitude of the
(output - bicubic) luminance difference spectrum at those periods divided by the spectrum's median, for the
full student, for the VAE round trip alone (encode the bicubic image, decode; no transformer) and, for the
first model, for its base transformer without the LoRA (the prior: what the student was at step 0), so the
source of a texture can be told apart. Writes OUT (json) with machine and versions when --out is given.

    python -m benchmarks.texture_spectrum
    python -m benchmarks.texture_spectrum --image photo.png --model tsd=compress/assets/reference --out runs/texture.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

PERIODS = (16, 8)


def period_ratios(difference, periods=PERIODS) -> dict:
    """{axis: {period: amplitude at 1/period over the median amplitude}} of a 2-D array's mean 1-D spectra."""
    import numpy as np

    result = {}
    for axis, name in ((0, "vertical"), (1, "horizontal")):
        spectrum = np.abs(np.fft.rfft(difference, axis=axis)).mean(axis=1 - axis)
        freqs = np.fft.rfftfreq(difference.shape[axis])
        median = float(np.median(spectrum[1:]))
        result[name] = {p: round(float(spectrum[np.argmin(abs(freqs - 1 / p))]) / median, 2) for p in periods}
    return result


def _difference(image, up):
    """Luminance-like (channel mean) difference to the bicubic image, as a 2-D array."""
    return (image - up)[0].mean(0).numpy()


def _format(ratios: dict) -> str:
    return ", ".join(f"{axis} " + " ".join(f"{p}px {r:.1f}x" for p, r in values.items()) for axis, values in ratios.items())


def _prior_image(release: Path, base: Path | None, lr):
    """The release's student with its LoRAs switched off (base transformer + base VAE, default embeddings): the
    student at step 0 of its distillation."""
    import torch

    from compress.models.lora import lora_disabled
    from compress.models.release import load_tsdsr_release

    student = load_tsdsr_release(release, base=base, merge=False)
    with torch.no_grad(), lora_disabled(student):
        return student(lr).clamp(0, 1)


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from compress.imaging import load_image
    from compress.models.resolve import REFERENCE_DIR, REFERENCE_REC_DIR, SAMPLE_IMAGE, load_model
    from compress.quality.cost import machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=SAMPLE_IMAGE, help="LR input")
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--base-model", type=Path, default=REFERENCE_DIR / "base")
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in ns.model) if ns.model else {
        "TSD student (shipped default)": str(REFERENCE_DIR), "reconstruction-only student": str(REFERENCE_REC_DIR)}

    lr = load_image(ns.image).rgb[None]
    up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    results = {}
    for label, path in models.items():
        base = None if (Path(path) / "base").is_dir() else ns.base_model
        student = load_model(path, base_model=base).model
        with torch.no_grad():
            sr = student(lr).clamp(0, 1)
            roundtrip = student.postprocess(student.decode(student.encode(student.preprocess(lr))), lr.shape[-2:])
        results[label] = {
            "student": period_ratios(_difference(sr, up)),
            "vae_roundtrip": period_ratios(_difference(roundtrip, up)),
        }
    first = Path(next(iter(models.values())))
    prior = _prior_image(first, None if (first / "base").is_dir() else ns.base_model, lr)
    results["prior without LoRA (student at step 0)"] = {"student": period_ratios(_difference(prior, up))}
    for label, parts in results.items():
        for part, ratios in parts.items():
            print(f"{label} / {part}: {_format(ratios)}")
    if ns.out:
        from compress.io import write_json

        write_json(ns.out, {"image": str(ns.image), "periods_px": PERIODS, "ratio_to_median": results,
                            "machine": machine_info(), "note": "amplitude at the period / median spectrum amplitude"})
        print(f"wrote {ns.out}")
    return 0 if np.isfinite([r for v in results.values() for p in v.values() for a in p.values() for r in a.values()]).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
