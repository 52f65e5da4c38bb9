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
    ASSETS_DIR, REFERENCE_DIR, REFERENCE_REC_DIR, SAMPLE_IMAGE, STUDENT_CONFIG_NAME,
)
from compress.models.preflight import missing_model_error
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
    from compress.models.release import is_release_root, load_tsdsr_release

    if spec is None:
        if REFERENCE_DIR.is_dir():
            loaded = load_model(REFERENCE_DIR, device=device, dtype=dtype, sample_posterior=sample_posterior)
            loaded.description = f"built-in reference TSD-SR student ({REFERENCE_DIR})"
            return loaded
        spec = "preset:tiny"
    spec_text = str(spec)
    if spec_text.startswith("preset:"):
        name, _, seed = spec_text[len("preset:") :].partition("@")
        preset = get_preset(name)
        transformer, vae, prompt, pooled = build_random_components(preset, seed=int(seed or 0))
        model = OneStepSR(transformer, vae, prompt, pooled)
        model.settings.sample_posterior = sample_posterior
        description = (
            f"preset '{preset.name}' with RANDOM weights (seed {int(seed or 0)}): {preset.description}. "
            "This is a structural stand-in, not a trained model; its output is not a meaningful upscale."
        )
        return LoadedModel(model.to_runtime(device, dtype), description, True)
    path = Path(spec_text)
    if not path.exists():
        raise missing_model_error(spec_text)
    from compress.runtime.manifest import MANIFEST_NAME

    if (path / MANIFEST_NAME).is_file() and not (path / STUDENT_CONFIG_NAME).is_file():
        from compress.runtime.manifest import read_manifest
        from compress.runtime.onnx import OnnxStudent

        manifest = read_manifest(path)  # a damaged, foreign or newer manifest fails here, naming why

        if device != "cpu" or dtype != torch.float32:
            raise ModelLoadError(
                f"--model {path} is an exported artifact: it runs on ONNX Runtime's CPU provider at the precision "
                "it was exported with; drop --device/--dtype"
            )
        runtime = OnnxStudent(path, manifest=manifest)
        return LoadedModel(runtime, runtime.describe(), False)
    if not (path / STUDENT_CONFIG_NAME).is_file() and (path / "model" / STUDENT_CONFIG_NAME).is_file():
        path = path / "model"  # a run folder (prune's or distill's OUT): its model
    if (path / STUDENT_CONFIG_NAME).is_file():
        model = OneStepSR.from_pretrained(path, device=device, dtype=dtype)
        model.settings.sample_posterior = sample_posterior or model.settings.sample_posterior
        return LoadedModel(model, f"saved student {path}", False)
    if is_release_root(path):
        model = load_tsdsr_release(path, base=base_model, device=device, dtype=dtype, sample_posterior=sample_posterior)
        return LoadedModel(model, f"TSD-SR release {path}", False)
    raise ModelLoadError(
        f"--model {path}: not a model folder. Looked for {path / STUDENT_CONFIG_NAME} (saved student) and "
        f"{path / 'checkpoint/tsdsr'} / {path / 'dataset/default'} (TSD-SR release); found neither."
    )
