"""An exported ONNX artifact run by ONNX Runtime behind the student's stages (`compress upscale --model DIR`).

`OnnxStudent` answers to what compress.pipeline.upscale_tensor asks of a student. With the component
graphs (export `--components`) it offers the stages (`preprocess`, `encode`, `velocity`, `decode`,
`postprocess`), so the transformer is tiled over large latents as in PyTorch; the VAE runs whole (its
bounded-memory tiling walks PyTorch modules). With only the end-to-end graph it runs that graph on the
whole image. Padding to the graphs' side multiple and cropping back happen here, with the student's own
`pad_to_multiple`, so every size works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress.models.errors import ModelLoadError
from compress.models.student import crop_to_unit, pad_to_multiple
from compress.runtime.manifest import read_manifest

COMPONENTS = ("upsample", "vae_encoder", "transformer", "vae_decoder")


@dataclass
class RuntimeSettings:
    """The part of StudentSettings a runtime needs (the rest is inside the graphs)."""

    upscale: int
    sample_posterior: bool = False


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    return options


def open_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session for `path`; a damaged file is a ModelLoadError naming it."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({str(err).splitlines()[0]}); export it again") from None


class OnnxStudent:
    """A saved ONNX artifact with the interface of compress.models.student.OneStepSR that pipelines use."""

    def __init__(self, folder: Path | str, threads: int | None = None, graphs: tuple[str, ...] | None = None,
                 manifest: dict | None = None):
        """`manifest`: use this one instead of reading folder/manifest.json (export validates before writing it)."""
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        if self.manifest["runtime"] != "onnx":
            raise ModelLoadError(
                f"{self.folder} is a {self.manifest['runtime']} artifact; only ONNX artifacts run here "
                "(Core ML packages run on macOS devices)"
            )
        geometry = self.manifest["student"]
        self.settings = RuntimeSettings(upscale=int(geometry["upscale"]))
        self.lr_multiple = int(geometry["lr_multiple"])
        self.pixel_multiple = int(geometry["pixel_multiple"])
        self.vae_downsample = int(geometry["vae_downsample"])
        self.max_latent_side = geometry.get("max_latent_side")
        self.threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None
        available = self.manifest["graphs"]
        wanted = graphs or tuple(available)
        self.sessions = {}
        for name in wanted:
            if name not in available:
                raise ModelLoadError(f"{self.folder}: the artifact has no {name!r} graph (it has {sorted(available)})")
            self.sessions[name] = open_session(self.folder / available[name]["file"], self.threads)
        self.has_stages = all(name in self.sessions for name in COMPONENTS)
        if not self.has_stages and "end_to_end" not in self.sessions:
            raise ModelLoadError(f"{self.folder}: neither an end_to_end graph nor all of {COMPONENTS}")
        self.supports_vae_tiling = False
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    @property
    def precision(self) -> str:
        return ",".join(sorted({g["precision"] for g in self.manifest["graphs"].values()}))

    def describe(self) -> str:
        graphs = "components" if self.has_stages else "end-to-end graph"
        return (f"ONNX artifact {self.folder} ({graphs}, {self.precision}; ONNX Runtime CPU, "
                f"{self.threads or 'default'} threads)")

    def run(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """One graph on a float32 batch; a side that is not the graph's multiple is refused before ORT sees it."""
        multiple = int(self.manifest["graphs"][name]["multiple"])
        if tensor.shape[-2] % multiple or tensor.shape[-1] % multiple:
            raise ValueError(f"graph {name!r} takes sides that are multiples of {multiple}, got "
                             f"{tensor.shape[-2]}x{tensor.shape[-1]}; pad first (OnnxStudent pads LR images itself)")
        session = self.sessions[name]
        feed = {session.get_inputs()[0].name: tensor.detach().float().cpu().contiguous().numpy()}
        return torch.from_numpy(np.asarray(session.run(None, feed)[0], dtype=np.float32))

    # -- the stages (component graphs) ---------------------------------------------------------------
    def pad_lr(self, lr: torch.Tensor) -> torch.Tensor:
        return pad_to_multiple(lr, self.lr_multiple)

    def preprocess(self, lr: torch.Tensor) -> torch.Tensor:
        return self.run("upsample", self.pad_lr(lr))

    def encode(self, image: torch.Tensor, generator=None, tiling=None, progress=None) -> torch.Tensor:
        return self.run("vae_encoder", image)

    def velocity(self, latent: torch.Tensor) -> torch.Tensor:
        return self.run("transformer", latent)

    def decode(self, latent: torch.Tensor, tiling=None, progress=None) -> torch.Tensor:
        return self.run("vae_decoder", latent)

    def restore_latent(self, latent_lr: torch.Tensor) -> torch.Tensor:
        return latent_lr - self.velocity(latent_lr)

    def postprocess(self, image: torch.Tensor, lr_size: tuple[int, int]) -> torch.Tensor:
        return crop_to_unit(image, lr_size, self.settings.upscale)

    # -- the whole image ------------------------------------------------------------------------------
    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        """LR B x 3 x h x w in [0, 1] -> SR B x 3 x 4h x 4w in [0, 1], untiled (end-to-end graph if present)."""
        height, width = lr.shape[-2] * self.settings.upscale, lr.shape[-1] * self.settings.upscale
        if "end_to_end" in self.sessions:
            sr = self.run("end_to_end", self.pad_lr(lr))
            return sr[..., :height, :width]
        image = self.decode(self.restore_latent(self.encode(self.preprocess(lr))))
        return self.postprocess(image, lr.shape[-2:]).clamp(0.0, 1.0)
