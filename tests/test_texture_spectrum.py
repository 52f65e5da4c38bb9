"""scripts/texture_spectrum.py finds a periodic texture at its period and not elsewhere."""

from __future__ import annotations

import importlib.util

import numpy as np

from tests.conftest import REPO


def _module():
    spec = importlib.util.spec_from_file_location("texture_spectrum", REPO / "scripts/texture_spectrum.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_period_ratios_find_a_16_px_texture_in_noise():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(256, 256))
    x = np.arange(256)
    texture = noise + 0.5 * np.sin(2 * np.pi * x / 16)[None, :] + 0.5 * np.sin(2 * np.pi * x / 16)[:, None]
    with_texture = _module().period_ratios(texture)
    plain = _module().period_ratios(noise)
    for axis in ("vertical", "horizontal"):
        assert with_texture[axis][16] > 3 * with_texture[axis][8]
        assert with_texture[axis][16] > 3 * plain[axis][16] and plain[axis][16] < 2
