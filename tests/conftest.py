"""Shared fixtures: tiny SD3-geometry students with non-trivial LoRAs, written as TSD-SR releases."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Tests must never reach a hub; fail fast if anything tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def make_tiny_lora_student(seed: int = 0, rank: int = 4):
    """Tiny SD3-geometry transformer + VAE with random base weights and random (non-zero) LoRAs."""
    from compress.models.lora import TRANSFORMER_LORA_TARGETS, add_lora, vae_encoder_lora_targets
    from compress.models.presets import build_random_components, get_preset
    from compress.models.student import OneStepSR

    transformer, vae, prompt, pooled = build_random_components(get_preset("tiny"), seed=seed)
    add_lora(transformer, rank, TRANSFORMER_LORA_TARGETS)
    add_lora(vae, rank, vae_encoder_lora_targets(vae))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in list(transformer.named_parameters()) + list(vae.named_parameters()):
            if "lora_B" in name:  # zero-initialised by peft; make the adapters matter
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return OneStepSR(transformer, vae, prompt, pooled).eval()


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """(release root, in-memory unmerged student) for the tiny preset in the official TSD-SR layout."""
    from compress.models.release import write_tsdsr_release

    model = make_tiny_lora_student()
    root = tmp_path_factory.mktemp("release")
    write_tsdsr_release(root, model.transformer, model.vae, model.prompt_embeds, model.pooled_prompt_embeds)
    return root, model


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: int = 600):
    """Run `python -m MODULE ARGS` in a fresh process, as a user would."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
