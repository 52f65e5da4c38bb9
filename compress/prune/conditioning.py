"""Pre-caching of the constant conditioning (lossless) and text-stream removal (lossy), TinySR Sec. 3.3.

`precache` turns a student's diffusers `SD3Transformer2DModel` into a `CompactSD3Transformer` with the
time/pooled-text embedding at the student's timestep, every block's adaLN modulation of both streams, the
final norm's modulation and the context-embedder output computed once, here, from the student's own
weights and fixed prompt, and stored as buffers. Nothing depends on a first call, a file path or a latent
size: the patch embedding keeps its position table, so every input size the original accepts still works.

`remove_text_stream` makes every block image-only (self-attention over the image tokens; TinySR's
single-stream variant). The text tokens stop influencing the image, so the output changes; distillation
recovers it (compress.prune.cli --recover-steps, or `python -m distill train --preset redistill-stage1`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.compact import CompactSD3Transformer, block_dicts
from compress.models.student import OneStepSR


class UnsupportedGeometry(ValueError):
    """A model whose structure a compression step cannot handle (named in the message)."""


def check_precachable(transformer: nn.Module) -> None:
    """Raise UnsupportedGeometry naming what a diffusers SD3 transformer has that pre-caching cannot fold."""
    name = type(transformer).__name__
    if name == "CompactSD3Transformer":
        return
    if name != "SD3Transformer2DModel":
        raise UnsupportedGeometry(f"pre-caching handles SD3Transformer2DModel, got {name}")
    config = transformer.config
    if getattr(config, "qk_norm", None):
        raise UnsupportedGeometry(f"pre-caching handles SD3 without qk_norm (SD3-medium); this one has qk_norm={config.qk_norm!r}")
    if list(getattr(config, "dual_attention_layers", ()) or ()):
        raise UnsupportedGeometry("pre-caching handles SD3 without dual-attention (SD3.5) layers")
    from compress.models.lora import has_lora

    if has_lora(transformer):
        raise UnsupportedGeometry("merge the transformer's LoRA (compress.models.lora.merge_lora) before pre-caching")


@torch.no_grad()
def precache_transformer(
    transformer: nn.Module, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, timestep: float
) -> CompactSD3Transformer:
    """SD3Transformer2DModel + its fixed conditioning -> an equivalent CompactSD3Transformer (float32 math)."""
    check_precachable(transformer)
    if isinstance(transformer, CompactSD3Transformer):
        return transformer
    source = transformer.config
    dtype = next(transformer.parameters()).dtype
    device = next(transformer.parameters()).device
    t = torch.full((1,), float(timestep), device=device, dtype=dtype)
    temb = transformer.time_text_embed(t, pooled_prompt_embeds.to(device, dtype)[:1])
    silu = F.silu(temb)
    context = transformer.context_embedder(prompt_embeds.to(device, dtype)[:1])
    dim = temb.shape[-1]
    blocks, buffers = [], {}
    for i, block in enumerate(transformer.transformer_blocks):
        heads = block.attn.heads
        head_dim = block.attn.to_q.out_features // heads
        layout = "last" if block.context_pre_only else "joint"
        blocks.append({
            "heads": heads, "head_dim": head_dim, "mlp_dim": block.ff.net[0].proj.out_features, "context": layout,
            "context_mlp_dim": block.ff_context.net[0].proj.out_features if layout == "joint" else 0,
        })
        buffers[f"transformer_blocks.{i}.modulation"] = block.norm1.linear(silu).view(6, dim)
        # AdaLayerNormContinuous applies SiLU to its conditioning itself (same input, same result).
        buffers[f"transformer_blocks.{i}.context_modulation"] = block.norm1_context.linear(silu).view(-1, dim)
    buffers["norm_out_modulation"] = transformer.norm_out.linear(silu).view(2, dim)
    buffers["context"] = context
    config = {
        "blocks": blocks, "dim": dim, "patch_size": source.patch_size, "in_channels": source.in_channels,
        "out_channels": source.out_channels, "sample_size": source.sample_size,
        "pos_embed_max_size": source.pos_embed_max_size, "context_tokens": context.shape[1],
        "timestep": float(timestep),
    }
    state = {k: v for k, v in transformer.state_dict().items() if not _is_folded(k)}
    compact = materialize(config, {**state, **buffers}, like=transformer)
    return compact.eval()


def _is_folded(key: str) -> bool:
    """Weights of the modules whose outputs pre-caching folds into buffers (not carried over)."""
    if key.startswith(("time_text_embed.", "context_embedder.", "norm_out.")):
        return True
    return key.startswith("transformer_blocks.") and key.split(".")[2] in ("norm1", "norm1_context")


def materialize(config: dict, state: dict[str, torch.Tensor], like: nn.Module) -> CompactSD3Transformer:
    """Build a CompactSD3Transformer from `config` around the tensors of `state` (no copy, no random init).

    The model is created on the meta device and the tensors are assigned, so converting a 2 B-parameter
    transformer needs no second copy of its weights: the result SHARES unchanged tensors with the model
    it came from (deep-copy it before training it if the source must stay as it is).
    """
    with torch.device("meta"):
        model = CompactSD3Transformer.from_config(config)
    expected = model.state_dict()
    filtered = {}
    for key in expected:
        if key not in state:
            raise RuntimeError(f"conversion bug: no tensor for {key}")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise RuntimeError(f"conversion bug: {key} is {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}")
        filtered[key] = state[key]
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise RuntimeError(f"conversion bug: tensors the new structure has no place for: {unexpected[:4]}")
    model.load_state_dict(filtered, strict=True, assign=True)
    leftovers = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    leftovers += [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if leftovers:  # a non-persistent buffer (computed at init): build that model for real instead
        model = to_like(CompactSD3Transformer.from_config(config), like)
        model.load_state_dict(filtered, strict=True)
    return model.eval()


def to_like(model: nn.Module, reference: nn.Module) -> nn.Module:
    """`model` moved to `reference`'s device and dtype (no dtype cast when they already agree)."""
    parameter = next(reference.parameters())
    model = model.to(parameter.device)
    return model if next(model.parameters()).dtype == parameter.dtype else model.to(parameter.dtype)


def precache(student: OneStepSR) -> OneStepSR:
    """The same student with its transformer pre-cached; the prompt embeddings are folded in and dropped."""
    if isinstance(student.transformer, CompactSD3Transformer):
        return student
    if student.prompt_embeds is None or student.pooled_prompt_embeds is None:
        raise UnsupportedGeometry("pre-caching needs the student's fixed prompt embeddings; this student has none")
    compact = precache_transformer(student.transformer, student.prompt_embeds, student.pooled_prompt_embeds,
                                   student.settings.timestep)
    return replace_transformer(student, compact)


def replace_transformer(student: OneStepSR, transformer: nn.Module) -> OneStepSR:
    """A new OneStepSR sharing the VAE, with `transformer` and, for a compact one, no prompt embeddings."""
    from dataclasses import replace

    compact = isinstance(transformer, CompactSD3Transformer)
    settings = replace(student.settings, transformer_class=type(transformer).__name__)
    return OneStepSR(
        transformer, student.vae,
        None if compact else student.prompt_embeds, None if compact else student.pooled_prompt_embeds, settings,
    ).eval()


@torch.no_grad()
def remove_text_stream(transformer: CompactSD3Transformer) -> CompactSD3Transformer:
    """Every block image-only: the text projections, text MLPs, text modulation and cached context go."""
    specs = [dict(spec, context="none", context_mlp_dim=0) for spec in block_dicts(transformer.block_specs)]
    return rebuild(transformer, specs)


@torch.no_grad()
def rebuild(transformer: CompactSD3Transformer, blocks: list[dict], block_map: list[int] | None = None,
            overrides: dict[str, torch.Tensor] | None = None) -> CompactSD3Transformer:
    """A CompactSD3Transformer with `blocks` whose new block j takes its weights from old block block_map[j].

    Every tensor the new structure has is copied by name from the old model (after renumbering), so a
    tensor a structure drops is simply not copied; `overrides` supplies tensors that change (the
    last-block rule). Shapes must match: width changes go through compress.prune.heads.
    """
    block_map = list(range(len(blocks))) if block_map is None else block_map
    config = {**{k: v for k, v in transformer.config.items() if not k.startswith("_")}, "blocks": blocks}
    old_state = transformer.state_dict()
    with torch.device("meta"):
        keys = list(CompactSD3Transformer.from_config(config).state_dict())
    state = {}
    for key in keys:
        source = key
        if key.startswith("transformer_blocks."):
            _, index, rest = key.split(".", 2)
            source = f"transformer_blocks.{block_map[int(index)]}.{rest}"
        if overrides and key in overrides:
            state[key] = overrides[key]
        elif key == "context":  # empty once the text stream is gone
            state[key] = old_state["context"][:, :len_context(config)]
        else:
            state[key] = old_state[source]
    return materialize(config, state, like=transformer)


def len_context(config: dict) -> int:
    uses_text = config["blocks"][0]["context"] != "none"
    return int(config["context_tokens"]) if uses_text else 0
