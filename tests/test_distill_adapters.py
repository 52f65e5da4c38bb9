"""Distillation at full scale, shown on the tiny geometry: one shared base transformer with the student, fake-score
and teacher LoRAs as adapters (same losses and gradients as separate copies), per-image prompt embeddings for
the teacher and the fake score, the release layouts of the prior, data workers and 8-bit AdamW."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from distill.config import ConfigError, RecipeConfig

FAST_SETTINGS = {"train.batch_size": "1", "train.hr_size": "64", "train.checkpoint_every": "2",
                 "loss.perceptual_net": "stlpips"}


def _recipe(tiny_prior, out, **overrides):
    from distill.recipe import DistillRecipe

    settings = {"model.prior": str(tiny_prior), "train.steps": "2", **FAST_SETTINGS, **overrides}
    return DistillRecipe(RecipeConfig.from_yaml("reference-tsd", settings), out, progress=False)


def _without_adapters(transformer, keep: str | None):
    """A deep copy of the shared transformer holding only the adapter `keep` (None: the plain base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from compress.models.lora import set_active_adapters, unwrap_lora

    clone = copy.deepcopy(transformer)
    if keep is None:
        return unwrap_lora(clone, merge=False)
    for layer in clone.modules():
        if isinstance(layer, BaseTunerLayer):
            for name in [n for n in layer.lora_A if n != keep]:
                layer.delete_adapter(name)
    set_active_adapters(clone, (keep,))
    return clone


def _as_copies(recipe):
    """Today's layout before adapters were shared: the student, the fake score and the teacher each on their own
    copy of the prior's transformer, with the same adapter weights as `recipe` starts from."""
    from distill.flow import ScoreModel
    from distill.recipe import FAKE_ADAPTER, STUDENT_ADAPTER, StudentForTraining

    base = recipe.prior.transformer
    recipe.student.transformer = _without_adapters(base, STUDENT_ADAPTER)
    recipe.trainee = StudentForTraining(recipe.student)
    recipe.fake = ScoreModel(_without_adapters(base, FAKE_ADAPTER))
    recipe.teacher_score = ScoreModel(_without_adapters(base, None))
    return recipe


def _record_gradients(recipe):
    """Every optimiser step's gradients, by parameter name, for the student and the fake score."""
    seen = []
    for optimizer, module, prefix in ((recipe.optimizer, recipe.trainee, ""), (recipe.fake_optimizer, recipe.fake, "fake.")):
        names = {id(p): prefix + n for n, p in module.named_parameters()}
        original = optimizer.step

        def step(*args, _optimizer=optimizer, _original=original, _names=names, **kwargs):
            seen.append({_names[id(p)]: p.grad.detach().clone() for group in _optimizer.param_groups
                         for p in group["params"] if p.grad is not None})
            return _original(*args, **kwargs)

        optimizer.step = step
    return seen


def test_shared_adapters_give_the_losses_and_gradients_of_separate_copies(tiny_prior, tmp_path):
    from distill.recipe import FAKE_ADAPTER, STUDENT_ADAPTER

    shared = _recipe(tiny_prior, tmp_path / "shared").load()
    base = shared.prior.transformer
    assert shared.student.transformer is base and shared.fake.transformer is base
    assert shared.teacher_score.transformer is base  # one transformer: nothing copied
    copies = _as_copies(_recipe(tiny_prior, tmp_path / "copies").load())
    runs = {}
    for name, recipe in (("shared", shared), ("copies", copies)):
        recipe.setup()
        grads = _record_gradients(recipe)
        logs = [recipe.train_step(step) for step in range(2)]
        runs[name] = logs, grads
    (logs_shared, grads_shared), (logs_copies, grads_copies) = runs["shared"], runs["copies"]
    assert [set(x) for x in logs_shared] == [set(x) for x in logs_copies]
    for a, b in zip(logs_shared, logs_copies):
        assert {"total", "tsd", "fake_score"} <= set(a)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert len(grads_shared) == len(grads_copies) == 4  # student and fake score, two steps
    for a, b in zip(grads_shared, grads_copies):
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-8)
    student_grads, fake_grads = grads_shared[0], grads_shared[1]
    assert all(f".{STUDENT_ADAPTER}." in k or k.startswith("student.vae") for k in student_grads)
    assert all(f".{FAKE_ADAPTER}." in k for k in fake_grads)
    assert any(float(g.abs().sum()) > 0 for g in fake_grads.values())


def test_gradient_checkpointing_recomputes_each_block_with_the_adapters_of_its_forward(tiny_prior, tmp_path):
    """The fake score's backward runs after the student's adapter is live again; a plain recomputation would
    differentiate the student's network there (an error where the ranks differ, wrong gradients where they match)."""
    runs = {}
    for checkpointing in ("false", "true"):
        recipe = _recipe(tiny_prior, tmp_path / checkpointing, **{"train.gradient_checkpointing": checkpointing})
        recipe.load().setup()
        assert recipe.student.transformer.is_gradient_checkpointing == (checkpointing == "true")
        grads = _record_gradients(recipe)
        runs[checkpointing] = [recipe.train_step(step) for step in range(2)], grads
    (logs_plain, grads_plain), (logs_ckpt, grads_ckpt) = runs["false"], runs["true"]
    for a, b in zip(logs_plain, logs_ckpt):
        assert {"tsd", "fake_score"} <= set(a)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert len(grads_plain) == len(grads_ckpt) == 4
    for a, b in zip(grads_plain, grads_ckpt):
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-8)


def test_checkpoints_hold_the_trained_weights_not_the_frozen_prior(tiny_prior, tmp_path):
    """The student and the fake score are prepared separately but share the prior's transformer: a checkpoint
    of every model's full state would write the frozen transformer twice (2 x 8 GB at full size). Only what the
    optimisers train (and the buffers) is saved; resuming loads it onto the prior and checks the names."""
    from safetensors.torch import load_file, save_file

    from compress.training import list_checkpoints
    from distill.recipe import DistillRecipe, run_recipe

    cfg = RecipeConfig.from_yaml("reference-tsd", {"model.prior": str(tiny_prior), "train.steps": "3",
                                                   **FAST_SETTINGS})
    first = run_recipe(cfg, tmp_path / "run", max_steps=2, progress=False)
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    trained = {id(p) for p in first.trainable + first.fake_trainable}
    for file, model in (("model.safetensors", first.trainee), ("model_1.safetensors", first.fake)):
        saved = load_file(str(checkpoint / file))
        params = dict(model.named_parameters())
        frozen = {name for name, p in params.items() if id(p) not in trained}
        assert frozen and set(saved) == set(model.state_dict()) - frozen, file  # trained weights and buffers
        for name in saved.keys() & params.keys():
            torch.testing.assert_close(saved[name], params[name].detach())

    second = run_recipe(cfg, tmp_path / "run", resume=True, progress=False)
    assert second.state.step == 3 and (tmp_path / "run" / "model").is_dir()

    # a checkpoint that lacks a trained weight is one clear error, not a silently fresh adapter
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    saved = load_file(str(checkpoint / "model_1.safetensors"))
    save_file({k: v for k, v in saved.items() if "lora_A" not in k}, str(checkpoint / "model_1.safetensors"))
    third = DistillRecipe(cfg, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(KeyError, match="missing trained"):
        third.load().setup()


def test_fsdp_and_deepspeed_launches_are_refused_in_one_line():
    """accelerate turns FSDP and DeepSpeed on only for GPU launches, so the refusal is shown on its check."""
    from accelerate.utils import DistributedType

    from distill.recipe import check_engine

    for engine in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ConfigError, match=f"{engine.value} engine is not supported.*ddp.yaml"):
            check_engine(engine)
    for engine in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_engine(engine)


def test_shard_prior_needs_several_processes(tiny_prior, tmp_path):
    recipe = _recipe(tiny_prior, tmp_path / "run", **{"train.shard_prior": "true"}).load()
    with pytest.raises(ConfigError, match="several processes"):
        recipe.setup()


def _data_folder(root, names):
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


def _write_embeddings(folder, prior, names):
    """NAME.safetensors per image: a constant value per image, so a batch's conditioning says whose it is."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    _, tokens, width = prior.uncond.prompt_embeds.shape
    pooled_width = prior.uncond.pooled.shape[1]
    values = {}
    for index, name in enumerate(names):
        value = float(index + 1)
        save_file({"prompt_embeds": torch.full((1, tokens, width), value),
                   "pool_embeds": torch.full((pooled_width,), value)}, str(folder / f"{name}.safetensors"))
        values[name] = value
    return values


def test_teacher_and_fake_score_see_each_images_prompt_embeddings(tiny_prior, tmp_path):
    from distill.recipe import load_prior

    names = ["cat", "dog", "owl"]
    data = _data_folder(tmp_path / "hr", names)
    values = _write_embeddings(tmp_path / "embeds", load_prior(tiny_prior), names)
    recipe = _recipe(tiny_prior, tmp_path / "run", **{"train.data": str(data),
                                                      "train.prompt_embeds": str(tmp_path / "embeds")}).load().setup()
    calls = []
    for role, model in (("teacher", recipe.teacher_score), ("fake", recipe.fake)):
        forward = model.forward

        def watched(z_t, timesteps, cond, _role=role, _forward=forward):
            calls.append((_role, cond.prompt_embeds.detach().clone(), cond.pooled.detach().clone()))
            return _forward(z_t, timesteps, cond)

        model.forward = watched
    student_prompt = recipe.student.prompt_embeds.clone()
    for step in range(3):
        calls.clear()
        image = recipe.data(step).names[0]
        recipe.train_step(step)
        assert {role for role, _, _ in calls} == {"teacher", "fake"}
        for role, prompt, pooled in calls:
            # CFG batches the null prompt (zeros in the tiny prior) with the image's own; nothing else appears
            per_row = {float(row.flatten()[0]) for row in prompt}
            assert per_row <= {0.0, values[image]} and values[image] in per_row, (role, per_row, image)
            assert all(bool((row == row.flatten()[0]).all()) for row in prompt)
            assert values[image] in {float(row[0]) for row in pooled}
    assert torch.equal(recipe.student.prompt_embeds, student_prompt)  # the student keeps the fixed prompt


def test_prompt_embeddings_missing_or_misshaped_are_one_clear_error(tiny_prior, tmp_path):
    from compress.data.prompts import PromptEmbeddingError, PromptEmbeddings, PromptShape

    folder = tmp_path / "embeds"
    folder.mkdir()
    shape = PromptShape(tokens=12, width=32, pooled_width=24)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.zeros(12, 32), "pool_embeds": torch.zeros(24)}, str(folder / "a.safetensors"))
    with pytest.raises(PromptEmbeddingError, match=r"1 of 2 training image\(s\) have no embedding .* e\.g\. b;"):
        PromptEmbeddings(folder, ["a", "b"], shape)
    save_file({"prompt_embeds": torch.zeros(7, 32), "pool_embeds": torch.zeros(24)}, str(folder / "a.safetensors"))
    with pytest.raises(PromptEmbeddingError, match=r"a: prompt \(7, 32\) .* needs \(12, 32\)"):
        PromptEmbeddings(folder, ["a"], shape)
    with pytest.raises(PromptEmbeddingError, match="occur twice"):
        PromptEmbeddings(folder, ["a", "a"], shape)
    # TSD-SR's own layout (data/process.py): prompt_embeds/NAME.pt and pool_embeds/NAME.pt
    tsdsr = tmp_path / "tsdsr"
    (tsdsr / "prompt_embeds").mkdir(parents=True)
    (tsdsr / "pool_embeds").mkdir()
    torch.save(torch.full((12, 32), 2.0), tsdsr / "prompt_embeds" / "a.pt")
    torch.save(torch.full((24,), 3.0), tsdsr / "pool_embeds" / "a.pt")
    prompt, pooled = PromptEmbeddings(tsdsr, ["a"], shape).batch(["a", "a"])
    assert prompt.shape == (2, 12, 32) and float(prompt[1, 0, 0]) == 2.0 and float(pooled[0, 0]) == 3.0
    with pytest.raises(ConfigError, match="train.prompt_embeds condition the teacher and the fake score"):
        RecipeConfig.from_yaml("redistill-stage1", {"train.prompt_embeds": str(tsdsr)})


def test_workers_build_the_same_batches(tiny_prior, tmp_path):
    inline = _recipe(tiny_prior, tmp_path / "a").load().setup()
    workers = _recipe(tiny_prior, tmp_path / "b", **{"train.num_workers": "1"}).load().setup()
    workers.data.start(0, 3)
    for step in range(3):
        a, b = inline.data(step), workers.data(step)
        assert a.names == b.names and torch.equal(a.lr, b.lr) and torch.equal(a.hr, b.hr)
    assert workers.data._next == 3  # served by the worker, not rebuilt inline


def test_prior_in_the_release_layout_with_the_teacher_lora(tiny_prior, tmp_path):
    """A TSD-SR download: the SD3 folder beside checkpoint/ (the release loader's name for it) and
    checkpoint/teacher/teacher.safetensors, loaded as the teacher's adapter on the shared transformer."""
    from compress.models.errors import ModelLoadError
    from compress.models.lora import TRANSFORMER_LORA_TARGETS, add_lora, save_lora_file
    from distill.recipe import TEACHER_ADAPTER, load_prior

    root = tmp_path / "release"
    shutil.copytree(tiny_prior / "base", root / "stable-diffusion-3-medium-diffusers")
    shutil.copytree(tiny_prior / "dataset", root / "dataset")
    with pytest.raises(ModelLoadError, match="model.teacher_lora: .*checkpoint/teacher/teacher.safetensors not found"):
        _recipe(root, tmp_path / "r0", **{"model.teacher_lora": "release"}).load()
    donor = load_prior(root).transformer  # a teacher LoRA with non-zero weights
    torch.manual_seed(3)
    add_lora(donor, 4, TRANSFORMER_LORA_TARGETS)
    for name, p in donor.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    save_lora_file(donor, root / "checkpoint" / "teacher" / "teacher.safetensors")

    recipe = _recipe(root, tmp_path / "r1", **{"model.teacher_lora": "release"}).load()
    plain = _recipe(root, tmp_path / "r2").load()
    assert recipe.teacher_score.adapters == (TEACHER_ADAPTER,) and plain.teacher_score.adapters == ()
    from distill.flow import Conditioning

    channels = recipe.prior.transformer.config.in_channels
    z = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(recipe.prior.cond.prompt_embeds, recipe.prior.cond.pooled)
    with torch.no_grad():
        taught = recipe.teacher_score(z, 500.0, cond)
        base = plain.teacher_score(z, 500.0, cond)
        with_donor = donor(hidden_states=z, timestep=torch.tensor([500.0]), encoder_hidden_states=cond.prompt_embeds,
                           pooled_projections=cond.pooled, return_dict=False)[0]
    assert not torch.allclose(taught, base)
    torch.testing.assert_close(taught, with_donor)
    teacher_weights = [p for n, p in recipe.prior.transformer.named_parameters() if f".{TEACHER_ADAPTER}." in n]
    assert teacher_weights and not any(p.requires_grad for p in teacher_weights)


def test_adamw8bit_is_bitsandbytes_or_one_clear_error(tiny_prior, tmp_path, monkeypatch):
    import sys

    recipe = _recipe(tiny_prior, tmp_path / "run", **{"optim.optimizer": "adamw8bit"}).load()
    try:
        import bitsandbytes
    except ImportError:
        bitsandbytes = None
    if bitsandbytes is None:
        with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes"):
            recipe.setup()
        return
    recipe.setup()
    assert type(recipe.optimizer.optimizer).__name__ == "AdamW8bit"
    before = [p.detach().clone() for p in recipe.trainable]
    assert recipe.train_step(0)["nonfinite"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, recipe.trainable))  # bitsandbytes stepped on this CPU
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as where it is not installed
    with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes"):
        _recipe(tiny_prior, tmp_path / "run2", **{"optim.optimizer": "adamw8bit"}).load().setup()


def test_tensorboard_logs_every_step_beside_the_csv(tiny_prior, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (train.log_with: tensorboard needs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = _recipe(tiny_prior, tmp_path / "run", **{"train.log_with": "tensorboard"}).load().setup().run()
    events = sorted((tmp_path / "run" / "trackers").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under run/trackers/"
    scalars = EventAccumulator(str(min(events, key=lambda e: len(e.parts)).parent))  # the run's, not the hparams
    scalars.Reload()
    assert {"total", "tsd", "fake_score"} <= set(scalars.Tags()["scalars"])
    assert [e.step for e in scalars.Scalars("total")] == [1, 2]
    assert scalars.Scalars("total")[-1].value == pytest.approx(recipe.state.history[-1]["total"], rel=1e-6)
    with pytest.raises(ConfigError, match="train.log_with must be a list of tensorboard and/or wandb"):
        RecipeConfig.from_yaml("reference-tsd", {"model.prior": str(tiny_prior), "train.log_with": "mlflow"})


def test_saved_bytes_count_activations_not_the_weights_a_layer_keeps():
    """The memory model's activation count: a linear layer saves its input and its weight for backward; only
    the input is activation memory (the weight is counted with the weights)."""
    from benchmarks.distill_fullscale import SavedBytes

    layer = torch.nn.Linear(1000, 1000)
    x = torch.randn(3, 1000, requires_grad=True)
    with SavedBytes(layer) as saved:
        y = layer(x)
        z = y * y  # saves y (twice: one storage)
    assert saved.total == (3 * 1000 + 3 * 1000) * 4
    assert z.grad_fn is not None


def test_the_documented_memory_model_is_the_shipped_runs(capsys):
    """docs/distill-fullscale.md's per-GPU table is memory_model() of the run it ships (distill-fullscale.json)."""
    from benchmarks.distill_fullscale import main
    from tests.conftest import REPO

    assert main(["--from-json", str(REPO / "docs" / "distill-fullscale.json")]) == 0
    table = capsys.readouterr().out
    doc = (REPO / "docs" / "distill-fullscale.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 10 and all(row in doc for row in rows)
    assert "total with checkpointing 15.19 GiB, without 18.2 GiB, sharded over 8 GPUs 11.74 GiB" in table


@pytest.mark.slow
def test_full_geometry_benchmark_runs_on_the_tiny_geometry(tmp_path):
    """benchmarks.distill_fullscale end to end on the tiny geometry (the sd3-medium run is documented in
    docs/distill-fullscale.md): every phase's numbers and the memory model are written."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.distill_fullscale", "--geometry", "tiny", "--workdir",
                           str(tmp_path / "prior"), "--model-hr-size", "64", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["steps"]["seconds_per_step"]) == 2 and result["steps"]["losses_finite"]
    assert result["half"]["frozen_dtypes"] == ["torch.bfloat16"] and result["half"]["trainable_dtypes"] == ["torch.float32"]
    assert result["steps"]["parameters"]["teacher_lora"] > 0 and result["activations"]["transformer_student"] > 0
    model = result["memory_model"]
    assert 0 < model["total_with_checkpointing_gib"] <= model["total_without_checkpointing_gib"]
