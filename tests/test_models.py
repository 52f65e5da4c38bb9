"""Model layer: the TSD-SR release loader, the project's own save/load, and the SD3-medium geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from compress.__main__ import main as compress_main
from compress.models.errors import ModelLoadError
from compress.models.release import load_tsdsr_release
from compress.models.student import OneStepSR
from tests.conftest import run_cli

LR = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(3))


def _output(model: OneStepSR) -> torch.Tensor:
    with torch.no_grad():
        return model(LR)


def test_release_layout_is_the_official_one(tiny_release):
    root, model = tiny_release
    for rel in (
        "checkpoint/tsdsr/transformer.safetensors",
        "checkpoint/tsdsr/vae.safetensors",
        "dataset/default/prompt_embeds.pt",
        "dataset/default/pool_embeds.pt",
        "base/transformer/config.json",
        "base/transformer/diffusion_pytorch_model.safetensors",
        "base/vae/config.json",
        "base/scheduler/scheduler_config.json",
    ):
        assert (root / rel).is_file(), rel
    transformer_keys = load_file(str(root / "checkpoint/tsdsr/transformer.safetensors"))
    vae_keys = load_file(str(root / "checkpoint/tsdsr/vae.safetensors"))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in transformer_keys
    assert "transformer.pos_embed.proj.lora_A.weight" in transformer_keys  # `proj` hits the patch conv
    assert "transformer.transformer_blocks.0.norm1_context.linear.lora_B.weight" in transformer_keys
    assert not any(".ff.net.2." in k or "to_add_out" in k or "context_embedder" in k for k in transformer_keys)
    # The VAE LoRA goes through the same save function, so it carries the `transformer.` prefix too.
    assert "transformer.encoder.conv_in.lora_A.weight" in vae_keys
    assert all(k.startswith("transformer.encoder.") for k in vae_keys)
    prompt = torch.load(root / "dataset/default/prompt_embeds.pt", weights_only=True)
    pooled = torch.load(root / "dataset/default/pool_embeds.pt", weights_only=True)
    assert prompt.shape == (1, 12, 32) and pooled.shape == (1, 24)


@pytest.mark.parametrize("merge", [True, False])
def test_release_loads_to_the_same_function(tiny_release, merge):
    root, model = tiny_release
    loaded = load_tsdsr_release(root, merge=merge)
    diff = (_output(loaded) - _output(model)).abs().max().item()
    assert diff <= 1e-5, diff
    # The LoRAs matter: the base model alone gives a different image.
    from compress.models.lora import has_lora

    assert has_lora(loaded.transformer) != merge


def _broken_copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "release"
    shutil.copytree(root, target)
    return target


def _sample_png(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _expect_cli_failure(release: Path, tmp_path: Path, capsys, *fragments: str) -> None:
    out = tmp_path / "out"
    code = compress_main(["upscale", str(_sample_png(tmp_path)), "-o", str(out), "--model", str(release)])
    err = capsys.readouterr().err
    assert code != 0
    for fragment in fragments:
        assert fragment in err, err
    assert not list(out.glob("*.png")) if out.exists() else True


def test_missing_file_fails_clearly(tiny_release, tmp_path, capsys):
    release = _broken_copy(tiny_release[0], tmp_path)
    (release / "checkpoint/tsdsr/vae.safetensors").unlink()
    _expect_cli_failure(release, tmp_path, capsys, "VAE-encoder LoRA", "vae.safetensors", "missing")


def test_wrong_shape_tensor_fails_clearly(tiny_release, tmp_path, capsys):
    release = _broken_copy(tiny_release[0], tmp_path)
    path = release / "checkpoint/tsdsr/transformer.safetensors"
    state = load_file(str(path))
    key = "transformer.transformer_blocks.1.attn.to_k.lora_B.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(path))
    _expect_cli_failure(release, tmp_path, capsys, key, "shape")


def test_renamed_key_fails_clearly(tiny_release, tmp_path, capsys):
    release = _broken_copy(tiny_release[0], tmp_path)
    path = release / "checkpoint/tsdsr/transformer.safetensors"
    state = load_file(str(path))
    key = "transformer.transformer_blocks.0.attn.to_v.lora_A.weight"
    state[key.replace("to_v", "to_value")] = state.pop(key)
    save_file(state, str(path))
    _expect_cli_failure(release, tmp_path, capsys, "to_value", key)


@pytest.mark.parametrize("relative", ["checkpoint/tsdsr/transformer.safetensors", "base/vae/diffusion_pytorch_model.safetensors"])
def test_truncated_safetensors_fails_clearly(tiny_release, tmp_path, capsys, relative):
    release = _broken_copy(tiny_release[0], tmp_path)
    path = release / relative
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_cli_failure(release, tmp_path, capsys, str(path), "truncated or corrupt")


def test_wrong_shape_base_weight_names_the_tensor(tiny_release, tmp_path):
    release = _broken_copy(tiny_release[0], tmp_path)
    path = release / "base/transformer/diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["proj_out.weight"] = torch.zeros(3, 3)
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=r"proj_out\.weight.*\(3, 3\)"):
        load_tsdsr_release(release)


def test_bad_embedding_shape_fails_clearly(tiny_release, tmp_path):
    release = _broken_copy(tiny_release[0], tmp_path)
    torch.save(torch.zeros(1, 12, 31), release / "dataset/default/prompt_embeds.pt")
    with pytest.raises(ModelLoadError, match="prompt_embeds.pt has shape"):
        load_tsdsr_release(release)


def test_missing_base_model_says_where_it_looked(tiny_release, tmp_path):
    release = _broken_copy(tiny_release[0], tmp_path)
    shutil.rmtree(release / "base")
    with pytest.raises(ModelLoadError, match="stable-diffusion-3-medium-diffusers.*--base-model"):
        load_tsdsr_release(release)


def test_release_cli_exit_code_in_a_fresh_process(tiny_release, tmp_path):
    release = _broken_copy(tiny_release[0], tmp_path)
    (release / "dataset/default/pool_embeds.pt").unlink()
    result = run_cli("compress", "upscale", str(_sample_png(tmp_path)), "-o", str(tmp_path / "o"), "--model", str(release))
    assert result.returncode == 2
    assert "pool_embeds.pt" in result.stderr and "Traceback" not in result.stderr


def test_saved_student_reloads_identically_in_a_fresh_process(tiny_release, tmp_path):
    from compress.models.lora import has_lora

    root, unmerged = tiny_release
    model = load_tsdsr_release(root)  # merged
    saved = model.save_pretrained(tmp_path / "student")
    torch.save(LR, tmp_path / "lr.pt")
    expected = _output(model)
    script = (
        "import torch,sys; from compress.models.student import OneStepSR;"
        f"m=OneStepSR.from_pretrained(r'{saved}'); x=torch.load(r'{tmp_path / 'lr.pt'}', weights_only=True);"
        f"torch.save(m(x).detach(), r'{tmp_path / 'out.pt'}')"
    )
    import subprocess
    import sys

    from tests.conftest import REPO

    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    reloaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(reloaded, expected)
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "student")
    # The release loader merged the LoRAs, so no peft wrapper is left to save; an unmerged student is refused.
    assert not has_lora(model.transformer) and not has_lora(model.vae)
    assert has_lora(unmerged.transformer)
    with pytest.raises(ValueError, match="merge the LoRA"):
        unmerged.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()


def test_saved_student_with_missing_weights_fails(tiny_release, tmp_path):
    model = load_tsdsr_release(tiny_release[0])
    saved = model.save_pretrained(tmp_path / "student")
    (saved / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights in .*vae"):
        OneStepSR.from_pretrained(saved)


def test_sd3_medium_geometry_matches_the_published_sizes():
    """The exact SD3-medium configs give ~2028 M transformer + ~84 M VAE (TinySR Table 1) and 31 VAE LoRA targets."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from compress.models.lora import TRANSFORMER_LORA_TARGETS, lora_config, vae_encoder_lora_targets
    from compress.models.presets import get_preset

    preset = get_preset("sd3-medium")
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**preset.transformer)
        vae = AutoencoderKL(**preset.vae)
    transformer_m = sum(p.numel() for p in transformer.parameters()) / 1e6
    vae_m = sum(p.numel() for p in vae.parameters()) / 1e6
    assert 2020 < transformer_m < 2035, transformer_m
    assert 82 < vae_m < 86, vae_m
    assert len(vae_encoder_lora_targets(vae)) == 31
    # peft's matching of the official target names on SD3: 11 per block (no ff_context in the last) + 3 global.
    config = lora_config(64, TRANSFORMER_LORA_TARGETS)
    from peft.tuners.tuners_utils import check_target_module_exists

    hits = [name for name, _ in transformer.named_modules() if name and check_target_module_exists(config, name)]
    assert len(hits) == 24 * 11 - 1 + 3, len(hits)
    assert {"pos_embed.proj", "norm_out.linear", "proj_out"} <= set(hits)


def test_a_registered_component_class_round_trips_and_an_unknown_one_is_refused(tmp_path):
    """A VAE of another class (as a slimmed VAE will be) saves and loads through the registry."""
    from diffusers import AutoencoderKL

    from compress.models.presets import build_random_components, get_preset
    from compress.models.student import register_component_class

    class MarkedVAE(AutoencoderKL):  # same weights layout, its own class
        pass

    transformer, vae, prompt, pooled = build_random_components(get_preset("tiny"), seed=2)
    marked = MarkedVAE(**vae.config)
    marked.load_state_dict(vae.state_dict())
    model = OneStepSR(transformer, marked.eval(), prompt, pooled)
    with pytest.raises(ValueError, match="MarkedVAE is not registered"):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    register_component_class("vae", MarkedVAE)
    saved = model.save_pretrained(tmp_path / "student")
    reloaded = OneStepSR.from_pretrained(saved)
    assert type(reloaded.vae) is MarkedVAE
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(lr), model(lr))
    config = saved / "student_config.json"
    config.write_text(config.read_text().replace('"MarkedVAE"', '"GoneVAE"'))
    with pytest.raises(ModelLoadError, match="unknown vae class 'GoneVAE'"):
        OneStepSR.from_pretrained(saved)
