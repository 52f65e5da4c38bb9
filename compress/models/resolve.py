"""Turn a `--model` value into a loaded student, and say plainly which model that was.

Accepted values:
  (none)                 the built-in reference student if this checkout ships one, else the `tiny` preset
                         with random weights (announced as such: its output is not a real upscale);
  preset:NAME[@SEED]     a geometry preset with random weights (structure and speed checks);
  a folder with student_config.json          a model saved by this toolkit;
  a run folder with model/student_config.json   the model a `prune` or `distill train` run wrote (OUT/model);
  an exported ONNX artifact folder (manifest.json; `python -m export onnx`), run by ONNX Runtime;
  a TSD-SR release root (checkpoint/tsdsr/, dataset/default/)   loaded through the release loader,
                         with the SD3 base in ROOT/base, ROOT/stable-diffusion-3-medium-diffusers or --base-model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from compress.models.errors import ModelLoadError
from compress.models.layout import (  # noqa: F401  (re-exported: where the built-in models are)
    ASSETS_DIR, REFERENCE_DIR, REFERENCE_REC_DIR, SAMPLE_IMAGE, STUDENT_CONFIG_NAME, locate_model,
)
from compress.models.student import OneStepSR


@dataclass
class LoadedModel:
    model: OneStepSR
    description: str
    is_random: bool


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"--dtype must be one of float32, float16, bfloat16, got {name!r}")
    return table[name]


def load_model(
    spec: str | Path | None,
    *,
    base_model: Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    sample_posterior: bool = False,
) -> LoadedModel:
    from compress.models.presets import build_random_components, get_preset
    from compress.models.release import load_tsdsr_release

    kind, where = locate_model(spec)
    if kind == "preset":
        name, _, seed = str(where)[len("preset:") :].partition("@")
        preset = get_preset(name)
        transformer, vae, prompt, pooled = build_random_components(preset, seed=int(seed or 0))
        model = OneStepSR(transformer, vae, prompt, pooled)
        model.settings.sample_posterior = sample_posterior
        description = (
            f"preset '{preset.name}' with RANDOM weights (seed {int(seed or 0)}): {preset.description}. "
            "This is a structural stand-in, not a trained model; its output is not a meaningful upscale."
        )
        return LoadedModel(model.to_runtime(device, dtype), description, True)
    if kind == "artifact":
        from compress.runtime.manifest import read_manifest
        from compress.runtime.onnx import OnnxStudent

        manifest = read_manifest(where)  # a damaged, foreign or newer manifest fails here, naming why

        if device != "cpu" or dtype != torch.float32:
            raise ModelLoadError(
                f"--model {where} is an exported artifact: it runs on ONNX Runtime's CPU provider at the precision "
                "it was exported with; drop --device/--dtype"
            )
        runtime = OnnxStudent(where, manifest=manifest)
        return LoadedModel(runtime, runtime.describe(), False)
    if kind == "student":
        model = OneStepSR.from_pretrained(where, device=device, dtype=dtype)
        model.settings.sample_posterior = sample_posterior or model.settings.sample_posterior
        return LoadedModel(model, f"saved student {where}", False)
    base = None if spec is None else base_model  # the built-in student ships its base
    model = load_tsdsr_release(where, base=base, device=device, dtype=dtype, sample_posterior=sample_posterior)
    if spec is None:
        return LoadedModel(model, f"built-in reference TSD-SR student ({REFERENCE_DIR})", False)
    return LoadedModel(model, f"TSD-SR release {where}", False)
