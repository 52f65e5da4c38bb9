"""ONNX export end to end through the real CLI: the built-in student and the tiny geometry, parity at sizes
that are and are not stride multiples, running the artifact with `compress upscale`, broken artifacts
(a tampered weight, an fp16 overflow) failing validation, and a killed export leaving nothing complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.runtime.manifest import MANIFEST_NAME, sha256_file

ROOT = Path(__file__).resolve().parent.parent


def export_main(*argv: str) -> int:
    from export.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def builtin_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "builtin"
    assert export_main("onnx", "--components", "--quality-images", "1", "-o", out) == 0
    return out


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    assert export_main("onnx", "--model", "preset:tiny", "--skip-quality", "-o", out) == 0
    return out


def test_builtin_artifact_files_manifest_and_parity(builtin_artifact):
    manifest = json.loads((builtin_artifact / MANIFEST_NAME).read_text())
    assert set(manifest["graphs"]) == {"end_to_end", "upsample", "vae_encoder", "transformer", "vae_decoder"}
    for name, entry in manifest["files"].items():
        assert sha256_file(builtin_artifact / name) == entry["sha256"]
    assert manifest["student"]["lr_multiple"] == 4 and manifest["graphs"]["end_to_end"]["multiple"] == 4
    assert manifest["source"]["weights_sha256"] and manifest["tools"]["onnxruntime"]
    report = json.loads((builtin_artifact / "report.json").read_text())
    assert report["passed"], report["failed"]
    inputs = {row["input"].split("@")[-1] for row in report["parity"]["end_to_end"]}
    assert {"64x64", "37x53"} <= inputs  # 37x53 is no multiple of 4: the runtime wrapper pads it
    assert any(row["shape"][0] == 2 for row in report["parity"]["end_to_end"])  # dynamic batch
    for rows in report["parity"].values():
        for row in rows:
            assert row["psnr_db"] >= 40.0, row
    budget = {item["item"]: item for item in report["quality_budget"]["items"]}
    assert budget["psnr drop <= 0.1"]["status"] == "passed"
    assert abs(budget["psnr drop <= 0.1"]["measured"]) < 0.01
    assert manifest["results"]["passed"] is True


def test_upscale_runs_the_artifact(builtin_artifact, tmp_path):
    """`compress upscale --model ARTIFACT` runs ONNX Runtime and matches the PyTorch student's output."""
    from compress.__main__ import main as compress_main
    from compress.imaging import load_image

    from compress.models.resolve import load_model
    from compress.pipeline import upscale_tensor

    sample = ROOT / "compress/assets/samples/astronaut_lr.png"
    assert compress_main(["upscale", str(sample), "--model", str(builtin_artifact), "-o", str(tmp_path / "onnx")]) == 0
    ours = load_image(tmp_path / "onnx" / "astronaut_lr.png").rgb
    lr = load_image(sample).rgb
    theirs = upscale_tensor(load_model(None).model, lr[None])[0]  # upscale's defaults: wavelet colour fix, auto tiles
    assert ours.shape[-2:] == (lr.shape[-2] * 4, lr.shape[-1] * 4)
    mse = float(((ours - theirs) ** 2).mean())
    assert mse == 0 or 10 * np.log10(1 / mse) > 40
    run = json.loads((tmp_path / "onnx" / "upscale_run.json").read_text())
    assert run["model"].startswith("ONNX artifact")


def test_end_to_end_only_artifact_runs_odd_sizes(tiny_artifact):
    from compress.models.resolve import load_model
    from compress.pipeline import upscale_tensor
    from compress.runtime.onnx import OnnxStudent

    runtime = load_model(str(tiny_artifact)).model
    assert isinstance(runtime, OnnxStudent) and not runtime.has_stages
    student = load_model("preset:tiny").model
    lr = torch.rand(1, 3, 13, 22, generator=torch.Generator().manual_seed(3))
    ours = upscale_tensor(runtime, lr, color_fix="none")
    theirs = upscale_tensor(student, lr, color_fix="none")
    assert ours.shape == (1, 3, 52, 88)
    assert (ours - theirs).abs().max() < 1e-4
    with pytest.raises(ValueError, match="multiples of 4, got 13x22"):
        runtime.run("end_to_end", lr)  # the graph itself is never fed a size it does not take


def test_tampered_weight_fails_validation(builtin_artifact, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(builtin_artifact, broken)
    graph = onnx.load(str(broken / "vae_decoder.onnx"))
    tensor = max(graph.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] += 1.0
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(graph, str(broken / "vae_decoder.onnx"))
    assert export_main("validate", broken, "--quality-images", "1") == 3
    err = capsys.readouterr().err
    assert "vae_decoder.onnx: sha256 differs from the manifest" in err
    report = json.loads((broken / "report.json").read_text())
    assert not report["passed"]


def _overflowing_student(tmp_path: Path) -> Path:
    """The tiny student with its VAE decoder's first convolution scaled by 1e6: GroupNorm cancels the scale in
    float32, but the activations exceed float16's 65504, so an fp16 decoder returns NaN."""
    from compress.models.resolve import load_model

    student = load_model("preset:tiny").model
    with torch.no_grad():
        student.vae.decoder.conv_in.weight.mul_(1e6)
        student.vae.decoder.conv_in.bias.mul_(1e6)
    path = tmp_path / "overflow-student"
    student.save_pretrained(path)
    return path


def test_fp16_falls_back_to_fp32_where_parity_fails_and_a_forced_fp16_decoder_fails(tmp_path, capsys):
    from export.graphs import graph_specs, with_precisions
    from export.onnx import save_optimized, trace_to_onnx
    from compress.models.student import OneStepSR
    from compress.runtime.manifest import file_entries

    model = _overflowing_student(tmp_path)
    out = tmp_path / "fp16"
    assert export_main("onnx", "--model", model, "--precision", "fp16", "--components", "--skip-quality",
                       "-o", out) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    trials = manifest["fp16_trials"]
    assert trials["vae_decoder"]["precision"] == "fp32" and trials["vae_decoder"]["finite"] is False
    assert trials["transformer"]["precision"] == "fp16"
    assert manifest["graphs"]["vae_decoder"]["precision"] == "fp32"
    assert manifest["graphs"]["end_to_end"]["precision"] == "fp16+fp32:vae_decoder"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and min(r["psnr_db"] for r in report["parity"]["end_to_end"]) >= 35

    # The same artifact with the decoder forced to fp16 (manifest re-hashed, so only parity can catch it).
    student = OneStepSR.from_pretrained(model)
    spec = graph_specs(with_precisions(student, {"vae_decoder": "fp16"}), ("vae_decoder",))[0]
    save_optimized(trace_to_onnx(spec, tmp_path / "forced"), out / "vae_decoder.onnx")
    manifest["graphs"]["vae_decoder"]["precision"] = "fp16"
    manifest["files"] = file_entries(out, [n for n in manifest["files"]])
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert export_main("validate", out, "--model", model) == 3
    err = capsys.readouterr().err
    assert "parity vae_decoder (fp16)" in err and "non-finite output" in err


def test_killed_export_leaves_no_complete_folder(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "export", "onnx", "--model", "preset:tiny", "--components", "--skip-quality",
           "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stderr:  # kill it in the middle of writing graphs
        if "tracing end_to_end" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".killed.*.tmp"))
    assert leftovers, "the export was killed before it started writing; move the kill point"
    assert not any((left / MANIFEST_NAME).exists() for left in leftovers)
    # The next export clears the killed one's temporary folder and completes.
    assert export_main("onnx", "--model", "preset:tiny", "--skip-quality", "-o", out) == 0
    assert (out / MANIFEST_NAME).is_file() and not list(tmp_path.glob(".killed.*.tmp"))


def test_bad_input_is_one_line(tmp_path, capsys):
    assert export_main("onnx", "--model", str(tmp_path / "nowhere"), "-o", tmp_path / "x") == 2
    assert "no such folder" in capsys.readouterr().err
    assert export_main("validate", tmp_path) == 2
    assert "manifest.json not found" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert export_main("onnx", "-o", tmp_path / "exists") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert export_main("onnx", "--opset", "99", "-o", tmp_path / "y") == 2
    assert "--opset must be between 14 and 21" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_eval_scores_the_artifact(tiny_artifact, tmp_path):
    from compress.__main__ import main as compress_main

    out = tmp_path / "eval"
    assert compress_main(["eval", "--model", str(tiny_artifact), "--limit", "1", "--metrics", "psnr,ssim",
                          "-o", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"].startswith("ONNX artifact") and metrics["images"] == 1
    assert np.isfinite(metrics["mean"]["student"]["psnr"])


def test_artifact_refuses_device_and_dtype_flags(tiny_artifact):
    from compress.models.errors import ModelLoadError
    from compress.models.resolve import load_model

    with pytest.raises(ModelLoadError, match="exported artifact: it runs on ONNX Runtime"):
        load_model(str(tiny_artifact), dtype=torch.float16)


def _budget_with_int8_floor(tmp_path: Path, floor: float) -> Path:
    text = (ROOT / "compress" / "assets" / "budgets" / "export.toml").read_text()
    path = tmp_path / f"int8-{floor:g}.toml"
    path.write_text(text.replace("int8 = 35.0", f"int8 = {floor}"))
    return path


def test_int8_quantizes_each_component_that_meets_its_floor_and_keeps_the_others_fp32(tmp_path):
    import onnx

    from compress.budget import load_budget
    from compress.models.resolve import load_model
    from export.artifact import int8_trial

    # A floor of 1 dB keeps every component int8: static QDQ convolutions in the VAE, dynamic linear layers in
    # the transformer, the bicubic upsample and the patch embedding never quantized; the artifact passes parity.
    out = tmp_path / "int8"
    assert export_main("onnx", "--model", "preset:tiny", "--precision", "int8", "--skip-quality",
                       "--calibration-images", "2", "--budgets", _budget_with_int8_floor(tmp_path, 1), "-o", out) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    trials = manifest["int8_trials"]
    assert set(trials) == {"vae_decoder", "vae_encoder", "transformer"}
    for name, trial in trials.items():
        assert trial["precision"] == "int8" and trial["finite"] and 1 < trial["int8_psnr_db"] < 200, (name, trial)
    assert manifest["graphs"]["end_to_end"]["precision"] == "int8"
    graph = onnx.load(str(out / "end_to_end.onnx")).graph
    producer = {output: node for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    quantized = [node for node in convs if producer.get(node.input[0]) is not None
                 and producer[node.input[0]].op_type == "DequantizeLinear"]
    assert len(quantized) == trials["vae_encoder"]["static_conv_nodes"] + trials["vae_decoder"]["static_conv_nodes"] > 0
    assert {node.name for node in convs} - {node.name for node in quantized} == {
        "/Conv", "/transformer/pos_embed/proj/Conv"}  # the bicubic upsample and the patch embedding
    assert sum(node.op_type == "MatMulInteger" for node in graph.node) == trials["transformer"]["dynamic_linear_nodes"] > 0
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and all(row["floor_db"] == 1 for row in report["parity"]["end_to_end"])

    # A floor no int8 graph can meet: every component stays fp32.
    student = load_model("preset:tiny").model.eval()
    budget = load_budget(_budget_with_int8_floor(tmp_path, 300), "export.toml")
    trials, kept, _ = int8_trial(student, tmp_path / "scratch", budget, ((32, 32),), 17, 1)
    assert kept == [] and all(t["precision"] == "fp32" and t["int8_psnr_db"] < 300 for t in trials.values())
