"""The prune recipe: load -> plan -> run the steps -> recover -> measure -> check the budget -> save.

OUT/model              the compressed student (`OneStepSR.save_pretrained`; a CompactSD3Transformer whose
                       config holds every block's structure, a slimmed VAE class when the VAE changed) with
                       OUT/model/prune_decisions.json (every step's decisions and scores)
OUT/plan.json          the steps and the settings that decide them (`--plan OUT/plan.json` replays the run),
                       with the planner's measured step costs when it came from --target-params
OUT/prune_report.json  params / MACs / latency before and after (measured side by side in this run),
                       quality on the validation photos vs the uncompressed student and vs HR, the quality
                       budget and what passed, the steps, the recovery log
OUT/report.md          the same for people
Everything is written in a temporary folder renamed onto OUT at the end, so an interrupted run leaves no
folder that looks complete. Work a resume needs (the plan, the pruned student before recovery, recovery
checkpoints) lives in OUT.partial/ until the run completes; `--resume` continues from there.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from compress.models.student import OneStepSR
from compress.prune.cli import LOSSLESS_STEPS, PruneArgs, parse_steps
from compress.prune.steps import Calibration, apply_step, replace_vae
from compress.quality.compare import quality, weights_hash

DECISIONS_NAME = "prune_decisions.json"
REPORT_NAME = "prune_report.json"
PLAN_NAME = "plan.json"
# Settings that decide what the steps remove: a plan file carries them so that it replays exactly.
PLAN_SETTINGS = ("method", "importance", "width_scope", "round_to", "calibration_images", "search_steps",
                 "batch_size", "hr_size", "seed")


def student_params(student: OneStepSR) -> dict:
    transformer = sum(p.numel() for p in student.transformer.parameters())
    vae = sum(p.numel() for p in student.vae.parameters())
    return {"transformer": transformer, "vae": vae, "total": transformer + vae}


def work_dir(output: Path) -> Path:
    """Where an unfinished run keeps what `--resume` needs."""
    return output.with_name(output.name + ".partial")


def read_plan(path: Path) -> dict:
    """A plan file (OUT/plan.json of an earlier run), checked."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--plan {path}: no such file (a plan is the plan.json of an earlier prune run)")
    try:
        plan = json.loads(Path(path).read_text())
        parse_steps(tuple(plan["steps"]))
        missing = [k for k in PLAN_SETTINGS if k not in plan["settings"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"--plan {path}: not a prune plan ({error})") from None
    if missing:
        raise ValueError(f"--plan {path}: settings {missing} are missing")
    return plan


def make_plan(original: OneStepSR, args: PruneArgs, calibration: Calibration) -> dict:
    """The steps to run: from --plan (its settings too), --target-params (measured) or --steps."""
    from compress.prune import planner

    if args.plan is not None:
        plan = adopt_plan(args, read_plan(args.plan))
        print(f"plan: replaying {args.plan}", file=sys.stderr)
    elif args.target_params is not None:
        print(f"plan: measuring every candidate step alone on {args.calibration_images} calibration crops "
              f"(target {args.target_params:g} of the parameters)", file=sys.stderr)
        plan = planner.plan_for_target(original, args.target_params, args, calibration)
    else:
        plan = {"steps": [str(s) for s in args.steps]}
    plan["settings"] = {key: getattr(args, key) for key in PLAN_SETTINGS}
    return adopt_plan(args, plan)


def adopt_plan(args: PruneArgs, plan: dict) -> dict:
    """Set `args`' steps and deciding settings to the plan's (a replay or a resume runs exactly the plan)."""
    for key in PLAN_SETTINGS:
        setattr(args, key, plan["settings"][key])
    args.steps = parse_steps(tuple(plan["steps"]))
    return plan


def default_recover_steps(args: PruneArgs) -> int:
    from compress.prune.cli import DEFAULT_RECOVER_STEPS

    if args.recover_steps is not None:
        return args.recover_steps
    return DEFAULT_RECOVER_STEPS if any(s.name not in LOSSLESS_STEPS for s in args.steps) else 0


def prune(model: str | None, output: Path | None, args: PruneArgs, base_model: Path | None = None) -> dict:
    """Plan, run, recover, measure and save (module docstring); returns the report (with "budget")."""
    from compress.budget import check_budget, load_budget
    from compress.io import write_json
    from compress.models.resolve import load_model
    from compress.prune import planner
    from compress.prune.conditioning import check_precachable, replace_transformer
    from compress.prune.cli import VAE_STEPS

    budget = load_budget(args.budget)  # a bad budget file fails before any work
    torch.manual_seed(args.seed)
    loaded = load_model(model, base_model=base_model)
    original = loaded.model
    print(f"model: {loaded.description}", file=sys.stderr)
    work = work_dir(output) if output is not None else None
    calibration = Calibration(args.calibration_images, args.seed)
    if args.resume:
        if work is None or not (work / PLAN_NAME).is_file():
            raise FileNotFoundError(f"--resume: nothing to resume at {work} (no {PLAN_NAME}); run without --resume")
        plan = adopt_plan(args, read_plan(work / PLAN_NAME))
    else:
        if any(s.name not in VAE_STEPS for s in (args.steps or ())) or args.target_params is not None:
            check_precachable(original.transformer)
        plan = make_plan(original, args, calibration)
    recover_steps = default_recover_steps(args)
    predicted = planner.predict(original.transformer, args.steps, args.round_to, args.method, vae=original.vae)
    before = student_params(original)
    after = predicted["params_after"] + predicted["vae_params_after"]
    structure = (f" ({len(predicted['blocks'])} blocks; heads {[b['heads'] for b in predicted['blocks']]}; MLP "
                 f"{[b['mlp_dim'] for b in predicted['blocks']]})" if predicted["blocks"] else "")
    print(f"plan: {', '.join(plan['steps'])}\n  student {before['total']:,} -> {after:,} parameters "
          f"({after / before['total']:.3f}); transformer {before['transformer']:,} -> {predicted['params_after']:,}"
          f"{structure}; VAE {before['vae']:,} -> {predicted['vae_params_after']:,}\n  recovery {recover_steps} "
          f"steps; depth method {args.method}; importance {args.importance} ({args.width_scope}); seed {args.seed}",
          file=sys.stderr)
    if args.dry_run:
        print("dry run: nothing written", file=sys.stderr)
        return {"plan": plan, "predicted": predicted, "params_before": before}

    pruned_dir = work / "pruned"
    if args.resume and (pruned_dir / "decisions.json").is_file():
        student = OneStepSR.from_pretrained(pruned_dir)
        decisions = json.loads((pruned_dir / "decisions.json").read_text())
        print(f"resume: pruned student read from {pruned_dir}", file=sys.stderr)
    else:
        if recover_steps:  # only a run with recovery is long enough to resume
            shutil.rmtree(work, ignore_errors=True)  # a stale OUT.partial (not resumed) must not be mixed in
            work.mkdir(parents=True)
            write_json(work / PLAN_NAME, plan)
        student, decisions = original, []
        for step in args.steps:
            student, record = apply_step(student, step, args, calibration)
            decisions.append(record)
            gc.collect()  # intermediate students (Torch-Pruning leaves reference cycles) go before the next step
        if recover_steps:  # what a resume starts from (the steps are deterministic, but may take long)
            shutil.rmtree(pruned_dir, ignore_errors=True)
            student.save_pretrained(pruned_dir)
            write_json(pruned_dir / "decisions.json", decisions)

    recovery_log = []
    if recover_steps:
        from compress.prune.recover import recover
        from compress.training import list_checkpoints

        student = replace_transformer(student, copy.deepcopy(student.transformer))
        if student.vae is not original.vae:
            student = replace_vae(student, copy.deepcopy(student.vae))
        print(f"recover: {recover_steps} steps (checkpoint every {args.checkpoint_every}; --resume continues an "
              "interrupted run)", file=sys.stderr)
        recovery_log = recover(student, original, recover_steps, lr=args.recover_lr, batch_size=args.batch_size,
                               hr_size=args.hr_size, seed=args.seed, run_dir=work / "recovery", resume=args.resume
                               and bool(list_checkpoints(work / "recovery")), checkpoint_every=args.checkpoint_every,
                               train_vae=any(s.name in VAE_STEPS for s in args.steps))
    student.eval()
    print("measure: parameters, MACs, latency (side by side) and quality on the validation photos", file=sys.stderr)
    report = measure(original, student, args)
    report["budget"] = check_budget(report["quality"], budget) if report["quality"] else {
        "budget": budget["path"], "passed": True, "failed": [], "items": [], "note": "no quality metric measured"}
    report["plan"] = plan
    report["steps"] = decisions
    report["recovery"] = {"steps": recover_steps, "lr": args.recover_lr,
                          "loss": "transformer: latent L1 to the uncompressed student (TinySR stage 1); slimmed VAE: "
                          "encoder latent L1, decoder pixel L1 + ST-LPIPS to the uncompressed decoder and to HR",
                          "log": _thinned(recovery_log, 50)}
    report["model"] = loaded.description
    report["settings"] = {k: (v if not isinstance(v, tuple) else [str(x) for x in v]) for k, v in asdict(args).items()}
    report["weights_sha256"] = {"transformer": weights_hash(student.transformer), "vae": weights_hash(student.vae)}
    save(student, output, report, decisions, args)
    shutil.rmtree(work, ignore_errors=True)
    return report


def check_output(student: OneStepSR, lr: torch.Tensor) -> None:
    """A compressed student whose output is not finite, or constant, is an error, never a result."""
    from compress.pipeline import NumericalFailure, check_not_constant, check_stage

    try:
        check_not_constant(check_stage("compressed student", student(lr)), lr)
    except NumericalFailure as err:
        raise FloatingPointError(f"{err} (lower --recover-lr, or check the steps with --recover-steps 0); "
                                 "nothing written") from None


def _thinned(rows: list, count: int) -> list:
    """About `count` evenly spaced rows, always with the last one (once)."""
    every = max(1, len(rows) // count)
    kept = rows[::every]
    return kept + rows[-1:] if rows and (len(rows) - 1) % every else kept


def side_by_side_ms(before, after, repeats: int, rounds: int = 3) -> dict:
    """Median milliseconds of two calls timed in interleaved rounds, so that machine load affects both alike."""
    from compress.quality.cost import measure_latency

    timings = {"before": [], "after": []}
    for _ in range(rounds):
        for key, fn in (("before", before), ("after", after)):
            timings[key].append(measure_latency(fn, warmup=1, repeats=repeats).median_s * 1000)
    return {key: sorted(values)[len(values) // 2] for key, values in timings.items()}


@torch.no_grad()
def measure(original: OneStepSR, student: OneStepSR, args: PruneArgs) -> dict:
    """Params, MACs and latency (side by side, this run) and quality on the validation photos."""
    from compress.quality.cost import count_macs, machine_info

    lr = torch.rand(1, 3, args.latency_size, args.latency_size, generator=torch.Generator().manual_seed(0))
    check_output(student, lr)
    before, after = student_params(original), student_params(student)
    macs = {"before": count_macs(original, lr), "after": count_macs(student, lr)}
    latency = side_by_side_ms(lambda: original(lr), lambda: student(lr), repeats=2)
    # The transformer alone, on the latent of the same input: what the transformer steps changed.
    latent = original.encode(original.preprocess(lr))
    transformer_macs = {"before": count_macs(original.velocity, latent), "after": count_macs(student.velocity, latent)}
    transformer_latency = side_by_side_ms(lambda: original.velocity(latent), lambda: student.velocity(latent),
                                          repeats=3)
    transformer_latency["speedup"] = transformer_latency["before"] / transformer_latency["after"]
    report = {
        "params": {"before": before["total"], "after": after["total"], "ratio": after["total"] / before["total"],
                   "transformer": {"before": before["transformer"], "after": after["transformer"]},
                   "vae": after["vae"]},
        "macs": {**macs, "input": f"{args.latency_size}x{args.latency_size} LR -> x4, whole student",
                 "transformer": transformer_macs},
        "latency_ms": {**latency, "speedup": latency["before"] / latency["after"],
                       "input": f"{args.latency_size}x{args.latency_size} LR, batch 1, median of 3x2 interleaved",
                       "transformer": transformer_latency},
        "quality": quality(original, student, args.metrics),
        "machine": machine_info(),
    }
    return report


def save(student: OneStepSR, output: Path, report: dict, decisions: list[dict], args: PruneArgs) -> None:
    from compress.io import atomic_dir, write_json
    from compress.quality.report import to_jsonable

    with atomic_dir(output, overwrite=args.overwrite) as tmp:
        student.save_pretrained(tmp / "model")
        write_json(tmp / "model" / DECISIONS_NAME, to_jsonable({"steps": decisions, "settings": report["settings"]}))
        write_json(tmp / REPORT_NAME, to_jsonable(report))
        write_json(tmp / PLAN_NAME, to_jsonable(report["plan"]))
        (tmp / "report.md").write_text(markdown(report))
    params, macs, latency = report["params"], report["macs"], report["latency_ms"]
    print(f"wrote {output}: student {params['before']:,} -> {params['after']:,} parameters ({params['ratio']:.3f}); "
          f"MACs {macs['after'] / macs['before']:.3f}; latency {latency['before']:.0f} -> {latency['after']:.0f} ms "
          f"(x{latency['speedup']:.2f}, {latency['input']})", file=sys.stderr)
    quality = report.get("quality") or {}
    for metric in quality.get("original_vs_hr", {}):
        print(f"  {metric}: uncompressed {quality['original_vs_hr'][metric]:.4f}, compressed "
              f"{quality['student_vs_hr'][metric]:.4f}, bicubic {quality['bicubic_vs_hr'][metric]:.4f}", file=sys.stderr)
    verdict = report["budget"]
    print(f"quality budget ({verdict['budget']}): " + ("passed" if verdict["passed"] else
          "FAILED: " + "; ".join(verdict["failed"])), file=sys.stderr)


def markdown(report: dict) -> str:
    params, macs, latency = report["params"], report["macs"], report["latency_ms"]
    lines = [
        f"# prune: {report['model']}", "",
        f"Steps: {', '.join(s['step'] for s in report['steps'])}; recovery {report['recovery']['steps']} steps.", "",
        "| | before | after | ratio |", "|---|---|---|---|",
        f"| parameters (student) | {params['before']:,} | {params['after']:,} | {params['ratio']:.3f} |",
        f"| parameters (transformer) | {params['transformer']['before']:,} | {params['transformer']['after']:,} | "
        f"{params['transformer']['after'] / params['transformer']['before']:.3f} |",
        f"| MACs ({macs['input']}) | {macs['before']:,} | {macs['after']:,} | {macs['after'] / macs['before']:.3f} |",
        f"| latency ms ({latency['input']}) | {latency['before']:.1f} | {latency['after']:.1f} | "
        f"{latency['after'] / latency['before']:.3f} |",
        f"| transformer MACs | {macs['transformer']['before']:,} | {macs['transformer']['after']:,} | "
        f"{macs['transformer']['after'] / macs['transformer']['before']:.3f} |",
        f"| transformer latency ms | {latency['transformer']['before']:.1f} | {latency['transformer']['after']:.1f} | "
        f"{latency['transformer']['after'] / latency['transformer']['before']:.3f} |", "",
    ]
    quality = report.get("quality") or {}
    if quality:
        metrics = list(quality["original_vs_hr"])
        lines += [f"Quality on {quality['images']} validation photos ({quality['degradation']}, colour fix "
                  f"{quality['color_fix']}):", "", "| | " + " | ".join(metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for key in ("original_vs_hr", "student_vs_hr", "bicubic_vs_hr", "student_vs_original"):
            lines.append(f"| {key.replace('_', ' ')} | "
                         + " | ".join(f"{quality[key][m]:.4f}" if m in quality[key] else "" for m in metrics) + " |")
        if quality.get("skipped"):
            lines += ["", f"Skipped metrics (their weights are not on this machine; prune_report.json says which files "
                      f"and where): {', '.join(quality['skipped'])}."]
        lines.append("")
    verdict = report.get("budget") or {}
    if verdict.get("items"):
        lines += [f"Quality budget ({Path(verdict['budget']).name}): **{'passed' if verdict['passed'] else 'failed'}**",
                  "", "| item | status | measured |", "|---|---|---|"]
        for item in verdict["items"]:
            value = item.get("measured")
            shown = f"{value:+.4f}" if value is not None else (
                f"{item['student']:.4f} vs bicubic {item['bicubic']:.4f}" if "bicubic" in item else item.get("why", ""))
            lines.append(f"| {item['item']} | {item['status']} | {shown} |")
        lines.append("")
    costs = (report.get("plan") or {}).get("costs")
    if costs:
        lines += [f"Plan for --target-params {report['plan']['target_params']:g}: {', '.join(report['plan']['steps'])} "
                  f"(predicted {report['plan']['params']['predicted_ratio']:.4f}). Measured cost of each candidate "
                  f"step alone ({report['plan']['cost_metric']}):", "", "| step | cost | seconds |", "|---|---|---|"]
        lines += [f"| {step} | {value['cost']:.4f} | {value['seconds']} |" for step, value in costs.items()]
        lines.append("")
    lines += ["## Steps", ""]
    for step in report["steps"]:
        p = step["transformer_params"]
        v = step.get("vae_params", {})
        vae_change = f"; VAE {v['before']:,} -> {v['after']:,}" if v and v["before"] != v["after"] else ""
        lines.append(f"- {step['step']}: transformer {p['before']:,} -> {p['after']:,}{vae_change} ({step['seconds']} s)"
                     + (f"; kept blocks {step['decision']['kept']}" if "kept" in step.get("decision", {}) else ""))
    for step in report["steps"]:
        history = step.get("decision", {}).get("details", {}).get("keep_probability_history")
        if history:
            lines += ["", f"Keep probability of every block during the learnable search ({step['step']}):", "",
                      "| step | " + " | ".join(f"block {i}" for i in range(len(history[0]["pi"]))) + " |",
                      "|---|" + "---|" * len(history[0]["pi"])]
            every = max(1, len(history) // 10)
            for row in history[::every] + ([history[-1]] if (len(history) - 1) % every else []):
                lines.append(f"| {row['step']} | " + " | ".join(f"{p:.3f}" for p in row["pi"]) + " |")
    machine = report["machine"]
    lines += ["", f"Machine: {machine.get('cpu_model')} ({machine.get('cpu_cores_available')} cores), torch "
              f"{machine.get('packages', {}).get('torch')}, {machine.get('date_utc')}.", ""]
    return "\n".join(lines)

