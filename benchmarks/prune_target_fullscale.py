"""The planner at full scale: `--target-params R` on the SD3-medium TSD-SR student (random weights), no recovery.

Builds the `sd3-medium` geometry with random weights, runs the planner exactly as `python -m compress prune
--target-params R --recover-steps 0` does (every candidate step measured alone on calibration crops, the
greedy search, then the chosen steps), and reports the achieved fraction of the parameters, the time of each
phase, the process's peak RSS, and the PyTorch latency of the uncompressed and the compressed student at
128 x 128 LR -> 512 x 512, measured side by side in this run (interleaved rounds, same thread count).

Random weights make the costs, and so the choice of steps, meaningless for quality; parameter counts, time,
memory and latency are real.

    python -m benchmarks.prune_target_fullscale --out docs/prune     # ~20 GB peak RAM, ~30 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from benchmarks.prune_fullscale import peak_rss_mb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prune_target_fullscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd3-medium")
    parser.add_argument("--target-params", type=float, default=0.2)
    parser.add_argument("--method", default="similarity", choices=("similarity", "sensitivity", "random"),
                        help="depth method (similarity: one forward pass; sensitivity: one per block)")
    parser.add_argument("--calibration-images", type=int, default=1)
    parser.add_argument("--latency-size", type=int, default=128, help="LR side of the latency measurement (x4)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved latency rounds (median)")
    parser.add_argument("--out", type=Path, default=None, help="write target-fullscale.json / .md here")
    ns = parser.parse_args(argv)

    from benchmarks import write_results
    from compress.models.presets import build_random_components, get_preset
    from compress.models.student import OneStepSR
    from compress.prune.cli import PruneArgs, parse_steps
    from compress.prune.planner import plan_for_target
    from compress.prune.run import side_by_side_ms, student_params
    from compress.prune.steps import Calibration, apply_step
    from compress.quality.cost import machine_info

    phases = []

    def phase(name: str, started: float, **extra):
        row = {"phase": name, "seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_rss_mb()),
               **extra}
        phases.append(row)
        print(row, flush=True)

    started = time.perf_counter()
    transformer, vae, prompt, pooled = build_random_components(get_preset(ns.preset), seed=0)
    student = OneStepSR(transformer, vae, prompt, pooled).eval()
    phase("build (random weights)", started)

    args = PruneArgs(target_params=ns.target_params, recover_steps=0, method=ns.method,
                     calibration_images=ns.calibration_images, metrics=("none",))
    calibration = Calibration(args.calibration_images, args.seed)
    started = time.perf_counter()
    plan = plan_for_target(student, ns.target_params, args, calibration)
    phase("plan (measure every candidate, search)", started, steps=plan["steps"])

    started = time.perf_counter()
    compressed = student
    for step in parse_steps(tuple(plan["steps"])):
        compressed, _ = apply_step(compressed, step, args, calibration)
        gc.collect()  # drop the intermediate students (Torch-Pruning leaves reference cycles)
    compressed.eval()
    phase("apply the steps", started)
    before, after = student_params(student), student_params(compressed)
    if after["total"] != plan["params"]["predicted_after"]:
        raise RuntimeError(f"planner predicted {plan['params']['predicted_after']:,}, got {after['total']:,}")

    lr = torch.rand(1, 3, ns.latency_size, ns.latency_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = compressed(lr)
    if not torch.isfinite(out).all():
        raise FloatingPointError("the compressed student's output is not finite")
    started = time.perf_counter()
    with torch.no_grad():
        latency = side_by_side_ms(lambda: student(lr), lambda: compressed(lr), repeats=1, rounds=ns.rounds)
    phase("latency (side by side)", started)

    payload = {
        "preset": ns.preset, "target_params": ns.target_params, "method": ns.method,
        "calibration_images": ns.calibration_images, "steps": plan["steps"],
        "params": {"before": before, "after": after, "ratio": after["total"] / before["total"]},
        "latency_ms": {**latency, "speedup": latency["before"] / latency["after"],
                       "input": f"{ns.latency_size}x{ns.latency_size} LR -> x4, batch 1, median of {ns.rounds} "
                                f"interleaved rounds, {torch.get_num_threads()} threads"},
        "costs": plan["costs"], "phases": phases, "peak_rss_mb": round(peak_rss_mb()), "machine": machine_info(),
    }
    if ns.out:
        write_results(ns.out, "target-fullscale", payload, markdown(payload))
    print(markdown(payload))
    return 0


def markdown(payload: dict) -> str:
    params, latency, machine = payload["params"], payload["latency_ms"], payload["machine"]
    lines = [f"# Planner at full scale ({payload['preset']}, random weights): --target-params "
             f"{payload['target_params']:g}", "",
             f"Steps chosen: {', '.join(payload['steps'])} (depth method {payload['method']}, "
             f"{payload['calibration_images']} calibration crop(s); random weights make the choice meaningless).", "",
             "| | before | after | ratio |", "|---|---|---|---|"]
    for key in ("total", "transformer", "vae"):
        lines.append(f"| parameters ({key}) | {params['before'][key] / 1e6:.1f} M | {params['after'][key] / 1e6:.1f} M | "
                     f"{params['after'][key] / params['before'][key]:.3f} |")
    lines += [f"| latency ms ({latency['input']}) | {latency['before']:.0f} | {latency['after']:.0f} | "
              f"{latency['after'] / latency['before']:.3f} (x{latency['speedup']:.2f}) |", "",
              "| phase | seconds | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {p['phase']} | {p['seconds']} | {p['peak_rss_mb']} |" for p in payload["phases"]]
    lines += ["", f"Peak RSS of the whole run: {payload['peak_rss_mb']} MB.", "",
              f"Measured {machine['date_utc']} on {machine['cpu_model']} ({machine['cpu_cores_available']} cores, "
              f"{machine['ram_total_bytes'] / 2**30:.0f} GiB), torch {machine['packages']['torch']}. "
              "Rerun: `python -m benchmarks.prune_target_fullscale --out docs/prune`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
