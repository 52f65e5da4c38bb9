"""The package layering (docs/layout.md) is enforced by import-linter, and the CLI answers --help at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

PACKAGES = ("compress", "distill", "export", "benchmarks")


def _lint(cwd) -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert lint, "lint-imports is not installed: pip install -e '.[dev]'"
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([lint, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_distill_import_in_compress_breaks_the_contract(tmp_path):
    """The same check on a copy of the packages with one forbidden import added must fail and name it."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    options = tmp_path / "compress" / "options.py"
    options.write_text(options.read_text() + "\nimport distill  # deliberately breaks the layering\n")
    result = _lint(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and "compress.options -> distill" in result.stdout, result.stdout


@pytest.mark.parametrize("module, args", [("compress", []), ("compress", ["upscale"]), ("compress", ["eval"]),
                                          ("compress", ["prune"]),
                                          ("distill", []), ("distill", ["train"])])
def test_help_answers_at_once_without_torch(module, args):
    command = [sys.executable, "-X", "importtime", "-m", module, *args, "--help"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "diffusers" not in imported, sorted(m for m in imported if "torch" in m)[:5]
    assert seconds < 2.0, f"python -m {module} {' '.join(args)} --help took {seconds:.2f} s"
