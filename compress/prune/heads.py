"""Attention-head and MLP-width pruning of a compact transformer with Torch-Pruning (Fang et al., CVPR 2023).

Torch-Pruning's dependency graph finds what must shrink together: a head removed from `to_q` also goes
from `to_k`, `to_v`, the text stream's `add_*_proj` (joint attention shares heads across streams) and the
matching input columns of `to_out.0` / `to_add_out`; an MLP channel goes from `ff.net.0.proj`'s rows and
`ff.net.2`'s columns. The residual width never changes: the patch embedding, the output projection and
every layer that writes the residual streams are excluded, and so are the cached modulation buffers they
would touch. Whole heads go (`prune_num_heads=True`) and head width stays (`prune_head_dims=False`, which
would silently change the attention scale 1/sqrt(d)). Widths are rounded to multiples of `round_to`.

The model knowledge (which layers, how many heads) is here; the pruning core is Torch-Pruning's.
Afterwards the model is rebuilt from a config that records every block's heads and MLP widths
(`CompactSD3Transformer`), so it saves and reloads like any diffusers model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.models.compact import CompactSD3Transformer, block_dicts
from compress.prune.cli import IMPORTANCE_METHODS, WIDTH_SCOPES
from compress.prune.conditioning import rebuild

ATTENTION_INPUTS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@dataclass
class WidthDecision:
    """Heads and MLP widths kept per block (JSON-ready), with the settings that chose them."""

    heads_before: list[int]
    heads_after: list[int]
    mlp_before: list[int]
    mlp_after: list[int]
    settings: dict

    def to_json(self) -> dict:
        return {"heads": {"before": self.heads_before, "after": self.heads_after},
                "mlp": {"before": self.mlp_before, "after": self.mlp_after}, "settings": self.settings}


def _residual_writers(transformer: CompactSD3Transformer) -> list[torch.nn.Module]:
    """Layers whose outputs are the residual streams (their output channels must not be pruned)."""
    layers = [transformer.pos_embed, transformer.proj_out]
    for block in transformer.transformer_blocks:
        layers += [block.attn.to_out[0], block.ff.net[2]]
        if hasattr(block.attn, "to_add_out"):
            layers.append(block.attn.to_add_out)
        if hasattr(block, "ff_context"):
            layers.append(block.ff_context.net[2])
    return layers


def check_width_ratio(name: str, ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} ratio must be in [0, 1), got {ratio}")


def prune_widths(
    transformer: CompactSD3Transformer,
    head_ratio: float = 0.0,
    mlp_ratio: float = 0.0,
    importance: str = "magnitude",
    scope: str = "uniform",
    round_to: int = 8,
    calibration_loss=None,
) -> tuple[CompactSD3Transformer, WidthDecision]:
    """Remove a fraction of every block's heads and/or MLP channels; returns the rebuilt model and decision.

    `scope="uniform"` removes the same fraction in every block; "global" ranks channels across blocks, so
    widths differ per block. `importance="taylor"` needs `calibration_loss(model) -> scalar` on calibration
    data (|w * dL/dw| per channel, Molchanov et al. 2019); "magnitude" uses the L2 norm of the weights.
    """
    import copy

    import torch_pruning as tp

    check_width_ratio("head", head_ratio)
    check_width_ratio("MLP", mlp_ratio)
    if importance not in IMPORTANCE_METHODS:
        raise ValueError(f"importance must be one of {IMPORTANCE_METHODS}, got {importance!r}")
    if scope not in WIDTH_SCOPES:
        raise ValueError(f"width scope must be one of {WIDTH_SCOPES}, got {scope!r}")
    if importance == "taylor" and calibration_loss is None:
        raise ValueError("taylor importance needs calibration data (calibration_loss)")
    specs = transformer.block_specs
    heads_before = [s.heads for s in specs]
    mlp_before = [s.mlp_dim for s in specs]
    settings = {"head_ratio": head_ratio, "mlp_ratio": mlp_ratio, "importance": importance, "scope": scope,
                "round_to": round_to}
    if head_ratio == 0.0 and mlp_ratio == 0.0:
        return transformer, WidthDecision(heads_before, heads_before, mlp_before, mlp_before, settings)

    transformer = copy.deepcopy(transformer)  # Torch-Pruning edits modules in place; the caller's stays whole
    num_heads, ignored = {}, list(_residual_writers(transformer))
    for block in transformer.transformer_blocks:
        for name in ATTENTION_INPUTS:
            if hasattr(block.attn, name):
                layer = getattr(block.attn, name)
                num_heads[layer] = block.spec.heads
                if head_ratio == 0.0:
                    ignored.append(layer)
        if mlp_ratio == 0.0:
            ignored.append(block.ff.net[0].proj)
            if hasattr(block, "ff_context"):
                ignored.append(block.ff_context.net[0].proj)
    example = torch.zeros(1, transformer.config.in_channels, 2 * transformer.config.patch_size,
                          2 * transformer.config.patch_size, device=transformer.device, dtype=transformer.dtype)
    scorer = (tp.importance.MagnitudeImportance(p=2) if importance == "magnitude"
              else tp.importance.TaylorImportance())
    pruner = tp.pruner.MetaPruner(
        transformer, example_inputs=(example,), importance=scorer,
        # Torch-Pruning skips every group at pruning_ratio 0; with the MLPs excluded the heads ratio rules.
        pruning_ratio=mlp_ratio if mlp_ratio > 0 else head_ratio,
        num_heads=num_heads, prune_num_heads=head_ratio > 0, prune_head_dims=False, head_pruning_ratio=head_ratio,
        ignored_layers=ignored, round_to=round_to, global_pruning=scope == "global",
    )
    if importance == "taylor":
        transformer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            calibration_loss(transformer).backward()
    for group in pruner.step(interactive=True):
        group.prune()
    transformer.zero_grad(set_to_none=True)
    new_specs = []
    for block, spec in zip(transformer.transformer_blocks, block_dicts(specs)):
        heads = block.attn.to_q.out_features // spec["head_dim"]
        spec = dict(spec, heads=heads, mlp_dim=block.ff.net[0].proj.out_features)
        if hasattr(block, "ff_context"):
            spec["context_mlp_dim"] = block.ff_context.net[0].proj.out_features
        new_specs.append(spec)
    rebuilt = rebuild(transformer, new_specs)
    return rebuilt, WidthDecision(heads_before, [s["heads"] for s in new_specs], mlp_before,
                                  [s["mlp_dim"] for s in new_specs], settings)
