"""The planner: predict what a list of steps gives, and find the steps that land on a parameter target.

`predict` gives the structure and parameter counts of a step list before any work (checks, dry runs); the
arithmetic mirrors what the steps do (Torch-Pruning's rounding for heads and MLP widths, the last-block rule
for depth) and `tests/test_prune.py` checks it against the real result.

`plan_for_target` turns `--target-params R` into steps. Pre-caching is lossless and always first. Every lossy
step is a family of levels (depth: one more block; heads: one more head per block; MLP: 1/32 of the width;
VAE channels: the ratios GroupNorm allows; on/off steps: one level); the cost of a level is measured by
compress.prune.importance (the step alone, ST-LPIPS to the uncompressed output on calibration photos) and
interpolated linearly between the measured levels. The search is greedy on the marginal cost per parameter
removed: from the pre-cached student it repeatedly takes the family whose next level costs least per
parameter it removes, until the student is within TOLERANCE of the target; a move that lands inside the
window is preferred when one exists, then moves that do not overshoot it, and if the last move overshot,
levels whose removal cost most per parameter are given back while the student stays under the window's top.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

from compress.models.compact import CompactSD3Transformer
from compress.prune.cli import Step
from compress.prune.conditioning import UnsupportedGeometry
from compress.prune.depth import blocks_to_keep


def heads_after(heads: int, ratio: float) -> int:
    """Torch-Pruning's local head pruning removes ceil(ratio * heads) heads."""
    return heads - math.ceil(ratio * heads)


def width_after(channels: int, ratio: float, round_to: int) -> int:
    """Torch-Pruning's local channel pruning: remove int(ratio * C), then round the kept count down."""
    kept = channels - int(channels * ratio)
    return kept - kept % round_to


def predict_blocks(blocks: list[dict], steps: tuple[Step, ...], round_to: int = 8, method: str = "sensitivity",
                   group_size: int = 4) -> list[dict]:
    """Block specs after `steps` (precache excluded: it keeps the structure). Depth keeps the first blocks
    as a stand-in choice: every block of a stock model has the same size, so the count is exact."""
    blocks = [dict(b) for b in blocks]
    for step in steps:
        if step.name == "textless":
            blocks = [dict(b, context="none", context_mlp_dim=0) for b in blocks]
        elif step.name == "depth":
            keep = blocks_to_keep(len(blocks), step.ratio)
            if keep == len(blocks):
                raise ValueError(f"--steps depth:{step.ratio:g} removes no block of {len(blocks)}; raise the ratio "
                                 f"to at least {1 / len(blocks):.3f}")
            if method == "learnable":
                check_learnable_depth(len(blocks), step.ratio, group_size)
            blocks = blocks[:keep]
            text = [i for i, b in enumerate(blocks) if b["context"] != "none"]
            if text and blocks[text[-1]]["context"] == "joint":
                blocks[text[-1]] = dict(blocks[text[-1]], context="last", context_mlp_dim=0)
        elif step.name == "heads":
            for i, b in enumerate(blocks):
                if heads_after(b["heads"], step.ratio) < 1:
                    raise ValueError(f"--steps heads:{step.ratio:g} would remove every head of block {i} "
                                     f"({b['heads']} heads); use a ratio below {1 - 1 / b['heads']:.3f}")
                blocks[i] = dict(b, heads=heads_after(b["heads"], step.ratio))
        elif step.name == "mlp":
            for i, b in enumerate(blocks):
                width = width_after(b["mlp_dim"], step.ratio, round_to)
                if width < round_to:
                    raise ValueError(f"--steps mlp:{step.ratio:g} leaves block {i} with {width} MLP channels "
                                     f"(< --round-to {round_to}); lower the ratio")
                update = {"mlp_dim": width}
                if b["context"] == "joint":
                    update["context_mlp_dim"] = width_after(b["context_mlp_dim"], step.ratio, round_to)
                blocks[i] = dict(b, **update)
    return blocks


def check_learnable_depth(blocks: int, ratio: float, group_size: int = 4) -> None:
    """TinyFusion's N:M masks need groups of M blocks and ratio = 1 - N/M."""
    if blocks % group_size:
        raise ValueError(f"--method learnable groups blocks {group_size} at a time; this model has {blocks} blocks")
    kept = (1 - ratio) * group_size
    if abs(kept - round(kept)) > 1e-6 or not 0 < round(kept) < group_size:
        allowed = ", ".join(f"{1 - n / group_size:g}" for n in range(1, group_size))
        raise ValueError(f"--method learnable keeps N of every {group_size} blocks: depth ratio must be one of "
                         f"{allowed}; got {ratio:g}")


def _count_meta(config: dict) -> int:
    with torch.device("meta"):
        model = CompactSD3Transformer.from_config(config)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=4096)
def _block_params(frame: str, block: str) -> tuple[int, int]:
    """(parameters of one block `block`, parameters outside the blocks) for the config `frame` (JSON, no blocks).

    Each count comes from the smallest valid model holding the block: a "joint" block needs a later block
    that reads its text output, so it is counted next to its "last" twin.
    """
    config = json.loads(frame)
    spec = json.loads(block)
    alone = dict(spec, context="none", context_mlp_dim=0)
    one, two = _count_meta({**config, "blocks": [alone]}), _count_meta({**config, "blocks": [alone, alone]})
    rest = 2 * one - two
    if spec["context"] == "none":
        return one - rest, rest
    last = dict(spec, context="last", context_mlp_dim=0)
    last_params = _count_meta({**config, "blocks": [last]}) - rest
    if spec["context"] == "last":
        return last_params, rest
    return _count_meta({**config, "blocks": [spec, last]}) - rest - last_params, rest


def count_compact_params(config: dict) -> int:
    """Parameters of a CompactSD3Transformer config: per-block counts of meta-device models, cached by block
    structure (the planner asks for thousands of configs; the meta models cost no memory)."""
    frame = json.dumps({k: v for k, v in dict(config).items() if k != "blocks" and not k.startswith("_")},
                       sort_keys=True)
    total = 0
    for spec in config["blocks"]:
        block, rest = _block_params(frame, json.dumps(dict(spec), sort_keys=True))
        total += block
    return total + rest


def compact_config_of(transformer) -> dict:
    """The CompactSD3Transformer config that pre-caching `transformer` gives (read from its config)."""
    if isinstance(transformer, CompactSD3Transformer):
        return dict(transformer.config)
    config = transformer.config
    if type(transformer).__name__ != "SD3Transformer2DModel":
        raise UnsupportedGeometry(f"pruning handles SD3Transformer2DModel or CompactSD3Transformer, got "
                                  f"{type(transformer).__name__}")
    dim = config.num_attention_heads * config.attention_head_dim
    blocks = []
    for i in range(config.num_layers):
        last = i == config.num_layers - 1
        blocks.append({"heads": config.num_attention_heads, "head_dim": config.attention_head_dim,
                       "mlp_dim": 4 * dim, "context": "last" if last else "joint",
                       "context_mlp_dim": 0 if last else 4 * dim})
    return {"blocks": blocks, "dim": dim, "patch_size": config.patch_size, "in_channels": config.in_channels,
            "out_channels": config.out_channels, "sample_size": config.sample_size,
            "pos_embed_max_size": config.pos_embed_max_size, "context_tokens": 1, "timestep": 1000.0}


def predict(transformer, steps: tuple[Step, ...], round_to: int = 8, method: str = "sensitivity", vae=None) -> dict:
    """Structure and parameter counts after the steps, without touching weights: {"blocks", "params_after"
    (transformer), "vae_params_after"}; VAE steps are checked against `vae` (their allowed ratios)."""
    from compress.prune.cli import VAE_STEPS

    transformer_steps = tuple(s for s in steps if s.name not in VAE_STEPS)
    vae_steps = tuple(s for s in steps if s.name in VAE_STEPS)
    if transformer_steps:
        config = compact_config_of(transformer)
        blocks = predict_blocks(block_dicts_of(config), transformer_steps, round_to, method)
        params_after = count_compact_params({**config, "blocks": blocks})
    else:
        blocks, params_after = [], sum(p.numel() for p in transformer.parameters())
    result = {"blocks": blocks, "params_after": params_after}
    if vae is not None:  # predict_vae_params refuses impossible VAE steps, naming the allowed values
        from compress.prune.vae import predict_vae_params

        result["vae_params_after"] = predict_vae_params(vae, vae_steps)
    return result


def block_dicts_of(config: dict) -> list[dict]:
    return [dict(b) for b in config["blocks"]]



# ------------------------------------------------------------------------------------------- target search
TOLERANCE = 0.02  # the achieved fraction is within +-2 % of the target fraction
MEASURED_FRACTIONS = (0.25, 0.5, 0.75)  # the levels whose cost is measured; the others are interpolated
MLP_LEVELS = 32


class PlanError(ValueError):
    """A target the steps cannot reach; the message names the reachable range."""


@dataclass
class Family:
    """One lossy step at increasing levels: levels[i] removes fractions[i] of what the step acts on."""

    name: str
    levels: list[Step]
    fractions: list[float]

    def measured(self) -> list[int]:
        """Indices (0-based into levels) whose cost is measured: the on/off level, or those nearest 25/50/75 %."""
        if len(self.levels) <= len(MEASURED_FRACTIONS):
            return list(range(len(self.levels)))
        picks = [min(range(len(self.levels)), key=lambda i: (abs(self.fractions[i] - f), i)) for f in MEASURED_FRACTIONS]
        return sorted(set(picks))

    def cost(self, level: int, costs: dict[str, dict]) -> float:
        """Measured or interpolated cost of `level` (0 = not applied; 1.. = levels[level - 1])."""
        if level == 0:
            return 0.0
        points = [(0.0, 0.0)] + [(self.fractions[i], max(0.0, costs[str(self.levels[i])]["cost"]))
                                 for i in self.measured()]
        x = self.fractions[level - 1]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        (x0, y0), (x1, y1) = points[-2], points[-1]  # beyond the last measured level: same slope
        return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


def candidate_families(transformer, vae, round_to: int = 8, method: str = "sensitivity") -> list[Family]:
    """Every lossy family this student offers, in the order their steps are applied."""
    from compress.prune.vae import allowed_vae_ratios

    config = compact_config_of(transformer)
    blocks = config["blocks"]
    families = []
    if any(b["context"] != "none" for b in blocks):
        families.append(Family("textless", [Step("textless")], [1.0]))
    n = len(blocks)
    depth = [(Step("depth", k / n), k / n) for k in range(1, n)]
    if method == "learnable":
        depth = [(s, f) for s, f in depth if _allowed(lambda s=s: check_learnable_depth(n, s.ratio))]
    if depth:
        families.append(Family("depth", [s for s, _ in depth], [f for _, f in depth]))
    heads = min(b["heads"] for b in blocks)
    if heads > 1:  # (k - 0.5) / h: Torch-Pruning removes ceil(ratio * h) = k heads, safe from float rounding
        families.append(Family("heads", [Step("heads", (k - 0.5) / heads) for k in range(1, heads)],
                               [k / heads for k in range(1, heads)]))
    mlp_dim = min(b["mlp_dim"] for b in blocks)
    seen, mlp = set(), []
    for j in range(1, MLP_LEVELS):
        width = width_after(mlp_dim, j / MLP_LEVELS, round_to)
        if width >= round_to and width < mlp_dim and width not in seen:
            seen.add(width)
            mlp.append((Step("mlp", j / MLP_LEVELS), 1 - width / mlp_dim))
    if mlp:
        families.append(Family("mlp", [s for s, _ in mlp], [f for _, f in mlp]))
    if vae is not None and type(vae).__name__ == "AutoencoderKL":
        if vae.config.get("mid_block_add_attention", True):
            families.append(Family("vae-attn", [Step("vae-attn")], [1.0]))
        for side in ("encoder", "decoder"):
            ratios = allowed_vae_ratios(vae, side)
            if ratios:
                families.append(Family(f"vae-{side}", [Step(f"vae-{side}", r) for r in ratios], list(ratios)))
        for side in ("encoder", "decoder"):
            families.append(Family(f"separable-{side}", [Step(f"separable-{side}")], [1.0]))
    return families


def _allowed(check) -> bool:
    try:
        check()
    except ValueError:
        return False
    return True


class ParamCounter:
    """Student parameters after a choice of family levels (transformer and VAE predicted separately, cached)."""

    def __init__(self, transformer, vae, families: list[Family], round_to: int, method: str):
        self.transformer, self.vae, self.families = transformer, vae, families
        self.round_to, self.method = round_to, method
        self._transformer: dict[tuple, int] = {}
        self._vae: dict[tuple, int] = {}

    def steps(self, levels: dict[str, int]) -> tuple[Step, ...]:
        chosen = [f.levels[levels[f.name] - 1] for f in self.families if levels.get(f.name, 0)]
        return (Step("precache"), *chosen)

    def __call__(self, levels: dict[str, int]) -> int:
        from compress.prune.cli import VAE_STEPS
        from compress.prune.vae import predict_vae_params

        steps = self.steps(levels)
        t_steps = tuple(s for s in steps if s.name not in VAE_STEPS)
        v_steps = tuple(s for s in steps if s.name in VAE_STEPS)
        if t_steps not in self._transformer:
            self._transformer[t_steps] = predict(self.transformer, t_steps, self.round_to, self.method)["params_after"]
        if v_steps not in self._vae:
            self._vae[v_steps] = predict_vae_params(self.vae, v_steps)
        return self._transformer[t_steps] + self._vae[v_steps]


def reachable_range(counter: ParamCounter, total: int) -> tuple[float, float]:
    """(smallest, largest) fraction of `total` the families reach: every family at its last level; pre-caching only."""
    smallest = counter({f.name: len(f.levels) for f in counter.families})
    return smallest / total, counter({}) / total


def check_target(target: float, counter: ParamCounter, total: int) -> None:
    """Refuse, before any measurement, a target outside (0, 1) or outside what the steps reach."""
    low, high = reachable_range(counter, total)
    span = f"this student reaches {low:.3f} to {high:.3f} of its parameters (pre-caching alone gives {high:.3f})"
    if not 0.0 < target < 1.0:
        raise PlanError(f"--target-params {target:g} must be a fraction in (0, 1); {span}")
    if target * (1 + TOLERANCE) < low:
        raise PlanError(f"--target-params {target:g} is below the smallest reachable size; {span}")
    if target * (1 - TOLERANCE) > high:
        raise PlanError(f"--target-params {target:g} is above what lossless pre-caching leaves; {span}")


def search(families: list[Family], costs: dict[str, dict], counter: ParamCounter, total: int,
           target: float) -> tuple[dict[str, int], list[dict]]:
    """Greedy marginal-cost search (module docstring): family levels and the moves in the order taken."""
    high, low = target * (1 + TOLERANCE) * total, target * (1 - TOLERANCE) * total
    levels = {f.name: 0 for f in families}
    moves: list[dict] = []
    while counter(levels) > high:
        now = counter(levels)
        options = []
        for f in families:
            i = levels[f.name]
            if i == len(f.levels):
                continue
            trial = {**levels, f.name: i + 1}
            saved = now - counter(trial)
            if saved <= 0:
                continue
            extra = max(0.0, f.cost(i + 1, costs) - f.cost(i, costs))
            options.append((extra / saved, f, trial, saved, extra))
        if not options:
            break
        landing = [o for o in options if low <= counter(o[2]) <= high]
        short = [o for o in options if counter(o[2]) >= low]  # moves that do not overshoot the window
        rate, f, trial, saved, extra = min(landing or short or options, key=lambda o: o[0])  # ties: family order
        levels = trial
        moves.append({"move": str(f.levels[trial[f.name] - 1]), "cost_per_million_params": rate * 1e6,
                      "params_after": counter(levels)})
    while counter(levels) < low:  # overshot: give back the removal that cost most per parameter
        now = counter(levels)
        options = []
        for f in families:
            i = levels[f.name]
            if i == 0:
                continue
            trial = {**levels, f.name: i - 1}
            if counter(trial) > high:
                continue
            extra = max(0.0, f.cost(i, costs) - f.cost(i - 1, costs))
            options.append((extra / (counter(trial) - now), f, trial))
        if not options:
            break
        _, f, trial = max(options, key=lambda o: o[0])
        levels = trial
        moves.append({"move": f"back to {f.levels[trial[f.name] - 1] if trial[f.name] else 'no ' + f.name}",
                      "params_after": counter(levels)})
    achieved = counter(levels) / total
    if not low <= counter(levels) <= high:
        raise PlanError(f"--target-params {target:g}: the nearest plan found gives {achieved:.4f}, outside +-"
                        f"{TOLERANCE:.0%}; try a nearby target")
    return levels, moves


def plan_for_target(student, target: float, args, calibration, progress: bool = True,
                    costs: dict[str, dict] | None = None) -> dict:
    """Measure the candidate steps on `student` and choose those that land on `target` (module docstring).
    `costs`: the "costs" of an earlier plan of the same student and settings (they do not depend on the
    target), so that a sweep over targets measures once."""
    from compress.prune.importance import COST_METRIC, measure_step_costs

    families = candidate_families(student.transformer, student.vae, args.round_to, args.method)
    counter = ParamCounter(student.transformer, student.vae, families, args.round_to, args.method)
    total = sum(p.numel() for p in student.parameters())
    check_target(target, counter, total)
    measured = [f.levels[i] for f in families for i in f.measured()]
    if costs is None or any(str(step) not in costs for step in measured):
        costs = measure_step_costs(student, measured, args, calibration, progress=progress)
    levels, moves = search(families, costs, counter, total, target)
    steps = counter.steps(levels)
    return {
        "target_params": target, "tolerance": TOLERANCE, "steps": [str(s) for s in steps],
        "params": {"before": total, "predicted_after": counter(levels), "predicted_ratio": counter(levels) / total},
        "cost_metric": f"{COST_METRIC} to the uncompressed student's output, step alone, before recovery",
        "costs": costs, "moves": moves,
        "levels": {f.name: {"chosen": str(f.levels[levels[f.name] - 1]) if levels[f.name] else None,
                            "available": len(f.levels)} for f in families},
    }
