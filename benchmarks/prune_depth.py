"""Depth pruning methods side by side on the built-in student: which blocks each keeps and what is left after
the same recovery.

Every method prunes the same pre-cached student (text stream kept, so only depth differs) by the same ratio,
then gets the same recovery (latent L1 to the uncompressed student, `--recover-steps` steps, same seed and
data) and is scored on the validation photos with every offline metric, beside the uncompressed student and
bicubic. The learnable search's own steps (`--search-steps`) come before the recovery and are reported.

    python -m benchmarks.prune_depth --out docs/prune            # about 25 minutes on 2 CPU cores
    python -m benchmarks.prune_depth --methods random,similarity --recover-steps 20 --metrics psnr,stlpips
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

METHODS = ("learnable", "sensitivity", "similarity", "random")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prune_depth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="student (default: the built-in one)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--textless", action="store_true", help="remove the text stream first")
    parser.add_argument("--recover-steps", type=int, default=200)
    parser.add_argument("--search-steps", type=int, default=200)
    parser.add_argument("--metrics", default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/prune"), help="where the table goes")
    parser.add_argument("--runs", type=Path, default=Path("runs/prune-depth"), help="where the pruned models go")
    ns = parser.parse_args(argv)

    from benchmarks import write_results
    from compress.cli import comma_separated
    from compress.prune.cli import PruneArgs, parse_steps
    from compress.prune.run import prune
    from compress.quality.cost import machine_info

    steps = "precache," + ("textless," if ns.textless else "") + f"depth:{ns.ratio:g}"
    runs_dir = ns.runs
    results = {}
    for method in comma_separated(ns.methods):
        args = PruneArgs(steps=parse_steps(steps), method=method, recover_steps=ns.recover_steps,
                         search_steps=ns.search_steps, metrics=comma_separated(ns.metrics), seed=ns.seed,
                         overwrite=True)
        started = time.perf_counter()
        report = prune(ns.model, runs_dir / method, args)
        depth = next(s for s in report["steps"] if s["step"].startswith("depth"))
        results[method] = {"kept": depth["decision"]["kept"], "scores": depth["decision"]["scores"],
                           "choice_seconds": depth["seconds"], "total_seconds": time.perf_counter() - started,
                           "quality": report["quality"], "params": report["params"],
                           "final_recovery_loss": report["recovery"]["log"][-1]["loss"] if report["recovery"]["log"] else None}
        print(f"{method}: kept {results[method]['kept']}", flush=True)
    payload = {"steps": steps, "recover_steps": ns.recover_steps, "search_steps": ns.search_steps, "seed": ns.seed,
               "results": results, "machine": machine_info()}
    write_results(ns.out, "depth-methods", payload, markdown(payload))
    print(markdown(payload))
    return 0


def markdown(payload: dict) -> str:
    results = payload["results"]
    first = next(iter(results.values()))["quality"]
    metrics = list(first["student_vs_hr"])
    higher = first["higher_is_better"]
    lines = [f"# Depth pruning methods ({payload['steps']}, recovery {payload['recover_steps']} steps, "
             f"seed {payload['seed']})", "",
             f"Validation photos ({first['images']}, {first['degradation']}, colour fix {first['color_fix']}); "
             + ", ".join(f"{m} {'higher' if higher[m] else 'lower'} is better" for m in metrics) + ".", "",
             "| method | kept blocks | " + " | ".join(metrics) + " | choice s |",
             "|---|---|" + "---|" * len(metrics) + "---|"]
    for name, key in (("uncompressed student", "original_vs_hr"), ("bicubic", "bicubic_vs_hr")):
        lines.append(f"| {name} | | " + " | ".join(f"{first[key][m]:.4f}" for m in metrics) + " | |")
    for method, result in results.items():
        q = result["quality"]["student_vs_hr"]
        lines.append(f"| {method} | {result['kept']} | " + " | ".join(f"{q[m]:.4f}" for m in metrics)
                     + f" | {result['choice_seconds']:.0f} |")
    lines += ["", "Fidelity to the uncompressed student's output (PSNR dB / ST-LPIPS where measured):", ""]
    for method, result in results.items():
        q = result["quality"]["student_vs_original"]
        lines.append(f"- {method}: " + ", ".join(f"{m} {q[m]:.4f}" for m in q))
    for metric in metrics:
        order = sorted(results, key=lambda m: results[m]["quality"]["student_vs_hr"][metric], reverse=higher[metric])
        lines.append(f"- best on {metric}: {order[0]}")
    machine = payload["machine"]
    lines += ["", f"Measured {machine['date_utc']} on {machine['cpu_model']} ({machine['cpu_cores_available']} cores), "
              f"torch {machine['packages']['torch']}. Rerun: `python -m benchmarks.prune_depth --out docs/prune`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
