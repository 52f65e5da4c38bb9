"""VAE slimming steps (TinySR, Sun et al. 2025, Sec. 3.2), on the encoder and the decoder together or apart.

`apply_vae_step(vae, step)` is the one entry point of the prune recipe; `predict_vae_params` gives the exact
parameter count a list of steps leads to, from configs alone, and `vae_step_error` says before any work
why a list of steps cannot be done. The steps:

- `vae:R`: remove the fraction R of every block's channels, encoder and decoder alike. The result is a
  stock `AutoencoderKL` (narrower `block_out_channels`) when the input is one, so it saves and reloads as
  the original does.
- `vae-encoder:R` / `vae-decoder:R`: the same on one side only; the other side is left bit-identical.
- `narrow-encoder:W` / `narrow-decoder:W`: every block of that side gets W channels (blocks already at most
  W stay), TAESD-style: one small width throughout. The kept channels are the highest-magnitude ones;
  the recovery (compress.prune.recover) then distils the narrow side towards the original. Blocks that
  narrowing makes equally wide keep their trained 1x1 shortcut convolution (listed in the config).
- `vae-attn`: remove the mid-block self-attention of both sides; the mid-block keeps its two ResNet blocks.
- `separable-encoder` / `separable-decoder`: every 3x3 convolution of that side except conv_in and conv_out
  becomes depthwise 3x3 + pointwise 1x1, initialised by the best per-input-channel rank-1 factorisation of
  the dense kernel (`rank1_separable`). Channel pruning after it is refused (vae-*/narrow-* go before
  separable-*): channels are ranked on the dense filters, and the factorisation is then of the kernels
  that stay; pruning a separable side is not implemented.

Channel pruning (Torch-Pruning, magnitude importance) traces encode -> mode -> decode through the whole VAE
so that every coupling is seen (skip convolutions, GroupNorm, the mid-block attention); the two `conv_out`
layers, the quant convs and, for a one-sided step, every layer of the other side are excluded, so the latent
space (its channels and scaling) and the image channels stay. GroupNorm keeps its group count and loses
channels evenly within groups, so a ratio or width must leave whole channels per group in every block.
Torch-Pruning edits the layers but not the widths diffusers' blocks remember, so those are reset after.
Every result but a stock one is a `compress.models.compact_vae.CompactAutoencoder` (per-side, per-block
widths, attention and separable flags in its config), rebuilt from its config and loaded strictly, so
it saves and reloads like the original. All steps but an exact no-op are lossy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress.models.compact_vae import SIDES, CompactAutoencoder, separable_conv_names
from compress.prune.cli import VAE_STEPS, Step

CHANNEL_STEPS = ("vae", "vae-encoder", "vae-decoder", "narrow-encoder", "narrow-decoder")
ORDER_HINT = "put vae-*/narrow-* steps before separable-*"


def _diffusers_vae(vae: nn.Module):
    from diffusers import AutoencoderKL

    if not isinstance(vae, AutoencoderKL):
        from compress.prune.conditioning import UnsupportedGeometry

        raise UnsupportedGeometry(f"VAE slimming handles diffusers AutoencoderKL, got {type(vae).__name__}")
    return AutoencoderKL


def _is_compact(vae: nn.Module) -> bool:
    return isinstance(vae, CompactAutoencoder)


class _RoundTrip(nn.Module):
    """encode -> posterior mode -> decode, the graph Torch-Pruning traces."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.vae.encode(image).latent_dist.mode()).sample


# ----------------------------------------------------------------------------------------------------------
# Configs: every step as a change of a CompactAutoencoder config (what predict_vae_params and the checks use)
# ----------------------------------------------------------------------------------------------------------
def compact_config(vae: nn.Module) -> dict:
    """The CompactAutoencoder config describing `vae` (an AutoencoderKL or a CompactAutoencoder)."""
    if _is_compact(vae):
        return _public(vae.config)
    _diffusers_vae(vae)
    return CompactAutoencoder.config_from_autoencoder_kl(vae.config)


def _widths(config: dict, side: str) -> list[int]:
    return [int(c) for c in config[f"{side}_block_out_channels"]]


def _derived_shortcuts(side: str, widths: list[int]) -> list[str]:
    """diffusers' rule: a block's first ResNet has a 1x1 shortcut conv where the width changes."""
    order, prefix = (widths, "down_blocks") if side == "encoder" else (widths[::-1], "up_blocks")
    return [f"{prefix}.{i}.resnets.0" for i in range(1, len(order)) if order[i - 1] != order[i]]


def _with_widths(config: dict, side: str, widths: list[int]) -> dict:
    """`config` with new widths on `side`, keeping the shortcut convs it has (narrowing can equalise widths)."""
    shortcuts = config.get(f"{side}_conv_shortcuts")
    if shortcuts is None:
        shortcuts = _derived_shortcuts(side, _widths(config, side))
    derived = _derived_shortcuts(side, widths)
    explicit = None if set(shortcuts) == set(derived) else sorted(shortcuts)
    return {**config, f"{side}_block_out_channels": list(widths), f"{side}_conv_shortcuts": explicit}


def channels_after(channels: int, groups: int, ratio: float) -> int:
    """Width Torch-Pruning leaves when it removes `ratio` of `channels` evenly across `groups` GroupNorm groups."""
    per_group = channels // groups
    return groups * (per_group - int(per_group * ratio))


def _allowed_ratios(widths: list[int], groups: int) -> list[float]:
    per_group = [c // groups for c in widths]
    smallest = min(per_group)
    return [k / smallest for k in range(1, smallest) if all((p * k) % smallest == 0 for p in per_group)]


def allowed_vae_ratios(vae: nn.Module, side: str | None = None) -> list[float]:
    """Ratios that remove the same whole number of channels from every GroupNorm group of every block.

    `side` None: both sides (a `vae:R` step); "encoder" or "decoder": that side only. Only those ratios give
    widths a config can describe (Torch-Pruning spreads other ratios unevenly, e.g. 89 of 128 channels).
    """
    config = compact_config(vae)
    return _allowed_ratios(_side_widths(config, side), int(config["norm_num_groups"]))


def _side_widths(config: dict, side: str | None) -> list[int]:
    return [c for s in (SIDES if side is None else (side,)) for c in _widths(config, s)]


def _check_ratio(config: dict, side: str | None, ratio: float, label: str) -> None:
    allowed = _allowed_ratios(_side_widths(config, side), int(config["norm_num_groups"]))
    if not any(abs(ratio - a) < 1e-9 for a in allowed):
        where = "this VAE's" if side is None else f"this VAE {side}'s"
        allows = (f"allow uniform channel pruning by {', '.join(f'{a:g}' for a in allowed)} only" if allowed
                  else "allow no further uniform channel pruning")
        raise ValueError(f"--steps {label}: {where} GroupNorm groups {allows} (other ratios leave part of a channel "
                         f"per group in some block; widths {_side_widths(config, side)}, "
                         f"{config['norm_num_groups']} groups)")


def check_vae_ratio(vae: nn.Module, ratio: float) -> list[int]:
    """The block widths a `vae:ratio` step gives; raises naming the allowed ratios otherwise."""
    config = compact_config(vae)
    _check_ratio(config, None, ratio, f"vae:{ratio:g}")
    groups = int(config["norm_num_groups"])
    return [channels_after(c, groups, ratio) for c in _widths(config, "encoder")]


def _check_width(config: dict, width: int, label: str) -> None:
    groups = int(config["norm_num_groups"])
    if width < groups or width % groups:
        examples = ", ".join(str(groups * k) for k in range(1, 5))
        raise ValueError(f"--steps {label}: the width must be a multiple of the VAE's norm_num_groups = {groups} "
                         f"(GroupNorm keeps its groups); allowed: {examples}, ...")


def _side_of(name: str) -> str | None:
    return name.rsplit("-", 1)[1] if name.endswith(("-encoder", "-decoder")) else None


def _next_config(config: dict, step) -> dict:
    """The config after one step; ValueError (naming the allowed values) when the step cannot be done."""
    name, side = step.name, _side_of(step.name)
    groups = int(config["norm_num_groups"])
    if name in CHANNEL_STEPS:
        separable = [s for s in SIDES if config.get(f"{s}_separable")]
        if separable:
            raise ValueError(f"--steps {step}: the VAE {' and '.join(separable)} is already depthwise-separable and "
                             f"is not channel-pruned after that; {ORDER_HINT}")
    if name in ("vae", "vae-encoder", "vae-decoder"):
        _check_ratio(config, side, float(step.ratio), str(step))
        for s in SIDES if side is None else (side,):
            config = _with_widths(config, s, [channels_after(c, groups, float(step.ratio)) for c in _widths(config, s)])
        return config
    if name in ("narrow-encoder", "narrow-decoder"):
        width = int(step.ratio)
        if width != step.ratio:
            raise ValueError(f"--steps {step}: the width must be a whole number of channels")
        _check_width(config, width, str(step))
        return _with_widths(config, side, [min(c, width) for c in _widths(config, side)])
    if name == "vae-attn":
        return {**config, "encoder_mid_block_attention": False, "decoder_mid_block_attention": False}
    if name in ("separable-encoder", "separable-decoder"):
        return {**config, f"{side}_separable": True}
    raise ValueError(f"--steps {step}: not a VAE step; VAE steps are {', '.join(VAE_STEPS)}")


def plan_vae_configs(vae: nn.Module, steps) -> list[dict]:
    """CompactAutoencoder configs after each VAE step of `steps` (others are skipped); ValueError if impossible."""
    config = compact_config(vae)
    configs = []
    for step in steps:
        if step.name in VAE_STEPS:
            config = _next_config(config, step)
            configs.append(config)
    return configs


def vae_step_error(vae: nn.Module, steps) -> str | None:
    """Why `steps` cannot be applied to `vae` (bad ratio, bad width, pruning after separable), or None."""
    try:
        plan_vae_configs(vae, steps)
    except ValueError as err:
        return str(err)
    return None


def predict_vae_params(vae: nn.Module, steps) -> int:
    """Exact VAE parameter count after the VAE steps of `steps`, from configs alone (meta device, no weights)."""
    configs = plan_vae_configs(vae, steps)
    if not configs:
        return sum(p.numel() for p in vae.parameters())
    with torch.device("meta"):
        model = CompactAutoencoder.from_config(configs[-1])
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# The steps on weights
# ----------------------------------------------------------------------------------------------------------
def apply_vae_step(vae: nn.Module, step) -> tuple[nn.Module, dict]:
    """(the VAE after `step`, a JSON-ready record of the result: class, parameters, each side's structure).

    The input is not modified. `vae:R` and `vae-attn` on an AutoencoderKL give an AutoencoderKL; every other
    result is a CompactAutoencoder. Impossible steps raise ValueError before any work.
    """
    name, side = step.name, _side_of(step.name)
    target = _next_config(compact_config(vae), step)  # checks first
    if name == "vae":
        slim = prune_vae_channels(vae, float(step.ratio))
    elif name in CHANNEL_STEPS:
        slim = _prune_channels(vae, target, (side,))
    elif name == "vae-attn":
        slim = remove_vae_attention(vae)
    else:
        slim = make_separable(vae, side)
    return slim, describe_vae(slim)


def describe_vae(vae: nn.Module) -> dict:
    """Class, parameter count and per-side structure (widths, mid-block attention, separable) of a VAE."""
    config = compact_config(vae)
    record = {"class": type(vae).__name__, "params": sum(p.numel() for p in vae.parameters())}
    for side in SIDES:
        record[side] = {
            "block_out_channels": _widths(config, side),
            "mid_block_attention": bool(config[f"{side}_mid_block_attention"]),
            "separable": bool(config[f"{side}_separable"]),
        }
    return record


def prune_vae_channels(vae: nn.Module, ratio: float, importance: str = "magnitude") -> nn.Module:
    """A new VAE with `ratio` of every block's channels removed (encoder and decoder alike).

    An AutoencoderKL gives an AutoencoderKL (narrower `block_out_channels`), a CompactAutoencoder one of its kind.
    """
    if importance != "magnitude":
        raise ValueError("VAE channel importance is by magnitude (Taylor needs the VAE's own recovery loss)")
    config = compact_config(vae)
    target = _next_config(config, Step("vae", ratio))
    return _prune_channels(vae, target, SIDES, stock=not _is_compact(vae))


def _out_channels(module: nn.Module) -> int | None:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return None


def _prune_channels(vae: nn.Module, target: dict, sides: tuple[str, ...], stock: bool = False) -> nn.Module:
    """`vae` channel-pruned on `sides` to the widths of `target` (a CompactAutoencoder config), magnitude-ranked.

    Every layer gets the pruning ratio that takes its original width c to the target width of the blocks of
    width c (widths map block by block; equal widths stay equal), so Torch-Pruning ranks each coupled group
    of channels on its own and keeps its highest-magnitude channels, the same in every GroupNorm group.
    """
    import torch_pruning as tp
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    source = compact_config(vae)
    width_map: dict[str, dict[int, int]] = {}
    for side in sides:
        pairs = set(zip(_widths(source, side), _widths(target, side)))
        width_map[side] = dict(pairs)
        if len(width_map[side]) != len(pairs):
            raise RuntimeError(f"{side} widths {_widths(source, side)} -> {_widths(target, side)} do not map width to width")
    work = copy.deepcopy(vae).float().requires_grad_(True)  # Torch-Pruning traces autograd: weights need grad
    ignored = [work.encoder.conv_out, work.decoder.conv_out]  # the latent and the image channels stay
    ignored += [m for m in (work.quant_conv, work.post_quant_conv) if m is not None]
    ignored += [getattr(work, side) for side in SIDES if side not in sides]  # a one-sided step: bit-identical other side
    skip = {id(m) for layer in ignored for m in layer.modules()}
    ratios = {}
    for side in sides:
        for path, module in getattr(work, side).named_modules():
            channels = _out_channels(module)
            if channels is None or id(module) in skip:
                continue
            if channels not in width_map[side]:
                raise RuntimeError(f"{side}.{path} has {channels} output channels, not a block width of "
                                   f"{_widths(source, side)}; this VAE layout is not handled")
            kept = width_map[side][channels]
            if kept < channels:
                # Torch-Pruning keeps int(per_group * (1 - ratio)) channels per GroupNorm group: half a channel
                # of slack makes that exactly kept / groups despite float rounding.
                ratios[module] = 1.0 - (kept + 0.5) / channels
    if ratios:
        side_px = 2 ** len(source["down_block_types"]) * 2
        example = torch.zeros(1, source["in_channels"], side_px, side_px, device=next(work.parameters()).device)
        with torch.enable_grad():  # Torch-Pruning traces autograd, also when called under no_grad
            pruner = tp.pruner.MetaPruner(
                _RoundTrip(work), example_inputs=(example,), importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=0.0, pruning_ratio_dict=ratios, ignored_layers=ignored,
            )
            for group in pruner.step(interactive=True):
                group.prune()
    for module in work.modules():  # widths diffusers' blocks remember (Torch-Pruning only edits the layers)
        if isinstance(module, (Downsample2D, Upsample2D)) and getattr(module, "conv", None) is not None:
            module.channels, module.out_channels = module.conv.in_channels, module.conv.out_channels
        if isinstance(module, ResnetBlock2D):
            module.in_channels, module.out_channels = module.conv1.in_channels, module.conv2.out_channels
    if stock:
        autoencoder = _diffusers_vae(vae)
        slim = autoencoder.from_config({**_public(vae.config), "block_out_channels": _widths(target, "encoder")})
    else:
        slim = CompactAutoencoder.from_config(target)
    state = work.state_dict()
    expected = slim.state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong or set(state) - set(expected):
        raise RuntimeError(f"pruned VAE does not match the widths {_widths(target, 'encoder')} (encoder), "
                           f"{_widths(target, 'decoder')} (decoder): {wrong[:4]}")
    slim.load_state_dict(state, strict=True)
    return _like(slim, vae)


def remove_vae_attention(vae: nn.Module) -> nn.Module:
    """The same VAE without mid-block self-attention (encoder and decoder); an AutoencoderKL stays one."""
    if _is_compact(vae):
        config = compact_config(vae)
        if not (config["encoder_mid_block_attention"] or config["decoder_mid_block_attention"]):
            return vae
        slim = CompactAutoencoder.from_config(_next_config(config, Step("vae-attn")))
    else:
        autoencoder = _diffusers_vae(vae)
        if not vae.config.get("mid_block_add_attention", True):
            return vae
        slim = autoencoder.from_config({**_public(vae.config), "mid_block_add_attention": False})
    state = {k: v for k, v in vae.state_dict().items() if ".attentions." not in k}
    slim.load_state_dict(state, strict=True)
    return _like(slim, vae)


def rank1_separable(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense kernel O x I x k x k -> (depthwise I x 1 x k x k, pointwise O x I x 1 x 1), the best such pair.

    Depthwise-then-pointwise computes the dense kernel K[o, i] = P[o, i] * D[i]: for every input channel i
    the O x k^2 matrix W[:, i].reshape(O, k^2) is replaced by a rank-1 one. The closest rank-1 matrix in the
    Frobenius norm (Eckart-Young) is s0 * u0 v0^T from its SVD, so pointwise[:, i] = s0 * u0 and
    depthwise[i] = v0: exact when the dense kernel is rank-1 per input channel, the least kernel error
    otherwise.

    v0 is taken as the top eigenvector of the k^2 x k^2 Gram matrix M^T M and s0 * u0 = M v0 (the same
    triple as the SVD's): batched eigh of 9 x 9 matrices, in float64, is ~100x faster on CPU than batched
    SVD of the tall O x 9 ones.
    """
    out_channels, in_channels, kh, kw = weight.shape
    matrices = weight.detach().double().permute(1, 0, 2, 3).reshape(in_channels, out_channels, kh * kw)
    _, vectors = torch.linalg.eigh(matrices.transpose(1, 2) @ matrices)  # ascending eigenvalues
    top = vectors[:, :, -1]  # v0 per input channel, unit norm
    scaled = (matrices @ top.unsqueeze(-1)).squeeze(-1)  # s0 * u0 per input channel: I x O
    pointwise = scaled.transpose(0, 1).reshape(out_channels, in_channels, 1, 1)
    depthwise = top.reshape(in_channels, 1, kh, kw)
    return depthwise.to(weight.dtype).contiguous(), pointwise.to(weight.dtype).contiguous()


def make_separable(vae: nn.Module, side: str) -> nn.Module:
    """A CompactAutoencoder whose `side` has depthwise-separable 3x3 convs (rank-1 initialised); the rest copied."""
    config = compact_config(vae)
    if config[f"{side}_separable"]:
        return vae
    slim = CompactAutoencoder.from_config(_next_config(config, Step(f"separable-{side}")))
    state = dict(vae.state_dict())
    for name in separable_conv_names(getattr(vae, side)):
        prefix = f"{side}.{name}"
        depthwise, pointwise = rank1_separable(state.pop(f"{prefix}.weight"))
        state[f"{prefix}.depthwise.weight"] = depthwise
        state[f"{prefix}.pointwise.weight"] = pointwise
        if f"{prefix}.bias" in state:
            state[f"{prefix}.pointwise.bias"] = state.pop(f"{prefix}.bias")
    slim.load_state_dict(state, strict=True)
    return _like(slim, vae)


def _public(config) -> dict:
    """A diffusers config without its private keys: `_use_default_values` would reset the keys we change."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _like(model: nn.Module, reference: nn.Module) -> nn.Module:
    """`model` on `reference`'s device and dtype, frozen, in eval mode."""
    from compress.prune.conditioning import to_like

    return to_like(model, reference).eval().requires_grad_(False)
