"""An exported artifact folder's `manifest.json`: what is in it, where it came from, how it was checked.

    {"format": "tinysr-toolkit/export-artifact", "version": 1, "runtime": "onnx" | "coreml",
     "files": {"model.onnx": {"bytes": N, "sha256": "..."}, ...},        every shipped file, hashed
     "graphs": {"end_to_end": {"file": "model.onnx", "precision": "fp32", "inputs": {...}, ...}, ...},
     "student": {"upscale": 4, "lr_multiple": 4, ...},                  geometry the runtime wrapper needs
     "source": {...}, "tools": {...}, "budgets": {...}, "results": {...}}

The manifest is written last, inside a temporary folder that is renamed into place only when the export
and its validation are complete (compress.io.atomic_dir), so a folder with a manifest is a finished one;
`verify_files` finds any shipped file whose size or hash no longer matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compress.models.errors import ModelLoadError

MANIFEST_NAME = "manifest.json"
ARTIFACT_FORMAT = "tinysr-toolkit/export-artifact"
ARTIFACT_VERSION = 1
RUNTIMES = ("onnx", "coreml")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict[str, dict]:
    """{relative name: {"bytes", "sha256"}} for files (a folder such as an .mlpackage is walked)."""
    entries = {}
    for name in sorted(names):
        path = folder / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            rel = file.relative_to(folder).as_posix()
            entries[rel] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    return entries


def read_manifest(folder: Path | str) -> dict:
    """The manifest of an artifact folder, checked for format and version (newer versions named)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ModelLoadError(f"{folder} is not an exported artifact: {MANIFEST_NAME} not found in it")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err}); export the artifact again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ModelLoadError(f"{path}: 'format' is not {ARTIFACT_FORMAT!r}; not an artifact of this toolkit")
    version = manifest.get("version")
    if not isinstance(version, int) or version > ARTIFACT_VERSION:
        raise ModelLoadError(
            f"{path}: artifact version {version!r} is newer than this toolkit reads ({ARTIFACT_VERSION}); "
            "upgrade tinysr-toolkit"
        )
    if manifest.get("runtime") not in RUNTIMES:
        raise ModelLoadError(f"{path}: 'runtime' must be one of {RUNTIMES}, got {manifest.get('runtime')!r}")
    return manifest


def verify_files(folder: Path | str, manifest: dict) -> list[str]:
    """One line per shipped file that is missing or whose size or sha256 differs from the manifest."""
    folder = Path(folder)
    problems = []
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: listed in {MANIFEST_NAME} but missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (the file was changed after export)")
    return problems
