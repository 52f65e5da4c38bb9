"""VAE slimming: channel pruning with Torch-Pruning and mid-block attention removal (TinySR Sec. 3.2).

Channel pruning traces encode -> mode -> decode through the whole `AutoencoderKL` so that Torch-Pruning sees
every coupling (skip convolutions, GroupNorm, the mid-block attention); the two `conv_out` layers are
excluded, so the latent space (its channels and scaling) and the image channels stay. GroupNorm keeps its
group count and loses channels evenly within groups. Torch-Pruning edits the convolutions but not the
attributes diffusers' blocks keep about their widths, so those are reset afterwards. Uniform pruning of the
encoder and the decoder together is a stock `AutoencoderKL` with narrower `block_out_channels`: the result
is rebuilt from that config and its weights load strictly, so the slimmed VAE saves and reloads like the
original (uneven or encoder-only widths need a class of their own; not done yet).

Attention removal rebuilds the VAE with `mid_block_add_attention=False` and copies every other weight: the
mid-block keeps its two ResNet blocks. Both steps are lossy; recovery (compress.prune.recover) distils the
slimmed VAE towards the original one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _diffusers_vae(vae: nn.Module):
    from diffusers import AutoencoderKL

    if not isinstance(vae, AutoencoderKL):
        from compress.prune.conditioning import UnsupportedGeometry

        raise UnsupportedGeometry(f"VAE slimming handles diffusers AutoencoderKL, got {type(vae).__name__}")
    return AutoencoderKL


class _RoundTrip(nn.Module):
    """encode -> posterior mode -> decode, the graph Torch-Pruning traces."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.vae.encode(image).latent_dist.mode()).sample


def channels_after(channels: int, groups: int, ratio: float) -> int:
    """Width Torch-Pruning leaves when it removes `ratio` of `channels` evenly across `groups` GroupNorm groups."""
    per_group = channels // groups
    return groups * (per_group - int(per_group * ratio))


def allowed_vae_ratios(vae: nn.Module) -> list[float]:
    """Ratios that remove the same whole number of channels from every GroupNorm group of every block.

    Only those give the uniform widths a stock `AutoencoderKL` config can describe (Torch-Pruning spreads
    other ratios unevenly, e.g. 89 of 128 channels).
    """
    groups = int(vae.config.norm_num_groups)
    per_group = [c // groups for c in vae.config.block_out_channels]
    smallest = min(per_group)
    return [k / smallest for k in range(1, smallest) if all((p * k) % smallest == 0 for p in per_group)]


def check_vae_ratio(vae: nn.Module, ratio: float) -> list[int]:
    """The block widths a `vae:ratio` step gives; raises naming the allowed ratios otherwise."""
    allowed = allowed_vae_ratios(vae)
    if not any(abs(ratio - a) < 1e-9 for a in allowed):
        listed = ", ".join(f"{a:g}" for a in allowed) or "none"
        raise ValueError(f"--steps vae:{ratio:g}: this VAE's GroupNorm groups allow uniform channel pruning by "
                         f"{listed} only (other ratios give uneven widths, which need a VAE format of its own)")
    groups = int(vae.config.norm_num_groups)
    return [channels_after(c, groups, ratio) for c in vae.config.block_out_channels]


def prune_vae_channels(vae: nn.Module, ratio: float, importance: str = "magnitude") -> nn.Module:
    """A new AutoencoderKL with `ratio` of every block's channels removed (encoder and decoder alike)."""
    import torch_pruning as tp
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    autoencoder = _diffusers_vae(vae)
    widths = check_vae_ratio(vae, ratio)
    if importance != "magnitude":
        raise ValueError("VAE channel importance is by magnitude (Taylor needs the VAE's own recovery loss)")
    work = copy.deepcopy(vae).float().requires_grad_(True)  # Torch-Pruning traces autograd: weights need grad
    side = 2 ** len(vae.config.block_out_channels) * 2
    example = torch.zeros(1, vae.config.in_channels, side, side)
    pruner = tp.pruner.MetaPruner(
        _RoundTrip(work), example_inputs=(example,), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=[work.encoder.conv_out, work.decoder.conv_out],
    )
    for group in pruner.step(interactive=True):
        group.prune()
    for module in work.modules():  # widths diffusers' blocks remember (Torch-Pruning only edits the layers)
        if isinstance(module, (Downsample2D, Upsample2D)) and getattr(module, "conv", None) is not None:
            module.channels, module.out_channels = module.conv.in_channels, module.conv.out_channels
        if isinstance(module, ResnetBlock2D):
            module.in_channels, module.out_channels = module.conv1.in_channels, module.conv2.out_channels
    config = {**_public(vae.config), "block_out_channels": widths}
    slim = autoencoder.from_config(config)
    state = work.state_dict()
    expected = slim.state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong or set(state) - set(expected):
        raise RuntimeError(f"pruned VAE does not match block_out_channels {widths}: {wrong[:4]}")
    slim.load_state_dict(state, strict=True)
    return _like(slim, vae)


def remove_vae_attention(vae: nn.Module) -> nn.Module:
    """The same AutoencoderKL without mid-block self-attention (encoder and decoder)."""
    autoencoder = _diffusers_vae(vae)
    if not vae.config.get("mid_block_add_attention", True):
        return vae
    slim = autoencoder.from_config({**_public(vae.config), "mid_block_add_attention": False})
    state = {k: v for k, v in vae.state_dict().items() if ".attentions." not in k}
    slim.load_state_dict(state, strict=True)
    return _like(slim, vae)


def _public(config) -> dict:
    """A diffusers config without its private keys: `_use_default_values` would reset the keys we change."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _like(model: nn.Module, reference: nn.Module) -> nn.Module:
    """`model` on `reference`'s device and dtype, frozen, in eval mode."""
    from compress.prune.conditioning import to_like

    return to_like(model, reference).eval().requires_grad_(False)


def predict_vae_params(vae: nn.Module, steps) -> int:
    """VAE parameters after the `vae:R` / `vae-attn` steps, from the config alone (meta device)."""
    config = _public(vae.config)
    for step in steps:
        if step.name == "vae":
            config["block_out_channels"] = [channels_after(c, int(config["norm_num_groups"]), step.ratio)
                                            for c in config["block_out_channels"]]
        elif step.name == "vae-attn":
            config["mid_block_add_attention"] = False
    autoencoder = _diffusers_vae(vae)
    with torch.device("meta"):
        model = autoencoder.from_config(config)
    return sum(p.numel() for p in model.parameters())
