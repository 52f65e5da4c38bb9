"""The TSD-SR one-step student as one module that owns its stages, and the project's own save/load format.

Forward pass (TSD-SR, Wu et al., CVPR 2025, Sec. 3 and the official `test/test_tsdsr.py`): LR in [0, 1]
-> pad to the network stride -> bicubic x4 -> [-1, 1] (`preprocess`) -> z_L = scaling * E(x) (`encode`;
posterior mode by default, TSD-SR samples it, unseeded) -> v = transformer(z_L, t = 1000, fixed prompt)
(`velocity`) -> z_H = z_L - v (flow matching, sigma = 1) -> D(z_H / scaling), clamped (`decode`) -> crop
and map back to [0, 1] (`postprocess`). The VAE shift factor is never applied, as in TSD-SR. TSD-SR pads the
upsampled image; here the LR image is padded (replicate) before upsampling, which changes only pixels of
the padded margin that `postprocess` crops away, and keeps padding out of exported graphs.

`preprocess`, `encode`, `velocity` and `decode` are the only way the toolkit reaches the two networks
(whole-image upscaling, evaluation, distillation, export), so a transformer or VAE of another class, a
pruned or slimmed one, drops in through the class registry below and `student_config.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.bicubic import bicubic_upsample
from compress.models.errors import ModelLoadError
from compress.models.preflight import check_format_version
from compress.options import VAETiling

from compress.models.layout import CONDITIONING_NAME, FORMAT_TAG, STUDENT_CONFIG_NAME, STUDENT_FORMAT_VERSION


@dataclass
class StudentSettings:
    """What, besides the two networks, defines the one-step student (stored as student_config.json)."""

    timestep: float = 1000.0
    upscale: int = 4
    latent_scaling_factor: float = 1.5305
    sample_posterior: bool = False
    transformer_class: str = "SD3Transformer2DModel"
    vae_class: str = "AutoencoderKL"
    description: str = ""


# Component classes a saved student may name in student_config.json, as "module:attribute" (imported on
# use). Compression code registers the classes it creates (pruned transformers, slimmed VAEs).
_COMPONENT_CLASSES: dict[str, dict[str, str | type]] = {
    "transformer": {
        "SD3Transformer2DModel": "diffusers:SD3Transformer2DModel",
        "CompactSD3Transformer": "compress.models.compact:CompactSD3Transformer",
    },
    "vae": {
        "AutoencoderKL": "diffusers:AutoencoderKL",
        "CompactAutoencoder": "compress.models.compact_vae:CompactAutoencoder",
    },
}


def register_component_class(kind: str, cls: type | str, name: str | None = None) -> None:
    """Make `cls` (a class, or "module:attribute") loadable as the student's `kind` ("transformer" or "vae")."""
    if kind not in _COMPONENT_CLASSES:
        raise ValueError(f"component kind must be one of {sorted(_COMPONENT_CLASSES)}, got {kind!r}")
    if name is None:
        name = cls.__name__ if isinstance(cls, type) else cls.rsplit(":", 1)[-1]
    _COMPONENT_CLASSES[kind][name] = cls


def component_class(kind: str, name: str) -> type:
    """The registered class called `name` for `kind`; unknown names raise KeyError listing the known ones."""
    known = _COMPONENT_CLASSES[kind]
    if name not in known:
        raise KeyError(f"unknown {kind} class {name!r}; known: {sorted(known)}")
    target = known[name]
    if isinstance(target, str):
        import importlib

        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        known[name] = target
    return target


class OneStepSR(nn.Module):
    """LR image -> 4x SR image in one transformer step at t = 1000 with a fixed (cached) prompt."""

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        settings: StudentSettings | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        self.settings = settings or StudentSettings(
            latent_scaling_factor=float(vae.config.scaling_factor),
            transformer_class=type(transformer).__name__,
            vae_class=type(vae).__name__,
        )
        # Constant conditioning travels with the module (device/dtype moves) but is saved on its own.
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("pooled_prompt_embeds", pooled_prompt_embeds, persistent=False)

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def vae_downsample(self) -> int:
        return vae_downsample_factor(self.vae)

    @property
    def pixel_multiple(self) -> int:
        """Side lengths (in upscaled pixels) the networks accept: VAE downsampling x patch size."""
        return self.vae_downsample * int(getattr(self.transformer.config, "patch_size", 1))

    @property
    def max_latent_side(self) -> int | None:
        """Largest latent side one transformer call accepts (SD3's position table), None if unbounded."""
        cfg = self.transformer.config
        if getattr(cfg, "pos_embed_max_size", None) is None:
            return None
        return int(cfg.pos_embed_max_size) * int(cfg.patch_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to_runtime(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "OneStepSR":
        """Move to device/dtype and switch to eval mode (dtype cast skipped when already float32)."""
        self.to(device)
        if dtype != self.dtype:
            self.to(dtype)
        return self.eval()

    # -- the stages ------------------------------------------------------------------------------------
    @property
    def lr_multiple(self) -> int:
        """Side lengths (in LR pixels) whose upscale is `pixel_multiple`-aligned: what `upsample` accepts."""
        multiple, scale = self.pixel_multiple, self.settings.upscale
        return multiple // math.gcd(multiple, scale)

    def pad_lr(self, lr: torch.Tensor) -> torch.Tensor:
        """Replicate-pad an LR batch bottom/right to `lr_multiple` (`postprocess` crops the output back).

        Padding happens before the upsampling, outside what export turns into a graph, so an exported
        graph takes exactly the sizes it declares and the runtime wrapper pads the same way as here.
        """
        return pad_to_multiple(lr, self.lr_multiple)

    def upsample(self, lr: torch.Tensor) -> torch.Tensor:
        """`lr_multiple`-aligned LR in [0, 1] -> bicubic x upscale in [-1, 1] (compress.models.bicubic: one
        convolution that PyTorch, ONNX and Core ML all run)."""
        lr = lr.to(device=self.device, dtype=self.dtype)
        upsampled = bicubic_upsample(lr, self.settings.upscale)
        if upsampled.requires_grad:
            return (upsampled * 2.0 - 1.0).clamp(-1.0, 1.0)
        return upsampled.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)  # in place: a 6000x4000 image is 288 MB a copy

    def preprocess(self, lr: torch.Tensor) -> torch.Tensor:
        """LR batch B x 3 x h x w in [0, 1] -> padded to `lr_multiple`, bicubic x4, in [-1, 1].

        The output is `pixel_multiple`-aligned; `postprocess` crops it back to 4h x 4w.
        """
        return self.upsample(self.pad_lr(lr))

    def encode(
        self,
        image: torch.Tensor,
        generator: torch.Generator | None = None,
        tiling: VAETiling | None = None,
        progress=None,
    ) -> torch.Tensor:
        """Image in [-1, 1] -> z_L = scaling * E(x) (mode, or a sample when settings.sample_posterior).

        With `tiling`, an image larger than `tiling.max_side` is encoded tile by tile in bounded memory
        (compress.tiled_vae); `progress(n)` is called as tiles finish.
        """
        if tiling is not None and tiling.applies(*image.shape[-2:]):
            from compress.tiled_vae import tiled_encode

            posterior = tiled_encode(self.vae, image, tiling, progress)
        else:
            posterior = self.vae.encode(image).latent_dist
        latent = posterior.sample(generator) if self.settings.sample_posterior else posterior.mode()
        return latent * self.settings.latent_scaling_factor

    def velocity(self, latent: torch.Tensor) -> torch.Tensor:
        """v = transformer(z; t = 1000, fixed prompt)."""
        batch = latent.shape[0]
        timestep = torch.full((batch,), self.settings.timestep, device=latent.device, dtype=latent.dtype)
        kwargs = {}
        if self.prompt_embeds is not None:
            kwargs["encoder_hidden_states"] = self.prompt_embeds.to(latent.dtype).expand(batch, -1, -1)
        if self.pooled_prompt_embeds is not None:
            kwargs["pooled_projections"] = self.pooled_prompt_embeds.to(latent.dtype).expand(batch, -1)
        return self.transformer(hidden_states=latent, timestep=timestep, return_dict=False, **kwargs)[0]

    def decode(self, latent: torch.Tensor, tiling: VAETiling | None = None, progress=None) -> torch.Tensor:
        """z_H -> image in [-1, 1] (clamped); tiled like `encode` when `tiling` says so."""
        scaled = latent / self.settings.latent_scaling_factor
        factor = self.vae_downsample
        if tiling is not None and tiling.applies(latent.shape[-2] * factor, latent.shape[-1] * factor):
            from compress.tiled_vae import tiled_decode

            return tiled_decode(self.vae, scaled, tiling, progress).clamp(-1.0, 1.0)
        return self.vae.decode(scaled).sample.clamp(-1.0, 1.0)

    def restore_latent(self, latent_lr: torch.Tensor) -> torch.Tensor:
        """One flow-matching Euler step from sigma = 1 to 0: z_H = z_L - v."""
        return latent_lr - self.velocity(latent_lr)

    def postprocess(self, image: torch.Tensor, lr_size: tuple[int, int]) -> torch.Tensor:
        """Decoded image in [-1, 1] -> [0, 1], cropped to 4x the LR size (undoes the stride padding)."""
        return crop_to_unit(image, lr_size, self.settings.upscale)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """LR batch B x 3 x h x w in [0, 1] -> SR batch B x 3 x 4h x 4w in [0, 1], no tiling.

        For large images and the colour fix use compress.pipeline.upscale_tensor.
        """
        sr = self.decode(self.restore_latent(self.encode(self.preprocess(lr))))
        return self.postprocess(sr, lr.shape[-2:])

    # -- persistence ----------------------------------------------------------------------------------
    def save_pretrained(self, path: Path | str, overwrite: bool = False) -> Path:
        """Write a self-contained folder (diffusers subfolders + conditioning + student_config.json).

        LoRA adapters must be merged first (merge_lora): the saved model is what runs, with no peft
        wrappers left. The folder appears only when completely written.
        """
        from safetensors.torch import save_file

        from compress.io import atomic_dir, write_json
        from compress.models.lora import has_lora

        if has_lora(self.transformer) or has_lora(self.vae):
            raise ValueError("merge the LoRA adapters (compress.models.lora.merge_lora) before save_pretrained")
        for kind, module in (("transformer", self.transformer), ("vae", self.vae)):
            name = type(module).__name__
            try:
                registered = component_class(kind, name)
            except KeyError:
                registered = None
            if registered is not type(module):  # the folder could not be loaded again
                raise ValueError(
                    f"{kind} class {type(module).__module__}.{name} is not registered; call "
                    f"compress.models.student.register_component_class({kind!r}, {name}) before save_pretrained"
                )
        path = Path(path)
        with atomic_dir(path, overwrite=overwrite) as tmp:
            self.transformer.save_pretrained(tmp / "transformer")
            self.vae.save_pretrained(tmp / "vae")
            conditioning = {}
            if self.prompt_embeds is not None:
                conditioning["prompt_embeds"] = self.prompt_embeds.detach().float().cpu().contiguous()
            if self.pooled_prompt_embeds is not None:
                conditioning["pooled_prompt_embeds"] = self.pooled_prompt_embeds.detach().float().cpu().contiguous()
            if conditioning:
                save_file(conditioning, str(tmp / CONDITIONING_NAME))
            payload = {"format": FORMAT_TAG, "version": STUDENT_FORMAT_VERSION, **asdict(self.settings)}
            payload["transformer_class"] = type(self.transformer).__name__
            payload["vae_class"] = type(self.vae).__name__
            write_json(tmp / STUDENT_CONFIG_NAME, payload)
        return path

    @classmethod
    def from_pretrained(
        cls, path: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "OneStepSR":
        """Load a folder written by save_pretrained; every missing or mismatching file is a clear error."""
        from compress.models.checks import load_diffusers_model
        from compress.models.lora import read_safetensors

        path = Path(path)
        config_path = path / STUDENT_CONFIG_NAME
        if not config_path.is_file():
            raise ModelLoadError(f"{path} is not a saved student: {STUDENT_CONFIG_NAME} not found in it")
        try:
            payload = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{config_path} is not valid JSON ({err}); the folder is damaged") from err
        if payload.get("format") != FORMAT_TAG:
            raise ModelLoadError(f"{config_path}: 'format' is {payload.get('format')!r}, expected {FORMAT_TAG!r}")
        check_format_version(config_path, payload.get("version"))
        fields = StudentSettings.__dataclass_fields__
        settings = StudentSettings(**{k: v for k, v in payload.items() if k in fields})
        classes = {}
        for kind, name in (("transformer", settings.transformer_class), ("vae", settings.vae_class)):
            try:
                classes[kind] = component_class(kind, name)
            except KeyError as err:
                raise ModelLoadError(f"{config_path}: {err.args[0]}") from None
        transformer = load_diffusers_model(classes["transformer"], path / "transformer")
        vae = load_diffusers_model(classes["vae"], path / "vae")
        prompt_embeds = pooled = None
        if (path / CONDITIONING_NAME).exists():
            conditioning = read_safetensors(path / CONDITIONING_NAME, "prompt conditioning")
            prompt_embeds = conditioning.get("prompt_embeds")
            pooled = conditioning.get("pooled_prompt_embeds")
        model = cls(transformer, vae, prompt_embeds, pooled, settings)
        return model.to_runtime(device, dtype)


def vae_downsample_factor(vae: nn.Module) -> int:
    """Pixels per latent pixel: 2^(encoder blocks - 1), from AutoencoderKL's `block_out_channels` or
    CompactAutoencoder's `encoder_block_out_channels` (its sides have widths of their own)."""
    config = vae.config
    widths = getattr(config, "encoder_block_out_channels", None) or config.block_out_channels
    return 2 ** (len(widths) - 1)


def crop_to_unit(image: torch.Tensor, lr_size: tuple[int, int], upscale: int) -> torch.Tensor:
    """A decoded image in [-1, 1] -> [0, 1], cropped to `upscale` x the LR size (the stride padding removed):
    the student's postprocess, shared with the runtimes that run its exported stages."""
    height, width = lr_size[0] * upscale, lr_size[1] * upscale
    cropped = image[..., :height, :width] + 1.0
    return cropped.div_(2.0) if not cropped.requires_grad else cropped / 2.0


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad bottom/right so H and W are multiples of `multiple` (cropped back by the caller)."""
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return image
    return F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
