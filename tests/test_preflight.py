"""Fail fast (compress/models/preflight.py): a damaged model folder is refused in seconds, before torch is
imported, naming the file and the tensor; the checks read headers and bit patterns, not frameworks."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.models.errors import ModelLoadError
from compress.models.layout import REFERENCE_DIR, SAMPLE_IMAGE
from compress.models.preflight import (
    check_model_files,
    read_safetensors_header,
    scan_safetensors,
    scan_torch_tensor,
)
from tests.conftest import run_cli

SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
BASE_WEIGHTS = Path("base/transformer/diffusion_pytorch_model.safetensors")
PROMPT = Path("dataset/default/prompt_embeds.pt")


@pytest.fixture()
def reference_copy(tmp_path) -> Path:
    """The built-in student (TSD-SR release layout, 25 MB), copied so that a file can be damaged."""
    root = tmp_path / "reference"
    shutil.copytree(REFERENCE_DIR, root, ignore=shutil.ignore_patterns("training"))
    return root


def _upscale_fails_fast(model: Path, out: Path) -> str:
    start = time.perf_counter()
    result = run_cli("compress", "upscale", str(SAMPLE_IMAGE), "-o", str(out), "--model", str(model))
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert seconds < 5.0, f"took {seconds:.1f} s"
    assert not out.exists(), "a refused run must not create its output folder"
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    return line


def test_nan_in_the_prompt_embeddings_fails_in_seconds_naming_file_and_tensor(reference_copy, tmp_path):
    prompt = torch.load(reference_copy / PROMPT)
    prompt[0, 3, 5] = float("nan")
    torch.save(prompt, reference_copy / PROMPT)
    line = _upscale_fails_fast(reference_copy, tmp_path / "out")
    assert line.startswith(f"error: {reference_copy / PROMPT}: tensor 'prompt embedding' has 1 NaN/inf value(s)"), line


def test_inf_in_one_weight_fails_in_seconds_naming_file_and_tensor(reference_copy, tmp_path):
    weights = load_file(reference_copy / BASE_WEIGHTS)
    weights["proj_out.bias"].view(-1)[7] = float("inf")
    save_file(weights, reference_copy / BASE_WEIGHTS)
    line = _upscale_fails_fast(reference_copy, tmp_path / "out")
    assert line.startswith(f"error: {reference_copy / BASE_WEIGHTS}: tensor 'proj_out.bias' has 1 NaN/inf"), line


def test_a_truncated_weight_file_fails_in_seconds(reference_copy, tmp_path):
    path = reference_copy / BASE_WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    line = _upscale_fails_fast(reference_copy, tmp_path / "out")
    assert f"{path} is not a readable safetensors file (tensor '" in line and "truncated or corrupt" in line, line


def test_the_intact_built_in_student_passes_without_importing_torch():
    import subprocess

    code = ("import sys, time; t = time.perf_counter(); from compress.models.preflight import check_model_files; "
            "check_model_files(None); print(time.perf_counter() - t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False" and float(out[0]) < 3.0, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_values_are_found_in_every_float_type(tmp_path, dtype):
    good = torch.linspace(-3e4, 3e4, 1000).to(dtype)  # large but finite in every type, fp16 included
    path = tmp_path / "w.safetensors"
    save_file({"ok": good, "ints": torch.arange(10)}, path)
    found = scan_safetensors(path)
    assert found["ok"] == (SAFETENSORS_NAMES[dtype], (1000,)) and found["ints"] == ("I64", (10,))
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = good.clone()
        bad[[3, 999]] = value
        save_file({"ok": good, "bad": bad}, path)
        with pytest.raises(ModelLoadError, match=r"tensor 'bad' has 2 NaN/inf value\(s\) of 1000"):
            scan_safetensors(path)


def test_headers_that_do_not_fit_the_file_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 4)}, path)
    header, start = read_safetensors_header(path)
    assert header["a"]["shape"] == [4, 4] and start == path.stat().st_size - 64
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    lying = json.loads(raw[8:8 + length])
    lying["a"]["shape"] = [4, 5]
    text = json.dumps(lying).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    with pytest.raises(ModelLoadError, match=r"tensor 'a': 64 bytes for shape \[4, 5\] of F32"):
        read_safetensors_header(path)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(ModelLoadError, match=r"not a readable safetensors file \(5 bytes\)"):
        read_safetensors_header(path)


def test_a_torch_file_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "prompt_embeds.pt"
    torch.save(torch.ones(1, 8, 64), path)
    assert scan_torch_tensor(path, "prompt embedding") == (1, 8, 64)

    class Exploit:
        def __reduce__(self):
            return (print, ("this ran",))

    with zipfile.ZipFile(path, "w") as archive:  # torch's zip layout with a hostile pickle
        archive.writestr("archive/data.pkl", pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(ModelLoadError, match=r"prompt embedding: .* is not a readable torch tensor file "
                                             r"\(UnpicklingError: (__builtin__|builtins).print is not a tensor\)"):
        scan_torch_tensor(path, "prompt embedding")
    path.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="BadZipFile"):
        scan_torch_tensor(path, "prompt embedding")


def test_saved_student_folders_checks(tmp_path):
    """A folder written by save_pretrained: NaN in the cached conditioning, a newer format, a wrong prompt
    width, a LoRA-less layout's missing weights."""
    from compress.models.resolve import load_model

    folder = tmp_path / "student"
    load_model("preset:tiny").model.save_pretrained(folder)
    check_model_files(folder)  # intact: passes
    conditioning = folder / "conditioning.safetensors"
    original = load_file(conditioning)

    damaged = dict(original)
    damaged["prompt_embeds"] = original["prompt_embeds"].clone()
    damaged["prompt_embeds"][0, 0, 0] = float("nan")
    save_file(damaged, conditioning)
    with pytest.raises(ModelLoadError, match=r"conditioning.safetensors: tensor 'prompt_embeds' has 1 NaN/inf"):
        check_model_files(folder)

    narrow = dict(original, prompt_embeds=original["prompt_embeds"][..., :8].contiguous())
    save_file(narrow, conditioning)
    with pytest.raises(ModelLoadError, match=r"prompt_embeds: .* has shape \(1, \d+, 8\), expected \(1, tokens, \d+\)"):
        check_model_files(folder)
    save_file(original, conditioning)

    config = json.loads((folder / "student_config.json").read_text())
    (folder / "student_config.json").write_text(json.dumps(dict(config, version=2)))
    with pytest.raises(ModelLoadError, match=r"written by a newer version of this toolkit \(student format 2; this "
                                             r"one reads up to 1\); upgrade tinysr-toolkit"):
        check_model_files(folder)
    (folder / "student_config.json").write_text(json.dumps(config))

    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights in .*vae: expected diffusion_pytorch_model.safetensors"):
        check_model_files(tmp_path / "student")


def test_lora_ranks_must_agree(reference_copy):
    path = reference_copy / "checkpoint/tsdsr/transformer.safetensors"
    lora = load_file(path)
    name = next(k for k in lora if k.endswith("lora_A.weight"))
    lora[name] = lora[name][:-1].contiguous()
    save_file(lora, path)
    with pytest.raises(ModelLoadError, match=r"transformer LoRA: .* disagree on the LoRA rank"):
        check_model_files(reference_copy)
