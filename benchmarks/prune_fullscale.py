"""Transformer compression at full scale: the SD3-medium TSD-SR student (random weights) on this machine.

Builds the `sd3-medium` geometry with random weights, then runs TinySR's transformer steps in the toolkit's
order and reports, after each, the transformer's parameters, the step's time and the process's peak RSS:

    precache     constant conditioning folded into buffers; checked lossless (max |difference| of the
                 velocity to the unfolded model at two latent sizes)
    textless     the text stream removed (single-stream blocks)
    depth:R      R of the blocks removed (--method, scored on --calibration-images LR crops)

Random weights make the choices meaningless; parameter counts, time and memory are real.

    python -m benchmarks.prune_fullscale --out docs/prune     # ~10 GB RAM, a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prune_fullscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd3-medium")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--method", default="similarity", choices=("similarity", "sensitivity", "random"))
    parser.add_argument("--calibration-images", type=int, default=1)
    parser.add_argument("--sizes", default="16x16,24x40", help="latent sizes of the lossless check")
    parser.add_argument("--out", type=Path, default=None, help="write fullscale.json / fullscale.md here")
    ns = parser.parse_args(argv)

    from benchmarks import write_results
    from compress.models.presets import build_random_components, get_preset
    from compress.models.student import OneStepSR
    from compress.prune.conditioning import (
        precache,
        remove_text_stream,
        replace_transformer,
    )
    from compress.prune.depth import choose_depth, keep_blocks
    from compress.quality.cost import machine_info

    rows = []

    def record(step: str, transformer, seconds: float, **extra):
        row = {"step": step, "transformer_params": params(transformer), "seconds": round(seconds, 1),
               "peak_rss_mb": round(peak_rss_mb()), **extra}
        rows.append(row)
        print(row, flush=True)

    start = time.perf_counter()
    transformer, vae, prompt, pooled = build_random_components(get_preset(ns.preset), seed=0)
    student = OneStepSR(transformer, vae, prompt, pooled).eval()
    record("build (random weights)", student.transformer, time.perf_counter() - start)

    start = time.perf_counter()
    cached = precache(student)
    seconds = time.perf_counter() - start
    differences = {}
    with torch.no_grad():
        for size in ns.sizes.split(","):
            height, width = (int(v) for v in size.split("x"))
            latent = torch.randn(1, 16, height, width, generator=torch.Generator().manual_seed(height * width))
            differences[size] = float((student.velocity(latent) - cached.velocity(latent)).abs().max())
    record("precache", cached.transformer, seconds, max_abs_difference=differences)

    start = time.perf_counter()
    textless = replace_transformer(cached, remove_text_stream(cached.transformer))
    record("textless", textless.transformer, time.perf_counter() - start)

    start = time.perf_counter()
    lr = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(ns.calibration_images)]
    decision = choose_depth(ns.method, textless, lr, ns.ratio, seed=0)
    pruned = keep_blocks(textless.transformer, decision.kept)
    record(f"depth:{ns.ratio:g} ({ns.method})", pruned, time.perf_counter() - start, kept=decision.kept)
    with torch.no_grad():
        out = pruned(torch.randn(1, 16, 16, 16), return_dict=False)[0]
    if not torch.isfinite(out).all():
        raise FloatingPointError("the pruned transformer's output is not finite")

    payload = {"preset": ns.preset, "rows": rows, "machine": machine_info()}
    if ns.out:
        write_results(ns.out, "fullscale", payload, markdown(payload))
    print(markdown(payload))
    return 0


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    lines = [f"# Transformer compression at full scale ({payload['preset']}, random weights)", "",
             "| step | transformer params | change | step time s | peak RSS MB |", "|---|---|---|---|---|"]
    previous = None
    for row in rows:
        change = "" if previous is None else f"{(row['transformer_params'] - previous) / 1e6:+.1f} M"
        lines.append(f"| {row['step']} | {row['transformer_params'] / 1e6:.1f} M | {change} | {row['seconds']} | "
                     f"{row['peak_rss_mb']} |")
        previous = row["transformer_params"]
    precache_row = next(r for r in rows if r["step"] == "precache")
    machine = payload["machine"]
    lines += ["", "Pre-caching, max |velocity difference| to the unfolded model: "
              + ", ".join(f"{size} latent {value:.2e}" for size, value in precache_row["max_abs_difference"].items()),
              "", f"Measured {machine['date_utc']} on {machine['cpu_model']} ({machine['cpu_cores_available']} cores, "
              f"{machine['ram_total_bytes'] / 2**30:.0f} GiB), torch {machine['packages']['torch']}. "
              "Rerun: `python -m benchmarks.prune_fullscale --out docs/prune`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
