"""VAE slimming steps on either side (compress.prune.vae) and the CompactAutoencoder they produce.

The trained VAE here is the built-in reference kit's base VAE (the built-in student's VAE layout:
block_out_channels [32, 64, 128, 128], 8 GroupNorm groups, mid-block attention, 3,925,699 parameters),
loaded on its own because that takes a fraction of a second.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compress.models.compact_vae import CompactAutoencoder, SeparableConv2d
from compress.models.resolve import REFERENCE_DIR
from compress.prune.cli import parse_steps
from compress.prune.vae import (
    allowed_vae_ratios,
    apply_vae_step,
    predict_vae_params,
    rank1_separable,
    vae_step_error,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kl():
    from diffusers import AutoencoderKL

    from compress.models.checks import load_diffusers_model

    return load_diffusers_model(AutoencoderKL, REFERENCE_DIR / "base" / "vae").requires_grad_(False)


@pytest.fixture(scope="module")
def quant_kl():
    """A small random AutoencoderKL with quant convs (the SD3 layout has none)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                        block_out_channels=[8, 16, 16], norm_num_groups=4, latent_channels=4, layers_per_block=1,
                        use_quant_conv=True, use_post_quant_conv=True)
    return vae.eval().requires_grad_(False)


def _apply(vae, text: str):
    record = None
    for step in parse_steps(text):
        vae, record = apply_vae_step(vae, step)
    return vae, record


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _image(height: int = 32, width: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _side_state(vae, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(prefixes)}


# ------------------------------------------------------------------------------------------ CompactAutoencoder
@pytest.mark.parametrize("which", ["kl", "quant_kl"])
@torch.no_grad()
def test_compact_autoencoder_with_the_same_widths_is_the_same_network(which, request):
    vae = request.getfixturevalue(which)
    compact = CompactAutoencoder.from_autoencoder_kl(vae).eval()  # loads strictly
    assert set(compact.state_dict()) == set(vae.state_dict())
    image = _image(32, 48)
    posterior, same = vae.encode(image).latent_dist, compact.encode(image).latent_dist
    assert torch.allclose(posterior.mean, same.mean, atol=1e-6) and torch.allclose(posterior.std, same.std, atol=1e-6)
    assert torch.allclose(vae.decode(posterior.mode()).sample, compact.decode(posterior.mode()).sample, atol=1e-6)
    assert compact.encode(image, return_dict=False)[0].mean.shape == posterior.mean.shape
    assert (compact.quant_conv is None) == (vae.quant_conv is None)
    from compress.models.student import vae_downsample_factor

    assert vae_downsample_factor(compact) == vae_downsample_factor(vae) == 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def test_compact_autoencoder_round_trips_through_save_pretrained(kl, tmp_path):
    from compress.models.checks import load_diffusers_model

    slim, _ = _apply(kl, "narrow-encoder:32,vae-attn,separable-decoder")
    # narrowing made blocks 0 and 1 equally wide; the trained shortcut conv of block 1 stays, named in the config
    assert slim.config.encoder_conv_shortcuts == ["down_blocks.1.resnets.0", "down_blocks.2.resnets.0"]
    assert slim.encoder.down_blocks[1].resnets[0].conv_shortcut is not None
    slim.save_pretrained(tmp_path / "vae")
    again = load_diffusers_model(CompactAutoencoder, tmp_path / "vae")  # checks every shape against config.json
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == \
        {k: v for k, v in slim.config.items() if not k.startswith("_")}
    state, loaded = slim.state_dict(), again.state_dict()
    assert set(state) == set(loaded) and all(torch.equal(state[k], loaded[k]) for k in state)
    image = _image()
    latent = slim.encode(image).latent_dist.mode()
    assert torch.equal(again.encode(image).latent_dist.mode(), latent)
    assert torch.equal(again.decode(latent).sample, slim.decode(latent).sample)


def test_a_student_with_a_compact_vae_reloads_in_a_fresh_process_with_identical_output(tmp_path):
    from compress.models.resolve import load_model
    from compress.models.student import OneStepSR

    student = load_model("preset:tiny@4").model
    vae, _ = _apply(student.vae, "vae-encoder:0.5,separable-decoder")
    student = OneStepSR(student.transformer, vae, student.prompt_embeds, student.pooled_prompt_embeds,
                        replace(student.settings, vae_class=type(vae).__name__)).eval()
    lr = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = student(lr)
    student.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "student_config.json").read_text())["vae_class"] == "CompactAutoencoder"
    torch.save(lr, tmp_path / "lr.pt")
    script = (
        "import sys, torch\n"
        "from compress.models.student import OneStepSR\n"
        "m = OneStepSR.from_pretrained(sys.argv[1])\n"
        "assert type(m.vae).__name__ == 'CompactAutoencoder' and m.vae.config.decoder_separable\n"
        "with torch.no_grad():\n"
        "    torch.save(m(torch.load(sys.argv[2])), sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "model"), str(tmp_path / "lr.pt"),
                    str(tmp_path / "sr.pt")], check=True, cwd=ROOT, timeout=120)
    assert torch.equal(torch.load(tmp_path / "sr.pt"), expected)


# ------------------------------------------------------------------------------------------ one side at a time
@pytest.mark.parametrize("which,text,pruned,kept", [
    ("kl", "vae-encoder:0.5", "encoder", "decoder"),
    ("kl", "vae-decoder:0.5", "decoder", "encoder"),
    ("kl", "narrow-decoder:64", "decoder", "encoder"),
    ("quant_kl", "vae-encoder:0.5", "encoder", "decoder"),
    ("quant_kl", "narrow-decoder:8", "decoder", "encoder"),
])
@torch.no_grad()
def test_one_sided_pruning_leaves_the_other_side_bit_identical(which, text, pruned, kept, request):
    vae = request.getfixturevalue(which)
    slim, record = _apply(vae, text)
    assert isinstance(slim, CompactAutoencoder)
    untouched = (f"{kept}.", "quant_conv.", "post_quant_conv.")
    before, after = _side_state(vae, untouched), _side_state(slim, untouched)
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    widths = list(vae.config.block_out_channels)
    assert record[kept]["block_out_channels"] == widths
    assert sum(record[pruned]["block_out_channels"]) < sum(widths)
    assert slim.config.latent_channels == vae.config.latent_channels
    # the pruned side keeps some of the original filters (pruned, not re-initialised)
    original = getattr(vae, pruned).conv_in.weight
    rows = getattr(slim, pruned).conv_in.weight
    assert rows.shape[0] < original.shape[0]
    assert all(any(torch.equal(row, candidate) for candidate in original) for row in rows)
    image = _image(32, 48)
    latent = slim.encode(image).latent_dist.mode()
    assert latent.shape == vae.encode(image).latent_dist.mode().shape
    assert slim.decode(latent).sample.shape == image.shape


def test_encoder_then_decoder_steps_compose_on_a_compact_autoencoder(kl):
    encoder_only, _ = _apply(kl, "vae-encoder:0.5")
    both, record = apply_vae_step(encoder_only, parse_steps("vae-decoder:0.75")[0])
    assert record["encoder"]["block_out_channels"] == [16, 32, 64, 64]
    assert record["decoder"]["block_out_channels"] == [8, 16, 32, 32]
    encoder = _side_state(encoder_only, ("encoder.",))
    assert all(torch.equal(v, both.state_dict()[k]) for k, v in encoder.items())
    assert allowed_vae_ratios(kl, "encoder") == [0.25, 0.5, 0.75]
    assert allowed_vae_ratios(both, "encoder") == [0.5]  # two channels per group left in the first block
    assert allowed_vae_ratios(both, "decoder") == []  # one channel per group left in the first block


# ------------------------------------------------------------------------------------------ parameter counts
# Built-in VAE: 3,925,699 parameters before any step.
@pytest.mark.parametrize("text,expected", [
    ("vae-encoder:0.5", 2_817_651),
    ("vae-decoder:0.5", 2_106_819),
    ("vae:0.5", 998_771),
    ("vae-attn,vae-encoder:0.5,vae-decoder:0.5", 965_235),
    ("narrow-encoder:32,narrow-decoder:32", 382_051),
    ("separable-encoder", 2_717_187),
    ("separable-decoder", 1_874_147),
    ("vae-encoder:0.5,vae:0.5", None),
    ("narrow-decoder:64,vae-decoder:0.5,vae-attn,separable-decoder", None),
    ("vae-encoder:0.5,narrow-encoder:8,separable-encoder,separable-decoder", None),
])
def test_predicted_parameters_equal_the_real_ones(kl, text, expected):
    steps = parse_steps(text)
    predicted = predict_vae_params(kl, steps)
    slim, record = _apply(kl, text)
    assert predicted == _params(slim) == record["params"] < _params(kl)
    if expected is not None:
        assert predicted == expected
    json.dumps(record)  # goes into the prune report as it is
    assert record["class"] == ("AutoencoderKL" if text == "vae:0.5" else "CompactAutoencoder")
    with torch.no_grad():
        decoded = slim.decode(slim.encode(_image(16, 16)).latent_dist.mode()).sample
    assert decoded.shape == (1, 3, 16, 16) and torch.isfinite(decoded).all()


def test_attention_removal_works_on_a_compact_autoencoder(kl):
    compact, _ = _apply(kl, "vae-encoder:0.5")
    slim, record = apply_vae_step(compact, parse_steps("vae-attn")[0])
    assert not record["encoder"]["mid_block_attention"] and not record["decoder"]["mid_block_attention"]
    kept = slim.state_dict()
    original = compact.state_dict()
    assert set(kept) == {k for k in original if ".attentions." not in k}
    assert all(torch.equal(kept[k], original[k]) for k in kept)


# ------------------------------------------------------------------------------------------ separable convs
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
@torch.no_grad()
def test_rank1_init_is_exact_when_each_input_channel_kernel_is_rank1(stride, padding):
    g = torch.Generator().manual_seed(0)
    pointwise, depthwise = torch.randn(12, 6, generator=g), torch.randn(6, 3, 3, generator=g)
    dense = torch.nn.Conv2d(6, 12, 3, stride=stride, padding=padding)
    dense.weight.copy_(pointwise[:, :, None, None] * depthwise[None])
    separable = SeparableConv2d(6, 12, 3, stride, padding)
    d, p = rank1_separable(dense.weight)
    separable.depthwise.weight.copy_(d)
    separable.pointwise.weight.copy_(p)
    separable.pointwise.bias.copy_(dense.bias)
    x = torch.randn(2, 6, 17, 17, generator=g)
    assert torch.allclose(separable(x), dense(x), atol=1e-5)


@torch.no_grad()
def test_rank1_init_is_the_least_kernel_error_and_beats_a_random_init():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 8, 3, 3, generator=g)
    d, p = rank1_separable(weight)
    error = float((p * d.view(1, 8, 3, 3) - weight).norm())
    singular = torch.linalg.svdvals(weight.permute(1, 0, 2, 3).reshape(8, 16, 9))
    assert abs(error - float(singular[:, 1:].square().sum().sqrt())) < 1e-4  # Eckart-Young: the best rank-1 error
    torch.manual_seed(2)
    random = SeparableConv2d(8, 16)
    kernel = random.pointwise.weight * random.depthwise.weight.view(1, 8, 3, 3)
    assert error < float((kernel - weight).norm())


@torch.no_grad()
def test_separable_decoder_from_rank1_init_is_closer_to_the_original_than_a_random_one(kl):
    slim, record = _apply(kl, "separable-decoder")
    assert record["decoder"]["separable"] and not record["encoder"]["separable"]
    assert isinstance(slim.decoder.up_blocks[0].resnets[0].conv1, SeparableConv2d)
    assert type(slim.decoder.conv_in) is torch.nn.Conv2d and type(slim.decoder.conv_out) is torch.nn.Conv2d
    torch.manual_seed(0)
    random = CompactAutoencoder.from_config(slim.config).eval()
    state = {k: v for k, v in slim.state_dict().items() if ".depthwise." not in k and ".pointwise." not in k}
    random.load_state_dict(state, strict=False)
    latent = kl.encode(_image(32, 32)).latent_dist.mode()
    reference = kl.decode(latent).sample
    assert float((slim.decode(latent).sample - reference).abs().mean()) < \
        float((random.decode(latent).sample - reference).abs().mean())


# ------------------------------------------------------------------------------------------ tiled VAE
@torch.no_grad()
def test_tiled_vae_runs_a_compact_autoencoder_and_matches_untiled(kl):
    from compress.options import VAETiling
    from compress.tiled_vae import tiled_decode, tiled_encode

    slim, _ = _apply(kl, "narrow-encoder:32,separable-encoder,separable-decoder")  # explicit shortcuts, separable
    exact = VAETiling(tile=64, pad=64, always=True, statistics="whole")
    latent = torch.randn(1, 16, 8, 16, generator=torch.Generator().manual_seed(1))
    whole = slim.decode(latent).sample
    tiled = tiled_decode(slim, latent, exact)
    assert tiled.shape == whole.shape == (1, 3, 64, 128)
    mse = float(((tiled.clamp(-1, 1) - whole.clamp(-1, 1)) / 2).square().mean())
    assert mse < 1e-6, mse  # PSNR > 60 dB, as for a stock AutoencoderKL (tests/test_tiled_vae.py)
    image = _image(64, 128)
    mode = slim.encode(image).latent_dist.mode()
    rel = float((tiled_encode(slim, image, exact).mode() - mode).norm() / mode.norm())
    assert rel < 1e-3, rel


# ------------------------------------------------------------------------------------------ refused steps
@pytest.mark.parametrize("text,message", [
    ("vae-encoder:0.3", r"by 0\.25, 0\.5, 0\.75 only"),
    ("vae:0.6", r"by 0\.25, 0\.5, 0\.75 only"),
    ("narrow-decoder:12", r"multiple of the VAE's norm_num_groups = 8.*allowed: 8, 16, 24, 32"),
    ("narrow-encoder:4", r"allowed: 8, 16, 24, 32"),
    ("separable-encoder,vae-decoder:0.5", r"put vae-\*/narrow-\* steps before separable-\*"),
    ("separable-decoder,narrow-decoder:32", r"before separable"),
    ("vae-decoder:0.75,vae-decoder:0.5", r"allow no further uniform channel pruning"),
])
def test_impossible_steps_are_refused_before_any_work_naming_the_allowed_values(kl, text, message):
    steps = [parse_steps(item)[0] for item in text.split(",")]  # parse_steps itself refuses a repeated step
    error = vae_step_error(kl, steps)
    assert error is not None and re.search(message, error), error
    with pytest.raises(ValueError, match=message):
        predict_vae_params(kl, steps)
    vae = kl
    with pytest.raises(ValueError, match=message):
        for step in steps:
            vae, _ = apply_vae_step(vae, step)
    assert vae_step_error(kl, parse_steps("vae-encoder:0.25,narrow-decoder:16,separable-decoder")) is None
