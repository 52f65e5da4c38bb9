"""The trade-off sweep (benchmarks.tradeoff) on the tiny geometry: every file and column written, and an
interrupted sweep resumed without redoing what was finished."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import tradeoff

QUICK_TINY = ["--model", "preset:tiny", "--quick", "--targets", "1.0,0.5", "--runtimes", "torch,onnx",
              "--sizes", "32", "--quality-images", "1", "--calibration-images", "1", "--hr-size", "64",
              "--batch-size", "2", "--recover-steps", "2"]


def test_quick_sweep_writes_every_file_and_column_and_resumes_without_redoing_finished_work(tmp_path, monkeypatch,
                                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    out = Path("sweep")  # relative, as users type it (ORT's quantization tools run in another folder)
    real_export = tradeoff.Sweep.export

    def export_then_stop(self, target, runtime, student):  # Ctrl-C at the second target's export (after its prune)
        if target == 0.5 and runtime == "onnx":
            raise KeyboardInterrupt
        return real_export(self, target, runtime, student)

    monkeypatch.setattr(tradeoff.Sweep, "export", export_then_stop)
    assert tradeoff.main([*QUICK_TINY, "-o", str(out)]) == 130
    assert not (out / "tradeoff.csv").exists()
    finished = {path: path.stat().st_mtime_ns for path in (out / "targets/1/measure.json", out / "targets/1/onnx/manifest.json",
                                                          out / "targets/0.5/prune/prune_report.json")}
    assert json.loads((out / "targets/1/measure.json").read_text())["complete"] is True
    assert not (out / "targets/0.5/measure.json").exists() and not (out / "targets/0.5/onnx").exists()

    monkeypatch.setattr(tradeoff.Sweep, "export", real_export)
    calls = []
    monkeypatch.setattr(tradeoff.Sweep, "prune", lambda self, *a: calls.append(a))  # must not be called again
    capsys.readouterr()
    assert tradeoff.main([*QUICK_TINY, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "target 1: finished earlier" in err and calls == []
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # nothing finished was redone
    assert (out / "targets/0.5/onnx/manifest.json").is_file()

    for name in ("tradeoff.csv", "tradeoff.json", "report.md", "pareto.png", "config.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "tradeoff.csv").open()))
    assert [(r["target"], r["runtime"]) for r in rows] == [
        (t, r) for t in ("1.0", "0.5") for r in ("torch", "onnx")]
    for row in rows:
        for column in ("params", "params_ratio", "precision", "artifact_mb", "macs_g_32", "latency_ms_32", "speedup_32",
                       "psnr", "ssim", "stlpips", "niqe", "budget"):
            assert row[column] not in ("", None), (row["target"], row["runtime"], column)
        assert float(row["latency_ms_32"]) > 0 and 0 < float(row["params_ratio"]) <= 1
    assert float(rows[0]["speedup_32"]) == 1.0  # the uncompressed PyTorch student is the reference
    assert abs(float(rows[2]["params_ratio"]) - 0.5) <= 0.02  # the planner landed on the target
    assert all(r["export_gate"] in ("passed", "failed") for r in rows if r["runtime"] != "torch")
    payload = json.loads((out / "tradeoff.json").read_text())
    assert payload["latency"]["repeats"] == 1 and payload["machine"]["cpu_cores_available"] >= 1
    report = (out / "report.md").read_text()
    assert "| 0.5 | " in report and "pareto.png" in report and "Machine:" in report
    header = next(i for i, line in enumerate(report.splitlines()) if line.startswith("| target |"))
    table = report.splitlines()[header:header + 3]  # header, separator, first row: one column count (else no table)
    assert len({line.count("|") for line in table}) == 1, table


@pytest.mark.parametrize("flags, message", [
    (["--targets", "0.5,0.2"], "must include 1.0"),
    (["--runtimes", "onnx"], "must include torch"),
    (["--runtimes", "torch,tflite"], "unknown tflite"),
    (["--sizes", "100"], "multiples of 16"),
    (["--targets", "1.0,1.5"], "fractions in (0, 1]"),
])
def test_bad_flags_are_one_line(flags, message, tmp_path, capsys):
    assert tradeoff.main([*flags, "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_quick_and_default_settings():
    # --quick must fit 10 minutes on the built-in student: two targets, one round, 128 -> 512 only
    quick, default = tradeoff.TradeoffArgs(quick=True), tradeoff.TradeoffArgs()
    assert (quick.targets, quick.sizes, quick.repeats) == ((1.0, 0.2), (128,), 1)
    assert (default.targets, default.sizes, default.repeats) == ((1.0, 0.5, 0.35, 0.2, 0.15), (128, 256), 3)
    assert tradeoff.TradeoffArgs(quick=True, sizes=(64, 128)).sizes == (64, 128)  # an explicit flag wins
