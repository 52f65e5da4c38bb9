"""Load diffusers model folders only after checking their files, keys and shapes ourselves.

diffusers' own errors for a bad folder are long or, with `ignore_mismatched_sizes`, silent; a user who
copied the wrong file deserves a message that names the file, what was expected and what was found.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.models.errors import ModelLoadError
from compress.models.layout import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from compress.models.preflight import nonfinite_error
from compress.models.preflight import weight_files as _weight_files


def read_safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape from safetensors headers, without loading the tensors (fast, even for 2 B params)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as err:
            raise ModelLoadError(
                f"{file} is not a readable safetensors file ({type(err).__name__}: {err}). "
                "It is probably truncated or corrupt: download or copy it again."
            ) from err
    return shapes


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {folder}")
    if not config_path.is_file():
        raise ModelLoadError(f"config.json not found in {folder}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_path} is not valid JSON ({err})") from err


def expected_shapes(model_class, config: dict, folder: Path) -> dict[str, tuple[int, ...]]:
    """State-dict shapes a config implies, computed on the meta device (no memory, no time)."""
    try:
        with torch.device("meta"):
            model = model_class.from_config(config)
    except Exception as err:
        raise ModelLoadError(f"{folder / 'config.json'} does not describe a valid {model_class.__name__}: {err}") from err
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weights(model_class, folder: Path) -> None:
    """Compare a folder's weight headers with what its config implies; raise naming the first mismatches."""
    config = read_config(folder)
    files = _weight_files(folder)
    found = read_safetensors_shapes(files)
    expected = expected_shapes(model_class, config, folder)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [(k, expected[k], found[k]) for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    if not (missing or unexpected or wrong):
        return
    where = files[0] if len(files) == 1 else folder
    parts = [f"{where} does not match {folder / 'config.json'} ({model_class.__name__}):"]
    if missing:
        parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]};")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]};")
    for key, want, got in wrong[:3]:
        parts.append(f"tensor '{key}' has shape {got}, expected {want};")
    parts.append("the weights and config.json come from different models.")
    raise ModelLoadError(" ".join(parts))


def check_finite(tensors, source) -> None:
    """Raise naming the source and the first tensor with NaN or inf values (`tensors`: name -> tensor pairs;
    `source`: the file, or a function of the tensor's name giving it, called only for a bad tensor).

    A NaN in a weight or in the cached prompt turns every output black; it must stop the load, not the user."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise nonfinite_error(source(name) if callable(source) else source, name, bad, tensor.numel())


def _weight_file_of(folder: Path, name: str) -> Path:
    """The file of `folder` that holds tensor `name` (the shard, when the weights are sharded)."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            return folder / json.loads(index.read_text())["weight_map"][name]
        except (KeyError, json.JSONDecodeError):
            return index
    return folder / WEIGHTS_NAME


def load_diffusers_model(model_class, folder: Path | str, dtype: torch.dtype = torch.float32):
    """Check, then load a diffusers folder (local files only: nothing is fetched from a hub) in `dtype`; weights
    with NaN or inf values are refused, naming the file and the tensor."""
    folder = Path(folder)
    check_weights(model_class, folder)
    try:
        model = model_class.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    except Exception as err:
        raise ModelLoadError(f"could not load {model_class.__name__} from {folder}: {err}") from err
    check_finite(model.state_dict().items(), lambda name: _weight_file_of(folder, name))
    return model.eval()
