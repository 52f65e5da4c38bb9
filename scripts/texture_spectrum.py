"""Measure periodic texture in a student's output: where does the spectrum of (output - bicubic) peak?

A one-step latent SR model can leave structure at the period of its token grid (patch 2 x VAE 8x = 16 px)
or of the VAE's latent grid (8 px). For each model this prints, per image axis, the amplitude of the
(output - bicubic) luminance difference spectrum at those periods divided by the spectrum's median, for the
full student, for the VAE round trip alone (encode the bicubic image, decode; no transformer) and, for the
first model, for its base transformer without the LoRA (the prior: what the student was at step 0), so the
source of a texture can be told apart. Writes OUT (json) with machine and versions when --out is given.

    python scripts/texture_spectrum.py
    python scripts/texture_spectrum.py --image photo.png --model tsd=compress/assets/reference --out runs/texture.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PERIODS = (16, 8)
DEFAULT_MODELS = {
    "TSD student (shipped default)": str(REPO / "compress/assets/reference"),
    "reconstruction-only student": str(REPO / "compress/assets/reference-rec"),
}


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


def _prior_image(base_dir: Path, release: Path, settings, lr):
    """The base transformer + base VAE with the release's default embeddings, no LoRA: the student at step 0."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from compress.models.release import EMBEDDING_SUBDIR, POOLED_EMBEDS, PROMPT_EMBEDS, load_embedding
    from compress.models.student import OneStepSR

    transformer = SD3Transformer2DModel.from_pretrained(base_dir / "transformer")
    embeddings = release / EMBEDDING_SUBDIR
    prompt = load_embedding(embeddings / PROMPT_EMBEDS, "prompt embedding", transformer.config.joint_attention_dim, True)
    pooled = load_embedding(embeddings / POOLED_EMBEDS, "pooled prompt embedding",
                            transformer.config.pooled_projection_dim, False)
    prior = OneStepSR(transformer, AutoencoderKL.from_pretrained(base_dir / "vae"), prompt, pooled, settings).eval()
    with torch.no_grad():
        return prior(lr).clamp(0, 1)


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from compress.imaging import load_image
    from compress.models.resolve import REFERENCE_DIR, load_model
    from compress.quality.cost import machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=REPO / "compress/assets/samples/astronaut_lr.png", help="LR input")
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--base-model", type=Path, default=REFERENCE_DIR / "base")
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in ns.model) if ns.model else DEFAULT_MODELS

    lr = load_image(ns.image).rgb[None]
    up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    results = {}
    settings = None
    for label, path in models.items():
        base = None if (Path(path) / "base").is_dir() else ns.base_model
        student = load_model(path, base_model=base).model
        settings = settings or student.settings  # the prior below runs with the first model's settings
        with torch.no_grad():
            sr = student(lr).clamp(0, 1)
            latent = student.vae.encode(up * 2 - 1).latent_dist.mode()
            roundtrip = ((student.vae.decode(latent).sample + 1) / 2).clamp(0, 1)
        results[label] = {
            "student": period_ratios(_difference(sr, up)),
            "vae_roundtrip": period_ratios(_difference(roundtrip, up)),
        }
    first = Path(next(iter(models.values())))
    base_dir = first / "base" if (first / "base").is_dir() else ns.base_model
    prior = _prior_image(base_dir, first, settings, lr)
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
