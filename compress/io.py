"""Atomic file and folder writes: an interrupted run never leaves a half-written artifact behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it onto `path` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_path
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)


def read_tensor_file(path: Path | str, what: str, error: type[Exception] = ValueError):
    """The one tensor a ``torch.save`` file holds, read with ``weights_only`` (no pickled code runs); an unreadable
    file or any other content is one `error` naming `what` and the file."""
    import torch

    try:
        value = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise error(f"{what}: {path} is not a readable torch tensor file ({type(err).__name__}: {err})") from err
    if not isinstance(value, torch.Tensor):
        raise error(f"{what}: {path} holds a {type(value).__name__}, expected one tensor")
    return value


def write_json(path: Path | str, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def check_output_folder(path: Path | str, flag: str = "-o", overwrite: bool | None = None) -> None:
    """Refuse, before any work, an output folder that cannot be created or written: a path that is a file, or
    whose nearest existing folder refuses a new entry. Probed by creating and removing a temporary folder
    (permission bits alone say nothing for root or a read-only mount); nothing is left behind.
    `overwrite=False`: a command that replaces its output whole also refuses an existing folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is a file, not a folder; give a folder path")
    if overwrite is False and path.exists():
        raise FileExistsError(f"{flag} {path} already exists; pass --overwrite to replace it")
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise FileExistsError(f"{flag} {path}: {probe} is a file, so the folder cannot be created; give another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=probe))
    except OSError as err:
        raise PermissionError(
            f"{flag} {path}: cannot write in {probe} ({err.strerror}); give a folder you can write"
        ) from None


def check_inputs_exist(paths: list[Path], what: str = "input") -> None:
    """Every input path exists and none is given twice (named, so the user fixes them all at once)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{what} not found: {', '.join(missing)}")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            also = f" (also as {seen[key]})" if str(seen[key]) != str(p) else ""
            raise ValueError(f"{what} {p} is given twice{also}; give each once")
        seen[key] = Path(p)
