"""Never a silent bad result: NaN/inf in a model folder stops the load naming the file and tensor; a stage
that produces NaN/inf at run time fails that image (stage named, no file written) and the batch goes on."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from compress.models.resolve import load_model

    path = tmp_path_factory.mktemp("guards") / "tiny"
    load_model("preset:tiny").model.save_pretrained(path)
    return path


def _copy_with(tiny_folder: Path, tmp_path: Path, file: str, key: str, value: float) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    tensors = load_file(str(broken / file))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(broken / file))
    return broken


def _upscale_cli(model: Path, inputs: list[Path], out: Path, capsys) -> tuple[int, str, float]:
    from compress.__main__ import main

    capsys.readouterr()
    start = time.perf_counter()
    code = main(["upscale", *map(str, inputs), "--model", str(model), "-o", str(out)])
    return code, capsys.readouterr().err, time.perf_counter() - start


def _png(path: Path, value: int) -> Path:
    pixels = np.random.default_rng(value).integers(0, 40, (16, 16, 3)) + value
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
    return path


def test_nan_in_the_prompt_embeddings_fails_at_load_naming_file_and_tensor(tiny_folder, tmp_path, capsys):
    broken = _copy_with(tiny_folder, tmp_path, "conditioning.safetensors", "prompt_embeds", float("nan"))
    code, err, seconds = _upscale_cli(broken, [_png(tmp_path / "a.png", 10)], tmp_path / "out", capsys)
    assert code == 2
    assert "conditioning.safetensors" in err and "'prompt_embeds'" in err and "NaN/inf" in err
    assert len(err.strip().splitlines()) == 1 + err.count("model:")  # one error line
    assert not (tmp_path / "out").exists()
    print(f"NaN prompt embeddings refused in {seconds:.2f} s")


def test_inf_in_one_weight_fails_at_load_naming_file_and_tensor(tiny_folder, tmp_path, capsys):
    key = "decoder.conv_in.weight"
    broken = _copy_with(tiny_folder, tmp_path, "vae/diffusion_pytorch_model.safetensors", key, float("inf"))
    code, err, _ = _upscale_cli(broken, [_png(tmp_path / "a.png", 10)], tmp_path / "out", capsys)
    assert code == 2
    assert "vae/diffusion_pytorch_model.safetensors" in err and f"'{key}'" in err
    assert not (tmp_path / "out").exists()


def test_nan_at_run_time_fails_that_image_names_the_stage_and_the_batch_goes_on(tiny_folder, tmp_path, monkeypatch,
                                                                                 capsys):
    """A transformer that returns NaN for the brighter input only: that image fails, the other one is written."""
    from compress.models import resolve
    from compress.models.student import OneStepSR

    dark, bright = _png(tmp_path / "dark.png", 5), _png(tmp_path / "bright.png", 200)
    student = OneStepSR.from_pretrained(tiny_folder)
    with torch.no_grad():
        means = [float(student.encode(student.preprocess(
            torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1)[None].float() / 255)).mean())
            for p in (dark, bright)]
    assert means[0] < means[1], means
    threshold = sum(means) / 2
    real_load = resolve.load_model

    def load_poisoned(*args, **kwargs):
        loaded = real_load(*args, **kwargs)

        def hook(module, args, kwargs, output):
            if float(kwargs["hidden_states"].mean()) > threshold:
                return (output[0] * float("nan"),) + tuple(output[1:])
            return output

        loaded.model.transformer.register_forward_hook(hook, with_kwargs=True)
        return loaded

    monkeypatch.setattr(resolve, "load_model", load_poisoned)
    code, err, _ = _upscale_cli(tiny_folder, [dark, bright], tmp_path / "out", capsys)
    assert code == 1
    assert (tmp_path / "out" / "dark.png").is_file() and not (tmp_path / "out" / "bright.png").exists()
    assert "bright.png" in err and "the transformer produced" in err and "NaN/inf" in err


def test_a_constant_output_from_a_textured_input_is_a_failure():
    from compress.pipeline import NumericalFailure, check_not_constant

    lr = torch.rand(1, 3, 8, 8)
    with pytest.raises(NumericalFailure, match="constant image"):
        check_not_constant(torch.zeros(1, 3, 32, 32), lr)
    check_not_constant(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 8, 8))  # flat in, flat out: fine


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_the_cpu_is_refused_before_any_work(dtype, tmp_path, capsys):
    from compress.__main__ import main

    start = time.perf_counter()
    code = main(["upscale", str(_png(tmp_path / "a.png", 10)), "--dtype", dtype, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"--dtype {dtype} on cpu" in err and "use --dtype float32" in err
    assert len(err.strip().splitlines()) == 1 and time.perf_counter() - start < 5
    assert not (tmp_path / "out").exists()


def test_an_fp16_vae_decoder_overflow_is_decoded_again_in_fp32(capsys):
    """The CUDA path's guard, run on the CPU (PyTorch's CPU has fp16 kernels, only slow): a decoder whose first
    convolution overflows float16 gives inf; the pipeline decodes that image again in float32 and returns a
    finite image, leaving the VAE in float16."""
    from compress.models.resolve import load_model
    from compress.options import TileSettings
    from compress.pipeline import upscale_tensor

    model = load_model("preset:tiny@3").model
    with torch.no_grad():  # weights up to 2e4 fit float16, their sums do not; GroupNorm follows in float32
        weight = model.vae.decoder.conv_in.weight
        weight.mul_(2e4 / float(weight.abs().max()))
    model = model.to_runtime("cpu", torch.float16)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.decode(model.encode(model.preprocess(lr.half())))
    assert not bool(torch.isfinite(plain).all()), "the fixture must overflow in float16"
    capsys.readouterr()
    sr = upscale_tensor(model, lr, TileSettings(mode="off"), color_fix="none")
    assert bool(torch.isfinite(sr).all()) and sr.shape == (1, 3, 64, 64) and float(sr.std()) > 0
    assert "overflowed in float16 on this image; decoded it again in float32" in capsys.readouterr().err
    assert {p.dtype for p in model.vae.parameters()} == {torch.float16}
