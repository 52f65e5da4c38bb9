"""Core ML export (export/coreml.py): conversion, spec-level inspection and checks, and the parity/latency paths.

coremltools on Linux converts and reads packages but cannot run them, so what runs here is checked from the
saved spec, and parity runs through an injected predictor (the PyTorch graph itself, or a perturbed one).
The built-in student is exported at fp16 and 6-bit palettized (the 6-bit package is compressed from the fp16
one, as `compress_mlpackage` lets an app try several compressions after one conversion: about 30 s of
conversion and 50 s of k-means on two cores); the rest runs on the tiny preset.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from compress.models.resolve import load_model
from export.coreml import (
    SKIPPED_WHY,
    check_mlpackage,
    compress_mlpackage,
    convert_coreml,
    coreml_latency,
    coreml_parity,
    inspect_mlpackage,
)
from export.graphs import graph_specs

LINUX_LIKE = sys.platform != "darwin"
# coremltools' own converter calls a deprecated registry method of its own, once per node
pytestmark = pytest.mark.filterwarnings("ignore:Function _TORCH_OPS_REGISTRY.__contains__ is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def tiny():
    return load_model("preset:tiny").model


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    """`python -m export coreml --model preset:tiny --precision fp32`, through the real CLI: an artifact folder
    and its end_to_end record."""
    import json

    from export.cli import main

    out = tmp_path_factory.mktemp("tiny_fp32") / "artifact"
    assert main(["coreml", "--model", "preset:tiny", "--precision", "fp32", "-o", str(out)]) == 0
    return out, json.loads((out / "manifest.json").read_text())["graphs"]["end_to_end"]


@pytest.fixture(scope="module")
def tiny_int8(tiny_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_int8")
    return out, compress_mlpackage(tiny_fp32[0] / "end_to_end.mlpackage", out, int8=True)


@pytest.fixture(scope="module")
def builtin():
    loaded = load_model(None)
    assert not loaded.is_random, loaded.description
    return loaded.model


@pytest.fixture(scope="module")
def builtin_fp16(builtin, tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin_fp16")
    return out / "end_to_end.mlpackage", convert_coreml(builtin, out, precision="fp16")["end_to_end"]


@pytest.fixture(scope="module")
def builtin_palettized(builtin_fp16, tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin_pal6")
    record = compress_mlpackage(builtin_fp16[0], out, palettize_bits=6)
    return out / "end_to_end.mlpackage", record


def test_fixed_shape_packages_are_mlprograms_with_the_asked_precision(builtin, builtin_fp16, tiny_fp32):
    fp16_dir, fp32_dir = builtin_fp16[0].parent, tiny_fp32[0]
    for (out, record), precision in (((fp16_dir, builtin_fp16[1]), "fp16"), ((fp32_dir, tiny_fp32[1]), "fp32")):
        path = out / "end_to_end.mlpackage"
        assert record["file"] == "end_to_end.mlpackage" and path.is_dir()
        assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary package left behind"
        assert record["precision"] == precision and record["compression"] is None
        assert record["shapes"] == [[1, 3, 64, 64]]
        info = inspect_mlpackage(path)
        assert info["is_mlprogram"] and info["opset"] == "CoreML7"
        assert [(f["name"], f["flexibility"], f["shapes"]) for f in info["inputs"]] == [
            ("lr", "fixed", [[1, 3, 64, 64]])]
        assert [(f["name"], f["shapes"]) for f in info["outputs"]] == [("sr", [[1, 3, 256, 256]])]
        assert info["inputs"][0]["dtype"] == info["outputs"][0]["dtype"] == "float32"
        assert info["precision"] == precision
        assert info["bytes"] == record["bytes"] > 0
        assert info["compression"] is None and info["palettized_ops"] == info["quantized_ops"] == 0
        assert check_mlpackage(path, record) == []
    fp16 = inspect_mlpackage(builtin_fp16[0])
    fp32 = inspect_mlpackage(fp32_dir / "end_to_end.mlpackage")
    # the counts behind the verdict: every compute op in one dtype, casts only at the fp16 model's edges
    assert fp16["op_dtypes"]["fp16"] > 100 and fp16["op_dtypes"]["fp32"] == 0 and fp16["op_types"]["cast"] == 2
    assert fp32["op_dtypes"]["fp32"] > 100 and fp32["op_dtypes"]["fp16"] == 0 and "cast" not in fp32["op_types"]
    # fp16 stores each parameter in 2 bytes (measured: 17,190,528 bytes for 8,588,803 parameters)
    parameters = sum(p.numel() for p in builtin.parameters())
    assert 0.98 < fp16["weights_bytes"] / (2 * parameters) < 1.02, (fp16["weights_bytes"], parameters)


def test_check_mlpackage_names_each_mismatch(builtin_fp16):
    path, record = builtin_fp16
    wrong = dict(record, precision="fp32", shapes=[[1, 3, 32, 32]], input="image", compression="int8")
    lines = check_mlpackage(path, wrong)
    assert len(lines) == 4, lines
    assert any(line.startswith("precision: expected fp32, package computes in fp16") for line in lines)
    assert any(line.startswith("input: expected 'image'") for line in lines)
    assert "input shapes: expected [[1, 3, 32, 32]], package has [[1, 3, 64, 64]]" in lines
    assert any(line.startswith("compression: expected int8, package has None") for line in lines)
    lines = check_mlpackage(path, dict(record, shapes=[[1, 3, 32, 32]], output="image"))
    assert lines == ["input shapes: expected [[1, 3, 32, 32]], package has [[1, 3, 64, 64]]",
                     "output: expected 'image', package has ['sr']"]


def test_builtin_student_palettized_6bit_is_smaller_by_the_bit_ratio(builtin_fp16, builtin_palettized):
    (fp16_path, fp16), (pal6_path, pal6) = builtin_fp16, builtin_palettized
    print(f"built-in student, Core ML end_to_end: fp16 {fp16['bytes']} bytes, 6-bit palettized {pal6['bytes']} bytes "
          f"({pal6['bytes'] / fp16['bytes']:.3f})")
    assert pal6["compression"] == "palettize-6bit" and pal6["precision"] == "fp16"
    assert pal6["shapes"] == fp16["shapes"] == [[1, 3, 64, 64]] and (pal6["input"], pal6["output"]) == ("lr", "sr")
    # 8.6 M parameters in fp16 are 17 MB; 6 of 16 bits per weight keep ~0.375 of it plus the LUTs
    assert 15e6 < fp16["bytes"] < 21e6, fp16
    assert 0.3 < pal6["bytes"] / fp16["bytes"] < 0.5, (pal6["bytes"], fp16["bytes"])
    info = inspect_mlpackage(pal6_path)
    assert info["compression"] == "palettize-6bit" and info["lut_bits"] == [6]
    assert info["palettized_ops"] == info["op_types"]["constexpr_lut_to_dense"] > 100
    assert info["precision"] == "fp16"
    assert inspect_mlpackage(fp16_path)["compression"] is None
    assert check_mlpackage(fp16_path, fp16) == [] and check_mlpackage(pal6_path, pal6) == []
    assert check_mlpackage(fp16_path, pal6) == [
        "compression: expected palettize-6bit, package has None (0 LUT ops, 0 quantized ops)"]
    lines = check_mlpackage(pal6_path, dict(pal6, precision="fp32", shapes=[[1, 3, 128, 128]]))
    assert [line.split(":")[0] for line in lines] == ["input shapes", "precision"], lines
    with pytest.raises(ValueError, match="already has palettize-6bit weights"):
        compress_mlpackage(pal6_path, pal6_path.parent / "again", int8=True)


def test_int8_weights_are_detected_and_smaller(tiny_fp32, tiny_int8):
    out, record = tiny_int8
    info = inspect_mlpackage(out / "end_to_end.mlpackage")
    assert record["compression"] == info["compression"] == "int8" and info["quantized_ops"] > 0
    assert info["palettized_ops"] == 0 and check_mlpackage(out / "end_to_end.mlpackage", record) == []
    # 8 of 32 bits for the weights large enough to quantize; coremltools leaves tensors under 2048 elements,
    # a large share of the tiny model, as they were
    fp32_bytes = inspect_mlpackage(tiny_fp32[0] / "end_to_end.mlpackage")["weights_bytes"]
    print(f"tiny: int8 {info['weights_bytes']} weight bytes, fp32 {fp32_bytes}")
    assert info["weights_bytes"] < 0.5 * fp32_bytes


def test_enumerated_shapes_appear_in_the_spec(tiny, tmp_path):
    # The transformer graph carries all the dynamic-shape rewrites (position-table crop, rank-6 unpatchify);
    # its input is the latent: LR side * 4 // 8.
    record = convert_coreml(tiny, tmp_path, graphs=("transformer",), shapes=[(64, 64), (32, 48)])["transformer"]
    assert record["shapes"] == [[1, 16, 32, 32], [1, 16, 16, 24]]
    path = tmp_path / "transformer.mlpackage"
    info = inspect_mlpackage(path)
    (latent,) = info["inputs"]
    assert latent["name"] == "latent" and latent["flexibility"] == "enumerated"
    assert latent["shapes"] == [[1, 16, 32, 32], [1, 16, 16, 24]] and latent["default_shape"] == [1, 16, 32, 32]
    assert [f["name"] for f in info["outputs"]] == ["velocity"]
    assert info["precision"] == "fp16"
    assert check_mlpackage(path, record) == []
    assert check_mlpackage(path, dict(record, shapes=record["shapes"][:1])) == [
        "input shapes: expected [[1, 16, 32, 32]], package has [[1, 16, 16, 24], [1, 16, 32, 32]]"]


def test_bad_arguments_raise_one_clear_line(tiny, tmp_path):
    multiple = graph_specs(tiny, ["end_to_end"])[0].multiple
    with pytest.raises(ValueError, match=rf"^LR shape 30x48 is not a multiple of {multiple}, which graph 'end_to_end'"):
        convert_coreml(tiny, tmp_path, shapes=[(64, 64), (30, 48)])
    with pytest.raises(ValueError, match=r"^LR shape 6x8 \(the vae_encoder input 24x32\) is not a multiple of 16"):
        convert_coreml(tiny, tmp_path, graphs=("vae_encoder",), shapes=[(6, 8)])
    with pytest.raises(ValueError, match="not both"):
        convert_coreml(tiny, tmp_path, palettize_bits=6, int8=True)
    with pytest.raises(ValueError, match="palettize_bits must be one of"):
        convert_coreml(tiny, tmp_path, palettize_bits=5)
    with pytest.raises(ValueError, match="precision must be one of"):
        convert_coreml(tiny, tmp_path, precision="int4")
    with pytest.raises(ValueError, match="unknown graph"):
        convert_coreml(tiny, tmp_path, graphs=("unet",))
    assert list(tmp_path.iterdir()) == []  # nothing is written before the arguments are checked


def _reference(module: torch.nn.Module):
    """The PyTorch graph as a numpy function, remembering outputs: a 64x64 forward of tiny costs ~1 s here."""
    seen: dict[bytes, np.ndarray] = {}

    def run(x: np.ndarray) -> np.ndarray:
        key = x.tobytes()
        if key not in seen:
            with torch.no_grad():
                seen[key] = module(torch.from_numpy(x)).numpy()
        return seen[key]
    return run


def test_parity_and_latency_are_skipped_without_core_ml(tiny, tiny_fp32):
    if not LINUX_LIKE:
        pytest.skip("macOS runs Core ML, so nothing is skipped there")
    path = tiny_fp32[0] / "end_to_end.mlpackage"
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    reference = _reference(graph_specs(tiny, ["end_to_end"])[0].module)
    assert coreml_parity(path, reference, [x]) == {"status": "skipped", "why": SKIPPED_WHY}
    assert coreml_latency(path, x, 3) == {"status": "skipped", "why": SKIPPED_WHY}


def test_parity_with_an_injected_predictor_can_pass_and_fail(tiny, tiny_fp32):
    path = tiny_fp32[0] / "end_to_end.mlpackage"
    module = graph_specs(tiny, ["end_to_end"])[0].module
    reference = _reference(module)
    inputs = [np.random.default_rng(seed).random((1, 3, 64, 64), dtype=np.float32) for seed in (1, 2)]
    calls = []

    def exact(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(sorted(feed))
        return {"sr": reference(feed["lr"])}

    def noisy(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = reference(feed["lr"])
        return {"sr": out + np.random.default_rng(3).normal(0.0, 0.1, out.shape).astype(np.float32)}

    good = coreml_parity(path, reference, inputs, predictor=exact)
    assert good["status"] == "measured" and calls == [["lr"], ["lr"]]
    assert len(good["results"]) == 2 and good["min_psnr_db"] == math.inf and good["max_abs_diff"] == 0.0
    bad = coreml_parity(path, reference, inputs, predictor=noisy)
    assert bad["status"] == "measured"
    # Gaussian noise of sigma 0.1 on a peak of 1: MSE 0.01, PSNR 20 dB
    assert all(19.0 < r["psnr_db"] < 21.0 for r in bad["results"]), bad["results"]
    assert bad["max_abs_diff"] > 0.3
    timing = coreml_latency(path, inputs[0], 3, predictor=exact)
    assert timing["status"] == "measured" and timing["repeats"] == 3
    assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"]

    def wrong_shape(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"sr": np.zeros((1, 3, 64, 64), np.float32)}

    with pytest.raises(ValueError, match=r"output sr has shape \[1, 3, 64, 64\], the reference \[1, 3, 256, 256\]"):
        coreml_parity(path, reference, inputs[:1], predictor=wrong_shape)
    with pytest.raises(ValueError, match=r"input shape \[1, 3, 32, 32\] is not one .* takes: \[\[1, 3, 64, 64\]\]"):
        coreml_parity(path, reference, [np.zeros((1, 3, 32, 32), np.float32)], predictor=exact)


def test_cli_artifact_reports_parity_skipped_on_linux_and_validates_with_a_predictor(tiny, tiny_fp32, capsys):
    """The CLI's artifact: manifest, report with parity skipped (not passed) on Linux; `validate` with a
    predictor measures parity (the macOS path); a changed package fails on its manifest hash."""
    import json
    import shutil

    from export.artifact import validate
    from export.cli import main

    out, _ = tiny_fp32
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"] == "coreml" and manifest["source"]["model"] == "preset:tiny"
    assert any(name.startswith("end_to_end.mlpackage/") for name in manifest["files"])
    report = json.loads((out / "report.json").read_text())
    if LINUX_LIKE:
        assert report["parity"]["end_to_end"]["status"] == "skipped"
        assert report["skipped"] and "macOS" in report["skipped"][0]
        assert "skipped" in (out / "report.md").read_text()
    module = graph_specs(tiny, ["end_to_end"])[0].module
    reference = _reference(module)
    measured = validate(out, predictor=lambda feed: {"sr": reference(feed["lr"])})
    assert measured["passed"] and measured["parity"]["end_to_end"]["status"] == "measured"
    assert measured["parity"]["end_to_end"]["latency"]["status"] == "measured"  # the macOS latency path
    noisy = validate(out, predictor=lambda feed: {"sr": reference(feed["lr"]) + 0.2})
    assert not noisy["passed"] and noisy["failed"][0].startswith("parity end_to_end (fp32)")
    broken = out.parent / "broken"
    shutil.copytree(out, broken)
    weights = next(p for p in broken.rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:-16] + bytes(16))
    capsys.readouterr()
    assert main(["validate", str(broken)]) == 3
    assert "sha256 differs from the manifest" in capsys.readouterr().err
