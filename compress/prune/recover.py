"""Short recovery after pruning: TinySR stage 1 (Sun et al. 2025, Sec. 3.3), latent L1 to the uncompressed student.

L = || z_stu - z_tea ||_1 with z = z_L - v(z_L) the one-step output latent of the pruned student and of the
uncompressed one on the same LR crops (Real-ESRGAN degradation of the training photos). Only the pruned
transformer trains (every parameter; the VAE and the teacher are frozen), AdamW with a linear warm-up and a
cosine decay. This is the quick recovery `python -m compress prune --recover-steps N` runs so that the
report measures a usable model; the full re-distillation (stage 2 with perceptual and GAN terms, the TSD
loss, resumable checkpoints, many GPUs) is `python -m distill train --preset redistill-...`.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from compress.models.student import OneStepSR
from compress.schedules import warmup_cosine


def recover(
    student: OneStepSR,
    teacher: OneStepSR,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    hr_size: int = 128,
    seed: int = 0,
    degradation: str = "realesrgan",
    progress: bool = True,
) -> list[dict]:
    """Train `student.transformer` (and a slimmed VAE) in place for `steps` steps; returns the loss log."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from compress.data import SRPairDataset, list_photos

    if steps < 0:
        raise ValueError(f"--recover-steps must be >= 0, got {steps}")
    if steps == 0:
        return []
    torch.manual_seed(seed)
    data = SRPairDataset(list_photos("train"), hr_size=hr_size, degradation=degradation, seed=seed,
                         length=steps * batch_size)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    transformer = student.transformer.train().requires_grad_(True)
    # A slimmed VAE (a different module from the teacher's) trains too: its encoder towards the teacher's
    # latent, its decoder towards the teacher's image of the teacher's output latent (TinySR Sec. 3.2's
    # distillation, with the uncompressed student as the target).
    train_vae = student.vae is not teacher.vae
    student.vae.requires_grad_(train_vae)
    teacher.requires_grad_(False).eval()
    parameters = list(transformer.parameters()) + (list(student.vae.parameters()) if train_vae else [])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, min(50, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
    log, start = [], time.perf_counter()
    bar = tqdm(total=steps, desc="recover", unit="step", disable=not progress, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 15.0)
    for step, batch in enumerate(loader):
        if train_vae:
            with torch.no_grad():
                image = teacher.preprocess(batch["lr"])
                target = teacher.restore_latent(teacher.encode(image))
                target_image = teacher.decode(target)
            latent = student.encode(student.preprocess(batch["lr"]))
            loss = F.l1_loss(student.restore_latent(latent), target) + F.l1_loss(student.decode(target), target_image)
        else:
            with torch.no_grad():
                latent = student.encode(student.preprocess(batch["lr"]))
                target = teacher.restore_latent(latent)
            loss = F.l1_loss(student.restore_latent(latent), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"recovery loss is {loss.item()} at step {step}; lower --recover-lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.append({"step": step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - start})
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
    bar.close()
    transformer.eval().requires_grad_(False)
    student.vae.eval().requires_grad_(False)
    return log
