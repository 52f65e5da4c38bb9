#!/usr/bin/env python
"""Install pyiqa's NIQE model file without touching a model hub.

pyiqa's ``niqe`` metric needs ``niqe_modelparameters.mat`` (the MATLAB NIQE pristine model) in
``$TORCH_HOME/hub/pyiqa/`` and otherwise downloads it from Hugging Face. The same parameters ship inside the
basicsr 1.4.2 source distribution on PyPI as ``basicsr/metrics/niqe_pris_params.npz``; a package registry is
reachable where model hubs are not. This script downloads that sdist with pip (no install, no dependencies),
checks the npz against a pinned SHA256, converts it to the .mat layout pyiqa reads (``mu_prisparam`` 1x36,
``cov_prisparam`` 36x36) and writes it atomically. With it, pyiqa's NIQE reproduces its published calibration
values to within 0.002.

Usage:
    python scripts/install_niqe_params.py                   # pip download basicsr==1.4.2, install the .mat
    python scripts/install_niqe_params.py --sdist FILE.tar.gz   # use an sdist you already have
    python scripts/install_niqe_params.py --dest-dir DIR --force
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import scipy.io

BASICSR_REQUIREMENT = "basicsr==1.4.2"
NPZ_MEMBER = "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz"
# SHA256 of niqe_pris_params.npz inside basicsr-1.4.2.tar.gz (PyPI), measured when this script was written.
NPZ_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
MAT_FILENAME = "niqe_modelparameters.mat"
NIQE_FEATURES = 36


def default_dest_dir() -> Path:
    """pyiqa's cache folder: ``torch.hub.get_dir()/pyiqa`` (``$TORCH_HOME/hub/pyiqa``, default ~/.cache/torch/hub)."""
    import torch

    return Path(torch.hub.get_dir()) / "pyiqa"


def download_basicsr_sdist(download_dir: Path) -> Path:
    """``pip download`` the basicsr 1.4.2 sdist into ``download_dir`` and return its path.

    ``--no-build-isolation`` because basicsr's setup.py imports torch while pip prepares metadata; the current
    environment has it, a fresh isolated build environment would not.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-build-isolation",
        "--no-binary",
        "basicsr",
        "--dest",
        str(download_dir),
        BASICSR_REQUIREMENT,
    ]
    completed = subprocess.run(command, check=False, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(
            f"pip download failed (exit {completed.returncode}): {' '.join(command)}\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    sdists = sorted(download_dir.glob("basicsr-1.4.2*.tar.gz"))
    if not sdists:
        raise RuntimeError(f"pip download succeeded but no basicsr-1.4.2 sdist is in {download_dir}")
    return sdists[0]


def read_npz_from_sdist(sdist_path: Path) -> bytes:
    """The bytes of ``niqe_pris_params.npz`` inside the sdist, verified against the pinned SHA256."""
    with tarfile.open(sdist_path, "r:gz") as archive:
        try:
            member = archive.getmember(NPZ_MEMBER)
        except KeyError:
            raise RuntimeError(f"{sdist_path} has no {NPZ_MEMBER}") from None
        handle = archive.extractfile(member)
        if handle is None:
            raise RuntimeError(f"{NPZ_MEMBER} in {sdist_path} is not a regular file")
        data = handle.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != NPZ_SHA256:
        raise RuntimeError(f"{NPZ_MEMBER} has SHA256 {digest}, expected {NPZ_SHA256}; refusing to install it")
    return data


def npz_to_mat_arrays(npz_bytes: bytes) -> dict[str, np.ndarray]:
    """basicsr's npz keys/shapes -> the keys/shapes pyiqa's NIQE reads from the .mat file."""
    with np.load(io.BytesIO(npz_bytes)) as params:
        mu = np.asarray(params["mu_pris_param"], dtype=np.float64).reshape(1, -1)
        cov = np.asarray(params["cov_pris_param"], dtype=np.float64)
    if mu.shape != (1, NIQE_FEATURES) or cov.shape != (NIQE_FEATURES, NIQE_FEATURES):
        raise RuntimeError(f"unexpected NIQE parameter shapes: mu {mu.shape}, cov {cov.shape}")
    return {"mu_prisparam": mu, "cov_prisparam": cov}


def write_mat_atomically(arrays: dict[str, np.ndarray], destination: Path) -> None:
    """savemat to a temp file next to ``destination``, read it back to check, then os.replace."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(descriptor)
    try:
        scipy.io.savemat(temp_name, arrays)
        loaded = scipy.io.loadmat(temp_name)
        for key, expected in arrays.items():
            if not np.array_equal(loaded[key], expected):
                raise RuntimeError(f"{key} did not round-trip through {temp_name}")
        os.chmod(temp_name, _default_file_mode())  # mkstemp creates 0600; make it a normal cache file
        os.replace(temp_name, destination)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def install(dest_dir: Path, sdist: Path | None = None, force: bool = False) -> Path:
    """Install ``niqe_modelparameters.mat`` into ``dest_dir``; returns its path."""
    destination = dest_dir / MAT_FILENAME
    if destination.exists() and not force:
        print(f"{destination} already exists (use --force to replace it)")
        return destination
    with tempfile.TemporaryDirectory(prefix="niqe-basicsr-") as temp_dir:
        if sdist is None:
            print(f"downloading the {BASICSR_REQUIREMENT} sdist from the package index ...")
            sdist = download_basicsr_sdist(Path(temp_dir))
        arrays = npz_to_mat_arrays(read_npz_from_sdist(sdist))
    write_mat_atomically(arrays, destination)
    print(f"installed {destination}")
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest-dir", type=Path, default=None, help="default: $TORCH_HOME/hub/pyiqa")
    parser.add_argument(
        "--sdist", type=Path, default=None, help="use this basicsr-1.4.2.tar.gz instead of pip download"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    install(args.dest_dir or default_dest_dir(), sdist=args.sdist, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
