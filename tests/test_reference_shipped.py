"""The built-in reference student that ships in compress/assets/reference (TSD-SR release layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.models.resolve import REFERENCE_DIR, load_model

REC_DIR = REFERENCE_DIR.parent / "reference-rec"


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def test_reference_ships_in_the_release_layout_within_40_mb():
    for relative in ("base/transformer/config.json", "base/vae/config.json", "base/scheduler/scheduler_config.json",
                     "checkpoint/tsdsr/transformer.safetensors", "checkpoint/tsdsr/vae.safetensors",
                     "dataset/default/prompt_embeds.pt", "dataset/default/pool_embeds.pt",
                     "dataset/null/prompt_embeds.pt", "dataset/null/pool_embeds.pt"):
        assert (REFERENCE_DIR / relative).is_file(), relative
    assert _size_mb(REFERENCE_DIR) <= 40.0, _size_mb(REFERENCE_DIR)
    config = json.loads((REFERENCE_DIR / "base/transformer/config.json").read_text())
    assert config["num_layers"] >= 8 and config["num_layers"] % 4 == 0
    vae = json.loads((REFERENCE_DIR / "base/vae/config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4  # 8x downsampling


def test_default_model_is_the_reference_student():
    loaded = load_model(None)
    assert not loaded.is_random
    assert "reference" in loaded.description
    with torch.no_grad():
        out = loaded.model(torch.rand(1, 3, 24, 40))
    assert out.shape == (1, 3, 96, 160)
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def shipped_scores(tmp_path_factory):
    """`python -m compress eval` (the code behind it) on the shipped default, as the README table: 7 photos, 256 px."""
    from compress.evaluate import EvalArgs, evaluate
    from compress.quality.perceptual import build_metric

    if getattr(build_metric("stlpips"), "reason", None):
        pytest.skip(f"ST-LPIPS unavailable: {build_metric('stlpips').reason}")
    out = tmp_path_factory.mktemp("eval")
    return {
        (degradation, fix): evaluate(None, out / f"{degradation}-{fix}",
                                     EvalArgs(degradation=degradation, color_fix=fix, metrics=("psnr", "stlpips")))["mean"]
        for degradation, fix in (("realesrgan", "none"), ("realesrgan", "wavelet"), ("bicubic", "wavelet"))
    }


# docs/reference-quality/colorfix-{wavelet,none}.md: measured on an Intel Xeon; the same weights gave every printed
# digit again on an AMD EPYC.
DOCUMENTED = {
    ("realesrgan", "none"): {"psnr": 21.3917, "stlpips": 0.6982},
    ("realesrgan", "wavelet"): {"psnr": 21.7480, "stlpips": 0.6499},
    ("bicubic", "wavelet"): {"psnr": 26.4422, "stlpips": 0.3615},
}


@pytest.mark.parametrize("setting", list(DOCUMENTED))
def test_shipped_weights_reproduce_the_documented_numbers(shipped_scores, setting):
    """Same weights, same float32 CPU arithmetic: only the summation order of the BLAS on another CPU may move
    the fourth decimal, hence 0.002."""
    scores = shipped_scores[setting]["student"]
    for metric, value in DOCUMENTED[setting].items():
        assert scores[metric] == pytest.approx(value, abs=0.002), (setting, metric, scores)


# Margins by which the student must beat bicubic: about half of the smallest lead that the shipped student and
# two retrains of its recipe (seeds 1 and 2) showed, docs/reference-quality/retrain-spread.md.
@pytest.mark.parametrize("degradation,fix,margin", [
    ("realesrgan", "wavelet", 0.03),  # leads 0.062 / 0.068 / 0.072
    ("bicubic", "wavelet", 0.04),  # leads 0.087 / 0.089 / 0.092
    ("realesrgan", "none", 0.005),  # leads 0.014 / 0.019 / 0.022: the PSNR-leaning preset's thin edge
])
def test_reference_beats_bicubic_on_stlpips(shipped_scores, degradation, fix, margin):
    """README table: ST-LPIPS below bicubic's in every setting, by a margin a retrain of the recipe keeps."""
    scores = shipped_scores[(degradation, fix)]
    assert scores["student"]["stlpips"] < scores["bicubic"]["stlpips"] - margin, scores


def test_reference_beats_bicubic_on_psnr_in_the_bicubic_setting(shipped_scores):
    """Issue 3's PSNR point: bicubic-only x4 input, wavelet colour fix (the default), 26.44 vs 26.25 dB; the
    margin 0.1 dB is about half the smallest lead of the shipped student and its two retrains (0.189 dB)."""
    scores = shipped_scores[("bicubic", "wavelet")]
    assert scores["student"]["psnr"] > scores["bicubic"]["psnr"] + 0.1, scores


def test_reconstruction_only_baseline_loads_on_the_shared_base():
    loaded = load_model(REC_DIR, base_model=REFERENCE_DIR / "base")
    with torch.no_grad():
        assert loaded.model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)


def test_shipped_vae_leaves_room_above_bicubic():
    """benchmarks.compare_reference's VAE table: with the wavelet colour fix, the shipped VAE's reconstruction of
    the HR crops is above bicubic on PSNR (so the bicubic-setting PSNR point is reachable on this VAE), and its
    round trip of the bicubic input (a student with zero velocity) stays close to bicubic itself."""
    from benchmarks.compare_reference import vae_reference_rows
    from compress.models.lora import lora_disabled
    from compress.models.release import load_tsdsr_release

    student = load_tsdsr_release(REFERENCE_DIR, merge=False)
    with lora_disabled(student):
        means, per_image = vae_reference_rows(student, "bicubic", 256, "wavelet")
    assert len(per_image) == 7
    from compress.data import bicubic_psnr, validation_images

    bicubic = bicubic_psnr(validation_images(256), degradation="bicubic")
    assert means["vae_hr_reconstruction"]["psnr"] > bicubic + 0.3, (means, bicubic)
    assert abs(means["vae_bicubic_round_trip"]["psnr"] - bicubic) < 1.0, (means, bicubic)
    assert means["vae_hr_reconstruction"]["ssim"] > means["vae_bicubic_round_trip"]["ssim"]
