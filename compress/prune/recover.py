"""Recovery after pruning: TinySR stage 1 (Sun et al. 2025, Sec. 3.3) for the transformer, distillation for a
slimmed VAE (TinySR Sec. 3.2), both towards the uncompressed student, resumable.

Transformer: L1 between the one-step output latents z = z_L - v(z_L) of the pruned and the uncompressed
student on the same LR crops (Real-ESRGAN degradation of the training photos). A slimmed VAE trains too:
its encoder by latent L1 to the uncompressed encoder's posterior mode (and end to end through the latent
term above); its decoder, fed the uncompressed student's output latent, by pixel L1 + `perceptual` x
ST-LPIPS to the uncompressed decoder's image and, weighted by `hr_weight`, the same two terms to the HR
crop. The perceptual network is ST-LPIPS (AlexNet; Ghildyal & Liu, ECCV 2022), the only perceptual network
whose weights ship offline, and the same network the quality budget's ST-LPIPS uses: PSNR and NIQE in the
report are the independent checks. AdamW, linear warm-up and cosine decay (compress.schedules).

With `run_dir`, Accelerate checkpoints (compress.training.CheckpointManager: weights, optimiser, schedule,
RNG) are written every `checkpoint_every` steps; `resume=True` continues from the newest one, on the same data
(item i of the crop dataset is a function of the seed and i), so an interrupted run loses at most one
interval. The full re-distillation (TSD loss + KD, many GPUs) is `python -m distill train --preset
redistill-tsd`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.models.student import OneStepSR
from compress.schedules import warmup_cosine

CHECKPOINT_EVERY = 50


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
    perceptual: float = 0.5,
    hr_weight: float = 0.25,
    run_dir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = CHECKPOINT_EVERY,
    train_vae: bool | None = None,
) -> list[dict]:
    """Train `student.transformer` (and a slimmed VAE) in place for `steps` steps; returns the loss log."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from compress.data import SRPairDataset, list_photos
    from compress.training import CheckpointManager, make_accelerator

    if steps < 0:
        raise ValueError(f"--recover-steps must be >= 0, got {steps}")
    if steps == 0:
        return []
    torch.manual_seed(seed)
    transformer = student.transformer.train().requires_grad_(True)
    # A slimmed VAE trains too (default: when it is a different module from the teacher's).
    train_vae = student.vae is not teacher.vae if train_vae is None else train_vae
    student.vae.requires_grad_(train_vae).train(train_vae)
    teacher.requires_grad_(False).eval()
    parameters = list(transformer.parameters()) + (list(student.vae.parameters()) if train_vae else [])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, min(50, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
    accelerator = make_accelerator(cpu=True, device_placement=False)
    modules = [transformer, student.vae] if train_vae else [transformer]
    prepared = accelerator.prepare(*modules, optimizer, schedule)
    optimizer, schedule = prepared[-2], prepared[-1]
    checkpoints = CheckpointManager(accelerator, run_dir, keep=1) if run_dir is not None else None
    start, log, elapsed = 0, [], 0.0
    if resume:
        if checkpoints is None or checkpoints.latest() is None:
            raise FileNotFoundError(f"--resume: no recovery checkpoint under {run_dir}; run without --resume")
        state = checkpoints.restore()
        start, log, elapsed = int(state["step"]), list(state["log"]), float(state.get("seconds", 0.0))
        print(f"recover: resumed at step {start} of {steps} from {checkpoints.latest()}", file=sys.stderr)
    score = None
    if train_vae and perceptual > 0:
        from compress.quality.perceptual import stlpips_module

        score = stlpips_module("alex")
    data = SRPairDataset(list_photos("train"), hr_size=hr_size, degradation=degradation, seed=seed,
                         length=steps * batch_size)
    loader = DataLoader(Subset(data, range(start * batch_size, steps * batch_size)), batch_size=batch_size,
                        shuffle=False, num_workers=0)
    began = time.perf_counter() - elapsed
    bar = tqdm(total=steps, initial=start, desc="recover", unit="step", disable=not progress, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 15.0)
    for step, batch in enumerate(loader, start=start):
        loss, parts = _loss(student, teacher, batch, train_vae, score, perceptual, hr_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"recovery loss is {loss.item()} at step {step}; lower --recover-lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.append({"step": step + 1, "loss": loss.item(), **parts, "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - began})
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update(1)
        done = step + 1
        if checkpoints is not None and (done % checkpoint_every == 0) and done < steps:
            checkpoints.save(done, log=log, seconds=time.perf_counter() - began)
    bar.close()
    transformer.eval().requires_grad_(False)
    student.vae.eval().requires_grad_(False)
    return log


def _loss(student: OneStepSR, teacher: OneStepSR, batch: dict, train_vae: bool, score, perceptual: float,
          hr_weight: float) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        image = teacher.preprocess(batch["lr"])
        teacher_latent = teacher.encode(image)
        target = teacher.restore_latent(teacher_latent)
    if not train_vae:
        loss = F.l1_loss(student.restore_latent(teacher_latent), target)
        return loss, {}
    latent = student.encode(student.preprocess(batch["lr"]))
    parts = {"latent": F.l1_loss(student.restore_latent(latent), target), "encoder": F.l1_loss(latent, teacher_latent)}
    with torch.no_grad():
        target_image = teacher.decode(target)
    decoded = student.decode(target)
    hr = batch["hr"].mul(2).sub(1)
    parts["decoder"] = F.l1_loss(decoded, target_image) + hr_weight * F.l1_loss(decoded, hr)
    if score is not None:
        unit = decoded.add(1).div(2)
        parts["perceptual"] = perceptual * (score(unit, target_image.add(1).div(2), normalize=True).mean()
                                            + hr_weight * score(unit, batch["hr"], normalize=True).mean())
    loss = sum(parts.values())
    return loss, {k: v.item() for k, v in parts.items()}
