"""Geometry presets: the exact SD3-medium configs of the TSD-SR student, and small ones for tests.

A preset fixes the *shapes* of the one-step student (transformer config, VAE config, prompt-embedding
shapes). Building one gives random weights; real weights come from a release or a saved folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# SD3-medium, as the stock diffusers `transformer/config.json` of
# stabilityai/stable-diffusion-3-medium-diffusers, the base TSD-SR loads (TSD-SR's `test/test_tsdsr.py`).
SD3_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}

# SD3 VAE `vae/config.json`: no quant convs, scaling 1.5305 (shift 0.0609 is stored but TSD-SR never uses it).
SD3_MEDIUM_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# FlowMatchEulerDiscreteScheduler of SD3-medium (its `scheduler/scheduler_config.json`).
SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

# TSD-SR's fixed prompt: CLIP-L/G (77 tokens, padded to 4096) + T5 (256 tokens) = 333 x 4096, pooled 2048.
SD3_PROMPT_TOKENS = 333


@dataclass(frozen=True)
class GeometryPreset:
    """Shapes of a one-step SR student: transformer and VAE configs plus prompt-embedding shapes."""

    name: str
    description: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    prompt_tokens: int
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD3_SCHEDULER))

    @property
    def prompt_shape(self) -> tuple[int, int, int]:
        return (1, self.prompt_tokens, self.transformer["joint_attention_dim"])

    @property
    def pooled_shape(self) -> tuple[int, int]:
        return (1, self.transformer["pooled_projection_dim"])


PRESETS: dict[str, GeometryPreset] = {
    "sd3-medium": GeometryPreset(
        name="sd3-medium",
        description="SD3-medium MMDiT (24 joint blocks, 1536 wide, ~2028 M) + SD3 VAE (~84 M), as TSD-SR",
        transformer=SD3_MEDIUM_TRANSFORMER,
        vae=SD3_MEDIUM_VAE,
        prompt_tokens=SD3_PROMPT_TOKENS,
    ),
    # Same topology, miniature widths: 4 joint blocks (so 2:4 depth groups exist), 8x VAE, 16 latent channels.
    "tiny": GeometryPreset(
        name="tiny",
        description="test-size SD3 geometry: 4 joint blocks, 2x16 heads, 4-level VAE (8x), 16 latent channels",
        transformer={
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 16,
            "num_layers": 4,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "caption_projection_dim": 32,
            "pooled_projection_dim": 24,
            "out_channels": 16,
            "pos_embed_max_size": 96,
        },
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 16, 16, 16],
            "layers_per_block": 1,
            "act_fn": "silu",
            "latent_channels": 16,
            "norm_num_groups": 4,
            "sample_size": 256,
            "scaling_factor": 1.5305,
            "shift_factor": 0.0609,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        prompt_tokens=12,
    ),
    # The built-in miniature reference kit (distill.reference trains it on CPU): SD3-medium topology scaled
    # down. 8 joint blocks (2:4 depth pruning applies), 4 x 32 heads = 128 wide, patch 2; pos_embed_max_size 64
    # so one call takes a 128-latent (1024 px) tile. VAE: 4 levels (8x), 16 latent channels, mid-block
    # attention, no quant convs. The scaling factor is a placeholder: training sets 1 / std(latents).
    "reference": GeometryPreset(
        name="reference",
        description="reference kit: 8 joint blocks, 4x32 heads (128 wide), 4-level VAE [32,64,128,128] (8x), "
        "16 latent channels, 8-token prompt",
        transformer={
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 16,
            "num_layers": 8,
            "attention_head_dim": 32,
            "num_attention_heads": 4,
            "joint_attention_dim": 64,
            "caption_projection_dim": 128,
            "pooled_projection_dim": 32,
            "out_channels": 16,
            "pos_embed_max_size": 64,
        },
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [32, 64, 128, 128],
            "layers_per_block": 1,
            "act_fn": "silu",
            "latent_channels": 16,
            "norm_num_groups": 8,
            "sample_size": 256,
            "scaling_factor": 1.0,
            "shift_factor": 0.0,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        prompt_tokens=8,
    ),
}


def get_preset(name: str) -> GeometryPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown geometry preset {name!r}; choose one of {sorted(PRESETS)}") from None


def build_random_components(preset: GeometryPreset, seed: int = 0):
    """Random-weight transformer, VAE and prompt embeddings of a preset (structure and speed checks only)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**preset.transformer)
        vae = AutoencoderKL(**preset.vae)
        # adaLN-Zero and proj_out are zero-initialised by diffusers' SD3 only in training recipes; the stock
        # constructor already gives random Linear weights, so the random student is a non-trivial function.
        prompt_embeds = torch.randn(preset.prompt_shape)
        pooled_prompt_embeds = torch.randn(preset.pooled_shape)
    finally:
        torch.random.set_rng_state(generator_state)
    return transformer.eval(), vae.eval(), prompt_embeds, pooled_prompt_embeds
