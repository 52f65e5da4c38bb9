"""Cost of the numerical guards (compress.pipeline.check_stage / check_not_constant) on a 128 -> 512 upscale.

Runs the built-in student's whole upscale (wavelet colour fix) with the guards and with them replaced by
no-ops, interleaved rounds in one process, and reports the medians and the overhead as a ratio.

    python -m benchmarks.guards --out docs/guards      # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)

    from benchmarks import machine_line, write_results
    from compress import pipeline
    from compress.models.resolve import load_model
    from compress.quality.cost import machine_info

    model = load_model(ns.model).model
    lr = torch.rand(1, 3, ns.size, ns.size, generator=torch.Generator().manual_seed(0))
    guarded = (pipeline.check_stage, pipeline.check_not_constant)
    unguarded = (lambda stage, tensor: tensor, lambda sr, lr: None)
    times = {"guarded": [], "unguarded": []}
    pipeline.upscale_tensor(model, lr)  # warm-up
    for _ in range(ns.rounds):
        for name, (stage_fn, constant_fn) in (("guarded", guarded), ("unguarded", unguarded)):
            pipeline.check_stage, pipeline.check_not_constant = stage_fn, constant_fn
            start = time.perf_counter()
            pipeline.upscale_tensor(model, lr)
            times[name].append(time.perf_counter() - start)
    pipeline.check_stage, pipeline.check_not_constant = guarded
    medians = {name: statistics.median(values) for name, values in times.items()}
    overhead = medians["guarded"] / medians["unguarded"] - 1
    machine = machine_info()
    text = "\n".join([
        "# Numerical guards: cost on one upscale", "",
        machine_line(machine, torch.get_num_threads(), "benchmarks.guards", argv), "",
        f"{ns.size} x {ns.size} -> {ns.size * 4} x {ns.size * 4}, wavelet colour fix, {ns.rounds} interleaved rounds.", "",
        "| variant | median ms | min–max ms |", "| --- | --- | --- |",
        *[f"| {name} | {medians[name] * 1000:.1f} | {min(v) * 1000:.1f}–{max(v) * 1000:.1f} |" for name, v in times.items()],
        "", f"Overhead of the guards: {overhead * 100:+.2f} % (median vs median; the spread between rounds is larger).", ""])
    print(text)
    if ns.out:
        write_results(ns.out, "guards", {"times_s": times, "overhead": overhead, "machine": machine}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
