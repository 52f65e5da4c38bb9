"""The synchronised tiled VAE must reproduce the untiled VAE, not just look seamless."""

import pytest
import torch

from compress.models.presets import build_random_components, get_preset
from compress.quality.fidelity import psnr
from compress.tiled_vae import plan_tiles, tiled_decode, tiled_encode


@pytest.fixture(scope="module")
def vae():
    _, vae, *_ = build_random_components(get_preset("tiny"), seed=3)
    return vae.eval()


def _image(height: int, width: int) -> torch.Tensor:
    """A smooth-plus-texture test image in [-1, 1] (deterministic)."""
    g = torch.Generator().manual_seed(0)
    ys = torch.linspace(0, 6.28, height)[:, None]
    xs = torch.linspace(0, 6.28, width)[None, :]
    base = torch.stack([torch.sin(ys * (c + 1)) * torch.cos(xs * (2 - c)) for c in range(3)])
    noise = torch.nn.functional.avg_pool2d(torch.rand(3, height, width, generator=g)[None], 3, 1, 1)[0]
    return (0.6 * base + 0.8 * (noise - 0.5)).clamp(-1, 1)[None]


def test_plan_tiles_partition_the_image():
    boxes = plan_tiles(200, 136, core=64, pad=16, align=8)
    covered = torch.zeros(200, 136, dtype=torch.int32)
    for b in boxes:
        covered[b.top + b.core_top : b.top + b.core_bottom, b.left + b.core_left : b.left + b.core_right] += 1
        assert b.top >= 0 and b.bottom <= 200 and b.left >= 0 and b.right <= 136
    assert bool((covered == 1).all()), "cores must cover every pixel exactly once"
    with pytest.raises(ValueError, match="multiples of 8"):
        plan_tiles(64, 64, core=60, pad=16, align=8)


@torch.no_grad()
def test_tiled_decode_matches_untiled(vae):
    latent = torch.randn(1, 16, 40, 56, generator=torch.Generator().manual_seed(1))
    whole = vae.decode(latent).sample
    tiled = tiled_decode(vae, latent, tile=16, pad=8)
    assert tiled.shape == whole.shape
    value = float(psnr((tiled.clamp(-1, 1) + 1) / 2, (whole.clamp(-1, 1) + 1) / 2))
    print(f"PSNR(tiled decode, untiled decode) = {value:.2f} dB")
    assert value > 40.0, value


@torch.no_grad()
def test_tiled_encode_matches_untiled(vae):
    image = _image(320, 448)
    whole = vae.encode(image).latent_dist.mode()
    tiled = tiled_encode(vae, image, tile=128, pad=64).mode()
    assert tiled.shape == whole.shape
    rel = float((tiled - whole).norm() / whole.norm())
    print(f"relative L2 error of the tiled posterior mode = {rel:.2e}")
    assert rel < 1e-2, rel


def test_tiled_vae_keeps_gradients_and_restores_layers(vae):
    latent = torch.randn(1, 16, 24, 24, requires_grad=True)
    out = tiled_decode(vae, latent, tile=16, pad=8)
    out.mean().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    # The patched GroupNorm forwards and attention processors are gone afterwards.
    assert all("forward" not in vars(m) for m in vae.modules() if isinstance(m, torch.nn.GroupNorm))
    before = vae.decode(latent.detach()).sample
    assert torch.equal(before, vae.decode(latent.detach()).sample)


def test_a_failing_tile_raises_instead_of_hanging(vae):
    latent = torch.randn(1, 15, 24, 24)  # wrong channel count: every tile fails in conv_in
    with pytest.raises(RuntimeError):
        tiled_decode(vae, latent, tile=16, pad=8)
