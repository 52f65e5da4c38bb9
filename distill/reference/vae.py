"""Stage 1 of the reference kit: an ``AutoencoderKL`` trained on random HR crops of the training photos.

Loss: L1 + MSE + ST-LPIPS + a tiny KL (per pixel-channel). When training ends, its ``scaling_factor`` is set
to ``1 / std(latents)`` (posterior mode) over unseen training crops, as Stable Diffusion sets it (Rombach et
al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022, Sec. 4.3.2), so
the prior of stage 2 trains on unit-variance latents. Writes ``out/base/vae`` and the stage folder
``out/vae`` (``distill.training`` run folder: log.csv, checkpoints/, metrics.json).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.reference.data import (
    CropStream,
    color_augment,
    iterate_batches,
    resolve_photos,
    to_model_range,
)
from distill.reference.stage import (
    METRICS_NAME,
    StageRun,
    mean_tail,
    positive,
    prepare_stage,
    progress,
    write_stage_metrics,
)
from distill.training import warmup_cosine


@dataclass
class VAEConfig:
    """Settings of stage 1. ``preset`` picks the VAE geometry (``reference``; ``tiny`` for tests)."""

    steps: int = 3000
    batch_size: int = 8
    crop: int = 64
    lr: float = 4e-4
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    l1_weight: float = 1.0
    mse_weight: float = 0.5
    lpips_weight: float = 0.1
    kl_weight: float = 1e-6
    posterior: str = "mode"  # latent fed to the decoder while training: "mode" or "sample"
    grad_clip: float = 1.0
    seed: int = 0
    preset: str = "reference"
    checkpoint_every: int = 100
    val_every: int = 500
    val_size: int = 256
    scaling_crops: int = 256  # training crops used to measure std(latents)
    photos: tuple[str, ...] | None = None  # training photo names (default: all of list_photos("train"))
    color_aug: bool = False  # color_augment every training batch (channel permutation + saturation)
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        positive(self, ("steps", "batch_size", "crop", "checkpoint_every", "val_every", "val_size", "scaling_crops"))
        if self.crop % 8:
            raise ValueError(f"--vae-crop must be a multiple of 8 (the VAE downsamples 8x), got {self.crop}")
        if self.val_size % 64:
            raise ValueError(f"val_size must be a multiple of 64, got {self.val_size}")
        if self.posterior not in ("mode", "sample"):
            raise ValueError(f"posterior must be 'mode' or 'sample', got {self.posterior!r}")
        if self.lr <= 0:
            raise ValueError(f"--vae-lr must be > 0, got {self.lr}")


_VAE_FLAGS = {"steps": "--vae-steps", "batch_size": "--vae-batch", "crop": "--vae-crop", "seed": "--seed",
              "preset": "--preset", "lr": "--vae-lr", "color_aug": "--color-aug"}
_VAE_RESUME_KEYS = ("steps", "batch_size", "crop", "seed", "preset", "lr", "warmup", "l1_weight", "mse_weight",
                    "lpips_weight", "kl_weight", "posterior", "photos", "color_aug")
LOG_COLUMNS = ("step", "loss", "l1", "mse", "lpips", "kl", "psnr_rgb_train", "grad_norm", "lr", "seconds")


def build_vae(preset: str = "reference", seed: int = 0) -> nn.Module:
    """A freshly initialised AutoencoderKL of a preset (seeded, global RNG left untouched)."""
    from diffusers import AutoencoderKL

    from compress.models.presets import get_preset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**get_preset(preset).vae)


@torch.no_grad()
def reconstruction_psnr(vae: nn.Module, images: Sequence[tuple[str, torch.Tensor]], device: str = "cpu") -> dict:
    """Y-channel PSNR of VAE(mode) reconstructions: ``{"mean": dB, "<name>": dB, ...}``.

    Every submodule's train/eval mode is restored afterwards, so a partly trained VAE (stage 1b trains the
    decoder of an eval-mode VAE) comes back as it was.
    """
    from compress.quality.fidelity import psnr_y

    modes = {module: module.training for module in vae.modules()}
    vae.eval()
    scores = {}
    for name, hr in images:
        x = to_model_range(hr.to(device))
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        scores[name] = float(psnr_y(((recon + 1) / 2).cpu().float(), hr.float())[0])
    for module, training in modes.items():
        module.training = training
    return {"mean": float(np.mean(list(scores.values()))), **scores}


@torch.no_grad()
def measure_scaling_factor(vae: nn.Module, stream: CropStream, crops: int, device: str = "cpu") -> float:
    """``1 / std`` of posterior-mode latents over ``crops`` training crops (SD's recipe for scaling_factor)."""
    was_training = vae.training
    vae.eval()
    latents = []
    steps = max(1, math.ceil(crops / stream.batch_size))
    for step in range(steps):
        # Offset far from the training steps so the measurement uses unseen crops of the same distribution.
        hr = stream.batch(10**9 + step)["hr"].to(device)
        latents.append(vae.encode(to_model_range(hr)).latent_dist.mode().float().cpu())
    vae.train(was_training)
    return float(1.0 / torch.cat(latents).std())


def train_vae(out: Path | str, config: VAEConfig | None = None, restart: bool = False, extend: bool = False) -> dict:
    """Stage 1: train the reference VAE; writes ``out/base/vae`` and ``out/vae/{log.csv,checkpoints/,metrics.json}``.

    Resumes from the newest checkpoint of ``out/vae`` when present (same loss curve as an uninterrupted run);
    returns the metrics dict (also written to metrics.json). A stage whose metrics.json exists is not rerun,
    unless ``extend`` and ``config.steps`` is larger: training then continues from the last step with the
    cosine schedule recomputed for the new total (a warm restart). ``restart`` discards the stage first. A
    retrained VAE makes a trained prior stale: train_prior refuses to skip and asks for a restart.
    """
    from compress.data import bicubic_psnr, validation_images
    from compress.io import atomic_dir
    from compress.models.release import prior_paths
    from compress.quality.perceptual import stlpips_module

    config = config or VAEConfig()
    out = Path(out)
    stage_dir = out / "vae"
    output_dir = prior_paths(out).vae
    settings = {key: getattr(config, key) for key in _VAE_RESUME_KEYS}
    done = prepare_stage("vae", out, output_dir, settings, _VAE_FLAGS, restart, extend)
    if done is not None:
        return done

    device = torch.device(config.device)
    vae = build_vae(config.preset, config.seed).to(device).train()
    lpips = stlpips_module("alex").to(device) if config.lpips_weight > 0 else None
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.steps, config.warmup, config.min_lr_ratio)
    )
    run = StageRun(stage_dir, device, LOG_COLUMNS)
    vae, optimizer, scheduler = run.prepare(vae, optimizer, scheduler)
    noise = torch.Generator().manual_seed(config.seed + 1)
    run.register_generators(noise=noise)
    stream = CropStream(config.crop, config.batch_size, seed=config.seed, degradation="bicubic",
                        photos=resolve_photos(config.photos))
    val_images = validation_images(config.val_size)

    start, saved = run.resume()
    if start:
        print(f"[vae] resumed from {run.checkpoints.latest()} at step {start}/{config.steps}", flush=True)
    seconds = float(saved.get("seconds", 0.0))
    val_log = list(saved.get("val", []))

    bar = progress(config.steps, start, "vae", config.progress)
    for step, batch in iterate_batches(stream, start, config.steps):
        tick = time.perf_counter()
        hr = color_augment(batch["hr"], config.seed, step) if config.color_aug else batch["hr"]
        x = to_model_range(hr.to(device))
        posterior = vae.encode(x).latent_dist
        if config.posterior == "sample":
            eps = torch.randn(posterior.mean.shape, generator=noise).to(device)
            latent = posterior.mean + posterior.std * eps
        else:
            latent = posterior.mode()
        recon = vae.decode(latent).sample
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()  # per pixel-channel, so the weight is resolution-free
        loss = config.l1_weight * l1 + config.mse_weight * mse + config.kl_weight * kl
        lp = torch.zeros((), device=device)
        if lpips is not None:
            lp = lpips(recon, x).mean()  # inputs already in [-1, 1]
            loss = loss + config.lpips_weight * lp
        optimizer.zero_grad(set_to_none=True)
        run.accelerator.backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - tick
        mse_01 = float(mse.detach()) / 4.0  # MSE in [0, 1] units -> RGB PSNR of the batch
        row = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "l1": float(l1.detach()),
            "mse": float(mse.detach()),
            "lpips": float(lp.detach()),
            "kl": float(kl.detach()),
            "psnr_rgb_train": float(-10 * math.log10(max(mse_01, 1e-12))),
            "grad_norm": float(grad_norm),
            "lr": lr_now,
            "seconds": round(seconds, 3),
        }
        run.log_row(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr_rgb_train']:.2f}", refresh=False)
        done = step + 1
        if done % config.val_every == 0 and done < config.steps:
            val = reconstruction_psnr(vae, val_images, config.device)
            val_log.append({"step": done, **val})
            bar.write(f"[vae] step {done}: validation Y-PSNR {val['mean']:.2f} dB")
        if done % config.checkpoint_every == 0 or done == config.steps:
            run.save(done, seconds=seconds, val=val_log, settings=settings)
    bar.close()

    history = run.history
    final_val = reconstruction_psnr(vae, val_images, config.device)
    val_log.append({"step": config.steps, **final_val})
    scaling = measure_scaling_factor(vae, stream, config.scaling_crops, config.device)
    vae.register_to_config(scaling_factor=scaling, shift_factor=0.0)
    vae.eval()
    with atomic_dir(output_dir, overwrite=True) as tmp:
        vae.to("cpu").save_pretrained(tmp)
    bicubic = bicubic_psnr(val_images)
    bicubic_realesrgan = bicubic_psnr(val_images, degradation="realesrgan")
    metrics: dict[str, Any] = {
        "stage": "vae",
        "steps": config.steps,
        "wall_seconds": seconds,
        "steps_per_second": config.steps / seconds if seconds > 0 else None,
        "final": {key: mean_tail(history, key) for key in ("loss", "l1", "mse", "lpips", "kl", "psnr_rgb_train")},
        "val_psnr_y": final_val["mean"],
        "val_psnr_y_per_image": {k: v for k, v in final_val.items() if k != "mean"},
        "val_history": val_log,
        "bicubic_x4_val_psnr_y": bicubic,
        "bicubic_x4_val_psnr_y_realesrgan": bicubic_realesrgan,
        "scaling_factor": scaling,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "settings": settings,
        "config": asdict(config),
        "output": str(output_dir),
    }
    write_stage_metrics(stage_dir / METRICS_NAME, metrics)
    print(
        f"[vae] done: {config.steps} steps in {seconds:.0f} s; validation Y-PSNR {final_val['mean']:.2f} dB "
        f"(bicubic x4 of the same crops: {bicubic:.2f} dB); scaling_factor {scaling:.4f}",
        flush=True,
    )
    return metrics
