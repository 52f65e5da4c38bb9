"""Export recipes: build an artifact folder, validate it against a budget, write its manifest last.

`export_onnx` and `export_coreml` work in a hidden temporary folder beside OUT (compress.io.atomic_dir):
graphs, validation report, then manifest.json, then one rename. An interrupted or failed export leaves no
OUT, so a folder named OUT with a manifest is always complete. `validate` re-checks any artifact: files
against the manifest's sha256, the source student against its recorded weights hash, parity of every graph
with PyTorch on real photos, and the quality budget on the validation photos.
"""

from __future__ import annotations

import math
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from compress.budget import check_budget, load_budget
from compress.io import atomic_dir, atomic_path, write_json
from compress.models.student import OneStepSR
from compress.runtime.manifest import (
    ARTIFACT_FORMAT, ARTIFACT_VERSION, MANIFEST_NAME, file_entries, read_manifest, verify_files,
)
from export.graphs import COMPONENT_NAMES, GRAPH_NAMES, graph_specs
from export.parity import DEFAULT_PARITY_SIZES, PEAKS, parity_photos, parity_psnr, stage_inputs

EXPORT_BUDGET_NAME = "export.toml"
QUALITY_METRICS = ("psnr", "stlpips", "niqe")
REPORT_FILES = ("report.json", "report.md")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tool_versions() -> dict:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("tinysr-toolkit", "torch", "onnx", "onnxruntime", "coremltools", "numpy", "diffusers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def student_geometry(student: OneStepSR) -> dict:
    return {
        "upscale": student.settings.upscale, "lr_multiple": student.lr_multiple,
        "pixel_multiple": student.pixel_multiple, "vae_downsample": student.vae_downsample,
        "max_latent_side": student.max_latent_side, "latent_channels": int(student.vae.config.latent_channels),
        "timestep": student.settings.timestep, "parameters": sum(p.numel() for p in student.parameters()),
    }


def source_record(model_arg: str | None, description: str, student: OneStepSR) -> dict:
    from compress.quality.compare import weights_hash

    return {"model": model_arg, "description": description, "weights_sha256": weights_hash(student)}


def clear_stale_temporaries(output: Path) -> None:
    """Hidden temporary folders a killed export left beside OUT (atomic_dir names them .OUT.*.tmp)."""
    for stale in output.parent.glob(f".{output.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


# -- ONNX ------------------------------------------------------------------------------------------------
def export_onnx(student: OneStepSR, output: Path, *, model_arg: str | None, description: str,
                precision: str = "fp32", opset: int = 17, components: bool = False, budget_path=None,
                parity_sizes=DEFAULT_PARITY_SIZES, metrics=QUALITY_METRICS, overwrite: bool = False,
                check_quality: bool = True, quality_images: int | None = None,
                calibration_images: int = 8) -> dict:
    """Write the ONNX artifact OUT (end-to-end graph, and the components with `components`), validated."""
    from export.graphs import with_precisions
    from export.onnx import EXTERNAL_DATA_BYTES, FP16_TRIAL_ORDER, save_optimized, trace_to_onnx

    budget = load_budget(budget_path, EXPORT_BUDGET_NAME)
    output = Path(output)
    clear_stale_temporaries(output)
    start = time.perf_counter()
    with atomic_dir(output, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory(
            prefix=f".{output.name}.", suffix=".tmp", dir=output.parent) as scratch_dir:
        scratch = Path(scratch_dir)  # traced graphs before optimization; named like atomic_dir's, so cleared alike
        precisions = {name: "fp32" for name in COMPONENT_NAMES}
        fp16_trials, int8_trials, int8_components = {}, {}, []
        if precision == "int8":
            int8_trials, int8_components, calibration = int8_trial(student, scratch, budget, parity_sizes, opset,
                                                                   calibration_images)
        if precision == "fp16":
            floor = budget["parity"].get("fp16", 35.0)
            photos = [stage_inputs(student, lr) for _, lr in parity_photos(parity_sizes)]
            for name in FP16_TRIAL_ORDER:
                log(f"fp16 trial {name}: tracing it in fp16 ...")
                spec = graph_specs(with_precisions(student, {name: "fp16"}), (name,))[0]
                candidate = trace_to_onnx(spec, scratch / f"trial-{name}", opset)
                worst = worst_parity(candidate, photos, name, PEAKS.get(spec.output_name))
                keep = worst >= floor
                fp16_trials[name] = {"fp16_psnr_db": worst if math.isfinite(worst) else None,
                                     "finite": worst != -math.inf, "floor_db": floor,
                                     "precision": "fp16" if keep else "fp32"}
                log(f"fp16 trial {name}: worst parity {worst:.1f} dB vs floor {floor} -> "
                    f"{'fp16' if keep else 'kept fp32'}")
                precisions[name] = "fp16" if keep else "fp32"
            precisions["upsample"] = precisions["transformer"]
        exported = with_precisions(student, precisions) if precision == "fp16" else student
        fp32_parts = [name for name in ("vae_encoder", "transformer", "vae_decoder") if precisions[name] == "fp32"]
        if precision == "fp32" or len(fp32_parts) == 3:
            precisions["end_to_end"] = "fp32"
        else:
            precisions["end_to_end"] = "fp16" + (f"+fp32:{','.join(fp32_parts)}" if fp32_parts else "")
        specs = {spec.name: spec for spec in graph_specs(exported, GRAPH_NAMES)}
        shipped = GRAPH_NAMES if components else ("end_to_end",)
        graphs, written = {}, []
        if precision == "int8":
            from export.quantize import precision_label

            precisions["end_to_end"] = precision_label(int8_components)
            for name in COMPONENT_NAMES:
                precisions[name] = "int8" if name in int8_components else "fp32"
        for index, name in enumerate(shipped, 1):  # one graph in memory at a time: a 2 B model is 8 GB each
            log(f"export [{index}/{len(shipped)}] tracing {name} (opset {opset}, {precisions[name]}) ...")
            raw = trace_to_onnx(specs[name], scratch / name, opset)
            quantized = [c for c in int8_components if name in ("end_to_end", c)]
            if quantized:
                from export.onnx import folder_bytes
                from export.quantize import quantize_graph

                log(f"export [{index}/{len(shipped)}] int8: {', '.join(quantized)} ...")
                files = [f"{name}.onnx"]
                external = folder_bytes(raw) > EXTERNAL_DATA_BYTES
                inputs = [stages[name][0] for stages in calibration]
                quantize_graph(raw, tmp / files[0], quantized, inputs, external_data=external)
                files += [files[0] + ".data"] if external else []
            else:
                files = save_optimized(raw, tmp / f"{name}.onnx")
            shutil.rmtree(raw.parent)
            written += files
            spec = specs[name]
            graphs[name] = {"file": files[0], "files": files, "input": spec.input_name, "output": spec.output_name,
                            "multiple": spec.multiple, "dynamic_axes": ["batch", "height", "width"],
                            "precision": precisions[name], "opset": opset}
        del specs, exported
        manifest = {
            "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "runtime": "onnx", "graphs": graphs,
            "student": student_geometry(student), "source": source_record(model_arg, description, student),
            "tools": tool_versions(), "exporter": "torch.onnx.export(dynamo=False), ONNX Runtime basic optimization",
            "fp16_trials": fp16_trials, "int8_trials": int8_trials, "files": file_entries(tmp, written),
        }
        log(f"export: graphs written in {time.perf_counter() - start:.0f} s; validating ...")
        report = validate(tmp, manifest=manifest, student=student, budget=budget, parity_sizes=parity_sizes,
                          metrics=metrics if check_quality else (), quality_images=quality_images,
                          display_name=str(output))
        manifest["budgets"] = budget
        manifest["results"] = {k: report[k] for k in ("passed", "failed", "skipped", "parity", "quality_budget")}
        write_json(tmp / MANIFEST_NAME, manifest)  # last: its presence marks a complete artifact
    log(f"export: {output} in {time.perf_counter() - start:.0f} s")
    return report


def worst_parity(candidate: Path, photos: list[dict], name: str, peak: float | None) -> float:
    """The lowest PSNR (dB) of graph `name` at `candidate` against PyTorch over the photos' stage inputs
    (export.parity.stage_inputs); -inf when an output is not finite."""
    from export.onnx import run_onnx

    worst = math.inf
    for output, stages in zip(run_onnx(candidate, [stages[name][0] for stages in photos]), photos):
        result = parity_psnr(output, stages[name][1].numpy(), peak)
        worst = min(worst, result["psnr_db"] if result["finite"] else -math.inf)
    return worst


def int8_trial(student: OneStepSR, scratch: Path, budget: dict, parity_sizes, opset: int, calibration_images: int):
    """Each quantizable component's own graph quantized alone and compared with PyTorch on the parity photos
    (export.quantize): ({component: trial record}, the components that stay int8, the calibration crops'
    stage inputs (export.parity.stage_inputs), which calibrate the shipped graphs too)."""
    from export.onnx import run_onnx, trace_to_onnx
    from export.quantize import INT8_COMPONENTS, calibration_lr, quantize_graph

    floor = budget["parity"].get("int8", 35.0)
    calibration = [stage_inputs(student, lr) for lr in calibration_lr(calibration_images)]  # every graph's inputs
    photos = [stage_inputs(student, lr) for _, lr in parity_photos(parity_sizes)]
    trials, kept = {}, []
    for name in INT8_COMPONENTS:
        log(f"int8 trial {name}: quantizing it alone ({calibration_images} calibration crops) ...")
        spec = graph_specs(student, (name,))[0]
        raw = trace_to_onnx(spec, scratch / f"trial-{name}", opset)
        candidate = scratch / f"trial-{name}" / "int8.onnx"
        counts = quantize_graph(raw, candidate, (name,), [stages[name][0] for stages in calibration])
        worst = worst_parity(candidate, photos, name, PEAKS.get(spec.output_name))
        shutil.rmtree(raw.parent)
        keep = worst >= floor
        trials[name] = {"int8_psnr_db": worst if math.isfinite(worst) else None, "finite": worst != -math.inf,
                        "floor_db": floor, "precision": "int8" if keep else "fp32", **counts}
        log(f"int8 trial {name}: worst parity {worst:.1f} dB vs floor {floor} -> {'int8' if keep else 'kept fp32'}")
        if keep:
            kept.append(name)
    # Components that pass alone can miss the floor together (their errors add up): check them end to end and
    # return the one with the lowest parity of its own to fp32 until the whole graph meets the floor.
    if kept:
        spec = graph_specs(student, ("end_to_end",))[0]
        raw = trace_to_onnx(spec, scratch / "trial-end_to_end", opset)
        padded = [student.pad_lr(stages["end_to_end"][0]) for stages in photos]
        with torch.no_grad():
            references = [student(lr).numpy() for lr in padded]
        inputs = [student.pad_lr(stages["end_to_end"][0]) for stages in calibration]
        while kept:
            candidate = scratch / "trial-end_to_end" / "int8.onnx"
            quantize_graph(raw, candidate, kept, inputs)
            worst = min((parity_psnr(out, ref, 1.0)["psnr_db"] if np.isfinite(out).all() else -math.inf)
                        for out, ref in zip(run_onnx(candidate, padded), references))
            log(f"int8 trial end to end ({', '.join(kept)}): worst parity {worst:.1f} dB vs floor {floor}")
            if worst >= floor:
                break
            dropped = min(kept, key=lambda n: trials[n]["int8_psnr_db"])
            kept.remove(dropped)
            trials[dropped].update(precision="fp32", end_to_end_psnr_db=worst if math.isfinite(worst) else None,
                                   note="int8 alone met the floor; with the others end to end it did not")
            log(f"int8 trial: {dropped} returns to fp32")
        shutil.rmtree(raw.parent)
    return trials, kept, calibration


# -- Core ML ---------------------------------------------------------------------------------------------
def export_coreml(student: OneStepSR, output: Path, *, model_arg: str | None, description: str,
                  precision: str = "fp16", palettize_bits: int | None = None, int8: bool = False,
                  shapes=((64, 64),), components: bool = False, budget_path=None, parity_sizes=DEFAULT_PARITY_SIZES,
                  overwrite: bool = False, predictor=None) -> dict:
    """Write the Core ML artifact OUT (.mlpackage per graph) and validate what this machine can."""
    from export.coreml import convert_coreml

    budget = load_budget(budget_path, EXPORT_BUDGET_NAME)
    output = Path(output)
    clear_stale_temporaries(output)
    start = time.perf_counter()
    graphs_wanted = GRAPH_NAMES if components else ("end_to_end",)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        log(f"export: converting {', '.join(graphs_wanted)} to Core ML ({precision}"
            f"{', palettized to %d bits' % palettize_bits if palettize_bits else ''}{', int8 weights' if int8 else ''})")
        graphs = convert_coreml(student, tmp, graphs=graphs_wanted, precision=precision,
                                palettize_bits=palettize_bits, int8=int8, shapes=shapes)
        manifest = {
            "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "runtime": "coreml", "graphs": graphs,
            "student": student_geometry(student), "source": source_record(model_arg, description, student),
            "tools": tool_versions(), "exporter": "torch.export + coremltools (mlprogram, iOS 17)",
            "files": file_entries(tmp, [record["file"] for record in graphs.values()]),
        }
        report = validate(tmp, manifest=manifest, student=student, budget=budget, parity_sizes=parity_sizes,
                          display_name=str(output), predictor=predictor)
        manifest["budgets"] = budget
        manifest["results"] = {k: report[k] for k in ("passed", "failed", "skipped", "parity", "quality_budget")}
        write_json(tmp / MANIFEST_NAME, manifest)
    log(f"export: {output} in {time.perf_counter() - start:.0f} s")
    return report


def coreml_checks(folder: Path, manifest: dict, student: OneStepSR, budget: dict, predictor=None) -> tuple[dict, list[str]]:
    """Each package against its manifest record (spec level: names, shapes, precision, compression), then
    numerical parity with PyTorch on photos at the package's shapes: measured on macOS (or with an injected
    predictor), reported as skipped elsewhere, never as passed."""
    from export.coreml import check_mlpackage, coreml_parity

    rows, failed = {}, []
    for name, record in manifest["graphs"].items():
        path = folder / record["file"]
        failed += [f"{record['file']}: {problem}" for problem in check_mlpackage(path, record)]
        # Package shapes are in the graph's own input pixels; the photos are cut at the matching LR size.
        per_lr = {"end_to_end": 1, "upsample": 1, "vae_encoder": student.settings.upscale}.get(
            name, student.settings.upscale / student.vae_downsample)
        lr_sizes = [(round(shape[2] / per_lr), round(shape[3] / per_lr)) for shape in record["shapes"]]
        inputs, references = [], {}
        for _, lr in parity_photos(tuple(lr_sizes)):
            source, reference = stage_inputs(student, lr)[name]
            inputs.append(source.numpy())
            references[source.numpy().tobytes()] = reference.numpy()
        result = coreml_parity(path, lambda x: references[np.ascontiguousarray(x, np.float32).tobytes()], inputs,
                               predictor=predictor, peak=PEAKS.get(record["output"], 2.0))
        floor = budget["parity"].get(record["precision"], 35.0)
        result["floor_db"] = floor
        if result["status"] == "measured":
            from export.coreml import coreml_latency

            result["latency"] = coreml_latency(path, inputs[0], repeats=5, predictor=predictor)
            ok = all(r["finite"] and r["psnr_db"] >= floor for r in result["results"])
            result["passed"] = ok
            if not ok:
                failed.append(f"parity {name} ({record['precision']}): {result['min_psnr_db']:.1f} dB < floor {floor} dB")
        rows[name] = result
    return rows, failed


# -- validation ------------------------------------------------------------------------------------------
def validate(folder: Path, *, manifest: dict | None = None, student: OneStepSR | None = None, budget=None,
             budget_path=None, model_arg: str | None = None, parity_sizes=DEFAULT_PARITY_SIZES,
             metrics=QUALITY_METRICS, quality_images: int | None = None, display_name: str | None = None,
             predictor=None) -> dict:
    """Check an artifact; writes folder/report.json and report.md and returns the report ("passed", "failed")."""
    folder = Path(folder)
    budget = budget or load_budget(budget_path, EXPORT_BUDGET_NAME)
    failed: list[str] = []
    fresh = manifest is not None
    manifest = manifest if fresh else read_manifest(folder)
    if not fresh:
        failed += verify_files(folder, manifest)
    if student is None:
        from compress.models.resolve import load_model
        from compress.quality.compare import weights_hash

        spec = model_arg if model_arg is not None else manifest["source"]["model"]
        loaded = load_model(spec)
        student = loaded.model
        if weights_hash(student) != manifest["source"]["weights_sha256"]:
            failed.append(f"source model {spec or 'built-in'}: its weights differ from those exported "
                          "(manifest source.weights_sha256); pass --model with the exported student")
    report = {"artifact": display_name or str(folder), "runtime": manifest["runtime"], "budget": budget["path"],
              "integrity": list(failed), "parity": {}, "quality": {}, "quality_budget": None}
    if manifest["runtime"] == "onnx" and not report["integrity"]:
        parity, parity_failed = onnx_parity(folder, manifest, student, budget, parity_sizes)
        report["parity"] = parity
        failed += parity_failed
        if metrics and not parity_failed:
            from compress.quality.compare import quality
            from compress.runtime.onnx import OnnxStudent

            log("validate: quality on the validation photos ...")
            runtime = OnnxStudent(folder, manifest=manifest)
            report["quality"] = quality(student, runtime, tuple(metrics), limit=quality_images,
                                        bicubic_metrics=tuple(budget["beat_bicubic"]), compare_outputs=False)
            checked = check_budget(report["quality"], budget)
            report["quality_budget"] = checked
            failed += [f"budget {item['item']}: measured {_measured(item)}" for item in checked["items"]
                       if item["status"] == "failed"]
    elif manifest["runtime"] == "coreml" and not report["integrity"]:
        parity, coreml_failed = coreml_checks(folder, manifest, student, budget, predictor=predictor)
        report["parity"] = parity
        failed += coreml_failed
        report["quality_budget"] = {"status": "skipped", "why": "Core ML runs only on macOS; the quality budget "
                                    "needs the package's outputs (parity above says whether it ran)"}
    report["failed"] = failed
    report["passed"] = not failed
    report["skipped"] = [f"parity {name}: {rows['why']}" for name, rows in report["parity"].items()
                         if isinstance(rows, dict) and rows.get("status") == "skipped"]
    if isinstance(report["quality_budget"], dict) and report["quality_budget"].get("status") == "skipped":
        report["skipped"].append(f"quality budget: {report['quality_budget']['why']}")
    write_json(folder / "report.json", report)
    with atomic_path(folder / "report.md") as tmp:
        tmp.write_text(markdown(report))
    return report


def _measured(item: dict) -> str:
    if "measured" in item:
        return f"{item['measured']:+.4f} (student {item['student']:.4f}, source {item['original']:.4f})"
    return f"student {item.get('student')}, bicubic {item.get('bicubic')}"


def onnx_parity(folder: Path, manifest: dict, student: OneStepSR, budget: dict, sizes) -> tuple[dict, list[str]]:
    """Every shipped graph against PyTorch on real photos at `sizes`; the end-to-end graph through the
    runtime wrapper (padding and cropping included), plus one batch of two to prove the batch axis."""
    from compress.runtime.onnx import OnnxStudent

    runtime = OnnxStudent(folder, manifest=manifest)
    photos = parity_photos(sizes)
    stages = [(label, stage_inputs(student, lr)) for label, lr in photos]
    first = photos[0][1]
    batch = (f"batch of 2 @{first.shape[-2]}x{first.shape[-1]}", stage_inputs(student, torch.cat([first, first.flip(-1)])))
    rows, failed = {}, []
    for name, graph in manifest["graphs"].items():
        floor = budget["parity"].get(precision_family(graph["precision"]), 40.0)
        rows[name] = []
        cases = [(label, outputs[name]) for label, outputs in stages + ([batch] if name == "end_to_end" else [])]
        for label, (source, reference) in cases:
            output = runtime(source) if name == "end_to_end" else runtime.run(name, source)
            result = parity_psnr(output.numpy(), reference.numpy(), PEAKS.get(graph["output"]))
            ok = result["finite"] and result["psnr_db"] >= floor
            rows[name].append({"input": label, "shape": list(source.shape), **result, "floor_db": floor,
                               "status": "passed" if ok else "failed"})
            if not ok:
                got = "non-finite output (overflow)" if not result["finite"] else f"{result['psnr_db']:.1f} dB"
                failed.append(f"parity {name} ({graph['precision']}) on {label}: {got} < floor {floor} dB")
    return rows, failed


def precision_family(precision: str) -> str:
    """The [parity] floor a graph is held to: "fp16+fp32:vae_decoder" -> fp16, "int8+fp32:..." -> int8."""
    return precision.split("+")[0]


def markdown(report: dict) -> str:
    lines = [f"# Validation of {report['artifact']}", "",
             f"Runtime: {report['runtime']}; budget: {report['budget']}.", "",
             "**Result: " + ("FAILED**" if not report["passed"] else "passed** (the checks that ran; "
                             f"{len(report['skipped'])} skipped, below)" if report.get("skipped") else "passed**"), ""]
    if report["failed"]:
        lines += [f"- {line}" for line in report["failed"]] + [""]
    if report["parity"]:
        lines += ["## Parity with PyTorch", "", "| graph | input | PSNR (dB) | max abs diff | floor | status |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, rows in report["parity"].items():
            if isinstance(rows, dict) and rows.get("status") == "skipped":
                lines.append(f"| {name} | — | — | — | {rows.get('floor_db')} | skipped: {rows.get('why', '')} |")
                continue
            if isinstance(rows, dict):  # Core ML, measured
                rows = [{"input": "x".join(map(str, r["shape"])), "psnr_db": r["psnr_db"],
                         "max_abs_diff": r["max_abs_diff"], "floor_db": rows["floor_db"],
                         "status": "passed" if rows.get("passed") else "failed"} for r in rows["results"]]
            for row in rows:
                psnr = "inf" if row.get("psnr_db") == math.inf else (
                    f"{row['psnr_db']:.1f}" if row.get("psnr_db") is not None else "non-finite")
                diff = f"{row['max_abs_diff']:.2e}" if row.get("max_abs_diff") is not None else "—"
                lines.append(f"| {name} | {row['input']} | {psnr} | {diff} | {row['floor_db']} | {row['status']} |")
        lines.append("")
    checked = report.get("quality_budget")
    if checked and checked.get("status") == "skipped":
        lines += ["## Quality budget", "", f"Skipped: {checked['why']}.", ""]
    elif checked:
        lines += ["## Quality budget (validation photos, artifact vs source student)", "",
                  "| item | status | measured |", "| --- | --- | --- |"]
        for item in checked["items"]:
            lines.append(f"| {item['item']} | {item['status']} | {_measured(item) if item['status'] != 'skipped' else item['why']} |")
        lines.append("")
    return "\n".join(lines)
