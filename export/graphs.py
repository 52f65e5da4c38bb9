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


# The student's submodules that make up each component; `with_precisions` casts them as one.
COMPONENT_MODULES = {
    "vae_encoder": ("vae.encoder", "vae.quant_conv"),
    "transformer": ("transformer",),
    "vae_decoder": ("vae.decoder", "vae.post_quant_conv"),
}
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def with_precisions(student: OneStepSR, precisions: dict[str, str]) -> OneStepSR:
    """A copy of `student` whose components run at the given precisions ("fp16"/"fp32"; others fp32).

    Mixed precision is decided here, in PyTorch, and traced: casts sit only at component boundaries, so a
    component kept in fp32 never sees an fp16 value inside it (converting a traced fp32 graph with a node
    block list casts between every pair of blocked nodes, which overflows all the same)."""
    import copy

    mixed = copy.deepcopy(student)
    for component, paths in COMPONENT_MODULES.items():
        dtype = PRECISION_DTYPES[precisions.get(component, "fp32")]
        for path in paths:
            module = getattr(mixed.vae, path.split(".", 1)[1], None) if path.startswith("vae.") else mixed.transformer
            if module is not None:
                module.to(dtype)
    return mixed


def component_dtype(student: OneStepSR, component: str) -> torch.dtype:
    first = COMPONENT_MODULES[component][0]
    module = student.transformer if first == "transformer" else getattr(student.vae, first.split(".", 1)[1])
    return next(module.parameters()).dtype


class _Graph(nn.Module):
    """Inputs and outputs are float32 whatever the precision inside (apps feed and read float32)."""

    def __init__(self, student: OneStepSR):
        super().__init__()
        self.student = student
        self.dtypes = {name: component_dtype(student, name) for name in COMPONENT_MODULES}


class EndToEnd(_Graph):
    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        student, dtypes = self.student, self.dtypes
        image = student.upsample(lr)  # at the transformer's precision (the student's dtype)
        latent = student.encode(image.to(dtypes["vae_encoder"])).float()
        velocity = student.velocity(latent.to(dtypes["transformer"])).float()
        image = student.decode((latent - velocity).to(dtypes["vae_decoder"])).float()
        return ((image + 1.0) * 0.5).clamp(0.0, 1.0)


class Upsample(_Graph):
    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.student.upsample(lr).float()


class VAEEncoder(_Graph):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.student.encode(image.to(self.dtypes["vae_encoder"])).float()


class Transformer(_Graph):
    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.student.velocity(latent.to(self.dtypes["transformer"])).float()


class VAEDecoder(_Graph):
    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.student.decode(latent.to(self.dtypes["vae_decoder"])).float()


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


def example_input(spec: GraphSpec, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic example input in the graph's range. Batch >= 2 and a non-square size keep the exporter
    from fixing the batch axis or tying height to width."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, spec.channels, spec.example_side, spec.example_side + spec.multiple)
    if spec.input_name == "lr":
        return torch.rand(shape, generator=generator)
    if spec.input_name == "image":
        return torch.rand(shape, generator=generator) * 2 - 1
    return torch.randn(shape, generator=generator)
