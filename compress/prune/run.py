"""The prune recipe: load -> check -> run the steps -> recover -> measure -> save (one self-describing folder).

OUT/model            the compressed student (`OneStepSR.save_pretrained`; its transformer is a
                     CompactSD3Transformer whose config holds every block's structure) with
                     OUT/model/prune_decisions.json (every step's decisions and scores)
OUT/prune_report.json  params / MACs / latency before and after (measured side by side in this run),
                     quality on the validation photos vs the uncompressed student and vs HR, the steps
OUT/report.md        the same for people
Everything is written in a temporary folder renamed onto OUT at the end, so an interrupted run leaves
no folder that looks complete.
"""

from __future__ import annotations

import copy
import hashlib
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compress.models.student import OneStepSR
from compress.prune.cli import VAE_STEPS, PruneArgs

DECISIONS_NAME = "prune_decisions.json"
REPORT_NAME = "prune_report.json"


def replace_vae(student: OneStepSR, vae: torch.nn.Module) -> OneStepSR:
    """A new OneStepSR with `vae` (same latent space: channels and scaling) and the same transformer."""
    from dataclasses import replace

    settings = replace(student.settings, vae_class=type(vae).__name__)
    return OneStepSR(student.transformer, vae, student.prompt_embeds, student.pooled_prompt_embeds, settings).eval()


def student_params(student: OneStepSR) -> dict:
    transformer = sum(p.numel() for p in student.transformer.parameters())
    vae = sum(p.numel() for p in student.vae.parameters())
    return {"transformer": transformer, "vae": vae, "total": transformer + vae}


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, bytes): equal hashes mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def calibration_pairs(count: int, seed: int, hr_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(LR, HR) crops of the training photos (never the validation ones) that score blocks and channels."""
    from compress.data import SRPairDataset, list_photos

    data = SRPairDataset(list_photos("train"), hr_size=hr_size, degradation="realesrgan", seed=seed + 7919,
                         length=count)
    return [(data[i]["lr"][None], data[i]["hr"][None]) for i in range(count)]


def taylor_loss_fn(student: OneStepSR, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """Calibration loss for Taylor importance: L1 between the one-step output latent and the HR latent.

    The HR target (not the uncompressed student's output, which the student still equals right after
    pre-caching and would give zero gradients) gives every channel a real gradient (Molchanov et al. 2019).
    """
    with torch.no_grad():
        inputs = [student.encode(student.preprocess(lr)) for lr, _ in pairs]
        targets = [student.encode(hr.mul(2).sub(1)) for _, hr in pairs]

    def loss(transformer):
        total = 0.0
        for latent, target in zip(inputs, targets):
            total = total + (latent - transformer(latent, return_dict=False)[0] - target).abs().mean()
        return total / len(inputs)

    return loss


def prune(model: str | None, output: Path | None, args: PruneArgs, base_model: Path | None = None) -> dict:
    """Run `args.steps` on the student `model` (None: the built-in one) and write OUT; see the module docstring."""
    from compress.models.resolve import load_model
    from compress.prune import planner
    from compress.prune.conditioning import (
        check_precachable,
        precache,
        remove_text_stream,
        replace_transformer,
    )

    torch.manual_seed(args.seed)
    loaded = load_model(model, base_model=base_model)
    original = loaded.model
    print(f"model: {loaded.description}", file=sys.stderr)
    print(f"steps: {', '.join(str(s) for s in args.steps)}; depth method {args.method}; importance "
          f"{args.importance} ({args.width_scope}); recovery {args.recover_steps} steps; seed {args.seed}",
          file=sys.stderr)
    # Everything that can be refused is refused here, before any work.
    if any(s.name not in VAE_STEPS for s in args.steps):
        check_precachable(original.transformer)
    plan = planner.predict(original.transformer, args.steps, args.round_to, args.method, vae=original.vae)
    before = student_params(original)
    vae_params = plan["vae_params_after"]
    structure = (f" ({len(plan['blocks'])} blocks; heads {[b['heads'] for b in plan['blocks']]}; MLP "
                 f"{[b['mlp_dim'] for b in plan['blocks']]})" if plan["blocks"] else "")
    scope = " [widths per block decided by importance]" if args.width_scope == "global" else ""
    print(f"plan: transformer {before['transformer']:,} -> {plan['params_after']:,} parameters{structure}{scope}; "
          f"VAE {before['vae']:,} -> {vae_params:,}", file=sys.stderr)
    if args.dry_run:
        ratio = (plan["params_after"] + vae_params) / before["total"]
        print(f"dry run: student {before['total']:,} -> {plan['params_after'] + vae_params:,} parameters "
              f"({ratio:.3f} of the original); nothing written", file=sys.stderr)
        return {"plan": plan, "params_before": before}

    decisions: list[dict] = []
    calibration = None
    student = original
    for step in args.steps:
        started = time.perf_counter()
        record: dict = {"step": str(step)}
        params_before = sum(p.numel() for p in student.transformer.parameters())
        vae_before = sum(p.numel() for p in student.vae.parameters())
        if step.name in VAE_STEPS:
            from compress.prune.vae import prune_vae_channels, remove_vae_attention

            vae = prune_vae_channels(student.vae, step.ratio) if step.name == "vae" else remove_vae_attention(student.vae)
            student = replace_vae(student, vae)
            record["vae_block_out_channels"] = list(vae.config.block_out_channels)
            record["vae_mid_block_attention"] = bool(vae.config.mid_block_add_attention)
            print(f"{step}: VAE widths {list(vae.config.block_out_channels)}, mid-block attention "
                  f"{'kept' if vae.config.mid_block_add_attention else 'removed'}", file=sys.stderr)
        elif step.name == "precache":
            student = precache(student)
            record["note"] = "lossless: timestep/pooled embedding, adaLN modulation of both streams, final norm " \
                             "modulation and context-embedder output folded into buffers"
        elif step.name == "textless":
            student = replace_transformer(student, remove_text_stream(student.transformer))
        elif step.name == "depth":
            from compress.prune.depth import choose_depth, describe_kept, keep_blocks

            if calibration is None:
                calibration = calibration_pairs(args.calibration_images, args.seed)
            options, bar = {}, None
            if args.method == "learnable":
                from tqdm import tqdm

                bar = tqdm(total=args.search_steps, desc="depth search", unit="step", file=sys.stderr,
                           mininterval=0.5 if sys.stderr.isatty() else 15.0)
                options = {"steps": args.search_steps, "batch_size": args.batch_size, "hr_size": args.hr_size,
                           "progress": bar.update}
            decision = choose_depth(args.method, student, [lr for lr, _ in calibration], step.ratio, args.seed,
                                    **options)
            if bar is not None:
                bar.close()
            count = len(student.transformer.transformer_blocks)
            print(f"depth ({args.method}): {describe_kept(decision.kept, count)}", file=sys.stderr)
            student = replace_transformer(student, keep_blocks(student.transformer, decision.kept))
            record["decision"] = decision.to_json()
        else:  # heads / mlp
            from compress.prune.heads import prune_widths

            ratio_key = "head_ratio" if step.name == "heads" else "mlp_ratio"
            loss = None
            if args.importance == "taylor":
                if calibration is None:
                    calibration = calibration_pairs(args.calibration_images, args.seed)
                loss = taylor_loss_fn(student, calibration)
            transformer, width = prune_widths(student.transformer, importance=args.importance, scope=args.width_scope,
                                              round_to=args.round_to, calibration_loss=loss,
                                              **{ratio_key: step.ratio})
            if min(width.heads_after) < 1:
                raise ValueError(f"--steps {step}: --width-scope global removed every head of a block; lower the "
                                 "ratio or use --width-scope uniform")
            student = replace_transformer(student, transformer)
            record["decision"] = width.to_json()
            print(f"{step.name}: heads {width.heads_after}, MLP {width.mlp_after}", file=sys.stderr)
        record["transformer_params"] = {"before": params_before,
                                        "after": sum(p.numel() for p in student.transformer.parameters())}
        record["vae_params"] = {"before": vae_before, "after": sum(p.numel() for p in student.vae.parameters())}
        record["seconds"] = round(time.perf_counter() - started, 2)
        decisions.append(record)

    recovery_log = []
    if args.recover_steps:
        from compress.prune.recover import recover

        student = replace_transformer(student, copy.deepcopy(student.transformer))
        if student.vae is not original.vae:
            student = replace_vae(student, copy.deepcopy(student.vae))
        recovery_log = recover(student, original, args.recover_steps, lr=args.recover_lr, batch_size=args.batch_size,
                               hr_size=args.hr_size, seed=args.seed)
    student.eval()
    report = measure(original, student, args)
    report["steps"] = decisions
    report["recovery"] = {"steps": args.recover_steps, "lr": args.recover_lr, "loss": "latent L1 to the uncompressed "
                          "student (TinySR stage 1)", "log": recovery_log[:: max(1, len(recovery_log) // 50)]
                          + recovery_log[-1:]}
    report["model"] = loaded.description
    report["settings"] = {k: (v if not isinstance(v, tuple) else [str(x) for x in v]) for k, v in asdict(args).items()}
    report["weights_sha256"] = weights_hash(student.transformer)
    save(student, output, report, decisions, args)
    return report


def side_by_side_ms(before, after, repeats: int, rounds: int = 3) -> dict:
    """Median milliseconds of two calls timed in interleaved rounds, so that machine load affects both alike."""
    from compress.quality.cost import measure_latency

    timings = {"before": [], "after": []}
    for _ in range(rounds):
        for key, fn in (("before", before), ("after", after)):
            timings[key].append(measure_latency(fn, warmup=1, repeats=repeats).median_s * 1000)
    return {key: sorted(values)[len(values) // 2] for key, values in timings.items()}


def _unit(image: torch.Tensor) -> torch.Tensor:
    return image.float().clamp(0, 1).cpu()


@torch.no_grad()
def measure(original: OneStepSR, student: OneStepSR, args: PruneArgs) -> dict:
    """Params, MACs and latency (side by side, this run) and quality on the validation photos."""
    from compress.quality.cost import count_macs, machine_info

    lr = torch.rand(1, 3, args.latency_size, args.latency_size, generator=torch.Generator().manual_seed(0))
    before, after = student_params(original), student_params(student)
    macs = {"before": count_macs(original, lr), "after": count_macs(student, lr)}
    latency = side_by_side_ms(lambda: original(lr), lambda: student(lr), repeats=2)
    # The transformer alone, on the latent of the same input: where pruning acts (the VAE is the next issue's).
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


def quality(original: OneStepSR, student: OneStepSR, metrics: tuple[str, ...]) -> dict:
    """Every requested metric of the student vs HR, of the uncompressed student vs HR, and of the student vs
    the uncompressed student's output, on the validation photos (Real-ESRGAN degradation, 256 px, wavelet)."""
    from compress.data.pairs import fixed_validation_pairs
    from compress.evaluate import DEFAULT_METRICS, build_scorers
    from compress.options import DEFAULT_COLOR_FIX, TileSettings
    from compress.pipeline import upscale_tensor

    if metrics == ("none",):
        return {}
    names = DEFAULT_METRICS if metrics == ("all",) else metrics
    scorers, skipped = build_scorers(names, "cpu")
    pairs = fixed_validation_pairs("realesrgan", hr_size=256)
    rows = {"student_vs_hr": [], "original_vs_hr": [], "bicubic_vs_hr": [], "student_vs_original": []}
    for _, lr, hr in pairs:
        lr, hr = lr[None], hr[None]
        settings = TileSettings(mode="auto")
        ours = _unit(upscale_tensor(student, lr, settings, DEFAULT_COLOR_FIX))
        theirs = _unit(upscale_tensor(original, lr, settings, DEFAULT_COLOR_FIX))
        bicubic = _unit(torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False))
        for key, image, reference in (("student_vs_hr", ours, hr), ("original_vs_hr", theirs, hr),
                                      ("bicubic_vs_hr", bicubic, hr), ("student_vs_original", ours, theirs)):
            scores = {}
            for name, (kind, _, fn) in scorers.items():
                if kind != "fr" and key == "student_vs_original":
                    continue  # a no-reference score does not compare two images
                value = fn(image, reference) if kind == "fr" else fn(image)
                scores[name] = float(torch.as_tensor(value).float().mean())
            rows[key].append(scores)
    means = {key: {m: sum(r[m] for r in values) / len(values) for m in values[0]} for key, values in rows.items()}
    return {**means, "higher_is_better": {m: hib for m, (_, hib, _) in scorers.items()}, "skipped": skipped,
            "images": len(pairs), "degradation": "realesrgan", "color_fix": DEFAULT_COLOR_FIX}


def save(student: OneStepSR, output: Path, report: dict, decisions: list[dict], args: PruneArgs) -> None:
    from compress.io import atomic_dir, write_json
    from compress.quality.report import to_jsonable

    with atomic_dir(output, overwrite=args.overwrite) as tmp:
        student.save_pretrained(tmp / "model")
        write_json(tmp / "model" / DECISIONS_NAME, to_jsonable({"steps": decisions, "settings": report["settings"]}))
        write_json(tmp / REPORT_NAME, to_jsonable(report))
        (tmp / "report.md").write_text(markdown(report))
    print(f"wrote {output}: transformer {report['params']['transformer']['before']:,} -> "
          f"{report['params']['transformer']['after']:,} parameters; latency x{report['latency_ms']['speedup']:.2f} "
          f"(transformer x{report['latency_ms']['transformer']['speedup']:.2f})",
          file=sys.stderr)


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

