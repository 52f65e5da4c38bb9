"""The distillation recipes end to end on tiny models: CLI, run folder, resume, KD/TAD-SR terms, DDP."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError, RecipeConfig, list_presets
from tests.conftest import REPO, run_cli, tsd_cli_args

FAST_SETTINGS = {"train.batch_size": "1", "train.hr_size": "64", "train.checkpoint_every": "2",
                 "loss.perceptual_net": "stlpips"}
FAST = [arg for key, value in FAST_SETTINGS.items() for arg in ("--set", f"{key}={value}")]


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


def test_tsd_cli_writes_a_complete_run_folder(tsd_straight_run, tiny_prior):
    """The CLI's run folder (resume after a kill: tests/test_fault_injection.py, which shares this run)."""
    straight = tsd_straight_run
    for name in ("config.yaml", "log.csv", "metrics.json", "report.md"):
        assert (straight / name).is_file(), name
    release = straight / "model"
    assert (release / "checkpoint/tsdsr/transformer.safetensors").is_file()
    assert (release / "checkpoint/tsdsr/vae.safetensors").is_file()
    assert (release / "dataset/default/prompt_embeds.pt").is_file()
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["perceptual_loss"] == "stlpips" and metrics["nonfinite_steps_skipped"] == 0
    assert {"tsd", "fake_score", "perceptual", "latent_mse"} <= set(metrics["final_losses_mean_last_20"])
    rows = _log(straight)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["tsd"])) for r in rows)
    assert [float(r["lr"]) for r in rows] == pytest.approx([2e-4 * (s + 1) / 50 for s in range(1, 5)])

    # The release loader reads what the recipe wrote; the student is a working 4x upscaler.
    from compress.models.resolve import load_model

    model = load_model(release).model
    with torch.no_grad():
        out = model(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 64, 64)

    # A finished run is not started over by accident (answered before torch is imported).
    again = run_cli(*tsd_cli_args(tiny_prior, straight))
    assert again.returncode == 2 and "already holds a run; pass --resume" in again.stderr


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize(
    "preset, extra, expected",
    [
        ("redistill-stage2", {"loss.kd_feature": "0.5"}, {"kd_latent_l1", "perceptual", "adversarial", "kd_feature"}),
        ("tadsr", {}, {"kd_latent_mse", "hf_score", "adversarial"}),
    ],
)
def test_adversarial_recipes_update_student_and_discriminator_as_intended(
    preset, extra, expected, tiny_prior, tiny_release, tmp_path
):
    """TinySR stage 2 (+ feature KD) and TAD-SR: in each step the student's trainable weights and the
    discriminator's trainable weights move, frozen weights of both do not, and the generator's loss, backward
    and optimiser step leave the discriminator untouched (no gradient on it, same weights when D's own step
    starts)."""
    from distill.recipe import DistillRecipe

    teacher_root, _ = tiny_release
    overrides = {"model.prior": str(tiny_prior), "model.student_init": str(teacher_root),
                 "model.kd_teacher": str(teacher_root), "train.steps": "2", **FAST_SETTINGS, **extra}
    recipe = DistillRecipe(RecipeConfig.from_yaml(preset, overrides), tmp_path / preset, progress=False).load().setup()
    student, discriminator = recipe.student, recipe.discriminator
    d_trainable = {name for name, p in discriminator.named_parameters()
                   if any(p is q for q in recipe.d_trainable)}
    assert d_trainable and d_trainable == {n for n, p in discriminator.named_parameters() if p.requires_grad}
    assert all(n.startswith(("heads.", "time_mlp.")) for n in d_trainable)  # the copied teacher blocks stay frozen
    s_trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert s_trainable and not any(n.startswith("vae.") for n in s_trainable)

    records: list[dict] = []
    train_step, g_step, d_step = recipe.train_step, recipe.optimizer.step, recipe.d_optimizer.step

    def recorded_train_step(step):
        records.append({"d": _snapshot(discriminator), "s": _snapshot(student)})
        logs = train_step(step)
        records[-1].update(d_after=_snapshot(discriminator), s_after=_snapshot(student), logs=logs)
        return logs

    def recorded_generator_step(*args, **kwargs):
        named = dict(discriminator.named_parameters())
        records[-1]["d_grads_at_g_step"] = {n: named[n].grad for n in d_trainable}
        records[-1]["s_moved"] = {n for n, p in student.named_parameters()
                                  if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        return g_step(*args, **kwargs)

    def recorded_discriminator_step(*args, **kwargs):
        records[-1]["d_at_d_step"] = _snapshot(discriminator)
        named = dict(discriminator.named_parameters())
        records[-1]["d_moved"] = {n for n in d_trainable
                                  if named[n].grad is not None and bool(named[n].grad.abs().sum() > 0)}
        return d_step(*args, **kwargs)

    recipe.train_step = recorded_train_step
    recipe.optimizer.step = recorded_generator_step
    recipe.d_optimizer.step = recorded_discriminator_step
    recipe.run().save()

    assert len(records) == 2
    for step, record in enumerate(records):
        assert expected | {"discriminator", "total"} <= set(record["logs"]), (step, record["logs"])
        assert all(math.isfinite(v) for v in record["logs"].values()), (step, record["logs"])
        # The generator part: no gradient reached D's trainable weights, and D is bit-identical when its step starts.
        assert all(g is None for g in record["d_grads_at_g_step"].values()), step
        assert all(torch.equal(record["d"][k], record["d_at_d_step"][k]) for k in record["d"]), step
        # D's step moves every trainable weight that got a gradient; the copied teacher blocks never move.
        assert record["d_moved"], step
        for name, before in record["d"].items():
            changed = not torch.equal(before, record["d_after"][name])
            if name in record["d_moved"]:
                assert changed, (step, name)
            elif name not in d_trainable:
                assert not changed, (step, name)
        # The student: weights with a gradient move, frozen ones (VAE, anything not trainable) do not.
        assert record["s_moved"] and record["s_moved"] <= s_trainable, step
        for name, before in record["s"].items():
            changed = not torch.equal(before, record["s_after"][name])
            if name in record["s_moved"]:
                assert changed, (step, name)
            elif name not in s_trainable:
                assert not changed, (step, name)
    losses = json.loads((tmp_path / preset / "metrics.json").read_text())["final_losses_mean_last_20"]
    assert expected | {"discriminator"} <= set(losses), losses
    assert (tmp_path / preset / "model" / "student_config.json").is_file()


def test_prior_folder_must_use_the_release_layout(tiny_prior, tmp_path):
    """load_prior reads base/ + dataset/{default,null}/ only; an old embeddings/ folder is one clear error."""
    from compress.models.errors import ModelLoadError
    from distill.recipe import load_prior

    prior = load_prior(tiny_prior)
    assert prior.cond.prompt_embeds.shape == (1, 12, 32) and prior.uncond.pooled.shape == (1, 24)
    assert torch.count_nonzero(prior.uncond.prompt_embeds) == 0 and torch.count_nonzero(prior.cond.pooled) > 0
    old = tmp_path / "old"
    shutil.copytree(tiny_prior / "base", old / "base")
    shutil.copytree(tiny_prior / "dataset" / "default", old / "embeddings")
    with pytest.raises(ModelLoadError, match=r"dataset/null/prompt_embeds\.pt"):
        load_prior(old)


def test_missing_prior_is_one_clear_error(tmp_path):
    result = run_cli("distill", "train", "--preset", "reference-tsd", "--prior", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "run"), *FAST)
    assert result.returncode == 2
    assert "base/" in result.stderr and "train_reference.py" in result.stderr


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_accelerate_launch_two_cpu_processes_plain_and_with_the_prior_sharded(tiny_prior, tmp_path):
    """A run checkpointed by one process resumes under two (the shipped DDP config) and finishes; resumed from
    the same checkpoint with train.shard_prior (torch FSDP2 splits the frozen transformer between the two
    processes), it logs the same losses step for step and writes the same release. Gradient checkpointing is on,
    so each block's weights are gathered again for its recomputation."""
    from safetensors.torch import load_file

    from compress.training import read_trainer_state
    from distill.recipe import run_recipe

    launcher = str(Path(sys.executable).parent / "accelerate")
    settings = {**FAST_SETTINGS, "train.gradient_checkpointing": "true"}
    cfg = RecipeConfig.from_yaml("reference-tsd", {"model.prior": str(tiny_prior), "train.steps": "4", **settings})
    first = tmp_path / "first"
    run_recipe(cfg, first, max_steps=2, progress=False)
    assert read_trainer_state(first / "checkpoints" / "step-0000002")["items_done"] == 2  # 2 steps x 1 crop x 1 process
    env = dict(__import__("os").environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    runs = {}
    for name, extra in (("plain", []), ("sharded", ["--set", "train.shard_prior=true"])):
        out = tmp_path / name
        shutil.copytree(first, out)
        # The shipped DDP config (MULTI_GPU: accelerate's torchrun launcher); without GPUs each process runs on CPU
        # with gloo. The student's and the fake score's adapters share one transformer, each wrapped by its own DDP.
        cmd = [launcher, "launch", "--config_file", str(REPO / "distill" / "accelerate" / "ddp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", "--gpu_ids", "all", "--dynamo_backend", "no", "-m",
               "distill", "train", "--preset", "reference-tsd", "--prior", str(tiny_prior), "--steps", "4", "--out",
               str(out), "--resume", *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")], *extra]
        result = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming step 2 with 2 process(es), the checkpoint's run had 1" in result.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["processes"] == 2 and metrics["steps"] == 4
        # items 0-1 by one process, then 2 crops a step: step 3 takes items 2 (rank 0) and 3 (rank 1), step 4 items 4, 5
        assert read_trainer_state(out / "checkpoints" / "step-0000004")["items_done"] == 6
        # One LR-schedule step per training step on every process (reference-tsd: lr 2e-4, 50 warm-up steps), not
        # one per process as Accelerate's default would step it, across the change of process count.
        assert [float(r["lr"]) for r in _log(out)] == pytest.approx([2e-4 * k / 50 for k in (2, 3, 4, 5)])
        runs[name] = _log(out), metrics
    (plain, plain_metrics), (sharded, sharded_metrics) = runs["plain"], runs["sharded"]
    assert plain_metrics["prior_sharding"] is None
    sharding = sharded_metrics["prior_sharding"]
    assert sharding["processes"] == 2
    assert sharding["frozen_transformer_bytes_per_process"] <= 0.55 * sharding["frozen_transformer_bytes"]
    assert [r["step"] for r in plain] == [r["step"] for r in sharded] == ["1", "2", "3", "4"]
    for a, b in zip(plain[2:], sharded[2:]):  # steps 3 and 4: two processes, unsharded and sharded
        for key in ("total", "tsd", "fake_score", "perceptual"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5, abs=1e-7), (a["step"], key)
    for file in ("checkpoint/tsdsr/transformer.safetensors", "base/transformer/diffusion_pytorch_model.safetensors"):
        want, got = (load_file(str(tmp_path / name / "model" / file)) for name in ("plain", "sharded"))
        assert want.keys() == got.keys() and want, file  # the release written from the shards is the same one
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)


def test_a_pruned_student_redistills_with_the_tsd_loss_and_kd(tiny_prior, tiny_release, tmp_path):
    """The default recovery after pruning (preset redistill-tsd: TSD + latent L1 KD to the uncompressed student)
    trains a compact, depth-pruned, text-free student and saves it in its own class."""
    from compress.models.resolve import load_model
    from compress.prune.conditioning import precache, remove_text_stream, replace_transformer
    from compress.prune.depth import keep_blocks
    from distill.recipe import DistillRecipe

    teacher_root, _ = tiny_release
    cached = precache(load_model(str(teacher_root)).model)
    pruned = replace_transformer(cached, keep_blocks(remove_text_stream(cached.transformer), [0, 2]))
    pruned.save_pretrained(tmp_path / "pruned")
    overrides = {"model.prior": str(tiny_prior), "model.student_init": str(tmp_path / "pruned"),
                 "model.kd_teacher": str(teacher_root), "train.steps": "2", **FAST_SETTINGS}
    recipe = DistillRecipe(RecipeConfig.from_yaml("redistill-tsd", overrides), tmp_path / "run", progress=False)
    recipe.load().setup().run().save()
    rows = _log(tmp_path / "run")
    assert len(rows) == 2 and all(float(r["tsd"]) != 0 and float(r["kd_latent_l1"]) > 0 for r in rows)
    saved = load_model(str(tmp_path / "run" / "model")).model
    assert type(saved.transformer).__name__ == "CompactSD3Transformer"
    assert [s.context for s in saved.transformer.block_specs] == ["none", "none"]
    before = pruned.transformer.state_dict()
    moved = [k for k, v in saved.transformer.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and all(not k.endswith("modulation") for k in moved)  # weights train, cached buffers stay


class _Poisoned:
    """The recipe's batches, with a NaN LR batch at the given (0-based) steps."""

    def __init__(self, data, bad_steps):
        self.data, self.bad_steps = data, bad_steps

    def __getattr__(self, name):  # start, items_before, rebase: the recipe's batches'
        return getattr(self.data, name)

    def __call__(self, step):
        batch = self.data(step)
        return batch._replace(lr=torch.full_like(batch.lr, float("nan"))) if step in self.bad_steps else batch


def _nan_inputs_at(recipe, bad_steps):
    """Make the LR batch of the given (0-based) steps NaN: the student's output and every loss go non-finite."""
    recipe.data = _Poisoned(recipe.data, bad_steps)


def test_a_non_finite_step_is_skipped_counted_and_changes_no_weight(tiny_prior, tmp_path):
    from distill.recipe import DistillRecipe

    overrides = {"model.prior": str(tiny_prior), "train.steps": "5", **FAST_SETTINGS}
    recipe = DistillRecipe(RecipeConfig.from_yaml("reference-tsd", overrides), tmp_path / "run", progress=False)
    recipe.load().setup()
    _nan_inputs_at(recipe, {1, 2})
    moved = []
    train_step = recipe.train_step

    def watched(step):
        before = {"student": _snapshot(recipe.student), "fake": _snapshot(recipe.fake)}
        logs = train_step(step)
        after = {"student": _snapshot(recipe.student), "fake": _snapshot(recipe.fake)}
        moved.append({part: any(not torch.equal(before[part][k], after[part][k]) for k in before[part])
                      for part in before})
        return logs

    recipe.train_step = watched
    recipe.run().save()
    assert moved == [{"student": True, "fake": True}, {"student": False, "fake": False},
                     {"student": False, "fake": False}, {"student": True, "fake": True},
                     {"student": True, "fake": True}]
    rows = _log(tmp_path / "run")
    assert [float(r["nonfinite"]) for r in rows] == [0, 1, 1, 0, 0]
    assert math.isnan(float(rows[1]["total"])) and math.isfinite(float(rows[3]["total"]))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["nonfinite_steps_skipped"] == 2
    assert all(math.isfinite(v) for v in metrics["final_losses_mean_last_20"].values())
    assert "skipped for a non-finite loss or gradient: 2" in (tmp_path / "run" / "report.md").read_text()


def test_too_many_non_finite_steps_in_a_row_stop_with_the_last_good_checkpoint(tiny_prior, tmp_path):
    from compress.models.errors import TrainingDiverged
    from compress.training import list_checkpoints, read_trainer_state
    from distill.recipe import DistillRecipe

    overrides = {"model.prior": str(tiny_prior), "train.steps": "8", **FAST_SETTINGS, "train.checkpoint_every": "1",
                 "train.max_nonfinite_steps": "3"}
    recipe = DistillRecipe(RecipeConfig.from_yaml("reference-tsd", overrides), tmp_path / "run", progress=False)
    recipe.load().setup()
    _nan_inputs_at(recipe, set(range(2, 8)))
    with pytest.raises(TrainingDiverged, match=r"steps 3-5 all had a non-finite loss .* the last good checkpoint is "
                                               r".*step-0000002"):
        recipe.run()
    found = list_checkpoints(tmp_path / "run")
    assert [p.name for p in found] == ["step-0000001", "step-0000002"]
    assert read_trainer_state(found[-1])["nonfinite_steps"] == 0
    assert not (tmp_path / "run" / "model").exists()


def test_max_steps_stops_without_a_final_model_and_resume_finishes(tiny_prior, tmp_path):
    from compress.training import list_checkpoints
    from distill.recipe import run_recipe

    cfg = RecipeConfig.from_yaml("reference-tsd", {"model.prior": str(tiny_prior), "train.steps": "3", **FAST_SETTINGS})
    first = run_recipe(cfg, tmp_path / "run", max_steps=2, progress=False)
    assert first.state.step == 2 and [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002"]
    assert not (tmp_path / "run" / "model").exists(), "an unfinished run must not write a final model"
    second = run_recipe(cfg, tmp_path / "run", resume=True, progress=False)
    assert second.state.step == 3 and (tmp_path / "run" / "model").is_dir()
    assert [int(r["step"]) for r in _log(tmp_path / "run")] == [1, 2, 3]


def test_train_on_a_folder_of_hr_images(tiny_prior, tmp_path, capsys):
    """--data: a folder tree is checked once (unreadable files listed, small images counted, both skipped) and
    the batches are crops of the usable images only."""
    import numpy as np
    from PIL import Image

    from distill.recipe import DistillRecipe

    data = tmp_path / "hr"
    (data / "sub").mkdir(parents=True)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30)}
    for name, colour in colours.items():  # flat images: any crop of them is that colour
        Image.fromarray(np.full((80, 96, 3), colour, np.uint8)).save(data / "sub" / f"{name}.png")
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(data / "small.png")  # under the 64 px crop
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = RecipeConfig.from_yaml("reference-tsd", {"model.prior": str(tiny_prior), "train.steps": "2",
                                                   **FAST_SETTINGS, "train.data": str(data)})
    recipe = DistillRecipe(cfg, tmp_path / "run", progress=True).load().setup()
    err = capsys.readouterr().err
    assert f"data: 2 of 4 image(s) under {data} used; 1 smaller than 64 px on a side skipped; 1 unreadable " \
           f"skipped: {data / 'broken.png'} (" in err
    seen = set()
    for step in range(6):
        hr = recipe.data(step).hr
        for crop in hr:
            pixel = tuple(int(round(float(v) * 255)) for v in crop[:, 0, 0])
            assert pixel in colours.values() and bool((crop == crop[:, :1, :1]).all())
            seen.add(pixel)
    assert seen == set(colours.values())  # both images are drawn
    with pytest.raises(ConfigError, match="train.data: .* is not a folder"):
        RecipeConfig.from_yaml("reference-tsd", {"model.prior": str(tiny_prior), "train.data": str(tmp_path / "no")})


def test_train_on_pre_degraded_pairs(tiny_prior, tmp_path, capsys):
    """--pairs LR_DIR HR_DIR: files matched by name (DIV2K's `x4` LR suffix too), HR exactly 4x LR; unmatched,
    mis-sized and unreadable files listed and skipped; LR and HR crops stay aligned."""
    import numpy as np
    from PIL import Image

    from compress.cli import dataclass_from_namespace
    from distill.__main__ import TrainArgs
    from distill.recipe import DistillRecipe

    lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
    (lr_dir / "set").mkdir(parents=True)
    (hr_dir / "set").mkdir(parents=True)
    rng = np.random.default_rng(0)
    hr_image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(hr_image).save(hr_dir / "set" / "0001.png")
    Image.fromarray(hr_image[::4, ::4]).save(lr_dir / "set" / "0001x4.png")  # LR pixel (i, j) is HR (4i, 4j)
    Image.fromarray(hr_image).save(hr_dir / "set" / "0002.png")  # no LR
    Image.fromarray(hr_image).save(hr_dir / "0003.png")
    Image.fromarray(hr_image[::2, ::2]).save(lr_dir / "0003.png")  # 2x, not 4x
    parser = argparse.ArgumentParser()
    from compress.cli import add_dataclass_arguments

    add_dataclass_arguments(parser, TrainArgs)
    ns = parser.parse_args(["--preset", "reference-tsd", "--out", str(tmp_path / "run"), "--prior", str(tiny_prior),
                            "--pairs", str(lr_dir), str(hr_dir), "--steps", "2",
                            *[a for k, v in FAST_SETTINGS.items() for a in ("--set", f"{k}={v}")]])
    cfg = dataclass_from_namespace(TrainArgs, ns).config()
    assert cfg.train.pairs == [str(lr_dir), str(hr_dir)]
    recipe = DistillRecipe(cfg, tmp_path / "run", progress=True).load().setup()
    err = capsys.readouterr().err
    assert f"data: 1 LR/HR pair(s) from {lr_dir} and {hr_dir} used; 2 skipped: " in err
    assert f"{hr_dir / 'set' / '0002.png'} (no LR file named set/0002.* or set/0002x4.*" in err
    assert f"{hr_dir / '0003.png'} (128x96 is not 4x its LR's 64x48)" in err
    for step in range(3):
        lr, hr = recipe.data(step)[:2]
        assert lr.shape[-1] * 4 == hr.shape[-1] == 64
        assert torch.equal(lr, hr[..., ::4, ::4]) or torch.equal(lr, hr[..., ::4, 3::4])  # aligned (flipped: 3::4)
    with pytest.raises(ConfigError, match="train.data and train.pairs"):
        RecipeConfig.from_yaml("reference-tsd", {"model.prior": str(tiny_prior), "train.data": str(hr_dir),
                                                 "train.pairs": [str(lr_dir), str(hr_dir)]})
