"""Distillation losses: TSD-SR's Target Score Distillation (+ DASM, fake-score update) and TinySR's KD terms.

Sources: TSD-SR (Wu et al., "One-Step Diffusion Model for Image Super-Resolution via Target Score Distillation",
CVPR 2025, arXiv 2411.18263) and its released code (github.com/Microtreei/TSD-SR, ``train/train.py`` and
``script/train.sh``); where paper and code differ, the code is followed. TinySR (arXiv 2508.17434, Sec. 3.3 and
supplementary A.4) for the re-distillation terms; TAD-SR (He et al.) for the adversarial terms.

* TSD gradient (TSD-SR Eqs. 3-5, as ``train/train.py`` computes it): for each evaluation point k,
  ``w_k * sigma_k^2 * (lam * (v_psi^cfg(zh_k) - v_phi^cfg(zh_k)) + (1 - lam) * (v_psi^cfg(zh_k) - v_psi^cfg(z_k)))``
  with lam = 0.7 (VSD share), CFG 7.5 for both the teacher psi and the fake score phi, and the **same noise** for
  the noised student latent zh and the noised HR latent z. It is injected as
  ``0.5 * mean((zh - stopgrad(zh - grad))^2)`` so d loss / d zh = grad / numel.
* DASM (TSD-SR Eq. 6 and Alg. 1; ``--use_dasm`` in ``train/train.py``): N = 4 points about 50 indices apart
  towards lower sigma, weights (1, .3, .3, .3); between points zh moves with the fake model's CFG velocity and z
  with the teacher's (Euler, x += (s_next - s_cur) v).
* Fake-score update (TSD-SR Eq. 9, ``train/train.py``): x0-parameterised MSE on the detached student latent, no
  CFG, random sigmoid(N(0, 1)) per-sample weight (``--weighting_scheme logit_normal``).
* TinySR re-distillation (Sec. 3.3, supp. A.4): stage 1 ``|z_stu - z_tea|_1``; stage 2 ``5 L1 + 1 LPIPS + 0.3 GAN``
  (the weights live in ``distill/presets/redistill-stage*.yaml``).
* Adversarial terms: hinge D loss (TAD-SR Eq. 12) with the matching hinge G loss ``-mean(D(fake))`` (TAD-SR
  Eq. 11). TinySR does not state the form of its GAN loss; the recipe uses TAD-SR's hinge pair for both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# TSDConfig lives in distill.config (torch-free, so `python -m distill --help` answers at once).
from distill.config import FAKE_SCORE_WEIGHTINGS, LAST_INDEX, TSDConfig
from distill.flow import (
    Conditioning,
    FlowSchedule,
    VelocityFn,
    cfg_velocity,
    per_sample,
)

__all__ = [
    "TSDConfig",
    "dasm_indices",
    "fake_score_loss",
    "feature_kd_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "latent_l1",
    "latent_mse",
    "tsd_gradient",
    "tsd_loss",
]



def dasm_indices(index: int, config: TSDConfig, generator: torch.Generator | None = None) -> list[int]:
    """Schedule indices visited from ``index`` (TSD-SR's Distribution-Aware Sampling Module, Eq. 6, Alg. 1).

    Without DASM: ``[index]``. With DASM, as the code does it: the right end is
    ``min(index + dasm_step * dasm_points + b, 999)`` with ``b`` uniform on the integers ``[-bias, bias]``
    (``bias = dasm_random_bias``; drawn from ``generator``, not drawn at all when bias is 0), and
    ``dasm_points + 1`` indices are taken by ``linspace(index, end)`` and rounded to int, so consecutive points are
    about ``dasm_step`` indices apart towards **lower** sigma.

    The first ``dasm_points`` entries are the N evaluation points (entry 0 is the sampled index itself, with weight
    ``dasm_weights[0]``); the last entry is only where the final Euler move would land, and since nothing is
    evaluated there, :func:`tsd_gradient` never makes that move. Whether the original draws b from [-25, 25) or
    [-25, 25] is not verified (``train/train.py``: ``randint(-25, 25)``); the symmetric inclusive range is used.
    """
    index = int(index)
    if not 0 <= index <= LAST_INDEX:
        raise ValueError(f"index must be in [0, {LAST_INDEX}], got {index}")
    if not config.dasm:
        return [index]
    bias = config.dasm_random_bias
    b = int(torch.randint(-bias, bias + 1, (1,), generator=generator).item()) if bias > 0 else 0
    end = min(index + config.dasm_step * config.dasm_points + b, LAST_INDEX)
    points = torch.linspace(float(index), float(end), config.dasm_points + 1, dtype=torch.float64)
    return [int(i) for i in points.round().long().tolist()]


def _point_table(index: int | Tensor, batch: int, config: TSDConfig, generator: torch.Generator | None) -> Tensor:
    """(num_points (+1 with DASM), batch) LongTensor of schedule indices, one column per sample."""
    if isinstance(index, Tensor) and index.ndim > 0:
        if index.shape != (batch,):
            raise ValueError(f"per-sample index must have shape ({batch},), got {tuple(index.shape)}")
        columns = [dasm_indices(int(i), config, generator) for i in index.tolist()]
    else:
        columns = [dasm_indices(int(index), config, generator)] * batch  # one index (and one bias) for the batch
    return torch.tensor(columns, dtype=torch.long).T.contiguous()


def _acc_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half-precision latents (accumulate safely), float64 kept as is."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _zero_non_finite(tensor: Tensor) -> Tensor:
    return torch.where(torch.isfinite(tensor), tensor, torch.zeros_like(tensor))


# ----------------------------------------------------------------------------------------------------------------
# TSD gradient and loss
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def tsd_gradient(
    student_latent: Tensor,
    hr_latent: Tensor,
    noise: Tensor,
    index: int | Tensor,
    schedule: FlowSchedule,
    teacher_fn: VelocityFn,
    fake_fn: VelocityFn,
    cond: Conditioning,
    uncond: Conditioning | None,
    config: TSDConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The TSD gradient w.r.t. the student latent zh (TSD-SR Eqs. 3-5; DASM Eq. 6), computed without autograd.

    ``grad = sum_k w_k sigma_k^2 [lam (v_psi(zh_k) - v_phi(zh_k)) + (1 - lam)(v_psi(zh_k) - v_psi(z_k))]`` where every
    v is the CFG velocity (``config.guidance`` with ``cond`` / ``uncond``), zh_0 and z_0 are the student and HR
    latents noised with the **same** ``noise`` at point 0, and between points zh moves with the fake model's CFG
    velocity and z with the teacher's: ``x <- x + (sigma_next - sigma_cur) v`` (= x - (s_cur - s_next) v).

    ``index`` is a Python int (or 0-d tensor): one schedule index for the whole batch, as TSD-SR's code draws it;
    a LongTensor of shape (B,) gives each sample its own index (and, with DASM, its own endpoint bias). Draw it with
    ``schedule.sample_indices(1, g, config.index_low, config.index_high)``. ``generator`` feeds the DASM bias.
    Non-finite entries of the result are zeroed (TSD-SR zeroes NaNs; an inf would turn the loss into NaN too).
    Model calls whose result has zero weight and is not needed for a DASM move are skipped. Returned in the
    student latent's dtype; accumulated in float32.
    """
    if not (student_latent.shape == hr_latent.shape == noise.shape):
        raise ValueError(
            f"student {tuple(student_latent.shape)}, HR {tuple(hr_latent.shape)} and noise {tuple(noise.shape)} "
            "latents must have the same shape"
        )
    lam = config.vsd_weight
    batch = student_latent.shape[0]
    table = _point_table(index, batch, config, generator).to(student_latent.device)
    weights = config.point_weights
    n_points = config.num_points

    z_hat = FlowSchedule.add_noise(student_latent, noise, schedule.sigma(table[0]).to(student_latent.dtype))
    z_real = FlowSchedule.add_noise(hr_latent, noise, schedule.sigma(table[0]).to(hr_latent.dtype))
    acc = _acc_dtype(student_latent)
    grad = torch.zeros_like(student_latent, dtype=acc)
    for k in range(n_points):
        sigma_k = schedule.sigma(table[k])
        t_k = schedule.timestep(table[k])
        moves_on = k + 1 < n_points
        v_teacher_hat = cfg_velocity(teacher_fn, z_hat, t_k, cond, uncond, config.guidance)
        v_fake_hat = cfg_velocity(fake_fn, z_hat, t_k, cond, uncond, config.guidance) if lam > 0 or moves_on else None
        v_teacher_real = (
            cfg_velocity(teacher_fn, z_real, t_k, cond, uncond, config.guidance) if lam < 1 or moves_on else None
        )
        direction = torch.zeros_like(grad)
        if lam > 0:
            direction += lam * (v_teacher_hat.to(acc) - v_fake_hat.to(acc))  # VSD
        if lam < 1:
            direction += (1 - lam) * (v_teacher_hat.to(acc) - v_teacher_real.to(acc))  # TSM
        grad += weights[k] * per_sample(sigma_k.to(acc) ** 2, grad) * direction
        if moves_on:
            step = per_sample(schedule.sigma(table[k + 1]) - sigma_k, z_hat)
            z_hat = z_hat + step.to(z_hat.dtype) * v_fake_hat
            z_real = z_real + step.to(z_real.dtype) * v_teacher_real
    return _zero_non_finite(grad).to(student_latent.dtype)


def tsd_loss(student_latent: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * mean((zh - stopgrad(zh - grad))^2)``: a scalar whose gradient w.r.t. zh is ``grad / numel``.

    The value itself is ``0.5 * mean(grad^2)`` (only useful for logging). ``grad`` is detached here.
    """
    if grad.shape != student_latent.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and student latent {tuple(student_latent.shape)} differ")
    target = (student_latent - grad.to(student_latent.dtype)).detach()
    acc = _acc_dtype(student_latent)
    return 0.5 * F.mse_loss(student_latent.to(acc), target.to(acc), reduction="mean")


# ----------------------------------------------------------------------------------------------------------------
# Fake-score (LoRA model) update
# ----------------------------------------------------------------------------------------------------------------


def fake_score_loss(
    fake_fn: VelocityFn,
    student_latent: Tensor,
    noise: Tensor,
    indices: Tensor | int,
    schedule: FlowSchedule,
    cond: Conditioning,
    weighting: str = "logit_normal",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Diffusion loss that teaches the fake score phi the student's output distribution (TSD-SR Eq. 9).

    zh is detached; ``zh_t = sigma eps + (1 - sigma) zh``; ``x0 = zh_t - sigma v_phi(zh_t; t, cond)`` with **no CFG**;
    ``loss = 0.5 * mean(w * (x0 - zh)^2)`` with a per-sample weight w:

    * ``"logit_normal"`` (TSD-SR default): ``w = sigmoid(u)``, u ~ N(0, 1) drawn from ``generator`` (a random factor
      that does not depend on sigma, as the code's ``--weighting_scheme logit_normal`` gives);
    * ``"sigma_sqrt"``: ``w = sigma^-2``;
    * ``"none"``: ``w = 1``.

    ``indices``: a LongTensor (B,) or one int for the batch (TSD-SR draws ``randint(50, 950)``).
    """
    if weighting not in FAKE_SCORE_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {FAKE_SCORE_WEIGHTINGS}, got {weighting!r}")
    if noise.shape != student_latent.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and student latent {tuple(student_latent.shape)} differ")
    z0 = student_latent.detach()
    batch = z0.shape[0]
    indices = torch.as_tensor(indices, dtype=torch.long)
    if indices.ndim == 0:
        indices = indices.expand(batch)
    sigma = schedule.sigma(indices).to(z0.device)
    z_t = FlowSchedule.add_noise(z0, noise, sigma.to(z0.dtype))
    v = fake_fn(z_t, schedule.timestep(indices).to(z0.device), cond.expand(batch))
    x0 = FlowSchedule.predict_x0(z_t, v, sigma.to(v.dtype))
    if weighting == "logit_normal":
        weight = torch.sigmoid(torch.randn(batch, generator=generator))
    elif weighting == "sigma_sqrt":
        weight = sigma.float().cpu() ** -2
    else:
        weight = torch.ones(batch)
    acc = _acc_dtype(x0)
    weight = per_sample(weight.to(x0.device, acc), x0.to(acc))
    return 0.5 * (weight * (x0.to(acc) - z0.to(acc)) ** 2).mean()


# ----------------------------------------------------------------------------------------------------------------
# Plain reconstruction and knowledge-distillation terms
# ----------------------------------------------------------------------------------------------------------------


def _same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student {tuple(a.shape)} and target {tuple(b.shape)} differ in shape")


def latent_mse(student: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between latents (TSD-SR's ``MSE(z, zh)`` of L_Rec, Eq. 7)."""
    _same_shape(student, target, "latent_mse")
    return F.mse_loss(student.to(_acc_dtype(student)), target.to(_acc_dtype(student)))


def latent_l1(student: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error between latents (TinySR ``|z_stu - z_tea|_1``, Sec. 3.3)."""
    _same_shape(student, target, "latent_l1")
    return F.l1_loss(student.to(_acc_dtype(student)), target.to(_acc_dtype(student)))


def feature_kd_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    """Mean over matched pairs of ``MSE(student_feats[i], teacher_feats[i])``; the teacher side is detached."""
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"feature_kd_loss: {len(student_feats)} student features but {len(teacher_feats)} teacher features"
        )
    if not student_feats:
        raise ValueError("feature_kd_loss: no feature pairs given")
    losses = []
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        if s.shape != t.shape:
            raise ValueError(
                f"feature_kd_loss: student_feats[{i}] has shape {tuple(s.shape)} but teacher_feats[{i}] has "
                f"{tuple(t.shape)}"
            )
        losses.append(F.mse_loss(s.float(), t.detach().float()))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------------------
# Adversarial terms
# ----------------------------------------------------------------------------------------------------------------


def _heads(logits: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [logits] if isinstance(logits, Tensor) else list(logits)


def hinge_d_loss(real_logits: Tensor | Sequence[Tensor], fake_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """Hinge discriminator loss ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`` (TAD-SR Eq. 12).

    Accepts one logit tensor or a list with one tensor per discriminator head; with a list the hinge is applied per
    head and the per-head losses are averaged (TAD-SR sums over heads; the mean only rescales by 1/K).
    """
    real, fake = _heads(real_logits), _heads(fake_logits)
    if len(real) != len(fake):
        raise ValueError(f"hinge_d_loss: {len(real)} real heads but {len(fake)} fake heads")
    per_head = [F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real, fake, strict=True)]
    return torch.stack(per_head).mean()


def hinge_g_loss(fake_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """Hinge generator loss ``-mean(D(fake))`` (TAD-SR Eq. 11): the one to pair with :func:`hinge_d_loss`."""
    return torch.stack([-f.float().mean() for f in _heads(fake_logits)]).mean()
