"""ONNX Runtime vs PyTorch eager on one student, and the ONNX export of the full SD3-medium geometry.

Default (`--model`, the built-in student by default): exports the end-to-end graph (fp32, and fp16 with
`--fp16`) with the toolkit's own export path, then times 128 x 128 LR -> 512 x 512 in ONNX Runtime and in
PyTorch eager (the student's untiled forward, no colour fix), interleaved rounds in one process, the same
thread count for both; reports medians, spreads, ratios and the parity of the two outputs.

`--preset sd3-medium`: the full geometry with random weights (2.1 B parameters). Times one PyTorch forward
at the given size, traces the end-to-end graph (external data: the weights are about 8.5 GB), frees the
PyTorch model, optimizes and saves the graph with ONNX Runtime, then runs one output in ONNX Runtime and
compares it with PyTorch's. Reports the time and the process's peak RSS after each phase.

    python -m benchmarks.export_onnx --out docs/export                       # built-in, ~3 min on 2 cores
    python -m benchmarks.export_onnx --preset sd3-medium --out docs/export   # ~20 GB peak RAM, ~30 min
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.prune_fullscale import peak_rss_mb


def median_spread(values: list[float]) -> dict:
    return {"median_ms": round(statistics.median(values) * 1000, 1), "min_ms": round(min(values) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1), "runs": len(values)}


def builtin(ns) -> dict:
    from compress.models.resolve import load_model
    from compress.runtime.onnx import OnnxStudent
    from export.artifact import export_onnx
    from export.parity import parity_photos, parity_psnr

    loaded = load_model(ns.model)
    student = loaded.model
    lr = parity_photos(((ns.size, ns.size),))[0][1]
    results = {"model": loaded.description, "lr_size": ns.size, "threads": torch.get_num_threads(), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = {}
        for precision in ("fp32", "fp16") if ns.fp16 else ("fp32",):
            started = time.perf_counter()
            out = Path(tmp) / precision
            report = export_onnx(student, out, model_arg=ns.model, description=loaded.description,
                                 precision=precision, check_quality=False)
            runtimes[precision] = OnnxStudent(out, threads=torch.get_num_threads())
            results["variants"][f"onnxruntime {precision}"] = {
                "export_s": round(time.perf_counter() - started, 1), "validation_passed": report["passed"],
                "bytes": sum(e["bytes"] for e in runtimes[precision].manifest["files"].values())}
        with torch.no_grad():
            reference = student(lr)
        times = {name: [] for name in ["pytorch eager fp32", *(f"onnxruntime {p}" for p in runtimes)]}
        for _ in range(ns.rounds):  # interleaved, so drift in machine load hits every variant alike
            for name in times:
                started = time.perf_counter()
                with torch.no_grad():
                    output = student(lr) if name.startswith("pytorch") else runtimes[name.split()[-1]](lr)
                times[name].append(time.perf_counter() - started)
                if not name.startswith("pytorch"):
                    results["variants"][name]["parity_vs_pytorch"] = parity_psnr(output.numpy(), reference.numpy(), 1.0)
        base = statistics.median(times["pytorch eager fp32"])
        for name, values in times.items():
            row = results["variants"].setdefault(name, {})
            row.update(median_spread(values))
            row["speedup_vs_pytorch"] = round(base / statistics.median(values), 2)
    return results


def fullscale(ns) -> dict:
    from compress.models.presets import build_random_components, get_preset
    from compress.models.student import OneStepSR
    from export.graphs import graph_specs
    from export.onnx import folder_bytes, save_optimized, trace_to_onnx
    from export.parity import parity_psnr

    phases = []

    def phase(name: str, started: float, **extra):
        row = {"phase": name, "seconds": round(time.perf_counter() - started, 1),
               "peak_rss_mb": round(peak_rss_mb()), **extra}
        phases.append(row)
        print(row, flush=True)

    started = time.perf_counter()
    transformer, vae, prompt, pooled = build_random_components(get_preset(ns.preset), seed=0)
    student = OneStepSR(transformer, vae, prompt, pooled).eval()
    parameters = sum(p.numel() for p in student.parameters())
    phase("build (random weights)", started, parameters=parameters)
    lr = torch.rand(1, 3, ns.size, ns.size, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    with torch.no_grad():
        reference = student(lr).numpy()
    phase(f"PyTorch eager {ns.size} -> {ns.size * 4}", started)
    with tempfile.TemporaryDirectory(dir=ns.workdir) as tmp:
        started = time.perf_counter()
        spec = graph_specs(student, ("end_to_end",), lr_side=16)[0]
        raw = trace_to_onnx(spec, Path(tmp) / "raw")
        raw_bytes = folder_bytes(raw)
        phase("trace to ONNX (TorchScript exporter)", started, bytes=raw_bytes)
        del spec, student, transformer, vae
        gc.collect()
        started = time.perf_counter()
        files = save_optimized(raw, Path(tmp) / "end_to_end.onnx")
        import shutil

        shutil.rmtree(raw.parent)
        sizes = {name: (Path(tmp) / name).stat().st_size for name in files}
        phase("ONNX Runtime basic optimization + save", started, files=sizes)
        gc.collect()
        import onnxruntime as ort

        from compress.runtime.onnx import session_options

        started = time.perf_counter()
        session = ort.InferenceSession(str(Path(tmp) / files[0]), session_options(torch.get_num_threads()),
                                       providers=["CPUExecutionProvider"])
        phase("ONNX Runtime session", started)
        started = time.perf_counter()
        output = session.run(None, {"lr": lr.numpy()})[0]
        phase(f"ONNX Runtime {ns.size} -> {ns.size * 4}", started,
              parity_vs_pytorch=parity_psnr(output, reference, 1.0))
    return {"preset": ns.preset, "parameters": parameters, "lr_size": ns.size, "threads": torch.get_num_threads(),
            "external_data": len(files) > 1, "phases": phases}


def markdown(payload: dict) -> str:
    machine = payload["machine"]
    lines = [f"# {payload['title']}", "", f"Machine: {machine.get('cpu_model')}, {machine.get('cpu_cores_available')} "
             f"cores, torch {machine['packages'].get('torch')}, onnxruntime {machine['packages'].get('onnxruntime')}; "
             f"{payload['results'].get('threads')} threads. Command: `{payload['command']}`.", ""]
    results = payload["results"]
    if "variants" in results:
        lines += [f"Model: {results['model']}; {results['lr_size']} x {results['lr_size']} LR -> "
                  f"{results['lr_size'] * 4} x {results['lr_size'] * 4}, untiled, no colour fix.", "",
                  "| runtime | median ms | min–max ms | runs | speed-up vs PyTorch | parity vs PyTorch (dB) | file MB |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, row in results["variants"].items():
            parity = row.get("parity_vs_pytorch", {}).get("psnr_db")
            lines.append(f"| {name} | {row['median_ms']} | {row['min_ms']}–{row['max_ms']} | {row['runs']} | "
                         f"{row['speedup_vs_pytorch']}x | {'' if parity is None else f'{parity:.1f}'} | "
                         f"{'' if 'bytes' not in row else round(row['bytes'] / 1e6, 1)} |")
    else:
        lines += [f"Preset {results['preset']} ({results['parameters']:,} parameters, random weights); "
                  f"{results['lr_size']} x {results['lr_size']} LR -> {results['lr_size'] * 4} px; external data: "
                  f"{results['external_data']}.", "", "| phase | seconds | peak RSS (MB) | notes |", "| --- | --- | --- | --- |"]
        for row in results["phases"]:
            notes = {k: v for k, v in row.items() if k not in ("phase", "seconds", "peak_rss_mb")}
            lines.append(f"| {row['phase']} | {row['seconds']} | {row['peak_rss_mb']} | {notes or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="student (default: the built-in one)")
    parser.add_argument("--preset", default=None, help="a geometry with random weights instead, e.g. sd3-medium")
    parser.add_argument("--size", type=int, default=128, help="LR side (the output is 4x)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (built-in mode)")
    parser.add_argument("--fp16", action="store_true", help="also export and time the fp16 graph")
    parser.add_argument("--workdir", type=Path, default=None, help="where the full-scale graph is written")
    parser.add_argument("--out", type=Path, default=None, help="write export-*.json / .md here")
    ns = parser.parse_args(argv)

    import sys

    from benchmarks import write_results
    from compress.quality.cost import machine_info

    results = fullscale(ns) if ns.preset else builtin(ns)
    stem = f"onnx-{ns.preset}" if ns.preset else "onnx-latency"
    payload = {"title": f"ONNX export: {ns.preset or 'ONNX Runtime vs PyTorch'}", "results": results,
               "machine": machine_info(), "command": "python -m benchmarks.export_onnx " + " ".join(sys.argv[1:] if argv is None else argv)}
    text = markdown(payload)
    print(text)
    if ns.out:
        write_results(ns.out, stem, payload, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
