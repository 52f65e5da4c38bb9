"""How fast a damaged model folder is refused, and what the fail-fast check costs on a good one.

Each case runs `python -m compress upscale SAMPLE -o OUT --model FOLDER` in a fresh process, as a user
would, and times it to its exit (median of `--rounds`): the intact built-in student (the check passes, the
model loads and the image is upscaled; the check's own share is timed in-process), a copy with one NaN in
its prompt embeddings, one with an inf in one base weight, and one with a truncated weight file. The scan's
throughput on a synthetic fp16 safetensors file of `--scan-gb` GB (the page cache warm, as after a copy)
gives the cost at the full SD3-medium size (its transformer: 4.2 GB in fp16).

    python -m benchmarks.failfast --out docs/guards      # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _damage(root: Path, case: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = root / "base/transformer/diffusion_pytorch_model.safetensors"
    if case == "NaN in the prompt embeddings":
        path = root / "dataset/default/prompt_embeds.pt"
        prompt = torch.load(path)
        prompt.view(-1)[5] = float("nan")
        torch.save(prompt, path)
    elif case == "inf in one base weight":
        tensors = load_file(weights)
        tensors["proj_out.bias"].view(-1)[0] = float("inf")
        save_file(tensors, weights)
    elif case == "truncated weight file":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _run(model: Path, out: Path) -> tuple[float, int, str]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "compress", "upscale", str(REPO / "compress/assets/samples/astronaut_lr.png"),
                             "-o", str(out), "--model", str(model)], cwd=REPO, capture_output=True, text=True)
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return time.perf_counter() - start, result.returncode, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.failfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scan-gb", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)

    import numpy as np
    import torch

    from benchmarks import machine_line, write_results
    from compress.models.layout import REFERENCE_DIR
    from compress.models.preflight import check_model_files, scan_safetensors
    from compress.quality.cost import machine_info

    cases = ["intact built-in student", "NaN in the prompt embeddings", "inf in one base weight", "truncated weight file"]
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for case in cases:
            root = scratch / f"model{cases.index(case)}"
            shutil.copytree(REFERENCE_DIR, root, ignore=shutil.ignore_patterns("training"))
            _damage(root, case)
            runs = [_run(root, scratch / "out") for _ in range(ns.rounds)]
            seconds = statistics.median(r[0] for r in runs)
            results[case] = {"seconds": [r[0] for r in runs], "exit": runs[0][1], "message": runs[0][2]}
            rows.append(f"| {case} | {seconds:.2f} | {runs[0][1]} | {runs[0][2][:110]} |")
        checks = []
        for _ in range(ns.rounds):
            start = time.perf_counter()
            check_model_files(None)
            checks.append(time.perf_counter() - start)
        check_seconds = statistics.median(checks)
        # throughput of the NaN/inf scan on a large fp16 file
        big = scratch / "big.safetensors"
        count = int(ns.scan_gb * 2**30 / 2 / 64)
        from safetensors.numpy import save_file

        save_file({f"t{i}": np.random.default_rng(i).random(count, dtype=np.float32).astype(np.float16)
                   for i in range(64)}, str(big))
        scan_safetensors(big)  # warm the page cache, as a just-copied file is
        scans = []
        for _ in range(ns.rounds):
            start = time.perf_counter()
            scan_safetensors(big)
            scans.append(time.perf_counter() - start)
        gb = big.stat().st_size / 2**30
        scan_seconds = statistics.median(scans)
    machine = machine_info()
    text = "\n".join([
        "# Fail fast: how long a damaged model folder takes to be refused", "",
        machine_line(machine, torch.get_num_threads(), "benchmarks.failfast", argv), "",
        f"`python -m compress upscale astronaut_lr.png --model COPY` in a fresh process, wall time to exit, median of "
        f"{ns.rounds}.", "",
        "| model folder | seconds | exit | last line of stderr |", "| --- | --- | --- | --- |", *rows, "",
        f"The check itself on the intact built-in student (in-process, no torch needed): {check_seconds * 1000:.0f} ms.",
        f"Its NaN/inf scan reads {gb / scan_seconds:.2f} GB/s from a warm page cache ({gb:.2f} GB fp16 in "
        f"{scan_seconds:.2f} s); SD3-medium's 4.2 GB fp16 transformer would take about "
        f"{4.2 / (gb / scan_seconds):.1f} s at that rate (a cold disk is slower: its read speed bounds the scan).", ""])
    print(text)
    if ns.out:
        write_results(ns.out, "failfast", {"cases": results, "check_seconds": check_seconds,
                                           "scan_gb_per_s": gb / scan_seconds, "machine": machine}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
