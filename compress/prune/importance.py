"""Measured cost of each candidate step: how far the step alone moves the student's output.

For the planner (compress.prune.planner.plan_for_target): every candidate step is applied on its own to the
pre-cached student, at a few levels (25 / 50 / 75 % of what the step can remove, and the on/off steps), and
the student runs on calibration crops of the training photos. The cost is the mean ST-LPIPS (Ghildyal & Liu,
ECCV 2022) between its output and the uncompressed student's output, a one-shot sensitivity analysis in the
manner of Li et al. 2017 ("Pruning Filters for Efficient ConvNets", Sec. 4.1): measured before any recovery,
so it ranks what a step breaks, not what training gives back. Steps are assumed to add up independently.
"""

from __future__ import annotations

import gc
import math
import sys
import time

import torch

from compress.models.student import OneStepSR
from compress.prune.cli import PruneArgs, Step
from compress.prune.steps import Calibration, apply_step

COST_METRIC = "stlpips"


def measure_step_costs(student: OneStepSR, candidates: list[Step], args: PruneArgs, calibration: Calibration,
                       progress: bool = True) -> dict[str, dict]:
    """{str(step): {"cost": mean ST-LPIPS to the uncompressed output, "seconds": ...}} for every candidate."""
    from compress.evaluate import build_scorers
    from compress.prune.cli import VAE_STEPS

    scorers, skipped = build_scorers((COST_METRIC,), "cpu")
    if COST_METRIC not in scorers:
        raise RuntimeError(f"the planner measures step costs with {COST_METRIC}, which is unavailable: {skipped}")
    score = scorers[COST_METRIC][2]
    inputs = [lr for lr, _ in calibration.pairs]
    with torch.no_grad():
        reference = [student(lr).float().clamp(0, 1) for lr in inputs]
    precached, _ = apply_step(student, Step("precache"), args, calibration, verbose=False)
    costs: dict[str, dict] = {}
    started = time.perf_counter()
    for index, step in enumerate(candidates):
        began = time.perf_counter()
        base = student if step.name in VAE_STEPS else precached
        variant, _ = apply_step(base, step, args, calibration, verbose=False)  # pruning may trace autograd
        variant.eval()
        with torch.no_grad():
            values = [float(score(variant(lr).float().clamp(0, 1), ref).mean()) for lr, ref in zip(inputs, reference)]
        cost = sum(values) / len(values)
        if not math.isfinite(cost):  # a NaN cost would silently reorder the plan
            raise FloatingPointError(f"measuring {step}: the student's output with this step is not finite")
        costs[str(step)] = {"cost": cost, "seconds": round(time.perf_counter() - began, 2)}
        del variant
        gc.collect()  # Torch-Pruning's dependency graph is a reference cycle: free the variant before the next
        if progress:
            done = index + 1
            eta = (time.perf_counter() - started) / done * (len(candidates) - done)
            print(f"measure [{done}/{len(candidates)}] {step}: {COST_METRIC} {costs[str(step)]['cost']:.4f} "
                  f"({costs[str(step)]['seconds']} s; ETA {eta:.0f} s)", file=sys.stderr)
    return costs
