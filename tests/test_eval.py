"""`python -m compress eval` end to end: metrics.json, report.md, bicubic baseline, honest skips."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def saved_student(tiny_release, tmp_path_factory):
    from compress.models.release import load_tsdsr_release

    return load_tsdsr_release(tiny_release[0]).save_pretrained(tmp_path_factory.mktemp("m") / "student")


def test_eval_writes_metrics_and_report(saved_student, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # LPIPS weights are surely absent
    run = tmp_path / "run"
    result = run_cli(
        "compress", "eval", "--model", str(saved_student), "--limit", "2", "--hr-size", "128",
        "--metrics", "psnr,ssim,stlpips,lpips", "--degradation", "bicubic", "-o", str(run),
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["degradation"] == "bicubic"
    for method in ("student", "bicubic"):
        for name in ("psnr", "ssim", "stlpips"):
            assert math.isfinite(metrics["mean"][method][name])
    # Bicubic on a bicubic-degraded 128 px crop is a real baseline: well above a random image.
    assert metrics["mean"]["bicubic"]["psnr"] > 20
    assert metrics["machine"]["packages"]["torch"]
    # Weights absent: the reason names the missing file, and no number is reported for it.
    lpips = metrics["skipped_metrics"]["lpips"]
    assert "alexnet-owt-7be5be79.pth" in lpips and str(tmp_path / "empty-torch-home") in lpips
    assert "lpips" not in metrics["mean"]["student"] and "lpips" not in metrics["mean"]["bicubic"]
    assert metrics["settings"]["color_fix"] == "wavelet"  # eval's default is upscale's
    assert "colour fix wavelet" in result.stderr
    report = (run / "report.md").read_text()
    assert "| student" in report and "| bicubic" in report
    assert "student" in result.stdout


def test_eval_rejects_bad_flags(tmp_path):
    result = run_cli("compress", "eval", "--metrics", "psnr,fid", "-o", str(tmp_path))
    assert result.returncode == 2 and "--metrics" in result.stderr
