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
    from compress.reference import color_augment

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
    from compress.reference import train_vae

    plain = train_vae(tmp_path / "plain", _vae_config(steps=1, val_every=1, lpips_weight=0.0))
    augmented = train_vae(tmp_path / "aug", _vae_config(steps=1, val_every=1, lpips_weight=0.0, color_aug=True))
    assert augmented["settings"]["color_aug"] is True and plain["settings"]["color_aug"] is False
    assert augmented["final"]["loss"] != plain["final"]["loss"]


def test_crop_stream_is_a_function_of_step():
    from compress.reference import CropStream, iterate_batches

    stream = CropStream(32, 2, seed=3)
    steps = [(step, batch["hr"].clone()) for step, batch in iterate_batches(stream, 0, 3)]
    again = CropStream(32, 2, seed=3)
    assert torch.equal(again.batch(2)["hr"], steps[2][1])
    assert not torch.equal(steps[0][1], steps[1][1])
    assert steps[0][1].shape == (2, 3, 32, 32) and again.batch(0)["lr"].shape == (2, 3, 8, 8)


def _vae_config(**kw):
    from compress.reference import VAEConfig

    base = {"steps": 4, "batch_size": 2, "crop": 32, "preset": "tiny", "checkpoint_every": 2, "val_every": 2,
            "val_size": 64, "scaling_crops": 4, "lpips_weight": 0.1, "progress": False, "photos": PHOTOS}
    base.update(kw)
    return VAEConfig(**base)


def _prior_config(**kw):
    from compress.reference import PriorConfig

    # Crops are encoded per step here (latent_cache=False); the cached-latent path has its own test.
    base = {"steps": 4, "batch_size": 2, "crop": 32, "preset": "tiny", "checkpoint_every": 2, "warmup": 2,
            "progress": False, "latent_cache": False, "photos": PHOTOS}
    base.update(kw)
    return PriorConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stages 1 and 2 straight through at toy size (tiny geometry, 32 px crops, 4 steps each)."""
    from compress.reference import train_prior, train_vae

    out = tmp_path_factory.mktemp("ref")
    vae_metrics = train_vae(out, _vae_config())
    prior_metrics = train_prior(out, _prior_config())
    return out, vae_metrics, prior_metrics


def test_stages_write_expected_files(trained):
    from compress.reference import load_reference_base, sample_prior

    out, vae_metrics, prior_metrics = trained
    for rel in ("base/vae/config.json", "base/transformer/config.json", "base/scheduler/scheduler_config.json",
                "embeddings/prompt_embeds.pt", "embeddings/pool_embeds.pt", "embeddings/null_prompt_embeds.pt",
                "embeddings/null_pool_embeds.pt", "vae/checkpoint.pt", "vae/log.csv", "vae/metrics.json",
                "prior/checkpoint.pt", "prior/log.csv", "prior/metrics.json"):
        assert (out / rel).is_file(), rel
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
    latents = sample_prior(base["transformer"], base, latent_size=4, steps=2, guidance=2.0)
    assert latents.shape == (1, 16, 4, 4) and torch.isfinite(latents).all()


def test_prior_on_cached_latents(trained, tmp_path):
    import shutil

    from compress.data import get_photo
    from compress.reference import LatentBank, load_trained_vae, train_prior

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
    from compress.reference import train_vae

    out, vae_metrics, _ = trained
    before = (out / "base" / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = train_vae(out, _vae_config())
    assert again["val_psnr_y"] == vae_metrics["val_psnr_y"]
    assert (out / "base" / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="--vae-steps"):
        train_vae(out, _vae_config(steps=5))


def test_extend_continues_a_finished_stage_and_guards_the_prior(trained, tmp_path):
    import shutil

    from compress.reference import train_prior, train_vae

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

    from compress.reference import DecoderConfig, finetune_decoder, load_trained_vae

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
    payload = torch.load(str(out / stage / "checkpoint.pt"), weights_only=False)
    return [{k: v for k, v in row.items() if k != "seconds"} for row in payload["history"]]


def test_resume_gives_the_same_loss_curve(trained, tmp_path):
    """N steps straight == N/2 steps, stop, resume to N (both stages; RNG, optimizer, LR schedule restored)."""
    import shutil

    from compress.reference import train_prior, train_vae

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
    from compress import reference

    original = reference.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(path, *, step, **kw):
        original(path, step=step, **kw)
        if step == stop_after:
            raise Stop

    reference.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            if stage == "vae":
                reference.train_vae(out, _vae_config())
            else:
                reference.train_prior(out, _prior_config())
    finally:
        reference.save_checkpoint = original
    payload = torch.load(str(out / stage / "checkpoint.pt"), weights_only=False)
    assert payload["step"] == stop_after and len(payload["history"]) == stop_after


def test_checkpoint_helper_round_trip(tmp_path):
    from compress.reference import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    torch.randn(2, generator=gen)
    path = save_checkpoint(tmp_path / "s" / "checkpoint.pt", step=7, modules={"m": model}, optimizers={"o": opt},
                           generators={"g": gen}, history=[{"step": 1, "loss": 0.5}], extra={"note": "x"})
    expected_next = torch.randn(3, generator=gen)
    global_next = torch.randn(3)
    clone = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1e-3)
    gen2 = torch.Generator().manual_seed(99)
    step, history, extra = load_checkpoint(path, modules={"m": clone}, optimizers={"o": opt2}, generators={"g": gen2})
    assert step == 7 and history == [{"step": 1, "loss": 0.5}] and extra == {"note": "x"}
    assert torch.equal(clone.weight, model.weight)
    assert torch.equal(torch.randn(3, generator=gen2), expected_next)
    assert torch.equal(torch.randn(3), global_next)
    assert not list(path.parent.glob("*.tmp"))


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
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_reference
    finally:
        sys.path.pop(0)
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
        cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"),
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
                             cwd=REPO, capture_output=True, text=True, timeout=300)
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
                              "--dest", str(tmp_path / "empty")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "missing" in refused.stderr
    assert not (tmp_path / "empty").exists()
