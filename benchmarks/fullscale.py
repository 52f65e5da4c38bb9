"""Full-scale structural and speed check: the exact SD3-medium TSD-SR student, random weights, on this machine.

Builds the `sd3-medium` geometry (24 MMDiT blocks + SD3 VAE) with random weights, runs one 128 -> 512
upscale through the whole student and prints parameters (transformer, VAE), MACs (torch FlopCounterMode,
MACs = FLOPs / 2), latency (median over --repeats after --warmup) and peak memory, with the machine and
library versions. Random weights make the output meaningless; shapes, counts, time and memory are real.

    python -m benchmarks.fullscale                # ~9 GB RAM, a few minutes on 2 CPU cores
    python -m benchmarks.fullscale --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from compress.models.presets import build_random_components, get_preset
    from compress.models.student import OneStepSR
    from compress.quality.cost import count_macs, count_params, machine_info, measure_latency, peak_memory

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd3-medium")
    parser.add_argument("--lr-size", type=int, default=128, help="LR side; the output is 4x")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs before timing (the MAC count is one)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = parser.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)

    preset = get_preset(ns.preset)
    start = time.perf_counter()
    transformer, vae, prompt, pooled = build_random_components(preset, seed=0)
    model = OneStepSR(transformer, vae, prompt, pooled).eval()
    build_seconds = time.perf_counter() - start
    print(f"built {preset.name} with random weights in {build_seconds:.1f} s", flush=True)

    lr = torch.rand(1, 3, ns.lr_size, ns.lr_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = time.perf_counter()
        macs_total = count_macs(model, lr)
        first_run_seconds = time.perf_counter() - start
        upsampled = model.preprocess(lr)
        latent = model.encode(upsampled)
        macs_encode = count_macs(model.encode, upsampled)
        macs_transformer = count_macs(model.velocity, latent)
        macs_decode = count_macs(model.decode, latent)
        output = model(lr)
        latency = measure_latency(lambda: model(lr), warmup=ns.warmup, repeats=ns.repeats)

    result = {
        "preset": preset.name,
        "input": [1, 3, ns.lr_size, ns.lr_size],
        "output": list(output.shape),
        "latent": list(latent.shape),
        "params_transformer_M": count_params(model.transformer) / 1e6,
        "params_vae_M": count_params(model.vae) / 1e6,
        "params_total_M": (count_params(model.transformer) + count_params(model.vae)) / 1e6,
        "macs_total_G": macs_total / 1e9,
        "macs_vae_encode_G": macs_encode / 1e9,
        "macs_transformer_G": macs_transformer / 1e9,
        "macs_vae_decode_G": macs_decode / 1e9,
        "build_seconds": build_seconds,
        "first_run_seconds_with_mac_counting": first_run_seconds,
        "latency_median_s": latency.median_s,
        "latency_all_s": latency.all_s,
        "peak_memory": peak_memory(),
        "machine": machine_info(),
    }
    print(json.dumps(result, indent=2, default=str))
    if ns.json:
        from compress.io import write_json

        write_json(ns.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
