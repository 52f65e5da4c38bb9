"""Speed of float32, bfloat16 and float16 on this machine's CPU for one upscale of the built-in student.

Each precision runs the student's whole upscale (untiled, no colour fix) `--rounds` times after a warm-up,
interleaved, in one process; reports medians and the ratio to float32. `compress upscale --dtype` refuses
float16/bfloat16 on the CPU because of what this measures.

    python -m benchmarks.precision --out docs/precision     # ~3 min on 2 cores at the default 32 px
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", type=int, default=32, help="LR side (the output is 4x)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)

    from benchmarks import machine_line, write_results
    from compress.models.resolve import load_model
    from compress.quality.cost import machine_info

    base = load_model(ns.model).model
    models = {name: copy.deepcopy(base).to_runtime("cpu", dtype)
              for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16))}
    lr = torch.rand(1, 3, ns.size, ns.size, generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    with torch.no_grad():
        reference = models["float32"](lr)
        errors = {name: float((model(lr).float() - reference).abs().max()) for name, model in models.items()}  # warm-up
        for _ in range(ns.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(lr)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    machine = machine_info()
    text = "\n".join([
        "# Precision on the CPU", "",
        machine_line(machine, torch.get_num_threads(), "benchmarks.precision", argv), "",
        f"Built-in student (unless --model), {ns.size} x {ns.size} -> {ns.size * 4} x {ns.size * 4}, untiled, "
        f"{ns.rounds} interleaved rounds after a warm-up.", "",
        "| dtype | median ms | vs float32 | max abs diff to float32 |", "| --- | --- | --- | --- |",
        *[f"| {name} | {medians[name] * 1000:.0f} | {medians[name] / medians['float32']:.1f}x | {errors[name]:.2e} |"
          for name in models], ""])
    print(text)
    if ns.out:
        write_results(ns.out, "precision", {"times_s": times, "max_abs_diff": errors, "machine": machine}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
