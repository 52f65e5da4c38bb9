"""Full-scale SD3-medium student on this CPU (slow: ~9 GB RAM, minutes). Run with `pytest -m slow`."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_fullscale_check(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "fullscale.json"
    subprocess.run([sys.executable, "-m", "benchmarks.fullscale", "--json", str(out)], check=True, cwd=REPO,
                   timeout=3600)
    result = json.loads(out.read_text())
    assert result["output"] == [1, 3, 512, 512] and result["latent"] == [1, 16, 64, 64]
    assert 2020 < result["params_transformer_M"] < 2035
    assert 82 < result["params_vae_M"] < 86
    assert result["macs_total_G"] > 1000
