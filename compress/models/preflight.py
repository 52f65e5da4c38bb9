"""Check the files behind a `--model` value in seconds, before torch or diffusers is imported.

A damaged model folder used to fail only after a minute of imports and loads, and a NaN in a tensor not at
all (the output came out black). This module reads the files with the standard library and numpy only:

- layout: the files a saved student, a run folder, a TSD-SR release (and its SD3 base) or an exported
  artifact needs are present, its JSON files parse, and its format version is one this toolkit reads;
- safetensors files: the header parses (format: an 8-byte little-endian length, a JSON header giving each
  tensor's dtype, shape and byte range, then the bytes) and every range fits its dtype and shape and lies
  inside the file, so a truncated copy fails here;
- values: every floating tensor is scanned for NaN and inf by their bit pattern (exponent bits all ones),
  chunk by chunk through a memory map, which works for each float type safetensors stores (bf16, fp8 too);
- torch.save'd tensors (TSD-SR's prompt embeddings, `.pt`): the pickle is read by an unpickler that knows
  only how a tensor is rebuilt (any other object is refused), and the storage bytes are scanned the same way;
- shapes that configs fix: the prompt embeddings' widths against the transformer's `joint_attention_dim` and
  `pooled_projection_dim`, and each LoRA pair's rank.

Tensor names and shapes against the model class are checked after the import, still before any weight is
read (`compress.models.checks.check_weights`): only the class knows them.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from compress.models.errors import ModelLoadError
from compress.models.layout import (
    COMPONENTS, CONDITIONING_NAME, FORMAT_TAG, POOLED_EMBEDS, PROMPT_EMBEDS, REFERENCE_DIR,
    STUDENT_CONFIG_NAME, STUDENT_FORMAT_VERSION, TRANSFORMER_LORA, VAE_LORA, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
    check_release_files, locate_model, release_paths,
)

# safetensors dtype -> (bytes per element, the unsigned view, the bits that are all ones in NaN/inf or None)
_FLOAT_BITS = {
    "F64": (8, np.uint64, 0x7FF0000000000000),
    "F32": (4, np.uint32, 0x7F800000),
    "F16": (2, np.uint16, 0x7C00),
    "BF16": (2, np.uint16, 0x7F80),
    "F8_E5M2": (1, np.uint8, 0x7C),
    "F8_E4M3": (1, np.uint8, 0x7F),  # no inf; NaN is S.1111.111
}
_OTHER_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}
_TORCH_STORAGES = {"DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16"}
_HEADER_LIMIT = 100 << 20  # safetensors refuses larger headers too
_CHUNK_BYTES = 64 << 20


def nonfinite_error(where, name: str, bad: int, total: int) -> ModelLoadError:
    """The one message for a tensor with NaN/inf values, at load (here and in `checks.check_finite`)."""
    return ModelLoadError(
        f"{where}: tensor '{name}' has {bad} NaN/inf value(s) of {total}; the file is damaged "
        "or was saved from a diverged run: copy it again or use an earlier checkpoint"
    )


def check_format_version(path: Path, version) -> None:
    """A student_config.json written by a newer toolkit is refused by name, not misread."""
    if not isinstance(version, int) or version < 1:
        raise ModelLoadError(f"{path}: 'version' is {version!r}, expected a positive integer; the folder is damaged")
    if version > STUDENT_FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: written by a newer version of this toolkit (student format {version}; this one reads up to "
            f"{STUDENT_FORMAT_VERSION}); upgrade tinysr-toolkit to load it"
        )


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{what} not found: {path}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err}); the folder is damaged: copy it again") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def _count_nonfinite(path: Path, offset: int, nbytes: int, dtype: str) -> int:
    """NaN/inf elements in `nbytes` bytes of `path` from `offset`, read through a memory map in chunks."""
    if nbytes == 0:
        return 0
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
    size = _FLOAT_BITS[dtype][0]
    step = _CHUNK_BYTES - _CHUNK_BYTES % size
    bad = sum(_nonfinite_in(data[start:start + step], dtype) for start in range(0, nbytes, step))
    del data
    return bad


def _nonfinite_in(raw, dtype: str) -> int:
    """NaN/inf elements in the bytes `raw` of floats of safetensors type `dtype`: exponent bits all ones."""
    _, view, bits = _FLOAT_BITS[dtype]
    values = np.frombuffer(raw, dtype=view)  # a copy-free view of the bytes
    return int(np.count_nonzero((values & view(bits)) == view(bits)))


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """{tensor: {"dtype", "shape", "data_offsets"}} of a safetensors file and where its data starts, each entry
    checked against the file's size; a truncated or foreign file raises naming it."""
    damaged = f"{path} is not a readable safetensors file"
    advice = "it is probably truncated or corrupt: download or copy it again"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{damaged} ({size} bytes); {advice}")
        (length,) = struct.unpack("<Q", head)
        if length > min(_HEADER_LIMIT, size - 8):
            raise ModelLoadError(f"{damaged} (header of {length} bytes in a {size}-byte file); {advice}")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(f"{damaged} (header: {err}); {advice}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{damaged} (header is not an object); {advice}")
    header.pop("__metadata__", None)
    start = 8 + length
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            itemsize = _FLOAT_BITS[dtype][0] if dtype in _FLOAT_BITS else _OTHER_SIZES[dtype]
            count = math.prod(int(n) for n in shape)
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{damaged} (tensor '{name}' has a malformed entry {entry!r}); {advice}") from None
        if end - begin != count * itemsize or begin < 0:
            raise ModelLoadError(f"{damaged} (tensor '{name}': {end - begin} bytes for shape {shape} of {dtype}); {advice}")
        if start + end > size:
            raise ModelLoadError(
                f"{damaged} (tensor '{name}' ends at byte {start + end}, the file has {size}); {advice}"
            )
    return header, start


def scan_safetensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check a safetensors file's header and every floating tensor's values; {tensor: (dtype, shape)}."""
    header, start = read_safetensors_header(path)
    for name, entry in header.items():
        if entry["dtype"] in _FLOAT_BITS:
            begin, end = entry["data_offsets"]
            bad = _count_nonfinite(path, start + begin, end - begin, entry["dtype"])
            if bad:
                raise nonfinite_error(path, name, bad, math.prod(entry["shape"]))
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


class _Storage:
    def __init__(self, dtype: str | None, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple, *_):
        self.storage, self.offset, self.shape = storage, offset, tuple(shape)


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _TORCH_STORAGES.get(name)  # None: not floating, nothing to scan


class _TensorPickle(pickle.Unpickler):
    """Reads a torch.save'd tensor's pickle without torch: it knows how a tensor is rebuilt and nothing else, so a
    file that would run code on load (a pickled object of any other kind) is refused, as torch's weights_only."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _Tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return _Storage(storage_type.dtype, str(key), int(numel))


def scan_torch_tensor(path: Path, what: str) -> tuple[int, ...]:
    """Check a torch.save'd single tensor (zip format) for readability and NaN/inf; returns its shape."""
    damaged = f"{what}: {path} is not a readable torch tensor file"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickled = [n for n in names if n.endswith("/data.pkl")]
            if len(pickled) != 1:
                raise ModelLoadError(f"{damaged} (no data.pkl in the archive); copy it again")
            prefix = pickled[0][: -len("data.pkl")]
            if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
                raise ModelLoadError(f"{damaged} (big-endian); save it again on a little-endian machine")
            value = _TensorPickle(archive.open(pickled[0])).load()
            if not isinstance(value, _Tensor):
                raise ModelLoadError(f"{what}: {path} holds a {type(value).__name__}, expected one tensor")
            storage = value.storage
            if storage.dtype is not None:
                info = archive.getinfo(f"{prefix}data/{storage.key}")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ModelLoadError(f"{damaged} (compressed storage); save it again with torch.save")
                raw = archive.read(info)
                bad = _nonfinite_in(raw, storage.dtype)
                if bad:
                    raise nonfinite_error(path, what, bad, len(raw) // _FLOAT_BITS[storage.dtype][0])
    except ModelLoadError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, OSError) as err:
        raise ModelLoadError(f"{damaged} ({type(err).__name__}: {err}); copy it again") from None
    return value.shape


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers folder (one, or the shards its index lists), all present."""
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} is not a valid safetensors index (no 'weight_map')")
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shard(s) that are missing: {missing}")
        return files
    raise ModelLoadError(
        f"no weights in {folder}: expected {WEIGHTS_NAME} (or a sharded {WEIGHTS_INDEX_NAME}). "
        "Only safetensors weights are loaded; convert .bin files with diffusers' save_pretrained."
    )


def check_diffusers_folder(folder: Path, what: str) -> dict:
    """A diffusers model folder: config.json parses, its weights are present, readable and finite; its config."""
    if not folder.is_dir():
        raise ModelLoadError(f"{what} folder not found: {folder}")
    config = _read_json(folder / "config.json", f"{what} config.json")
    for file in weight_files(folder):
        scan_safetensors(file)
    return config


def check_lora_file(path: Path, what: str) -> None:
    """A peft LoRA file: readable, finite, and each lora_A/lora_B pair agrees on the rank."""
    tensors = scan_safetensors(path)
    a_suffix, b_suffix = "lora_A.weight", "lora_B.weight"
    unpaired = []
    for name in sorted(tensors):
        for mine, other in ((a_suffix, b_suffix), (b_suffix, a_suffix)):
            if name.endswith(mine) and name[: -len(mine)] + other not in tensors:
                unpaired.append(f"'{name}' has no '{name[: -len(mine)] + other}'")
    if unpaired:
        raise ModelLoadError(f"{what}: {path}: {'; '.join(unpaired[:4])}: a tensor was renamed or is missing; "
                             "the file is damaged or not a LoRA of this toolkit's layout")
    for name, (_, shape_a) in tensors.items():
        if name.endswith(a_suffix):
            partner = name[: -len(a_suffix)] + b_suffix
            shape_b = tensors[partner][1]
            if len(shape_a) < 2 or len(shape_b) < 2 or shape_a[0] != shape_b[1]:
                raise ModelLoadError(
                    f"{what}: {path}: '{name}' {shape_a} and '{partner}' {shape_b} disagree on the LoRA rank"
                )


def _check_embedding_width(path: Path, what: str, shape: tuple[int, ...], width, token_axis: bool) -> None:
    want = 3 if token_axis else 2
    if len(shape) == want - 1:
        shape = (1, *shape)
    if isinstance(width, int) and (len(shape) != want or shape[0] != 1 or shape[-1] != width):
        expected = f"(1, tokens, {width})" if token_axis else f"(1, {width})"
        raise ModelLoadError(f"{what}: {path} has shape {shape}, expected {expected} for this base model")


def check_saved_student(folder: Path) -> None:
    """A folder written by `OneStepSR.save_pretrained`."""
    config_path = folder / STUDENT_CONFIG_NAME
    payload = _read_json(config_path, STUDENT_CONFIG_NAME)
    if payload.get("format") != FORMAT_TAG:
        raise ModelLoadError(f"{config_path}: 'format' is {payload.get('format')!r}, expected {FORMAT_TAG!r}")
    check_format_version(config_path, payload.get("version"))
    transformer = {}
    for kind in COMPONENTS:
        config = check_diffusers_folder(folder / kind, kind)
        transformer = config if kind == "transformer" else transformer
    conditioning = folder / CONDITIONING_NAME
    if conditioning.exists():
        tensors = scan_safetensors(conditioning)
        for name, key, token_axis in (("prompt_embeds", "joint_attention_dim", True),
                                      ("pooled_prompt_embeds", "pooled_projection_dim", False)):
            if name in tensors:
                _check_embedding_width(conditioning, name, tensors[name][1], transformer.get(key), token_axis)


def check_release(root: Path, base: Path | None = None) -> None:
    """A TSD-SR release root (checkpoint/tsdsr/, dataset/default/) and its SD3 base."""
    paths = release_paths(root, base)
    check_release_files(paths)
    transformer = check_diffusers_folder(paths.base / "transformer", "base transformer")
    check_diffusers_folder(paths.base / "vae", "base VAE")
    check_lora_file(paths.lora_dir / TRANSFORMER_LORA, "transformer LoRA")
    check_lora_file(paths.lora_dir / VAE_LORA, "VAE-encoder LoRA")
    for name, what, key, token_axis in ((PROMPT_EMBEDS, "prompt embedding", "joint_attention_dim", True),
                                        (POOLED_EMBEDS, "pooled prompt embedding", "pooled_projection_dim", False)):
        path = paths.embedding_dir / name
        _check_embedding_width(path, what, scan_torch_tensor(path, what), transformer.get(key), token_axis)


def check_artifact(folder: Path) -> None:
    """An exported artifact: a manifest this toolkit reads, and every file it lists present at its size
    (the hashes are `python -m export validate`'s job: hashing a 9 GB graph takes longer than failing fast)."""
    from compress.runtime.manifest import read_manifest

    manifest = read_manifest(folder)
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"{path}: listed in the artifact's manifest but missing; export it again")
        if path.stat().st_size != entry.get("bytes"):
            raise ModelLoadError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {entry.get('bytes')}; the file is truncated "
                "or was changed: export it again"
            )


def check_model_files(spec: str | Path | None, base_model: Path | None = None, flag: str = "--model") -> None:
    """Check the files behind a `--model` value (`compress.models.layout.locate_model` says what it names)
    without torch; raise ModelLoadError naming the first problem. Presets have no files: nothing to check."""
    kind, where = locate_model(spec, flag)
    if kind == "artifact":
        check_artifact(where)
    elif kind == "student":
        check_saved_student(where)
    elif kind == "release":
        check_release(where, Path(base_model) if base_model else None)


def check_prior(path: str | Path) -> None:
    """A prior folder (distillation's teacher: base/{transformer,vae} and dataset/{default,null} embeddings, the
    layout of `compress.models.release.prior_paths`); "builtin" is the shipped reference release."""
    from compress.models.layout import prior_paths

    layout = prior_paths(REFERENCE_DIR if str(path) == "builtin" else path)
    if not layout.root.is_dir():
        raise ModelLoadError(
            f"--prior {path}: no such folder; create a prior folder (base/ + dataset/) with `python "
            f"scripts/train_reference.py --out {path} --stage prior`, give a TSD-SR release root, or 'builtin'"
        )
    if not layout.base.is_dir():
        return  # distill.recipe.load_prior says how to create one
    transformer = check_diffusers_folder(layout.transformer, "prior transformer")
    check_diffusers_folder(layout.vae, "prior VAE")
    for name, file in layout.embeddings.items():
        if file.is_file():
            pooled = "pool" in name
            key = "pooled_projection_dim" if pooled else "joint_attention_dim"
            _check_embedding_width(file, f"prior {name}", scan_torch_tensor(file, f"prior {name}"),
                                   transformer.get(key), not pooled)
