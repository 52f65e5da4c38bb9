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


@torch.no_grad()
def test_reference_beats_bicubic_on_bicubic_degraded_validation_photos():
    """A quick form of the README table: mean ST-LPIPS over 3 validation photos, bicubic-only degradation."""
    import torch.nn.functional as F

    from compress.data.pairs import fixed_validation_pairs
    from compress.quality.perceptual import build_metric

    metric = build_metric("stlpips")
    if getattr(metric, "reason", None):
        pytest.skip(f"ST-LPIPS unavailable: {metric.reason}")
    model = load_model(None).model
    student, bicubic = [], []
    for _, lr, hr in fixed_validation_pairs("bicubic", hr_size=128)[:3]:
        sr = model(lr[None]).clamp(0, 1)
        up = F.interpolate(lr[None], scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        student.append(float(metric(sr, hr[None]).mean()))
        bicubic.append(float(metric(up, hr[None]).mean()))
    assert sum(student) < sum(bicubic), (student, bicubic)


def test_reconstruction_only_baseline_loads_on_the_shared_base():
    loaded = load_model(REC_DIR, base_model=REFERENCE_DIR / "base")
    with torch.no_grad():
        assert loaded.model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)
