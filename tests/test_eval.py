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
    lpips = metrics["skipped_metrics"].get("lpips")
    if lpips is not None:  # weights absent on this machine: the reason names a file, never a silent number
        assert ".pth" in lpips and "lpips" not in metrics["mean"]["student"]
    report = (run / "report.md").read_text()
    assert "| student" in report and "| bicubic" in report
    assert "student" in result.stdout


def test_eval_rejects_bad_flags(tmp_path):
    result = run_cli("compress", "eval", "--metrics", "psnr,fid", "-o", str(tmp_path))
    assert result.returncode == 2 and "--metrics" in result.stderr
