"""The exported graphs: thin modules over the student's own stages (compress.models.student.OneStepSR).

Nothing here re-implements the model: each graph calls `upsample`, `encode`, `velocity` and `decode`, so a
pruned transformer or slimmed VAE exports exactly as it runs. Padding to the network stride stays outside
(compress.runtime pads with `OneStepSR.pad_lr`), so every graph takes every size it declares:

- `end_to_end`: LR B x 3 x h x w in [0, 1], h and w multiples of `lr_multiple` -> SR B x 3 x 4h x 4w in
  [0, 1] (bicubic, VAE encoder, one transformer step, VAE decoder; colour fix left to the app, as it needs
  the whole image);
- `upsample`: LR in [0, 1] -> bicubic x4 image in [-1, 1];
- `vae_encoder`: image in [-1, 1] (sides multiples of `pixel_multiple`) -> z_L = scaling * E(x) (mode);
- `transformer`: z_L -> velocity v (t = 1000 and the cached prompt are constants inside the graph);
- `vae_decoder`: z_H = z_L - v -> image in [-1, 1], clamped.
The components let an app tile the transformer over large latents as compress.pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.models.student import OneStepSR

GRAPH_NAMES = ("end_to_end", "upsample", "vae_encoder", "transformer", "vae_decoder")
COMPONENT_NAMES = GRAPH_NAMES[1:]


class EndToEnd(nn.Module):
    def __init__(self, student: OneStepSR):
        super().__init__()
        self.student = student

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        student = self.student
        latent = student.encode(student.upsample(lr))
        image = student.decode(latent - student.velocity(latent))
        return ((image + 1.0) * 0.5).clamp(0.0, 1.0)


class Upsample(nn.Module):
    def __init__(self, student: OneStepSR):
        super().__init__()
        self.student = student

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.student.upsample(lr)


class VAEEncoder(nn.Module):
    def __init__(self, student: OneStepSR):
        super().__init__()
        self.student = student

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.student.encode(image)


class Transformer(nn.Module):
    def __init__(self, student: OneStepSR):
        super().__init__()
        self.student = student

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.student.velocity(latent)


class VAEDecoder(nn.Module):
    def __init__(self, student: OneStepSR):
        super().__init__()
        self.student = student

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.student.decode(latent)


@dataclass(frozen=True)
class GraphSpec:
    """One graph: its module, input/output names, the axes that are dynamic and the side multiple."""

    name: str
    module: nn.Module
    input_name: str
    output_name: str
    multiple: int  # every input side must be a multiple of this
    example_side: int  # the example input's side (a multiple of `multiple`)
    channels: int


def graph_specs(student: OneStepSR, names=GRAPH_NAMES, lr_side: int = 16) -> list[GraphSpec]:
    """The graphs called `names`, with example inputs for an LR image of `lr_side` (rounded up to the multiple)."""
    scale, down = student.settings.upscale, student.vae_downsample
    lr_multiple, pixel_multiple = student.lr_multiple, student.pixel_multiple
    lr_side = -(-lr_side // lr_multiple) * lr_multiple
    latent_channels = int(student.vae.config.latent_channels)
    table = {
        "end_to_end": (EndToEnd, "lr", "sr", lr_multiple, lr_side, 3),
        "upsample": (Upsample, "lr", "image", lr_multiple, lr_side, 3),
        "vae_encoder": (VAEEncoder, "image", "latent", pixel_multiple, lr_side * scale, 3),
        "transformer": (Transformer, "latent", "velocity", pixel_multiple // down, lr_side * scale // down,
                        latent_channels),
        "vae_decoder": (VAEDecoder, "latent", "image", pixel_multiple // down, lr_side * scale // down,
                        latent_channels),
    }
    specs = []
    for name in names:
        cls, input_name, output_name, multiple, side, channels = table[name]
        specs.append(GraphSpec(name, cls(student).eval(), input_name, output_name, multiple, side, channels))
    return specs


def example_input(spec: GraphSpec, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A deterministic example input in the graph's range. Batch >= 2 and a non-square size keep the exporter
    from fixing the batch axis or tying height to width."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, spec.channels, spec.example_side, spec.example_side + spec.multiple)
    if spec.input_name == "lr":
        return torch.rand(shape, generator=generator, dtype=torch.float32).to(dtype)
    if spec.input_name == "image":
        return (torch.rand(shape, generator=generator) * 2 - 1).to(dtype)
    return torch.randn(shape, generator=generator).to(dtype)
