"""Depth pruning of a compact transformer: choose blocks to keep, then materialise them.

Choices, all returning a `DepthDecision` (blocks kept, a per-block score, method details):
- "sensitivity": remove one block at a time and measure how far the student's output moves on the
  calibration photos (PSNR to the full student's output; higher drop = more important). TinySR v2 Table 2
  "Sensitivity" baseline.
- "similarity": ShortGPT's Block Influence, BI_i = 1 - E[cos(x_i, x_{i+1})] over image tokens (Men et al.
  2024, Sec. 3.1): a block that barely turns its input is redundant.
- "random": a seeded uniform choice (TinySR's "Random" baseline).
- "learnable": TinyFusion's differentiable N:M mask search with TinySR's DIA and Expansion-Corrosion
  (compress.prune.depth_learnable).

One-shot methods keep the highest-scoring blocks globally. `keep_blocks` materialises a choice: kept
blocks are renumbered in order; when the text stream still exists, the last kept block that uses it
becomes a text-output-free block ("last", diffusers' `context_pre_only`) because nothing reads its text
output any more: its text modulation keeps (scale, shift) of the attention rows and drops the rest,
together with `to_add_out` and `ff_context`, which leaves the image output unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from compress.models.compact import ZERO_ROWS, CompactSD3Transformer, block_dicts
from compress.prune.cli import DEPTH_METHODS
from compress.prune.conditioning import rebuild


@dataclass
class DepthDecision:
    """Which blocks a depth method keeps, with the per-block scores it decided on (JSON-ready)."""

    method: str
    kept: list[int]
    scores: list[float]
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"method": self.method, "kept": list(self.kept), "scores": [float(s) for s in self.scores],
                "details": self.details}


def blocks_to_keep(num_blocks: int, ratio: float) -> int:
    """How many of `num_blocks` survive pruning a fraction `ratio` of them (at least one)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"depth ratio must be in [0, 1), got {ratio}")
    return max(1, num_blocks - round(num_blocks * ratio))


@torch.no_grad()
def keep_blocks(transformer: CompactSD3Transformer, kept: list[int]) -> CompactSD3Transformer:
    """A new compact transformer with only the blocks in `kept` (sorted, unique), last-block rule applied."""
    kept = sorted({int(i) for i in kept})
    count = len(transformer.transformer_blocks)
    if not kept or kept[0] < 0 or kept[-1] >= count:
        raise ValueError(f"blocks to keep must be a non-empty subset of 0..{count - 1}, got {kept}")
    specs = [block_dicts(transformer.block_specs)[i] for i in kept]
    overrides = {}
    text_blocks = [j for j, spec in enumerate(specs) if spec["context"] != "none"]
    if text_blocks and specs[text_blocks[-1]]["context"] == "joint":
        j = text_blocks[-1]
        specs[j] = dict(specs[j], context="last", context_mlp_dim=0)
        rows = transformer.transformer_blocks[kept[j]].context_modulation
        # AdaLayerNormZero rows (shift_msa, scale_msa, ...) -> AdaLayerNormContinuous rows (scale, shift).
        overrides[f"transformer_blocks.{j}.context_modulation"] = torch.stack(
            [rows[ZERO_ROWS.index("scale_msa")], rows[ZERO_ROWS.index("shift_msa")]]
        )
    return rebuild(transformer, specs, block_map=kept, overrides=overrides)


def top_blocks(scores: list[float], keep: int) -> list[int]:
    """Indices of the `keep` highest scores, in block order (ties broken towards earlier blocks)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


def random_decision(num_blocks: int, keep: int, seed: int) -> DepthDecision:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_blocks, generator=generator).tolist()
    return DepthDecision("random", top_blocks(scores, keep), scores, {"seed": seed})


@torch.no_grad()
def calibration_latents(student, lr_images: list[torch.Tensor]) -> list[torch.Tensor]:
    """z_L of each calibration LR image (the transformer's input), computed once."""
    return [student.encode(student.preprocess(lr)) for lr in lr_images]


@torch.no_grad()
def sensitivity_decision(student, lr_images: list[torch.Tensor], keep: int) -> DepthDecision:
    """Score block i by how far the output moves when it alone is removed: mean MSE to the full output.

    Images are the decoded outputs in [0, 1]; the report also gives the PSNR, 10 log10(1 / MSE).
    """
    transformer = student.transformer
    count = len(transformer.transformer_blocks)
    latents = calibration_latents(student, lr_images)

    def decoded(latent, mask):
        velocity = transformer(latent, return_dict=False, block_mask=mask)[0]
        return ((student.decode(latent - velocity) + 1) / 2).clamp(0, 1)

    full = [decoded(z, None) for z in latents]
    scores = []
    for i in range(count):
        mask = torch.ones(count)
        mask[i] = 0.0
        errors = [float(torch.mean((decoded(z, mask) - ref) ** 2)) for z, ref in zip(latents, full)]
        scores.append(sum(errors) / len(errors))
    psnr_db = [10 * math.log10(1 / max(e, 1e-12)) for e in scores]
    return DepthDecision("sensitivity", top_blocks(scores, keep), scores,
                         {"psnr_without_block_db": psnr_db, "images": len(lr_images)})


@torch.no_grad()
def similarity_decision(student, lr_images: list[torch.Tensor], keep: int) -> DepthDecision:
    """ShortGPT Block Influence on the image tokens: BI_i = 1 - mean cos(input_i, output_i)."""
    from compress.models.hooks import transformer_blocks

    transformer = student.transformer
    blocks = transformer_blocks(transformer)
    sums = [0.0] * len(blocks)
    tokens = 0
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_io(_module, inputs, output):
        records.append((inputs[0], output[-1]))

    handles = [block.register_forward_hook(keep_io) for block in blocks]
    try:
        for latent in calibration_latents(student, lr_images):
            records.clear()
            transformer(latent, return_dict=False)
            for i, (before, after) in enumerate(records):
                cos = torch.nn.functional.cosine_similarity(before.flatten(0, 1), after.flatten(0, 1), dim=-1)
                sums[i] += float(cos.sum())
            tokens += records[0][0].shape[0] * records[0][0].shape[1]
    finally:
        for handle in handles:
            handle.remove()
    scores = [1.0 - s / tokens for s in sums]
    return DepthDecision("similarity", top_blocks(scores, keep), scores, {"images": len(lr_images)})


def choose_depth(method: str, student, lr_images, ratio: float, seed: int, **learnable_options) -> DepthDecision:
    """Run one depth method on a student with a compact transformer; see the module docstring."""
    if method not in DEPTH_METHODS:
        raise ValueError(f"depth method must be one of {DEPTH_METHODS}, got {method!r}")
    count = len(student.transformer.transformer_blocks)
    keep = blocks_to_keep(count, ratio)
    if method == "random":
        return random_decision(count, keep, seed)
    if method == "sensitivity":
        return sensitivity_decision(student, lr_images, keep)
    if method == "similarity":
        return similarity_decision(student, lr_images, keep)
    from compress.prune.depth_learnable import learnable_decision

    return learnable_decision(student, ratio=ratio, seed=seed, **learnable_options)


def describe_kept(kept: list[int], count: int) -> str:
    removed = [i for i in range(count) if i not in kept]
    return f"keep {len(kept)}/{count} blocks {kept}, remove {removed}"
