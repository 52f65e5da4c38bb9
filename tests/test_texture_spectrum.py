"""benchmarks.texture_spectrum finds a periodic texture at its period and not elsewhere."""

from __future__ import annotations

import numpy as np

from benchmarks.texture_spectrum import period_ratios


def test_period_ratios_find_a_16_px_texture_in_noise():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(256, 256))
    x = np.arange(256)
    texture = noise + 0.5 * np.sin(2 * np.pi * x / 16)[None, :] + 0.5 * np.sin(2 * np.pi * x / 16)[:, None]
    with_texture = period_ratios(texture)
    plain = period_ratios(noise)
    for axis in ("vertical", "horizontal"):
        assert with_texture[axis][16] > 3 * with_texture[axis][8]
        assert with_texture[axis][16] > 3 * plain[axis][16] and plain[axis][16] < 2
