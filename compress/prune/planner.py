"""Predict the structure a list of steps produces, before any work: checks, dry runs and parameter counts.

The arithmetic mirrors what the steps do (Torch-Pruning's rounding for heads and MLP widths, the
last-block rule for depth); `tests/test_prune.py` checks the prediction against the real result.
"""

from __future__ import annotations

import math

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


def count_compact_params(config: dict) -> int:
    """Parameters of a CompactSD3Transformer config, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = CompactSD3Transformer.from_config(config)
    return sum(p.numel() for p in model.parameters())


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
    if vae is not None:
        from compress.prune.vae import check_vae_ratio, predict_vae_params

        for step in vae_steps:
            if step.name == "vae":
                check_vae_ratio(vae, step.ratio)
        result["vae_params_after"] = predict_vae_params(vae, vae_steps)
    return result


def block_dicts_of(config: dict) -> list[dict]:
    return [dict(b) for b in config["blocks"]]

