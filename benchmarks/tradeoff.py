"""Speed/quality trade-off sweep: one student from uncompressed to its smallest size, on every runtime.

For each parameter target, the toolkit's own stages, not copies: `compress prune` (the planner's plan, with
the candidate steps measured once for all targets, then recovery), `export onnx` (fp32), `export onnx
--precision int8` (static QDQ convolutions, dynamic int8 linear layers, each component's precision chosen by
the budget's int8 parity floor) and `export coreml` (fp16, spec-checked; Core ML runs only on macOS). Each
target then gets its parameters, MACs, artifact bytes and every offline quality metric on the validation
photos (and on `--data HR_FOLDER`), and each row is checked against the default quality budget (against the
uncompressed student) and, for artifacts, against export's gate (against the student it was exported from).
Latency is measured last, at every `--sizes` LR side with 4x output: each target's runtimes in interleaved
rounds together with the uncompressed PyTorch student (warm-up round not counted; median, min and max), so
every speed-up is a ratio within the same rounds of one run, with one target's ONNX Runtime sessions in memory
at a time.

    python -m benchmarks.tradeoff -o runs/tradeoff                # default: 5 targets, ~50 min on 2 cores
    python -m benchmarks.tradeoff --quick -o runs/tradeoff-quick  # 1.0 and 0.2, short recovery, one round at 128 only
    python -m benchmarks.tradeoff --runtimes torch,onnx --data my_photos/ -o runs/tradeoff-mine

It resumes: rerun the same command and finished targets (their pruned student, artifacts and measurements,
checked against the settings that made them) are not redone; an interrupted prune continues from its
checkpoint. Writes OUT/tradeoff.csv, OUT/tradeoff.json, OUT/report.md and OUT/pareto.png, with one folder
per target under OUT/targets/ (prune run folder, artifact folders, measure.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compress.cli import comma_separated

RUNTIMES = ("torch", "onnx", "onnx-int8", "coreml")
DEFAULT_TARGETS = (1.0, 0.5, 0.35, 0.2, 0.15)
QUICK_TARGETS = (1.0, 0.2)
DEFAULT_RECOVER_STEPS = 100  # what fits the default sweep in 60 minutes here; `compress prune` defaults to 300
QUICK_RECOVER_STEPS = 20
DEFAULT_REPEATS, QUICK_REPEATS = 3, 1
DEFAULT_SIZES, QUICK_SIZES = (128, 256), (128,)  # --quick skips 256 -> 1024: its rounds were a third of 10 minutes
QUALITY_COLUMNS = ("psnr", "ssim", "stlpips", "niqe")
EXPORTS = ("onnx", "onnx-int8", "coreml")


def parse_targets(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in comma_separated(text))
    except ValueError:
        raise ValueError(f"--targets: {text!r} is not a comma-separated list of fractions, e.g. 1.0,0.5,0.2") from None


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in comma_separated(text))
    except ValueError:
        raise ValueError(f"--sizes: {text!r} is not a comma-separated list of LR sides, e.g. 128,256") from None


@dataclass
class TradeoffArgs:
    """Options of the sweep (each is a flag of the same name)."""

    targets: tuple[float, ...] | None = field(default=None, metadata={
        "parse": parse_targets, "metavar": "R[,R...]", "help": "parameter fractions; 1.0 (the uncompressed student, "
        "every ratio's reference) is required. Default 1.0,0.5,0.35,0.2,0.15 (--quick: 1.0,0.2)"})
    recover_steps: int | None = field(default=None, metadata={
        "help": f"recovery steps of each prune (default {DEFAULT_RECOVER_STEPS}; --quick {QUICK_RECOVER_STEPS})"})
    runtimes: tuple[str, ...] = field(default=RUNTIMES, metadata={
        "parse": comma_separated, "metavar": "NAME[,NAME...]", "help": f"of {', '.join(RUNTIMES)}; torch is required"})
    sizes: tuple[int, ...] | None = field(default=None, metadata={
        "parse": parse_sizes, "metavar": "S[,S...]",
        "help": "LR sides of the latency measurement, x4 output (default 128,256; --quick 128)"})
    repeats: int | None = field(default=None, metadata={
        "help": f"timed rounds after the warm-up round (default {DEFAULT_REPEATS}; --quick {QUICK_REPEATS})"})
    quick: bool = field(default=False, metadata={
        "help": "two targets, a short recovery, one timed round, latency at 128 -> 512 only"})
    data: Path | None = field(default=None, metadata={
        "metavar": "HR_FOLDER", "help": "also score every row on this folder of HR images (degraded as eval does)"})
    quality_images: int | None = field(default=None, metadata={
        "help": "score the first N validation photos (default: all 7)"})
    calibration_images: int = field(default=8, metadata={"help": "calibration crops of the planner and of int8"})
    hr_size: int = field(default=128, metadata={"help": "HR crop side of the prune's search and recovery"})
    batch_size: int = field(default=4, metadata={"help": "crops per recovery step"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})

    def __post_init__(self):
        self.targets = self.targets or (QUICK_TARGETS if self.quick else DEFAULT_TARGETS)
        self.recover_steps = self.recover_steps if self.recover_steps is not None else (
            QUICK_RECOVER_STEPS if self.quick else DEFAULT_RECOVER_STEPS)
        self.repeats = self.repeats or (QUICK_REPEATS if self.quick else DEFAULT_REPEATS)
        self.sizes = self.sizes or (QUICK_SIZES if self.quick else DEFAULT_SIZES)
        if any(not 0.0 < t <= 1.0 for t in self.targets):
            raise ValueError(f"--targets must be fractions in (0, 1], got {','.join(f'{t:g}' for t in self.targets)}")
        if 1.0 not in self.targets:
            raise ValueError("--targets must include 1.0: the uncompressed student is every ratio's reference")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("--targets: a target is given twice")
        self.targets = tuple(sorted(self.targets, reverse=True))
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"--runtimes: unknown {', '.join(unknown)}; allowed: {', '.join(RUNTIMES)}")
        if "torch" not in self.runtimes:
            raise ValueError("--runtimes must include torch: the uncompressed PyTorch student is the speed reference")
        if not self.sizes or any(s < 16 or s % 16 for s in self.sizes):
            raise ValueError(f"--sizes must be LR sides that are multiples of 16, got {self.sizes}")
        if self.recover_steps < 0 or self.repeats < 1:
            raise ValueError("--recover-steps must be >= 0 and --repeats >= 1")
        for name in ("calibration_images", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.hr_size % 64:
            raise ValueError(f"--hr-size must be a multiple of 64, got {self.hr_size}")
        if self.data is not None and not Path(self.data).is_dir():
            raise ValueError(f"--data {self.data}: no such folder (give a folder of HR images)")


def label(target: float) -> str:
    return f"{target:g}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """'[k/N] stage target: ... (elapsed, ETA)' lines; the ETA is the mean time of the stages of the same kind
    finished in this run (any kind's mean before one of that kind has finished)."""

    def __init__(self, stages: list[tuple[str, str]]):
        self.stages, self.done, self.times, self.started = stages, 0, {}, time.perf_counter()

    def start(self, kind: str, target: str) -> float:
        self.done += 1
        eta = self.eta(self.stages[self.done - 1:])
        log(f"[{self.done}/{len(self.stages)}] {kind} {target} (elapsed {self._clock(time.perf_counter() - self.started)}"
            + (f", ETA {self._clock(eta)})" if eta is not None else ")"))
        return time.perf_counter()

    def finish(self, kind: str, began: float) -> None:
        self.times.setdefault(kind, []).append(time.perf_counter() - began)

    def eta(self, remaining: list[tuple[str, str]]) -> float | None:
        if not self.times:
            return None
        overall = statistics.mean(t for values in self.times.values() for t in values)
        return sum(statistics.mean(self.times[k]) if k in self.times else overall for k, _ in remaining)

    @staticmethod
    def _clock(seconds: float) -> str:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


class Sweep:
    """The sweep's state: the source student, the settings, the folders (module docstring)."""

    def __init__(self, model: str | None, output: Path, args: TradeoffArgs):
        from compress.models.resolve import load_model

        self.model_arg, self.output, self.args = model, Path(output), args
        loaded = load_model(model)
        self.original, self.description = loaded.model.eval(), loaded.description
        self.original_outputs, self.data_outputs = {}, {}
        self.data_pairs = None

    def folder(self, target: float) -> Path:
        return self.output / "targets" / label(target)

    def key(self, target: float) -> dict:
        """The settings a target's stages depend on: a finished target is reused only when they match."""
        a = self.args
        return {"model": self.description, "target": target, "recover_steps": a.recover_steps, "seed": a.seed,
                "calibration_images": a.calibration_images, "hr_size": a.hr_size, "batch_size": a.batch_size,
                "quality_images": a.quality_images, "data": str(a.data) if a.data else None}

    # -- per-target stages -------------------------------------------------------------------------------
    def read_measure(self, target: float) -> dict:
        path = self.folder(target) / "measure.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("key") == self.key(target):
                return record
        return {"key": self.key(target), "runtimes": {}}

    def write_measure(self, target: float, record: dict) -> None:
        from compress.io import write_json

        write_json(self.folder(target) / "measure.json", record)

    def plans(self, targets: list[float]) -> dict[float, Path]:
        """plan.json for each target still to prune; the candidate steps are measured once for all of them."""
        from compress.io import write_json
        from compress.prune import planner
        from compress.prune.run import PLAN_SETTINGS
        from compress.prune.steps import Calibration

        paths, costs_path = {}, self.output / "plan-costs.json"
        costs = json.loads(costs_path.read_text()) if costs_path.is_file() else None
        calibration = Calibration(self.args.calibration_images, self.args.seed)
        for target in targets:
            path = self.folder(target) / "plan.json"
            prune_args = self.prune_args(target_params=target)
            if not path.is_file() or json.loads(path.read_text()).get("settings") != {
                    k: getattr(prune_args, k) for k in PLAN_SETTINGS}:
                plan = planner.plan_for_target(self.original, target, prune_args, calibration, costs=costs)
                costs = plan["costs"]
                write_json(costs_path, costs)
                plan["settings"] = {k: getattr(prune_args, k) for k in PLAN_SETTINGS}
                write_json(path, plan)
            paths[target] = path
        return paths

    def prune_args(self, **kwargs):
        from compress.prune.cli import PruneArgs

        a = self.args
        return PruneArgs(recover_steps=a.recover_steps, calibration_images=a.calibration_images, hr_size=a.hr_size,
                         batch_size=a.batch_size, seed=a.seed, metrics=("none",), latency_size=min(a.sizes),
                         overwrite=True, **kwargs)

    def prune(self, target: float, plan: Path) -> None:
        from compress.prune.run import PLAN_NAME, prune, work_dir

        out = self.folder(target) / "prune"
        resume = (work_dir(out) / PLAN_NAME).is_file()
        args = self.prune_args(resume=True) if resume else self.prune_args(plan=plan)
        prune(self.model_arg, out, args)

    def student(self, target: float):
        from compress.models.student import OneStepSR

        if target == 1.0:
            return self.original
        return OneStepSR.from_pretrained(self.folder(target) / "prune" / "model").eval()

    def export(self, target: float, runtime: str, student) -> dict:
        """The artifact of `runtime` (reused when its manifest names this student's weights); its gate result."""
        from compress.quality.compare import weights_hash
        from compress.runtime.manifest import MANIFEST_NAME
        from export.artifact import export_coreml, export_onnx

        folder = self.folder(target) / runtime
        manifest_path = folder / MANIFEST_NAME
        source_hash = weights_hash(student)
        if not (manifest_path.is_file() and json.loads(manifest_path.read_text())["source"]["weights_sha256"] == source_hash):
            common = dict(model_arg=str(self.folder(target) / "prune") if target != 1.0 else self.model_arg,
                          description=f"{self.description} at {label(target)} of its parameters", overwrite=True)
            if runtime == "coreml":
                # one shape: the weights (all a package's size) do not depend on it, and the end-to-end graph
                # cannot take LR sides whose latent passes the transformer's position table (256 on the built-in)
                export_coreml(student, folder, precision="fp16", shapes=((self.args.sizes[0],) * 2,), **common)
            else:
                export_onnx(student, folder, precision="int8" if runtime == "onnx-int8" else "fp32", metrics=("all",),
                            quality_images=self.args.quality_images, calibration_images=self.args.calibration_images,
                            **common)
        manifest = json.loads(manifest_path.read_text())
        report = json.loads((folder / "report.json").read_text())
        graph = manifest["graphs"]["end_to_end"]
        return {"bytes": sum(f["bytes"] for f in manifest["files"].values()), "precision": graph["precision"],
                "gate": "passed" if report["passed"] else "failed", "gate_failed": report["failed"],
                "gate_skipped": report.get("skipped", []), "quality": report.get("quality") or None,
                "int8_trials": manifest.get("int8_trials") or None}

    def quality(self, student, pairs=None, cache=None) -> dict:
        from compress.quality.compare import quality

        return quality(self.original, student, ("all",), limit=self.args.quality_images, compare_outputs=False,
                       pairs=pairs, original_outputs=self.original_outputs if cache is None else cache)

    def data_quality(self, model) -> dict:
        from compress.evaluate import EvalArgs, folder_pairs

        if self.data_pairs is None:
            self.data_pairs = folder_pairs(Path(self.args.data), EvalArgs(data=str(self.args.data)))
        return self.quality(model, pairs=self.data_pairs, cache=self.data_outputs)

    def macs(self, student) -> dict:
        import torch

        from compress.quality.cost import count_macs

        return {str(s): count_macs(student, torch.zeros(1, 3, s, s)) for s in self.args.sizes}


def stage_list(sweep: Sweep) -> list[tuple[str, str]]:
    """What is left to do, in order, for the progress display."""
    stages = [("plan", "all")] if targets_to_prune(sweep) else []
    for target in sweep.args.targets:
        record = sweep.read_measure(target)
        if record.get("complete") and all(r in record["runtimes"] for r in sweep.args.runtimes):
            continue
        if target != 1.0 and not (sweep.folder(target) / "prune" / "prune_report.json").is_file():
            stages.append(("prune", label(target)))
        stages += [(f"export {r}", label(target)) for r in sweep.args.runtimes if r in EXPORTS
                   and r not in record["runtimes"]]
        stages.append(("measure", label(target)))
    return stages + [("latency", "all")]


def targets_to_prune(sweep: Sweep) -> list[float]:
    return [t for t in sweep.args.targets if t != 1.0 and not (sweep.folder(t) / "prune" / "prune_report.json").is_file()
            and not sweep.read_measure(t).get("complete")]


def exported(record: dict, runtime: str, args: TradeoffArgs) -> bool:
    """Whether this sweep asked for `runtime` and the target's artifact of it was written."""
    return runtime in args.runtimes and runtime in record["runtimes"] and "error" not in record["runtimes"][runtime]


def run_targets(sweep: Sweep, progress: Progress) -> dict[float, dict]:
    import torch

    args = sweep.args
    records, plans = {}, {}
    to_prune = targets_to_prune(sweep)
    if to_prune:  # one measurement of the candidate steps serves every target
        began = progress.start("plan", "all")
        plans = sweep.plans(to_prune)
        progress.finish("plan", began)
    for target in args.targets:
        record = sweep.read_measure(target)
        if record.get("complete") and all(r in record["runtimes"] for r in args.runtimes):
            log(f"target {label(target)}: finished earlier ({sweep.folder(target) / 'measure.json'}), reused")
            records[target] = record
            continue
        sweep.folder(target).mkdir(parents=True, exist_ok=True)
        if target in plans:
            began = progress.start("prune", label(target))
            sweep.prune(target, plans[target])
            progress.finish("prune", began)
        student = sweep.student(target)
        for runtime in args.runtimes:
            if runtime in EXPORTS and runtime not in record["runtimes"]:
                began = progress.start(f"export {runtime}", label(target))
                try:
                    record["runtimes"][runtime] = sweep.export(target, runtime, student)
                except Exception as err:  # an exporter's failure is a row that says so, not a lost sweep
                    record["runtimes"][runtime] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
                    log(f"export {runtime} {label(target)} failed: {record['runtimes'][runtime]['error']}")
                progress.finish(f"export {runtime}", began)
                sweep.write_measure(target, record)
        began = progress.start("measure", label(target))
        record["params"] = sum(p.numel() for p in student.parameters())
        record["torch_bytes"] = sum(t.numel() * t.element_size() for t in student.state_dict().values())
        record["macs"] = sweep.macs(student)
        with torch.no_grad():
            record["runtimes"]["torch"] = {"bytes": record["torch_bytes"], "precision": "fp32",
                                           "quality": sweep.quality(student)}
            for runtime in ("onnx", "onnx-int8"):  # export scores quality only after parity passed: score the rest
                entry = record["runtimes"].get(runtime)
                if entry and "error" not in entry and not entry.get("quality"):
                    from compress.runtime.onnx import OnnxStudent

                    entry["quality"] = sweep.quality(OnnxStudent(sweep.folder(target) / runtime))
                    entry["quality_note"] = "scored by the sweep: the export gate failed before its quality check"
        if args.data is not None:
            from compress.runtime.onnx import OnnxStudent

            record["data_quality"] = {"torch": sweep.data_quality(student)}
            for runtime in ("onnx", "onnx-int8"):
                if exported(record, runtime, args):
                    record["data_quality"][runtime] = sweep.data_quality(OnnxStudent(sweep.folder(target) / runtime))
        record["complete"] = True
        sweep.write_measure(target, record)
        progress.finish("measure", began)
        records[target] = record
    return records


def timing_input(size: int):
    """The bundled sample photo resized to size x size (the models have no data-dependent control flow)."""
    import torch

    from compress.imaging import load_image

    sample = Path(__file__).resolve().parent.parent / "compress" / "assets" / "samples" / "astronaut_lr.png"
    image = load_image(sample).rgb[None]
    return torch.nn.functional.interpolate(image, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def measure_latency(sweep: Sweep, records: dict[float, dict]) -> dict:
    """Median/min/max ms per (target, runtime, size) in one process. Each target is timed in its own block of
    interleaved rounds together with the uncompressed PyTorch student, and its speed-ups are against that
    block's baseline: one ONNX Runtime session keeps a memory arena as large as its biggest run (about 2.5 GB
    at 256 -> 1024 on the built-in student), so ten sessions held at once took the first default sweep to a
    24 GB peak; one target's sessions at a time bound it."""
    import gc

    import torch

    from compress.runtime.onnx import open_session

    args = sweep.args
    threads = torch.get_num_threads()
    baseline = sweep.student(1.0)
    result = {"threads": threads, "repeats": args.repeats, "warmup_rounds": 1, "ms": {}, "baseline_ms": {},
              "design": "per target: interleaved rounds of its runtimes and the uncompressed PyTorch student"}
    for size in args.sizes:
        lr = timing_input(size)
        for target in args.targets:
            student = baseline if target == 1.0 else sweep.student(target)
            runners = {"baseline": lambda x: baseline(x)} if target != 1.0 else {}
            runners["torch"] = lambda x, s=student: s(x)
            for runtime in ("onnx", "onnx-int8"):
                if exported(records[target], runtime, args):
                    session = open_session(sweep.folder(target) / runtime / "end_to_end.onnx", threads)
                    runners[runtime] = lambda x, s=session: s.run(None, {"lr": x.numpy()})[0]
            times = {key: [] for key in runners}
            for round_ in range(args.repeats + 1):  # round 0 warms every runner up and is not counted
                log(f"latency {size} -> {size * 4}, target {label(target)}: round {round_ + 1}/{args.repeats + 1}"
                    + (" (warm-up)" if round_ == 0 else ""))
                for key, run in runners.items():
                    with torch.no_grad():
                        started = time.perf_counter()
                        run(lr)
                        times[key].append((time.perf_counter() - started) * 1000)
            for runtime, values in times.items():
                counted = values[1:]
                summary = {"median": statistics.median(counted), "min": min(counted), "max": max(counted),
                           "all": counted}
                if runtime == "baseline" or (target == 1.0 and runtime == "torch"):
                    result["baseline_ms"].setdefault(label(target), {})[str(size)] = summary["median"]
                if runtime != "baseline":
                    result["ms"].setdefault(label(target), {}).setdefault(runtime, {})[str(size)] = summary
            del runners, times
            gc.collect()  # the block's sessions and their arenas go before the next target's
    if "coreml" in args.runtimes:
        result["coreml"] = ("skipped: Core ML runs only on macOS" if platform.system() != "Darwin" else
                            "not measured by this sweep yet: `python -m export validate` times a package on macOS")
    return result


# -- outputs -------------------------------------------------------------------------------------------
def rows_of(sweep: Sweep, records: dict[float, dict], latency: dict) -> tuple[list[dict], dict]:
    from compress.budget import check_budget, load_budget

    args = sweep.args
    budget = load_budget(None)
    reference = records[1.0]["runtimes"]["torch"]["quality"]
    bicubic = reference.get("bicubic_vs_hr", {})
    base_ms = {s: latency["baseline_ms"][label(1.0)][str(s)] for s in args.sizes}
    rows = []
    for target in args.targets:
        record = records[target]
        for runtime in args.runtimes:
            entry = record["runtimes"].get(runtime, {})
            row = {"target": target, "params": record["params"], "params_ratio": record["params"] / records[1.0]["params"],
                   "runtime": runtime, "precision": entry.get("precision", ""),
                   "artifact_mb": entry["bytes"] / 1e6 if "bytes" in entry else None}
            for s in args.sizes:
                row[f"macs_g_{s}"] = record["macs"][str(s)] / 1e9
                ms = latency["ms"].get(label(target), {}).get(runtime, {}).get(str(s))
                row[f"latency_ms_{s}"] = ms["median"] if ms else None
                row[f"latency_spread_ms_{s}"] = f"{ms['min']:.0f}-{ms['max']:.0f}" if ms else ""
                # against the uncompressed PyTorch student timed in the same block (measure_latency)
                row[f"speedup_{s}"] = latency["baseline_ms"][label(target)][str(s)] / ms["median"] if ms else None
            measured = entry.get("quality") or {}
            scores = measured.get("student_vs_hr", {})
            for metric in QUALITY_COLUMNS:
                row[metric] = scores.get(metric)
            if scores:
                checked = check_budget({"student_vs_hr": scores, "original_vs_hr": reference["student_vs_hr"],
                                        "bicubic_vs_hr": bicubic, "higher_is_better": reference["higher_is_better"],
                                        "skipped": reference.get("skipped", {})}, budget)
                row["budget"] = "passed" if checked["passed"] else "failed: " + "; ".join(checked["failed"])
            else:
                row["budget"] = "skipped: " + (entry.get("error") or (latency.get("coreml", "") if runtime == "coreml"
                                                                      else "no quality measured"))
            row["export_gate"] = entry.get("gate", "") if runtime != "torch" else ""
            if entry.get("error"):
                row["export_gate"] = f"error: {entry['error']}"
            if args.data is not None:
                data_scores = record.get("data_quality", {}).get(runtime, {}).get("student_vs_hr", {})
                for metric in QUALITY_COLUMNS:
                    row[f"data_{metric}"] = data_scores.get(metric)
            rows.append(row)
    return rows, {"bicubic": bicubic, "uncompressed": reference["student_vs_hr"], "base_ms": base_ms}


def write_outputs(sweep: Sweep, records, latency, rows, refs, started: float, argv) -> None:
    import csv
    import io

    from compress.io import atomic_path, write_json
    from compress.quality.cost import machine_info

    from benchmarks import machine_line

    args, out = sweep.args, sweep.output
    machine = machine_info()
    with atomic_path(out / "tradeoff.csv") as tmp:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        tmp.write_text(buffer.getvalue())
    payload = {"model": sweep.description, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in asdict(args).items()},
               "rows": rows, "references": refs, "latency": latency, "targets": {label(t): r for t, r in records.items()},
               "machine": machine, "seconds": time.perf_counter() - started}
    write_json(out / "tradeoff.json", payload)
    plot(rows, refs, args, machine, out / "pareto.png")
    size = args.sizes[0]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    lines = [f"# Speed/quality trade-off: {sweep.description}", "",
             machine_line(machine, latency["threads"], "benchmarks.tradeoff", argv, packages=("torch", "onnxruntime",
                                                                                            "coremltools")), "",
             f"Recovery {args.recover_steps} steps per pruned target; latency: {args.repeats} interleaved round(s) after "
             f"a warm-up round, median (min-max), batch 1, {latency['threads']} threads; quality: "
             f"{records[1.0]['runtimes']['torch']['quality']['images']} validation photos (Real-ESRGAN degradation, "
             "wavelet colour fix), vs HR. Budget: the default quality budget against the uncompressed student "
             "(PyTorch); export gate: the artifact against the student it was exported from.", "",
             "| target | params | runtime | precision | MB | " + " | ".join(
                 f"{s}->{4 * s} ms (x)" for s in args.sizes) + " | PSNR-Y | SSIM | ST-LPIPS | NIQE | budget | export gate |",
             "| --- " * (11 + len(args.sizes)) + "|"]
    for row in rows:
        speeds = " | ".join(
            (f"{row[f'latency_ms_{s}']:.0f} ({row[f'latency_spread_ms_{s}']}) {row[f'speedup_{s}']:.2f}x"
             if row[f"latency_ms_{s}"] is not None else "skipped") for s in args.sizes)
        budget = row["budget"].split(":")[0] if row["budget"].startswith("skipped") else row["budget"]
        lines.append(f"| {row['target']:g} | {row['params'] / 1e6:.2f} M ({row['params_ratio']:.3f}) | {row['runtime']} | "
                     f"{row['precision']} | {fmt(row['artifact_mb'], '.1f')} | {speeds} | {fmt(row['psnr'], '.2f')} | "
                     f"{fmt(row['ssim'], '.4f')} | {fmt(row['stlpips'], '.4f')} | {fmt(row['niqe'], '.2f')} | "
                     f"{budget} | {row['export_gate']} |")
    bic = refs["bicubic"]
    base_times = ", ".join(f"{refs['base_ms'][s]:.0f} ms at {s}" for s in args.sizes)
    lines += ["", f"Bicubic: PSNR-Y {fmt(bic.get('psnr'), '.2f')}, ST-LPIPS {fmt(bic.get('stlpips'), '.4f')}, NIQE "
              f"{fmt(bic.get('niqe'), '.2f')}. Speed-ups (x) are against the uncompressed student in PyTorch at the same "
              f"size, timed in the same interleaved rounds as each target ({base_times} in the uncompressed student's own "
              "rounds; tradeoff.json has every block's baseline).",
              "", "Budget failures, in full:", ""]
    lines += [f"- {r['target']:g} {r['runtime']}: {r['budget']}" for r in rows if r["budget"].startswith("failed")] or ["- none"]
    gate_failures = [f"- {label(t)} {runtime}: " + "; ".join(entry.get("gate_failed") or [entry.get("error", "")])
                     for t, record in records.items() for runtime, entry in record["runtimes"].items()
                     if runtime in args.runtimes and (entry.get("gate") == "failed" or entry.get("error"))]
    lines += ["", "Export gate failures, in full:", ""] + (gate_failures or ["- none"])
    if "coreml" in args.runtimes:
        lines += ["", f"Core ML latency and quality: {latency.get('coreml')}; its packages were converted and "
                  "checked as specs (size above)."]
    lines += ["", f"bf16: {bf16_note()}"]
    lines += ["", f"![latency against quality]({'pareto.png'})", "",
              f"Sweep time: {(time.perf_counter() - started) / 60:.1f} min in this invocation (finished targets reused "
              f"from earlier invocations are not counted). LR {size} -> {4 * size} is the plot's latency.", ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))


def bf16_note() -> str:
    """Whether this CPU has bf16 arithmetic (the flags Linux reports), for the report's bf16 line."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "not measured: this sweep cannot read the CPU's flags here (/proc/cpuinfo)"
    present = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not present:
        return ("not measured: this CPU has no bf16 arithmetic (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo), "
                "so bf16 is not a row of this sweep")
    return f"not measured by this sweep yet, although this CPU has {', '.join(present)}"


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both latency (lower) and quality."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if best is None or (y > best if higher_is_better else y < best):
            front.append((x, y))
            best = y
    return front


def plot(rows, refs, args, machine, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress.io import atomic_path

    size = args.sizes[0]
    markers = {"torch": "o", "onnx": "s", "onnx-int8": "^", "coreml": "D"}
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, metric, title, higher in ((axes[0], "stlpips", "ST-LPIPS (lower is better)", False),
                                        (axes[1], "psnr", "PSNR-Y, dB (higher is better)", True)):
        points = []
        for runtime in args.runtimes:
            chosen = [r for r in rows if r["runtime"] == runtime and r[f"latency_ms_{size}"] is not None
                      and r[metric] is not None]
            if not chosen:
                continue
            xs, ys = [r[f"latency_ms_{size}"] for r in chosen], [r[metric] for r in chosen]
            axis.scatter(xs, ys, marker=markers[runtime], s=50, label=runtime)
            for r in chosen:
                axis.annotate(f"{r['target']:g}", (r[f"latency_ms_{size}"], r[metric]), textcoords="offset points",
                              xytext=(4, 4), fontsize=8)
            points += list(zip(xs, ys))
        front = pareto_front(points, higher)
        if front:
            axis.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", linestyle="--",
                      linewidth=1, label="Pareto front")
        if refs["bicubic"].get(metric) is not None:
            axis.axhline(refs["bicubic"][metric], color="red", linewidth=1, linestyle=":", label="bicubic")
        axis.set_xscale("log")
        axis.set_xlabel(f"latency, ms ({size} -> {4 * size} px, batch 1)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Trade-off sweep on {machine['cpu_model']}, {machine['cpu_cores_available']} cores "
                    f"(labels: parameter target)", fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def sweep(model: str | None, output: Path, args: TradeoffArgs, argv=None) -> list[dict]:
    """Run (or resume) the sweep into `output`; returns the table's rows."""
    from compress.io import write_json

    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    state = Sweep(model, output, args)
    log(f"model: {state.description}; targets {', '.join(label(t) for t in args.targets)}; runtimes "
        f"{', '.join(args.runtimes)}; recovery {args.recover_steps} steps")
    write_json(output / "config.json", {"model": model, "description": state.description,
                                        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}})
    progress = Progress(stage_list(state))
    records = run_targets(state, progress)
    began = progress.start("latency", "all")
    latency = measure_latency(state, records)
    progress.finish("latency", began)
    rows, refs = rows_of(state, records, latency)
    write_outputs(state, records, latency, rows, refs, started, argv)
    log(f"wrote {output / 'report.md'}, tradeoff.csv, tradeoff.json, pareto.png in "
        f"{Progress._clock(time.perf_counter() - started)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    import os

    from compress.cli import OneLineParser, add_dataclass_arguments, dataclass_from_namespace, run_command

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = OneLineParser(prog="python -m benchmarks.tradeoff", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="student: saved folder, run folder, TSD-SR release root, "
                        "preset:NAME (default: the built-in student)")
    add_dataclass_arguments(parser, TradeoffArgs)
    parser.add_argument("-o", "--output", type=Path, required=True, help="sweep folder (rerun to resume)")

    def run(ns) -> int:
        args = dataclass_from_namespace(TradeoffArgs, ns)
        from compress.io import check_output_folder
        from compress.models.preflight import check_model_files

        check_output_folder(ns.output)  # an existing sweep folder is resumed, not refused
        check_model_files(ns.model, None)
        sweep(ns.model, ns.output, args, argv)
        return 0

    parser.set_defaults(run=run)
    ns = parser.parse_args(argv)
    return run_command(ns, interrupted_note="rerun the same command to resume; finished targets are kept")


if __name__ == "__main__":
    sys.exit(main())
