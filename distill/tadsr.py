"""TAD-SR (He et al., "One Step Diffusion-based Super-Resolution with Time-Aware Distillation"), on rectified flow.

Two pieces of TAD-SR are provided for the SD3 students of this toolkit:

**High-frequency enhanced score distillation (HSD, paper Eq. 7-8).** The student output z0_stu and the teacher
output z0_tch are perturbed with the *same* slight noise, the teacher scores both, and the difference of the two
noise predictions is the gradient injected into the student:
``grad = omega * (eps_psi(z_stu_t) - eps_psi(z_tch_t))``, ``omega = 1 / (C * S)``.

*Adaptation to rectified flow.* TAD-SR is written for ResShift, whose forward process mixes in the LR residual and
whose network predicts x0 (F_phi). Here z_t = (1 - s) z0 + s eps and the teacher predicts a velocity v, so
x0_hat = z_t - s v and the implied noise is ``eps_hat = (z_t - (1 - s) x0_hat) / s = z_t + (1 - s) v``. With the
same eps on both branches, z_stu_t - z_tch_t = (1 - s)(z0_stu - z0_tch), which turns Eq. 7 into the flow version of
Eq. 8::

    grad = omega * (1 - s) / s * (z0_stu - z0_tch + x0_psi(z_tch_t) - x0_psi(z_stu_t))
         = omega * (1 - s) * ((z0_stu - z0_tch) + (v_psi(z_stu_t) - v_psi(z_tch_t)))

(the paper's omega_2 = omega (1 - eta) / sqrt(eta kappa) plays the role of omega (1 - s) / s). The second line is what
is computed: it is the same number without the 1/s cancellation that the first form suffers at s ~ 0.003 in fp16.
The gradient is zero whenever student and teacher outputs coincide (no SDS bias, the paper's point).

*Small noise.* The paper samples t' in [1, 3] (Alg. 1: t' ~ U(0, T/5) of ResShift's 15-step chain), i.e. the
smallest noise levels, where a diffusion model mostly restores high frequencies. On SD3's shift-3 schedule the
matching region is the last schedule indices: :data:`SMALL_INDEX_RANGE` = [994, 1000) gives
sigma in [0.0030, 0.0178] (index 990 would already be 0.029). Draw indices with :func:`sample_small_indices`.
The teacher is called once per branch **without CFG** (TAD-SR's teacher conditions on the LR image, not a prompt).

**Time-aware discriminator (paper Eq. 9-12).** Features F_k of the noised latent are taken from the first joint
blocks of a frozen copy of the teacher (the paper uses the teacher UNet's encoder), each is layer-normalised and
modulated by a learnable embedding of the timestep, ``F_hat_k = Norm(F_k) (1 + gamma_k(t)) + beta_k(t)`` (Eq. 10),
and a small head per feature gives one logit per sample; the output is the mean over heads. Real and fake latents
are perturbed with the same t (Alg. 1, lines 11-13, t ~ U(0, T): use ``schedule.sample_indices(B, g, 0, 1000)``).
Train it with :func:`distill.losses.hinge_d_loss` and the student with :func:`distill.losses.hinge_g_loss`
(Eq. 11-12); pass ``return_all=True`` to apply the hinge per head as Eq. 12 does.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from distill.flow import Conditioning, FlowSchedule, VelocityFn, per_sample

__all__ = [
    "SMALL_INDEX_RANGE",
    "TimeAwareDiscriminator",
    "TimeConditionedHead",
    "discriminator_inputs",
    "hf_score_distillation_gradient",
    "hf_score_distillation_loss",
    "sample_small_indices",
]

# Schedule indices [low, high) of the slight perturbation: sigma in [0.0030, 0.0178] on SD3's shift-3 schedule.
SMALL_INDEX_RANGE: tuple[int, int] = (994, 1000)


def sample_small_indices(
    schedule: FlowSchedule,
    batch: int,
    generator: torch.Generator | None = None,
    index_range: tuple[int, int] = SMALL_INDEX_RANGE,
) -> Tensor:
    """Per-sample schedule indices for the HSD perturbation, uniform in ``index_range`` (default: sigma <= 0.018)."""
    return schedule.sample_indices(batch, generator, low=index_range[0], high=index_range[1])


def _indices_for_batch(index: int | Tensor, batch: int) -> Tensor:
    index = torch.as_tensor(index, dtype=torch.long)
    if index.ndim == 0:
        return index.expand(batch)
    if index.shape != (batch,):
        raise ValueError(f"index must be an int or have shape ({batch},), got {tuple(index.shape)}")
    return index


@torch.no_grad()
def hf_score_distillation_gradient(
    student_latent: Tensor,
    teacher_latent: Tensor,
    noise: Tensor,
    index: int | Tensor,
    schedule: FlowSchedule,
    teacher_fn: VelocityFn,
    cond: Conditioning,
) -> Tensor:
    """HSD gradient w.r.t. the student latent (TAD-SR Eq. 7-8 on rectified flow; see the module docstring).

    ``grad = omega * (1 - s) * ((z0_stu - z0_tch) + (v_psi(z_stu_t) - v_psi(z_tch_t)))`` per sample, with
    ``omega = 1 / (C * H * W)``, both outputs noised with the same ``noise`` at ``s = sigma(index)``; the teacher runs
    once on the concatenated batch without CFG. ``index``: an int for the batch or a LongTensor (B,), normally from
    :func:`sample_small_indices`. Non-finite entries are zeroed; returned in the student latent's dtype.
    """
    if not (student_latent.shape == teacher_latent.shape == noise.shape):
        raise ValueError(
            f"student {tuple(student_latent.shape)}, teacher {tuple(teacher_latent.shape)} and noise "
            f"{tuple(noise.shape)} latents must have the same shape"
        )
    batch = student_latent.shape[0]
    indices = _indices_for_batch(index, batch).to(student_latent.device)
    sigma = schedule.sigma(indices)
    timesteps = schedule.timestep(indices)
    teacher_latent = teacher_latent.to(student_latent.dtype)
    z_stu_t = FlowSchedule.add_noise(student_latent, noise, sigma.to(student_latent.dtype))
    z_tch_t = FlowSchedule.add_noise(teacher_latent, noise, sigma.to(student_latent.dtype))
    cond = cond.expand(batch)
    v = teacher_fn(torch.cat([z_stu_t, z_tch_t]), torch.cat([timesteps, timesteps]), Conditioning.cat([cond, cond]))
    acc = torch.promote_types(student_latent.dtype, torch.float32)  # fp16 latents: accumulate in float32
    v_stu, v_tch = v.to(acc).chunk(2)
    omega = 1.0 / math.prod(student_latent.shape[1:])
    scale = per_sample(omega * (1.0 - sigma.to(acc)), v_stu)
    grad = scale * ((student_latent.to(acc) - teacher_latent.to(acc)) + (v_stu - v_tch))
    grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
    return grad.to(student_latent.dtype)


def hf_score_distillation_loss(student_latent: Tensor, grad: Tensor) -> Tensor:
    """Stop-gradient injection of the HSD gradient: ``0.5 * sum((zh - stopgrad(zh - grad))^2) / B``.

    Same construction as :func:`distill.losses.tsd_loss`, but summed over C, H, W and averaged over the batch,
    because ``grad`` already carries TAD-SR's per-element normalisation omega = 1/(C*S); a plain mean would apply it
    twice. Hence d loss / d zh = grad / B.
    """
    if grad.shape != student_latent.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and student latent {tuple(student_latent.shape)} differ")
    target = (student_latent - grad.to(student_latent.dtype)).detach()
    acc = torch.promote_types(student_latent.dtype, torch.float32)
    return 0.5 * ((student_latent.to(acc) - target.to(acc)) ** 2).sum() / student_latent.shape[0]


def discriminator_inputs(
    z0: Tensor, noise: Tensor, indices: Tensor | int, schedule: FlowSchedule
) -> tuple[Tensor, Tensor]:
    """Noise clean latents for the discriminator: returns ``(z_t, timesteps)``.

    Call it for the real (HR) and the fake (student) latents with the same ``indices`` (and, as Alg. 1 does, the
    same ``noise``), so D compares the two distributions at the same perturbation level.
    """
    indices = _indices_for_batch(indices, z0.shape[0]).to(z0.device)
    z_t = FlowSchedule.add_noise(z0, noise, schedule.sigma(indices).to(z0.dtype))
    return z_t, schedule.timestep(indices)


class TimeConditionedHead(nn.Module):
    """One discrimination head: ``Norm(F) (1 + gamma(t)) + beta(t)`` (TAD-SR Eq. 10), token MLP, mean over tokens."""

    def __init__(self, feature_dim: int, time_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(time_dim, 2 * feature_dim)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))

    def forward(self, features: Tensor, time_embedding: Tensor) -> Tensor:
        gamma, beta = self.modulation(time_embedding).unsqueeze(1).chunk(2, dim=-1)
        modulated = self.norm(features) * (1 + gamma) + beta
        return self.mlp(modulated).squeeze(-1).mean(dim=1)  # (B, N) token logits -> (B,)


class TimeAwareDiscriminator(nn.Module):
    """TAD-SR's time-aware latent discriminator on a frozen copy of an SD3 teacher's first joint blocks.

    ``teacher`` is a diffusers ``SD3Transformer2DModel`` (peft LoRA layers allowed: they are copied as they are, with
    the adapter active at construction time, so build it while the *teacher* adapter is active). Only
    ``pos_embed``, ``time_text_embed``, ``context_embedder`` and ``transformer_blocks[:num_blocks]`` are deep-copied;
    no external weights are needed. The image-stream hidden states after each copied block are the multi-scale
    features F_k; each gets a :class:`TimeConditionedHead` modulated by a trainable timestep embedding.

    With ``train_backbone=False`` (default) the copied blocks are frozen and kept in eval mode; gradients still
    flow through them to the input latent, as the generator loss needs. Heads run in float32 whatever the
    backbone dtype.
    """

    def __init__(
        self,
        teacher: nn.Module,
        num_blocks: int = 8,
        head_hidden_dim: int = 256,
        time_embed_dim: int = 256,
        train_backbone: bool = False,
    ) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        missing = [
            n
            for n in ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks")
            if not hasattr(teacher, n)
        ]
        if missing:
            raise ValueError(
                f"TimeAwareDiscriminator needs an SD3Transformer2DModel-like teacher; {type(teacher).__name__} "
                f"lacks {missing}"
            )
        available = len(teacher.transformer_blocks)
        if not 1 <= num_blocks <= available:
            raise ValueError(f"num_blocks must be in [1, {available}] for this teacher, got {num_blocks}")
        self.num_blocks = num_blocks
        self.train_backbone = train_backbone
        self.pos_embed = copy.deepcopy(teacher.pos_embed)
        self.time_text_embed = copy.deepcopy(teacher.time_text_embed)
        self.context_embedder = copy.deepcopy(teacher.context_embedder)
        self.blocks = nn.ModuleList(copy.deepcopy(teacher.transformer_blocks[i]) for i in range(num_blocks))
        for module in self.backbone_modules():
            module.requires_grad_(train_backbone)
        reference = next(teacher.parameters())
        feature_dim = self.pos_embed.proj.out_channels
        # Own sinusoidal projection + MLP: the teacher's temb also mixes in the pooled prompt; D's modulation should
        # depend on t only (Eq. 10: "encode the time step t and map it ... using several linear layers").
        self.time_proj = Timesteps(time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = TimestepEmbedding(time_embed_dim, time_embed_dim)
        self.heads = nn.ModuleList(
            TimeConditionedHead(feature_dim, time_embed_dim, head_hidden_dim) for _ in range(num_blocks)
        )
        self.time_mlp.to(reference.device)
        self.heads.to(reference.device)
        self.backbone_dtype = reference.dtype
        self.train(False)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.pos_embed, self.time_text_embed, self.context_embedder, self.blocks]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the discriminator's optimiser updates: the time MLP and the heads (Eq. 10), plus the copied
        backbone when ``train_backbone``. The distillation recipe builds its discriminator optimiser from this
        list and freezes exactly these parameters during the generator step."""
        params = list(self.time_mlp.parameters()) + list(self.heads.parameters())
        if self.train_backbone:
            params += [p for module in self.backbone_modules() for p in module.parameters()]
        return params

    def train(self, mode: bool = True) -> TimeAwareDiscriminator:
        super().train(mode)
        if not self.train_backbone:
            for module in self.backbone_modules():
                module.eval()  # a frozen backbone stays deterministic
        return self

    @staticmethod
    def discriminator_inputs(
        z0: Tensor, noise: Tensor, indices: Tensor | int, schedule: FlowSchedule
    ) -> tuple[Tensor, Tensor]:
        """See :func:`discriminator_inputs`."""
        return discriminator_inputs(z0, noise, indices, schedule)

    def features(self, z_t: Tensor, timesteps: Tensor, cond: Conditioning) -> list[Tensor]:
        """Image-stream hidden states (B, tokens, dim) after each copied joint block."""
        batch = z_t.shape[0]
        timesteps = torch.as_tensor(timesteps, device=z_t.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        cond = cond.expand(batch).to(device=z_t.device, dtype=self.backbone_dtype)
        hidden = self.pos_embed(z_t.to(self.backbone_dtype))
        temb = self.time_text_embed(timesteps, cond.pooled)
        context = self.context_embedder(cond.prompt_embeds)
        feats = []
        for block in self.blocks:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            feats.append(hidden)
        return feats

    def forward(
        self, z_t: Tensor, timesteps: Tensor, cond: Conditioning, return_all: bool = False
    ) -> Tensor | list[Tensor]:
        """Logits for noised latents: the mean over heads, shape (B,), or with ``return_all`` one (B,) per head."""
        feats = self.features(z_t, timesteps, cond)
        timesteps = torch.as_tensor(timesteps, device=z_t.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(z_t.shape[0])
        time_embedding = self.time_mlp(self.time_proj(timesteps.float()))
        logits = [head(f.float(), time_embedding) for head, f in zip(self.heads, feats, strict=True)]
        return logits if return_all else torch.stack(logits).mean(dim=0)
