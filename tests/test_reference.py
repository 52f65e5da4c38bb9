"""The reference kit: preset topology, stage 1/2 training at toy size, exact resume, CLI argument checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

PHOTOS = ("astronaut", "coffee")  # two small training photos keep the toy runs fast


def test_reference_preset_topology_and_budget():
    from compress.models.presets import build_random_components, get_preset

    preset = get_preset("reference")
    transformer, vae, prompt, pooled = build_random_components(preset)
    cfg = transformer.config
    assert cfg.num_layers == 8 and cfg.num_layers % 4 == 0
    assert len(transformer.transformer_blocks) == 8
    assert cfg.patch_size == 2 and cfg.in_channels == 16 and cfg.out_channels == 16
    assert cfg.num_attention_heads * cfg.attention_head_dim == 128
    assert cfg.pos_embed_max_size * cfg.patch_size >= 128  # one call takes a 128-latent (1024 px) tile
    assert vae.config.latent_channels == 16
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert vae.encoder.mid_block.attentions[0] is not None and vae.decoder.mid_block.attentions[0] is not None
    assert not vae.config.use_quant_conv and not vae.config.use_post_quant_conv
    assert prompt.shape == (1, 8, 64) and pooled.shape == (1, 32)
    params = sum(p.numel() for p in transformer.parameters()) + sum(p.numel() for p in vae.parameters())
    assert params < 16_000_000, params
    # a 128-latent (1024 px) tile fits SD3's position table in one call (the only size limit of the model)
    with torch.no_grad():
        tokens = transformer.pos_embed(torch.zeros(1, 16, 128, 128))
    assert tokens.shape == (1, 64 * 64, 128)


def test_color_augment_permutes_channels_and_keeps_luma():
    from compress.quality.fidelity import rgb_to_luma
    from distill.reference import color_augment

    images = 0.4 + 0.2 * torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = color_augment(images, seed=3, step=5)
    assert out.shape == images.shape and torch.equal(out, color_augment(images, seed=3, step=5))
    assert not torch.equal(out, color_augment(images, seed=3, step=6))
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    import itertools

    for i in range(images.shape[0]):  # saturation pivots on luma: out's luma is that of a channel permutation
        luma_out = rgb_to_luma(out[i : i + 1], "yiq")
        assert any(torch.allclose(luma_out, rgb_to_luma(images[i : i + 1, list(order)], "yiq"), atol=1e-5)
                   for order in itertools.permutations(range(3))), i
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        color_augment(torch.rand(3, 8, 8), seed=0, step=0)


def test_vae_stage_with_color_aug_trains_on_other_batches(tmp_path):
    from distill.reference import train_vae

    plain = train_vae(tmp_path / "plain", _vae_config(steps=1, val_every=1, lpips_weight=0.0))
    augmented = train_vae(tmp_path / "aug", _vae_config(steps=1, val_every=1, lpips_weight=0.0, color_aug=True))
    assert augmented["settings"]["color_aug"] is True and plain["settings"]["color_aug"] is False
    assert augmented["final"]["loss"] != plain["final"]["loss"]


def test_crop_stream_is_a_function_of_step():
    from distill.reference import CropStream, iterate_batches

    stream = CropStream(32, 2, seed=3)
    steps = [(step, batch["hr"].clone()) for step, batch in iterate_batches(stream, 0, 3)]
    again = CropStream(32, 2, seed=3)
    assert torch.equal(again.batch(2)["hr"], steps[2][1])
    assert not torch.equal(steps[0][1], steps[1][1])
    assert steps[0][1].shape == (2, 3, 32, 32) and again.batch(0)["lr"].shape == (2, 3, 8, 8)


def _vae_config(**kw):
    from distill.reference import VAEConfig

    base = {"steps": 4, "batch_size": 2, "crop": 32, "preset": "tiny", "checkpoint_every": 2, "val_every": 2,
            "val_size": 64, "scaling_crops": 4, "lpips_weight": 0.1, "progress": False, "photos": PHOTOS}
    base.update(kw)
    return VAEConfig(**base)


def _prior_config(**kw):
    from distill.reference import PriorConfig

    # Crops are encoded per step here (latent_cache=False); the cached-latent path has its own test.
    base = {"steps": 4, "batch_size": 2, "crop": 32, "preset": "tiny", "checkpoint_every": 2, "warmup": 2,
            "progress": False, "latent_cache": False, "photos": PHOTOS}
    base.update(kw)
    return PriorConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stages 1 and 2 straight through at toy size (tiny geometry, 32 px crops, 4 steps each)."""
    from distill.reference import train_prior, train_vae

    out = tmp_path_factory.mktemp("ref")
    vae_metrics = train_vae(out, _vae_config())
    prior_metrics = train_prior(out, _prior_config())
    return out, vae_metrics, prior_metrics


def test_stages_write_expected_files(trained):
    from distill.recipe import load_prior
    from distill.reference import load_reference_base, sample_prior

    out, vae_metrics, prior_metrics = trained
    # The output root is a prior folder in the TSD-SR release layout; each stage folder a distill.training run.
    for rel in ("base/vae/config.json", "base/transformer/config.json", "base/scheduler/scheduler_config.json",
                "dataset/default/prompt_embeds.pt", "dataset/default/pool_embeds.pt", "dataset/null/prompt_embeds.pt",
                "dataset/null/pool_embeds.pt", "vae/checkpoints/step-0000004/trainer_state.json",
                "vae/checkpoints/step-0000004/model.safetensors", "vae/checkpoints/step-0000004/optimizer.bin",
                "vae/log.csv", "vae/metrics.json", "prior/checkpoints/step-0000004/trainer_state.json",
                "prior/log.csv", "prior/metrics.json"):
        assert (out / rel).is_file(), rel
    assert not (out / "embeddings").exists()
    # one checkpoint kept per stage (the newest), no temporary folder left behind
    assert [p.name for p in (out / "vae" / "checkpoints").iterdir()] == ["step-0000004"]
    prior = load_prior(out)  # what python -m distill reads
    assert prior.cond.prompt_embeds.shape == (1, 12, 32) and torch.count_nonzero(prior.uncond.pooled) == 0
    base = load_reference_base(out)
    assert math.isclose(base["vae"].config.scaling_factor, vae_metrics["scaling_factor"], rel_tol=1e-6)
    assert base["prompt_embeds"].shape == (1, 12, 32) and base["pool_embeds"].shape == (1, 24)
    assert torch.count_nonzero(base["null_prompt_embeds"]) == 0
    assert base["scheduler"].config.shift == 3.0
    metrics = json.loads((out / "vae" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and math.isfinite(metrics["val_psnr_y"]) and "machine" in metrics
    assert math.isfinite(prior_metrics["final"]["loss"])
    rows = (out / "prior" / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 5
    torch.testing.assert_close(prior.cond.pooled, base["pool_embeds"])
    latents = sample_prior(base["transformer"], base, latent_size=4, steps=2, guidance=2.0)
    assert latents.shape == (1, 16, 4, 4) and torch.isfinite(latents).all()
    assert torch.equal(latents, sample_prior(base["transformer"], base, latent_size=4, steps=2, guidance=2.0))
    stds = prior_metrics["sample_latent_std"]
    assert set(stds) == {"guidance_1", "guidance_4"} and all(math.isfinite(v) and v > 0 for v in stds.values())


def test_sample_prior_is_euler_with_cfg(trained):
    """Two Euler steps by hand: z1 = z0 + (s1 - s0) v(z0), with v = v_u + g (v_c - v_u) from the transformer."""
    from distill.flow import Conditioning, ScoreModel
    from distill.reference import load_reference_base, sample_prior

    out, _, _ = trained
    base = load_reference_base(out)
    transformer, shift, guidance = base["transformer"], 3.0, 2.5
    got = sample_prior(transformer, base, latent_size=4, batch=2, steps=2, guidance=guidance, shift=shift, seed=3)
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    s = torch.linspace(1.0, 0.0, 3)
    sigmas = shift * s / (1 + (shift - 1) * s)
    score = ScoreModel(transformer)
    cond = Conditioning(base["prompt_embeds"], base["pool_embeds"])
    null = Conditioning(base["null_prompt_embeds"], base["null_pool_embeds"])
    with torch.no_grad():
        for i in range(2):
            t = torch.full((2,), float(sigmas[i]) * 1000.0)
            v_c, v_u = score(z, t, cond), score(z, t, null)
            z = z + (float(sigmas[i + 1]) - float(sigmas[i])) * (v_u + guidance * (v_c - v_u))
    torch.testing.assert_close(got, z)
    unguided = sample_prior(transformer, base, latent_size=4, batch=2, steps=2, guidance=1.0, shift=shift, seed=3)
    assert not torch.allclose(unguided, got)


def test_prior_on_cached_latents(trained, tmp_path):
    import shutil

    from compress.data import get_photo
    from distill.reference import LatentBank, load_trained_vae, train_prior

    out, _, _ = trained
    shutil.copytree(out / "base" / "vae", tmp_path / "base" / "vae")
    vae = load_trained_vae(tmp_path)
    bank = LatentBank(vae, crop=64, batch_size=3, seed=1, photos=[get_photo(name) for name in PHOTOS])
    assert bank.batch(5).shape == (3, 16, 8, 8) and torch.equal(bank.batch(5), bank.batch(5))
    assert not torch.equal(bank.batch(5), bank.batch(6))
    # latents are scaled: roughly unit variance by construction of scaling_factor
    assert 0.2 < float(torch.cat([bank.batch(i) for i in range(8)]).std()) < 5.0
    metrics = train_prior(tmp_path, _prior_config(steps=2, latent_cache=True, crop=64))
    assert metrics["steps"] == 2 and (tmp_path / "base" / "transformer" / "config.json").is_file()


def test_finished_stage_is_skipped(trained):
    from distill.reference import train_vae

    out, vae_metrics, _ = trained
    before = (out / "base" / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = train_vae(out, _vae_config())
    assert again["val_psnr_y"] == vae_metrics["val_psnr_y"]
    assert (out / "base" / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="--vae-steps"):
        train_vae(out, _vae_config(steps=5))


def test_extend_continues_a_finished_stage_and_guards_the_prior(trained, tmp_path):
    import shutil

    from distill.reference import train_prior, train_vae

    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    metrics = train_vae(copy, _vae_config(steps=6), extend=True)
    assert metrics["steps"] == 6
    assert _history(copy, "vae")[:4] == _history(out, "vae") and len(_history(copy, "vae")) == 6
    with pytest.raises(ValueError, match="another VAE"):
        train_prior(copy, _prior_config())
    assert train_prior(copy, _prior_config(steps=2), restart=True)["steps"] == 2


def test_decoder_stage_extends_with_a_frozen_encoder(trained, tmp_path):
    """Stage 1b: skip when finished, --extend continues the same curve, the encoder (the latents) never changes."""
    import shutil

    from distill.reference import DecoderConfig, finetune_decoder, load_trained_vae

    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    def config(steps):
        return DecoderConfig(steps=steps, batch_size=2, crop=32, checkpoint_every=1, val_every=1, val_size=64,
                             progress=False)

    first = finetune_decoder(copy, config(2))
    assert first["steps"] == 2 and [row["step"] for row in first["val_history"]] == [1, 2]
    assert finetune_decoder(copy, config(2))["val_psnr_y"] == first["val_psnr_y"]  # finished: skipped
    with pytest.raises(ValueError, match="--decoder-steps"):
        finetune_decoder(copy, config(3))
    extended = finetune_decoder(copy, config(4), extend=True)
    assert extended["steps"] == 4 and len(_history(copy, "decoder")) == 4
    straight = tmp_path / "straight"
    shutil.copytree(out, straight)
    finetune_decoder(straight, config(4))
    assert _history(copy, "decoder")[:2] == _history(straight, "decoder")[:2]
    base = load_trained_vae(copy)
    from diffusers import AutoencoderKL

    tuned = AutoencoderKL.from_pretrained(copy / "decoder" / "vae")
    for name, tensor in base.encoder.state_dict().items():
        assert torch.equal(tensor, tuned.encoder.state_dict()[name]), name
    assert any(not torch.equal(t, tuned.decoder.state_dict()[n]) for n, t in base.decoder.state_dict().items())


def _history(out, stage):
    """The stage's log.csv without the wall-clock column (values parsed back to numbers)."""
    from distill.training import CsvLog

    with (out / stage / "log.csv").open() as handle:
        columns = handle.readline().strip().split(",")
    return [{k: v for k, v in row.items() if k != "seconds"} for row in CsvLog(out / stage / "log.csv", columns).read()]


def test_resume_gives_the_same_loss_curve(trained, tmp_path):
    """N steps straight == N/2 steps, stop, resume to N (both stages; RNG, optimizer, LR schedule restored)."""
    import shutil

    from distill.reference import train_prior, train_vae

    straight, _, _ = trained
    split = tmp_path / "split"
    # Each stage is interrupted right after its step-2 checkpoint, then rerun with the same settings.
    _run_until(split, "vae", stop_after=2)
    train_vae(split, _vae_config())
    assert _history(split, "vae") == _history(straight, "vae")
    _run_until(split, "prior", stop_after=2)
    train_prior(split, _prior_config())
    assert _history(split, "prior") == _history(straight, "prior")
    shutil.rmtree(split)


def _run_until(out, stage, stop_after):
    """Run a stage with the standard settings but interrupt it right after checkpoint `stop_after`."""
    from distill import reference
    from distill.training import CheckpointManager, latest_trainer_state

    original = CheckpointManager.save

    class Stop(Exception):
        pass

    def save_then_stop(self, step, **state):
        path = original(self, step, **state)
        if step == stop_after:
            raise Stop
        return path

    CheckpointManager.save = save_then_stop
    try:
        with pytest.raises(Stop):
            if stage == "vae":
                reference.train_vae(out, _vae_config())
            else:
                reference.train_prior(out, _prior_config())
    finally:
        CheckpointManager.save = original
    assert latest_trainer_state(out / stage)["step"] == stop_after and len(_history(out, stage)) == stop_after


def test_interrupted_log_is_truncated_to_the_checkpoint(trained, tmp_path):
    """Rows logged after the newest checkpoint (a crash between checkpoints) are dropped on resume."""
    from distill.reference import train_vae

    straight, _, _ = trained
    split = tmp_path / "split"
    _run_until(split, "vae", stop_after=2)
    with pytest.raises(ValueError, match="--vae-batch 2"):  # an unfinished run continues with its own settings
        train_vae(split, _vae_config(batch_size=3))
    with (split / "vae" / "log.csv").open("a") as handle:  # step 3 ran and was logged, then the process died
        handle.write("3,9.0,9.0,9.0,9.0,9.0,9.0,9.0,0.1,1.0\n4,9.0")  # the last row cut short
    train_vae(split, _vae_config())
    assert _history(split, "vae") == _history(straight, "vae")


def test_training_helpers_round_trip(tmp_path):
    """distill.training: Accelerate-state checkpoint of model, optimiser, LR schedule, named generator and global
    RNG, restored into fresh objects; the newest `keep` checkpoints kept; the CSV log parses back exactly."""
    from distill.training import (
        CheckpointManager,
        CsvLog,
        GeneratorStates,
        make_accelerator,
        sync_lr,
        warmup_cosine,
    )

    def build(total):
        acc = make_accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, 2, floor=0.1))
        model, opt, sched = acc.prepare(model, opt, sched)
        gen = torch.Generator().manual_seed(99)
        acc.register_for_checkpointing(GeneratorStates(noise=gen))
        return acc, model, opt, sched, gen

    acc, model, opt, sched, gen = build(10)
    manager = CheckpointManager(acc, tmp_path / "run", keep=2)
    for step in range(3):
        model(torch.randn(4, 3, generator=gen)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        manager.save(step + 1, seconds=0.5 * step, note="x")
    assert [p.name for p in manager.list()] == ["step-0000002", "step-0000003"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    expected_gen, expected_global = torch.randn(3, generator=gen), torch.randn(3)
    weights, lr = model.weight.detach().clone(), opt.param_groups[0]["lr"]

    acc2, model2, opt2, sched2, gen2 = build(10)
    assert not torch.equal(model2.weight, weights)
    state = CheckpointManager(acc2, tmp_path / "run", keep=2).restore()
    assert state == {"step": 3, "seconds": 1.0, "note": "x"}
    assert torch.equal(model2.weight, weights) and opt2.param_groups[0]["lr"] == lr
    assert sched2.scheduler.last_epoch == 3
    assert torch.equal(torch.randn(3, generator=gen2), expected_gen)
    assert torch.equal(torch.randn(3), expected_global)

    # --extend: the schedule is rebuilt for a longer run and the lr moves onto the new curve at the same step
    acc3, _, opt3, sched3, _ = build(100)
    CheckpointManager(acc3, tmp_path / "run").restore()
    assert opt3.param_groups[0]["lr"] == lr
    sync_lr(sched3)
    assert opt3.param_groups[0]["lr"] == pytest.approx(1e-2 * warmup_cosine(100, 2, floor=0.1)(3))
    assert opt3.param_groups[0]["lr"] != pytest.approx(lr)

    factor = warmup_cosine(10, 2, floor=0.1)
    assert [factor(0), factor(1), factor(2)] == [0.5, 1.0, 1.0]
    assert factor(6) == pytest.approx(0.1 + 0.9 * 0.5) and factor(10) == factor(50) == pytest.approx(0.1)
    assert warmup_cosine(10, 0, decay="constant")(7) == 1.0
    with pytest.raises(ValueError, match="decay"):
        warmup_cosine(10, decay="linear")

    log = CsvLog(tmp_path / "log.csv", ["step", "loss", "extra"])
    rows = [{"step": 1, "loss": 0.1 + 0.2}, {"step": 2, "loss": 1e-17, "extra": 3}, {"step": 3, "loss": 2.5}]
    log.append(rows)
    assert log.read() == [{**rows[0], "extra": None}, rows[1], {**rows[2], "extra": None}]
    assert log.truncate(2) == log.read() and [r["step"] for r in log.read()] == [1, 2]
    with pytest.raises(KeyError, match="bogus"):
        log.append([{"step": 4, "bogus": 1}])


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--stage", "bogus"], "--stage"),
        (["--vae-steps", "0"], "--vae-steps"),
        (["--vae-crop", "60"], "--vae-crop"),
        (["--prior-crop", "120"], "--prior-crop"),
        (["--preset", "nope"], "--preset"),
        (["--stage", "prior"], "--stage prior"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, args, flag):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_reference", REPO / "scripts" / "train_reference.py")
    train_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_reference)
    with pytest.raises(SystemExit) as info:
        train_reference.main(["--out", str(tmp_path / "o"), *args])
    assert info.value.code == 2


def test_cli_messages_name_the_flag(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_reference.py"), "--out", str(tmp_path), "--vae-crop", "60"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2 and "--vae-crop" in result.stderr


def test_all_stages_run_end_to_end_on_the_tiny_geometry(tmp_path):
    """vae -> decoder -> prior -> the two distill students (reference-tsd, reference-rec), a few steps each."""
    out = tmp_path / "kit"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/train_reference.py"), "--out", str(out), "--preset", "tiny",
         "--stage", "all", "--vae-steps", "2", "--vae-batch", "2", "--decoder-steps", "2", "--prior-steps", "2",
         "--prior-batch", "2", "--prior-crop", "64", "--student-steps", "2", "--no-lpips", "--no-progress",
         "--val-size", "64", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"), check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "decoder" / "vae" / "config.json").is_file()
    assert (out / "kit" / "base" / "vae" / "config.json").is_file()
    for run in ("student", "student-rec"):
        assert (out / run / "model" / "checkpoint/tsdsr/transformer.safetensors").is_file(), run
        assert (out / run / "metrics.json").is_file(), run

    # Shipping: scripts/ship_reference.py copies the run into an assets folder that loads as the default would.
    dest = tmp_path / "assets"
    shipped = subprocess.run([sys.executable, str(REPO / "scripts/ship_reference.py"), "--run", str(out), "--dest", str(dest)],
                             cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    for stage in ("vae", "decoder", "prior", "student", "student-rec"):
        assert (dest / "reference/training" / stage / "log.csv.gz").is_file(), stage
    assert not (dest / "reference-rec" / "base").exists()  # the baseline ships LoRAs + embeddings only
    from compress.models.resolve import load_model

    default = load_model(dest / "reference")
    baseline = load_model(dest / "reference-rec", base_model=dest / "reference" / "base")
    with torch.no_grad():
        x = torch.rand(1, 3, 16, 16)
        assert default.model(x).shape == baseline.model(x).shape == (1, 3, 64, 64)
    # An unfinished run is refused and leaves nothing behind.
    refused = subprocess.run([sys.executable, str(REPO / "scripts/ship_reference.py"), "--run", str(tmp_path / "none"),
                              "--dest", str(tmp_path / "empty")], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2 and "missing" in refused.stderr
    assert not (tmp_path / "empty").exists()
