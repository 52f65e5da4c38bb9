"""A slimmed VAE whose encoder and decoder have structures of their own: `CompactAutoencoder`.

VAE slimming (TinySR, Sun et al. 2025, Sec. 3.2; compress.prune.vae) narrows the encoder and the decoder
separately, per block, drops mid-block attention and makes 3x3 convolutions depthwise-separable, in the
style of TAESD's small autoencoders. diffusers' `AutoencoderKL` has one `block_out_channels` for both
sides, so such a VAE needs a class of its own. `CompactAutoencoder` keeps AutoencoderKL's latent space
(latent channels, scaling and shift factors, quant convs) and its interface (`encode(x).latent_dist`,
`decode(z).sample`, `encoder`, `decoder`, `quant_conv`, `post_quant_conv`) and describes each side in its
config:

- `encoder_block_out_channels` / `decoder_block_out_channels`: one width per block, in diffusers' order
  (index 0 is the full-resolution block on both sides: the encoder's first block, the decoder's last);
- `encoder_mid_block_attention` / `decoder_mid_block_attention`: whether the mid-block has self-attention;
- `encoder_separable` / `decoder_separable`: every 3x3 convolution of that side except `conv_in` and
  `conv_out` is a depthwise 3x3 (groups = in_channels, same stride and padding) followed by a pointwise 1x1;
- `encoder_conv_shortcuts` / `decoder_conv_shortcuts`: paths (within the side) of the ResNet blocks with a 1x1
  shortcut convolution, or None for diffusers' rule (where the block changes width). Narrowing can make a
  block's input and output widths equal while its trained shortcut convolution stays, hence the list.

Both sides are diffusers' own `Encoder` / `Decoder`, so module names match AutoencoderKL's: an
AutoencoderKL's state dict loads strictly into a CompactAutoencoder with the same widths (`from_autoencoder_kl`),
and compress.tiled_vae walks either. The model is built from its config before the weights load, so
diffusers' `save_pretrained` / `from_pretrained` round-trip it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import (
    Decoder,
    DecoderOutput,
    DiagonalGaussianDistribution,
    Encoder,
)
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

SIDES = ("encoder", "decoder")


class SeparableConv2d(nn.Module):
    """Depthwise k x k (one filter per input channel, the dense conv's stride/padding) -> pointwise 1x1 (with the bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1, bias: bool = True):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride=stride, padding=padding,
                                   groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    @property
    def in_channels(self) -> int:
        return self.depthwise.in_channels

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def separable_conv_names(side: nn.Module) -> list[str]:
    """Paths (within an Encoder/Decoder) of the dense 3x3 convolutions a separable side replaces.

    conv_in and conv_out stay dense: they touch the image or the latent, and are a small part of the cost.
    """
    names = []
    for name, module in side.named_modules():
        if (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.groups == 1
                and name not in ("conv_in", "conv_out")):
            names.append(name)
    return names


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def conv_shortcut_paths(side: nn.Module) -> list[str]:
    """Paths (within an Encoder/Decoder) of the ResNet blocks that have a 1x1 shortcut convolution."""
    from diffusers.models.resnet import ResnetBlock2D

    return [name for name, m in side.named_modules() if isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None]


def _set_conv_shortcuts(side: nn.Module, paths: list[str]) -> None:
    """Give exactly the ResNet blocks at `paths` a 1x1 shortcut conv (diffusers' default places one where widths change)."""
    from diffusers.models.resnet import ResnetBlock2D

    wanted = set(paths)
    resnets = {name: m for name, m in side.named_modules() if isinstance(m, ResnetBlock2D)}
    unknown = sorted(wanted - set(resnets))
    if unknown:
        raise ValueError(f"conv_shortcuts names blocks that do not exist: {unknown}")
    for name, block in resnets.items():
        if name in wanted and block.conv_shortcut is None:
            block.conv_shortcut = nn.Conv2d(block.in_channels, block.out_channels, 1)
            block.use_in_shortcut = True
        elif name not in wanted and block.conv_shortcut is not None:
            if block.in_channels != block.out_channels:
                raise ValueError(f"{name} changes width {block.in_channels} -> {block.out_channels}: it needs its "
                                 "shortcut convolution")
            block.conv_shortcut = None
            block.use_in_shortcut = False


class CompactAutoencoder(ModelMixin, ConfigMixin):
    """AutoencoderKL's latent space and interface with per-side widths, attention and separable convolutions."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        encoder_block_out_channels: tuple[int, ...] = (64,),
        decoder_block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        encoder_mid_block_attention: bool = True,
        decoder_mid_block_attention: bool = True,
        encoder_separable: bool = False,
        decoder_separable: bool = False,
        encoder_conv_shortcuts: list[str] | None = None,
        decoder_conv_shortcuts: list[str] | None = None,
    ):
        super().__init__()
        for side, widths, types in (("encoder", encoder_block_out_channels, down_block_types),
                                    ("decoder", decoder_block_out_channels, up_block_types)):
            if len(widths) != len(types):
                raise ValueError(f"{side}_block_out_channels has {len(widths)} widths for {len(types)} blocks")
            bad = [w for w in widths if w < 1 or w % norm_num_groups]
            if bad:
                raise ValueError(f"{side}_block_out_channels {list(widths)}: every width must be a positive multiple "
                                 f"of norm_num_groups = {norm_num_groups}")
        self.encoder = Encoder(
            in_channels=in_channels, out_channels=latent_channels, down_block_types=tuple(down_block_types),
            block_out_channels=tuple(encoder_block_out_channels), layers_per_block=layers_per_block, act_fn=act_fn,
            norm_num_groups=norm_num_groups, double_z=True, mid_block_add_attention=encoder_mid_block_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels, out_channels=out_channels, up_block_types=tuple(up_block_types),
            block_out_channels=tuple(decoder_block_out_channels), layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups, act_fn=act_fn, mid_block_add_attention=decoder_mid_block_attention,
        )
        for side, shortcuts, separable in ((self.encoder, encoder_conv_shortcuts, encoder_separable),
                                           (self.decoder, decoder_conv_shortcuts, decoder_separable)):
            if shortcuts is not None:
                _set_conv_shortcuts(side, list(shortcuts))
            if separable:
                for name in separable_conv_names(side):
                    dense = side.get_submodule(name)
                    _replace(side, name, SeparableConv2d(dense.in_channels, dense.out_channels, dense.kernel_size,
                                                         dense.stride, dense.padding, bias=dense.bias is not None))
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False  # diffusers' own tiling is not provided; compress.tiled_vae tiles this class

    @classmethod
    def config_from_autoencoder_kl(cls, config) -> dict:
        """The CompactAutoencoder config with an AutoencoderKL config's structure (both sides alike)."""
        config = dict(config)
        widths = list(config["block_out_channels"])
        attention = bool(config.get("mid_block_add_attention", True))
        keep = ("in_channels", "out_channels", "down_block_types", "up_block_types", "layers_per_block", "act_fn",
                "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "shift_factor",
                "latents_mean", "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv")
        return {
            **{k: config[k] for k in keep if k in config},
            "encoder_block_out_channels": widths, "decoder_block_out_channels": list(widths),
            "encoder_mid_block_attention": attention, "decoder_mid_block_attention": attention,
            "encoder_separable": False, "decoder_separable": False,
            "encoder_conv_shortcuts": None, "decoder_conv_shortcuts": None,
        }

    @classmethod
    def from_autoencoder_kl(cls, vae: nn.Module) -> CompactAutoencoder:
        """The same network as an AutoencoderKL (weights copied, strict): identical encode/decode outputs."""
        compact = cls.from_config(cls.config_from_autoencoder_kl(vae.config))
        compact.load_state_dict(vae.state_dict(), strict=True)
        parameter = next(vae.parameters())
        return compact.to(device=parameter.device, dtype=parameter.dtype).train(vae.training)

    # -- AutoencoderKL's interface ------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images -> posterior (`AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)`)."""
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(part) for part in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents -> images (`DecoderOutput(sample=...)`)."""
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(part) for part in z.split(1)])
        else:
            decoded = self._decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)
