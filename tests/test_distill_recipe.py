"""The distillation recipes end to end on tiny models: CLI, run folder, resume, KD/TAD-SR terms, DDP."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError, RecipeConfig, list_presets
from tests.conftest import REPO, run_cli

FAST = ["--set", "train.batch_size=1", "--set", "train.hr_size=64", "--set", "train.checkpoint_every=2",
        "--set", "loss.perceptual_net=stlpips"]


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory) -> Path:
    """A prior folder in the layout scripts/train_reference.py writes, with random tiny weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from compress.models.presets import build_random_components, get_preset

    root = tmp_path_factory.mktemp("prior")
    transformer, vae, prompt, pooled = build_random_components(get_preset("tiny"), seed=5)
    transformer.save_pretrained(root / "base" / "transformer")
    vae.save_pretrained(root / "base" / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(root / "base" / "scheduler")
    (root / "embeddings").mkdir()
    torch.save(prompt, root / "embeddings" / "prompt_embeds.pt")
    torch.save(pooled, root / "embeddings" / "pool_embeds.pt")
    torch.save(torch.zeros_like(prompt), root / "embeddings" / "null_prompt_embeds.pt")
    torch.save(torch.zeros_like(pooled), root / "embeddings" / "null_pool_embeds.pt")
    return root


def _log(run: Path) -> list[dict]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_validates(name):
    cfg = RecipeConfig.from_yaml(name)
    assert cfg.name == name and cfg.description
    assert cfg.train.steps >= 1


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"loss.tsd": -1}, "loss.tsd must be a number >= 0"),
        ({"train.hr_size": 100}, "train.hr_size"),
        ({"train.bogus": 1}, "train.bogus"),
        ({"loss.tsd_settings.vsd_weight": 2.0}, "vsd_weight"),
        ({"model.prior": None}, "model.prior"),
        ({"optim.schedule": "linear"}, "optim.schedule"),
    ],
)
def test_bad_config_names_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        RecipeConfig.from_yaml("reference-tsd", override)


def test_tsd_cli_writes_a_complete_run_folder_and_resumes(tiny_prior, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["train", "--preset", "reference-tsd", "--prior", str(tiny_prior), "--steps", "4", *FAST]
    result = run_cli("distill", *common, "--out", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "log.csv", "metrics.json", "report.md"):
        assert (straight / name).is_file(), name
    release = straight / "model"
    assert (release / "checkpoint/tsdsr/transformer.safetensors").is_file()
    assert (release / "checkpoint/tsdsr/vae.safetensors").is_file()
    assert (release / "dataset/default/prompt_embeds.pt").is_file()
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["perceptual_loss"] == "stlpips"
    assert {"tsd", "fake_score", "perceptual", "latent_mse"} <= set(metrics["final_losses_mean_last_20"])
    rows = _log(straight)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["tsd"]) == float(r["tsd"]) for r in rows)  # finite, present

    # The release loader reads what the recipe wrote; the student is a working 4x upscaler.
    from compress.models.resolve import load_model

    model = load_model(release).model
    with torch.no_grad():
        out = model(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 64, 64)

    # Stop after 2 steps, resume to 4: the loss curve is the uninterrupted one.
    first = run_cli("distill", *common, "--out", str(split), "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (split / "model").exists(), "an unfinished run must not write a final model"
    again = run_cli("distill", *common, "--out", str(split))
    assert again.returncode == 2 and "--resume" in again.stderr
    second = run_cli("distill", *common, "--out", str(split), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = _log(straight), _log(split)
    assert [r["step"] for r in b] == ["1", "2", "3", "4"]
    for ra, rb in zip(a, b):
        for key in ("total", "tsd", "fake_score", "perceptual", "latent_mse"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-5, abs=1e-7), (ra["step"], key)


def test_kd_tadsr_and_adversarial_terms_train(tiny_prior, tiny_release, tmp_path):
    """TinySR stage 2 (+ feature KD) and TAD-SR on a tiny student distilled from a tiny teacher."""
    teacher_root, _ = tiny_release
    for preset, extra in (("redistill-stage2", ["--set", "loss.kd_feature=0.5"]), ("tadsr", [])):
        out = tmp_path / preset
        result = run_cli(
            "distill", "train", "--preset", preset, "--prior", str(tiny_prior), "--student", str(teacher_root),
            "--teacher", str(teacher_root), "--steps", "2", "--out", str(out), *FAST, *extra,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        losses = json.loads((out / "metrics.json").read_text())["final_losses_mean_last_20"]
        expected = {"kd_latent_l1", "adversarial", "discriminator", "kd_feature"} if preset == "redistill-stage2" \
            else {"kd_latent_mse", "hf_score", "adversarial", "discriminator"}
        assert expected <= set(losses), (preset, losses)
        assert (out / "model" / "student_config.json").is_file()


def test_missing_prior_is_one_clear_error(tmp_path):
    result = run_cli("distill", "train", "--preset", "reference-tsd", "--prior", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "run"), *FAST)
    assert result.returncode == 2
    assert "base/" in result.stderr and "train_reference.py" in result.stderr


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_accelerate_launch_two_cpu_processes(tiny_prior, tmp_path):
    launcher = str(Path(sys.executable).parent / "accelerate")
    out = tmp_path / "ddp"
    # --multi_gpu selects accelerate's torchrun launcher; without GPUs each process runs on CPU with gloo.
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "distill", "train", "--preset", "reference-tsd",
           "--prior", str(tiny_prior), "--steps", "2", "--out", str(out), *FAST]
    env = dict(__import__("os").environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2
    assert (out / "model/checkpoint/tsdsr/transformer.safetensors").is_file()
