"""Rectified-flow helpers shared by the distillation losses: the SD3 schedule, conditioning, velocity functions.

Notation (rectified flow as SD3 trains it: Esser et al., "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", ICML 2024, Sec. 3; TSD-SR, Wu et al., CVPR 2025, uses it as is):
z_t = (1 - sigma) z_0 + sigma * eps, the networks predict the velocity v ~ eps - z_0, so z_0 = z_t - sigma * v.
TSD-SR's ``train/train.py`` indexes the schedule as ``scheduler.timesteps[idx]`` with
idx in [0, 1000): index 0 is the noisiest point (sigma = 1, t = 1000) and index 999 the cleanest
(sigma ~ 0.003), so *higher index = lower noise*. The tables are taken from diffusers'
``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)`` rather than re-derived, so a change
of convention in diffusers shows up in the pinned tests instead of silently shifting sigmas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Conditioning",
    "FlowSchedule",
    "ScoreModel",
    "VelocityFn",
    "cfg_velocity",
    "per_sample",
]


def per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` (scalar, 0-d or shape (B,)) reshaped to (B, 1, 1, ...) so it broadcasts over ``like``."""
    value = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"per-sample value of shape {tuple(value.shape)} does not fit a batch of {like.shape[0]}")
    return value.reshape(-1, *([1] * (like.ndim - 1)))


class FlowSchedule:
    """SD3's shifted flow-matching schedule as TSD-SR's ``train/train.py`` indexes it (``randint(50, 950)``).

    ``timesteps`` and ``sigmas`` are float32 tensors of 1000 entries, descending (index 0: t = 1000, sigma = 1).
    With shift 3, index 50 gives sigma ~ 0.983 and index 949 sigma ~ 0.139 (the TSD-SR teacher range).
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 3.0) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        timesteps = scheduler.timesteps.detach().to(dtype=torch.float32, device="cpu")
        # Some diffusers versions append a terminal sigma = 0 after set_timesteps; keep exactly one per timestep.
        sigmas = scheduler.sigmas.detach().to(dtype=torch.float32, device="cpu")[: timesteps.shape[0]]
        if timesteps.shape[0] != num_train_timesteps or sigmas.shape[0] != num_train_timesteps:
            raise RuntimeError(
                f"diffusers gave {timesteps.shape[0]} timesteps and {sigmas.shape[0]} sigmas, expected "
                f"{num_train_timesteps} of each"
            )
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.timesteps = timesteps
        self.sigmas = sigmas

    def __len__(self) -> int:
        return self.num_train_timesteps

    def _check(self, indices: Tensor | int) -> Tensor:
        indices = torch.as_tensor(indices)
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"schedule indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_train_timesteps):
            raise IndexError(
                f"schedule indices must lie in [0, {self.num_train_timesteps}), got "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        return indices

    def sample_indices(
        self, batch: int, generator: torch.Generator | None = None, low: int = 50, high: int = 950
    ) -> Tensor:
        """``batch`` indices uniform in [low, high), like TSD-SR's ``randint(50, 950)`` (CPU LongTensor)."""
        if not 0 <= low < high <= self.num_train_timesteps:
            raise ValueError(f"need 0 <= low < high <= {self.num_train_timesteps}, got low={low}, high={high}")
        return torch.randint(low, high, (batch,), generator=generator, dtype=torch.long)

    def sigma(self, indices: Tensor | int) -> Tensor:
        """sigma at each index (same shape and device as ``indices``, float32)."""
        indices = self._check(indices)
        return self.sigmas[indices.cpu()].to(indices.device)

    def timestep(self, indices: Tensor | int) -> Tensor:
        """Model timestep (sigma * 1000, float32) at each index, the value the transformer is called with."""
        indices = self._check(indices)
        return self.timesteps[indices.cpu()].to(indices.device)

    @staticmethod
    def add_noise(z0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
        """z_t = (1 - sigma) z0 + sigma * noise, sigma a scalar or one value per sample."""
        if z0.shape != noise.shape:
            raise ValueError(f"z0 {tuple(z0.shape)} and noise {tuple(noise.shape)} differ in shape")
        s = per_sample(sigma, z0)
        return (1 - s) * z0 + s * noise

    @staticmethod
    def predict_x0(z_t: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
        """x0 = z_t - sigma * v (the flow-matching clean-sample prediction)."""
        return z_t - per_sample(sigma, z_t) * v


@dataclass
class Conditioning:
    """Prompt conditioning of an SD3 transformer: sequence embeddings (1|B, L, D) and pooled (1|B, P).

    TSD-SR stores the fixed prompts with a leading batch of 1 and repeats them (``test/test_tsdsr.py`` loads
    ``dataset/default/{prompt,pool}_embeds.pt`` and repeats them over the batch).
    """

    prompt_embeds: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be (1|B, L, D), got {tuple(self.prompt_embeds.shape)}")
        if self.pooled.ndim != 2:
            raise ValueError(f"pooled must be (1|B, P), got {tuple(self.pooled.shape)}")
        if self.prompt_embeds.shape[0] != self.pooled.shape[0]:
            raise ValueError(
                f"prompt_embeds batch {self.prompt_embeds.shape[0]} and pooled batch {self.pooled.shape[0]} differ"
            )

    @property
    def batch(self) -> int:
        return self.prompt_embeds.shape[0]

    def expand(self, batch: int) -> Conditioning:
        """The same conditioning with leading dimension ``batch`` (a batch of 1 is broadcast, not copied)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"conditioning has batch {self.batch}; it can only be expanded from 1, not to {batch}")
        return Conditioning(self.prompt_embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    def to(self, *args, **kwargs) -> Conditioning:
        return Conditioning(self.prompt_embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch axis (used to run CFG's two branches in one call)."""
        return Conditioning(torch.cat([c.prompt_embeds for c in items]), torch.cat([c.pooled for c in items]))


# (z_t, timesteps (B,), conditioning) -> predicted velocity, same shape as z_t.
VelocityFn = Callable[[Tensor, Tensor, Conditioning], Tensor]


def cfg_velocity(
    fn: VelocityFn,
    z_t: Tensor,
    timesteps: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance: float,
    *,
    batched: bool = True,
) -> Tensor:
    """Classifier-free guided velocity v_u + g (v_c - v_u) (TSD-SR: g = 7.5 for teacher and fake score).

    ``guidance == 1`` (or no ``uncond``) is a single conditional call. With ``batched`` the two branches run as one
    call on a doubled batch (same result, half the launches); pass ``batched=False`` to save memory.
    """
    batch = z_t.shape[0]
    timesteps = torch.as_tensor(timesteps, device=z_t.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(batch)
    cond = cond.expand(batch)
    if uncond is None or guidance == 1.0:
        return fn(z_t, timesteps, cond)
    uncond = uncond.expand(batch)
    if batched:
        both = fn(torch.cat([z_t, z_t]), torch.cat([timesteps, timesteps]), Conditioning.cat([uncond, cond]))
        v_u, v_c = both.chunk(2)
    else:
        v_u = fn(z_t, timesteps, uncond)
        v_c = fn(z_t, timesteps, cond)
    return v_u + guidance * (v_c - v_u)


class ScoreModel(torch.nn.Module):
    """A diffusers ``SD3Transformer2DModel`` (peft LoRA layers allowed) as a :data:`VelocityFn` module.

    ``forward(z_t, timesteps, cond)``: timesteps (B,) or a scalar for the batch, conditioning with batch 1 or B;
    both are cast to the latent's device and dtype. An ``nn.Module`` so that a trainable score model (TSD-SR's
    fake score) can go through ``accelerator.prepare`` (DDP) and a frozen one (the teacher) can be moved with
    ``.to``. ``adapters`` names the LoRA adapters active during the call (``()``: the base weights alone; None:
    whatever is active): TSD-SR's ``train/train.py`` switches ``set_adapter("default")`` / ``("reg")`` on one
    module for the teacher and the fake score, and the recipe shares one base transformer the same way.
    """

    def __init__(self, transformer: torch.nn.Module, adapters: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.adapters = adapters

    def forward(self, z_t: Tensor, timesteps: Tensor | float, cond: Conditioning) -> Tensor:
        from compress.models.lora import adapters_active

        batch = z_t.shape[0]
        cond = cond.expand(batch).to(device=z_t.device, dtype=z_t.dtype)
        timesteps = torch.as_tensor(timesteps, device=z_t.device, dtype=z_t.dtype)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        with adapters_active(self.transformer, self.adapters):
            return self.transformer(
                hidden_states=z_t,
                timestep=timesteps,
                encoder_hidden_states=cond.prompt_embeds,
                pooled_projections=cond.pooled,
                return_dict=False,
            )[0]
