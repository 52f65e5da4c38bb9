"""A compact SD3 MMDiT for one-step students: constant conditioning folded in, per-block structure in the config.

A one-step student always runs at t = 1000 with one fixed prompt, so everything that depends only on the
timestep and the prompt is a constant (TinySR, Sun et al. 2025, Sec. 3.3 "pre-caching"): the time/pooled-text
embedding, every block's adaLN-Zero modulation of both streams, the final norm's modulation and the
context-embedder output that enters block 0. `CompactSD3Transformer` stores those constants as buffers
instead of the modules that made them, and describes every block on its own (heads, head width, MLP width,
text-stream layout), which diffusers' `SD3Transformer2DModel` cannot: pruned blocks differ in width and
depth-pruned or text-free students differ in stream layout. The model is built from its config before the
weights load, so diffusers' `save_pretrained` / `from_pretrained` round-trip it.

Block layouts (`BlockSpec.context`):
- "joint": an MMDiT block (image and text streams, joint attention), as SD3 Sec. 4 / Fig. 2;
- "last": the text stream only feeds the attention (diffusers' `context_pre_only` block): no text output;
- "none": image-only self-attention (TinySR's text-stream removal), a DiT-style single-stream block.

Module names follow diffusers' (`attn.to_q`, `attn.add_k_proj`, `ff.net.0.proj`, ...) so state dicts copy
over by name and LoRA target names keep matching.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

CONTEXT_LAYOUTS = ("joint", "last", "none")
# Order of the six adaLN-Zero rows (diffusers AdaLayerNormZero: emb.chunk(6)).
ZERO_ROWS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
NORM_EPS = 1e-6


@dataclass(frozen=True)
class BlockSpec:
    """Structure of one block: attention heads and head width, MLP width, text-stream layout."""

    heads: int
    head_dim: int
    mlp_dim: int
    context: str = "joint"
    context_mlp_dim: int = 0  # only for "joint" blocks

    def __post_init__(self):
        if self.context not in CONTEXT_LAYOUTS:
            raise ValueError(f"block context must be one of {CONTEXT_LAYOUTS}, got {self.context!r}")
        if self.heads < 1 or self.head_dim < 1 or self.mlp_dim < 1:
            raise ValueError(f"a block needs at least one head, one head channel and one MLP channel: {self}")
        if self.context == "joint" and self.context_mlp_dim < 1:
            raise ValueError(f"a joint block needs context_mlp_dim >= 1: {self}")

    @classmethod
    def from_dict(cls, payload: dict) -> "BlockSpec":
        return cls(**payload)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    # the width as a Python int: ONNX tracing would turn `x.shape[-1:]` into a computed list, which
    # layer_norm's normalized_shape cannot be (the width is fixed by the weights anyway)
    return F.layer_norm(x, (int(x.shape[-1]),), eps=NORM_EPS)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _layer_norm(x) * (1 + scale) + shift


class FeedForward(nn.Module):
    """diffusers FeedForward with "gelu-approximate" (net.0.proj -> tanh-GELU -> net.2), any inner width."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        up = nn.Module()
        up.proj = nn.Linear(dim, inner_dim)
        self.net = nn.ModuleList([up, nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class Attention(nn.Module):
    """Joint (image + text) or image-only multi-head attention; heads follow from the weight shapes."""

    def __init__(self, dim: int, heads: int, head_dim: int, context: str):
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        if context != "none":
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        if context == "joint":
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, inner = x.shape
        return x.view(batch, tokens, inner // self.head_dim, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        query, key, value = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        if context is not None:
            query = torch.cat([query, self._heads(self.add_q_proj(context))], dim=2)
            key = torch.cat([key, self._heads(self.add_k_proj(context))], dim=2)
            value = torch.cat([value, self._heads(self.add_v_proj(context))], dim=2)
        out = F.scaled_dot_product_attention(query, key, value)
        batch, heads, tokens, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        # no slice without a text stream: a whole-length slice is an `alias` node Core ML's converter refuses
        image = self.to_out[0](out if context is None else out[:, : x.shape[1]])
        if context is None or not hasattr(self, "to_add_out"):
            return image, None
        return image, self.to_add_out(out[:, x.shape[1]:])


class CompactBlock(nn.Module):
    """One MMDiT block with its adaLN-Zero modulation cached as buffers (rows in diffusers' order)."""

    def __init__(self, dim: int, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("modulation", torch.zeros(len(ZERO_ROWS), dim))
        if spec.context == "joint":
            self.register_buffer("context_modulation", torch.zeros(len(ZERO_ROWS), dim))
        elif spec.context == "last":  # AdaLayerNormContinuous: (scale, shift)
            self.register_buffer("context_modulation", torch.zeros(2, dim))
        self.attn = Attention(dim, spec.heads, spec.head_dim, spec.context)
        self.ff = FeedForward(dim, spec.mlp_dim)
        if spec.context == "joint":
            self.ff_context = FeedForward(dim, spec.context_mlp_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation.to(x.dtype)
        normed_context = None
        if self.spec.context == "joint":
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.context_modulation.to(
                x.dtype
            )
            normed_context = _modulate(context, c_shift_msa, c_scale_msa)
        elif self.spec.context == "last":
            c_scale, c_shift = self.context_modulation.to(x.dtype)
            normed_context = _modulate(context, c_shift, c_scale)
        attn_image, attn_context = self.attn(_modulate(x, shift_msa, scale_msa), normed_context)
        x = x + gate_msa * attn_image
        x = x + gate_mlp * self.ff(_modulate(x, shift_mlp, scale_mlp))
        if self.spec.context != "joint":
            return None, x
        context = context + c_gate_msa * attn_context
        context = context + c_gate_mlp * self.ff_context(_modulate(context, c_shift_mlp, c_scale_mlp))
        return context, x


class CompactSD3Transformer(ModelMixin, ConfigMixin):
    """SD3 MMDiT with constant conditioning cached and per-block structure; forward(latent) -> velocity.

    `forward` keeps the signature the student calls (`timestep`, `encoder_hidden_states`,
    `pooled_projections`) but the conditioning is baked in: a timestep other than the cached one is an
    error, and the prompt arguments are ignored (they are the constants already folded in).
    """

    _supports_gradient_checkpointing = True  # diffusers' enable_gradient_checkpointing() works (blocks recomputed)

    @register_to_config
    def __init__(
        self,
        blocks: list[dict] = (),
        dim: int = 1536,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int = 16,
        sample_size: int = 128,
        pos_embed_max_size: int | None = 192,
        context_tokens: int = 0,
        timestep: float = 1000.0,
    ):
        super().__init__()
        specs = [BlockSpec.from_dict(dict(b)) for b in blocks]
        if not specs:
            raise ValueError("a CompactSD3Transformer needs at least one block")
        for i, spec in enumerate(specs):
            later_text = any(s.context != "none" for s in specs[i + 1:])
            if spec.context == "last" and later_text:
                raise ValueError(f"block {i} ends the text stream ('last') but a later block still uses it")
            if spec.context == "joint" and not later_text:
                raise ValueError(f"block {i} is 'joint' but no later block reads its text output; make it 'last'")
            if spec.context != "none" and context_tokens < 1:
                raise ValueError(f"block {i} uses the text stream but context_tokens is {context_tokens}")
            if spec.context != "none" and i > 0 and specs[i - 1].context == "none":
                raise ValueError(f"block {i} uses the text stream after block {i - 1} dropped it")
        self.block_specs = specs
        self.out_channels = out_channels
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed(
            height=sample_size, width=sample_size, patch_size=patch_size, in_channels=in_channels,
            embed_dim=dim, pos_embed_max_size=pos_embed_max_size,
        )
        uses_text = specs[0].context != "none"
        # The context-embedder output for the fixed prompt: what enters block 0's text stream.
        self.register_buffer("context", torch.zeros(1, context_tokens, dim) if uses_text else torch.zeros(1, 0, dim))
        self.transformer_blocks = nn.ModuleList(CompactBlock(dim, spec) for spec in specs)
        self.register_buffer("norm_out_modulation", torch.zeros(2, dim))  # (scale, shift), AdaLayerNormContinuous
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    @property
    def uses_text(self) -> bool:
        return self.block_specs[0].context != "none"

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        return_dict: bool = True,
        block_mask: torch.Tensor | None = None,
    ):
        """Latent B x C x H x W -> velocity of the same shape.

        `block_mask` (num_blocks, or B x num_blocks, values in [0, 1]) gates the blocks as TinyFusion's
        layer gate x_{i+1} = m_i * block_i(x_i) + (1 - m_i) * x_i on both streams (TinyFusion, Fang et al.
        2025, Sec. 3; TinySR Eq. 1): depth-pruning searches and sensitivity scores use it; None runs all.
        """
        # a check of the caller's value: graph capture (ONNX tracing, torch.export for Core ML) cannot branch on
        # a tensor's data, and the exported graphs feed the folded-in t themselves (OneStepSR.velocity)
        capturing = torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if timestep is not None and not capturing:
            value = timestep if not torch.is_tensor(timestep) else timestep.detach()
            if torch.is_tensor(value) and value.numel() and not bool((value == self.config.timestep).all()):
                raise ValueError(f"this transformer has t = {self.config.timestep:g} folded in; got {value.tolist()}")
            if not torch.is_tensor(value) and float(value) != self.config.timestep:
                raise ValueError(f"this transformer has t = {self.config.timestep:g} folded in; got {value}")
        height, width = hidden_states.shape[-2:]
        batch = hidden_states.shape[0]
        x = self.pos_embed(hidden_states).contiguous()
        context = self.context.to(x.dtype).expand(batch, -1, -1) if self.uses_text else None
        if block_mask is not None:
            block_mask = block_mask.to(x.dtype)
            if block_mask.shape[-1] != len(self.transformer_blocks):
                raise ValueError(f"block_mask has {block_mask.shape[-1]} entries for {len(self.transformer_blocks)} blocks")
            if block_mask.dim() == 1:
                block_mask = block_mask.expand(batch, -1)
        for index, block in enumerate(self.transformer_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                new_context, new_x = self._gradient_checkpointing_func(block, x, context)
            else:
                new_context, new_x = block(x, context)
            if block_mask is None:
                context, x = new_context, new_x
                continue
            gate = block_mask[:, index].view(batch, 1, 1)
            x = gate * new_x + (1 - gate) * x
            if new_context is not None:
                context = gate * new_context + (1 - gate) * context
        scale, shift = self.norm_out_modulation.to(x.dtype)
        x = self.proj_out(_modulate(x, shift, scale))
        patch = self.config.patch_size
        x = x.reshape(batch, height // patch, width // patch, patch, patch, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        output = x.reshape(batch, self.out_channels, height, width)
        if not return_dict:
            return (output,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=output)


def block_dicts(specs: list[BlockSpec]) -> list[dict]:
    return [asdict(spec) for spec in specs]
