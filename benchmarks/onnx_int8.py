"""ONNX Runtime int8 on this CPU: what dynamic quantization gives the built-in student's end-to-end graph.

A first measurement for the trade-off sweep (issue 13), before any product code: the fp32 end-to-end graph
is traced with the toolkit's own exporter (`export.onnx.trace_to_onnx`), pre-processed with
`onnxruntime.quantization.quant_pre_process` (ONNX shape inference and optimization; its symbolic
shape inference gives up on the dynamic height and width), then quantized with
`onnxruntime.quantization.quantize_dynamic` (int8 weights, activations quantized per call) in two variants:
the linear layers only (MatMul/Gemm: the transformer's attention and MLP) and the linear layers plus the
convolutions (the VAE). Each variant is timed at 128 x 128 LR -> 512 x 512 against the fp32 graph and
PyTorch eager, interleaved rounds in one process, the same thread count, and compared with PyTorch's output
on the same validation photo (PSNR, peak 1). Static QDQ with calibration, the other half of issue 13's int8
plan, is not tried here.

    python -m benchmarks.onnx_int8 --out docs/export      # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_int8", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from benchmarks import machine_line, write_results
    from compress.models.resolve import load_model
    from compress.quality.cost import machine_info
    from export.graphs import graph_specs
    from export.onnx import trace_to_onnx
    from export.parity import parity_photos, parity_psnr

    loaded = load_model(ns.model)
    student = loaded.model.eval()
    name, lr = parity_photos(((ns.size, ns.size),))[0]
    lr = student.pad_lr(lr)
    with torch.no_grad():
        reference = student(lr).numpy()
    threads = torch.get_num_threads()
    results = {"model": loaded.description, "photo": name, "lr_size": ns.size, "threads": threads, "variants": {}}
    # ORT's quantization tools leave temporary files (sym_shape_infer_temp.onnx, a <uuid>.data copy of the
    # weights) in the working directory when shape inference fails: work inside the temporary folder
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        tmp = Path(tmp)
        fp32 = trace_to_onnx(graph_specs(student, ("end_to_end",))[0], tmp / "fp32")
        prepared = tmp / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # symbolic: fails on dynamic H/W
        graphs = {"onnxruntime fp32": fp32}
        for label, ops in (("int8 dynamic, linear layers", ["MatMul", "Gemm"]),
                           ("int8 dynamic, linear + conv", ["MatMul", "Gemm", "Conv"])):
            path = tmp / f"{len(graphs)}.onnx"
            started = time.perf_counter()
            quantize_dynamic(str(prepared), str(path), op_types_to_quantize=ops, weight_type=QuantType.QInt8)
            results["variants"][f"onnxruntime {label}"] = {"quantize_s": round(time.perf_counter() - started, 1)}
            graphs[f"onnxruntime {label}"] = path
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        sessions = {}
        for label, path in graphs.items():
            try:
                sessions[label] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as err:  # an op without an int8 kernel here: reported, not hidden
                results["variants"].setdefault(label, {})["error"] = f"{type(err).__name__}: {err}"[:300]
        for label, path in graphs.items():
            results["variants"].setdefault(label, {})["bytes"] = path.stat().st_size
        feed = lr.numpy()
        times = {"pytorch eager fp32": [], **{label: [] for label in sessions}}
        for _ in range(ns.rounds + 1):  # the first round warms every variant up and is not counted
            for label in times:
                started = time.perf_counter()
                if label.startswith("pytorch"):
                    with torch.no_grad():
                        output = student(lr).numpy()
                else:
                    session = sessions[label]
                    output = session.run(None, {session.get_inputs()[0].name: feed})[0]
                times[label].append(time.perf_counter() - started)
                if not label.startswith("pytorch"):
                    results["variants"][label]["parity_vs_pytorch_db"] = round(
                        parity_psnr(output, reference, 1.0)["psnr_db"], 2)
        base = statistics.median(times["pytorch eager fp32"][1:])
        fp32_median = statistics.median(times["onnxruntime fp32"][1:]) if "onnxruntime fp32" in times else None
        for label, values in times.items():
            row = results["variants"].setdefault(label, {})
            median = statistics.median(values[1:])
            row.update(median_ms=round(median * 1000, 1), min_ms=round(min(values[1:]) * 1000, 1),
                       max_ms=round(max(values[1:]) * 1000, 1), speedup_vs_pytorch=round(base / median, 2))
            if fp32_median:
                row["speedup_vs_ort_fp32"] = round(fp32_median / median, 2)
    machine = machine_info()
    rows = []
    for label, row in results["variants"].items():
        if "median_ms" not in row:
            rows.append(f"| {label} | failed: {row.get('error', '?')} | | | | |")
            continue
        parity = f"{row['parity_vs_pytorch_db']:.1f} dB" if "parity_vs_pytorch_db" in row else ""
        size = f"{row['bytes'] / 1e6:.1f} MB" if "bytes" in row else ""
        rows.append(f"| {label} | {row['median_ms']:.0f} ({row['min_ms']:.0f}–{row['max_ms']:.0f}) | "
                    f"{row['speedup_vs_pytorch']:.2f}x | {row.get('speedup_vs_ort_fp32', '')}x | {parity} | {size} |"
                    .replace("| x |", "| |"))
    text = "\n".join([
        "# ONNX Runtime int8 (dynamic quantization) on the built-in student", "",
        machine_line(machine, threads, "benchmarks.onnx_int8", argv, packages=("torch", "onnxruntime")), "",
        f"{loaded.description}; end-to-end graph, {ns.size} x {ns.size} -> {ns.size * 4} x {ns.size * 4} on the "
        f"validation photo {name}, {ns.rounds} interleaved rounds after a warm-up round.", "",
        "| variant | median ms (min–max) | vs PyTorch | vs ORT fp32 | parity with PyTorch | file |",
        "| --- | --- | --- | --- | --- | --- |", *rows, ""])
    print(text)
    if ns.out:
        write_results(ns.out, "onnx-int8", {**results, "machine": machine}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
