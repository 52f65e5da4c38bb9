"""Measurements: each module is a command, `python -m benchmarks.NAME --help`, run from the repository root.

Every benchmark prints (and writes, with --out / --json) its numbers together with the machine and package
versions they were measured on (compress.quality.cost.machine_info), and compares variants as ratios within
the same run. What builds shipped artifacts lives in scripts/ instead.

    fullscale           the full SD3-medium student with random weights: parameters, MACs, latency, memory
    compare_reference   quality of the shipped reference students beside bicubic (and what their VAE allows)
    texture_spectrum    periodic texture at the token period in a student's output
    tiled_vae           tiled vs untiled VAE (accuracy of each statistics choice) and a large upscale's memory/time
    prune_depth         depth-pruning methods side by side after the same recovery
    prune_fullscale     transformer compression steps on the SD3-medium geometry: parameters, time, memory
    export_onnx         ONNX Runtime vs PyTorch latency of one student; the SD3-medium geometry exported to ONNX
    tradeoff            the speed/quality sweep over parameter targets and runtimes (docs/tradeoff/)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_results(out: Path, stem: str, payload: Any, markdown: str) -> None:
    """OUT/STEM.json (the numbers) and OUT/STEM.md (the table), each written atomically."""
    from compress.io import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", payload)
    with atomic_path(out / f"{stem}.md") as tmp:
        tmp.write_text(markdown)


def machine_line(machine: dict, threads: int, module: str, argv: list[str] | None, packages=("torch",)) -> str:
    """'Machine: CPU, N cores, torch X, ..., T threads. Command: `python -m benchmarks.NAME ARGS`.' for a report."""
    import sys

    versions = ", ".join(f"{name} {machine['packages'].get(name)}" for name in packages)
    args = " ".join(sys.argv[1:] if argv is None else argv)
    return (f"Machine: {machine['cpu_model']}, {machine['cpu_cores_available']} cores, {versions}, {threads} threads. "
            f"Command: `python -m {module} {args}`.")
