"""Stage 1b of the reference kit: more training for the VAE's decoder alone, on the frozen stage-1 encoder.

The encoder (and so every latent the prior and the students see) is unchanged, so this stage can run beside
stage 2 on a second core; it buys reconstruction PSNR, which bounds the student's PSNR. Writes
``out/decoder/vae`` (stage-1 encoder + further-trained decoder) and the stage folder ``out/decoder``
(``distill.training`` run folder); :func:`distill.reference.kit.assemble_kit` prefers this VAE.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill.reference.data import (
    CropStream,
    color_augment,
    iterate_batches,
    to_model_range,
)
from distill.reference.kit import load_trained_vae
from distill.reference.stage import (
    METRICS_NAME,
    StageRun,
    mean_tail,
    positive,
    prepare_stage,
    progress,
    write_stage_metrics,
)
from distill.reference.vae import reconstruction_psnr
from distill.training import warmup_cosine


@dataclass
class DecoderConfig:
    """Settings of stage 1b (decoder-only L1 + MSE on the frozen encoder's posterior mode)."""

    steps: int = 1500
    batch_size: int = 8
    crop: int = 64
    lr: float = 2e-4
    warmup: int = 50
    min_lr_ratio: float = 0.1
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    grad_clip: float = 1.0
    seed: int = 7
    color_aug: bool = False  # color_augment every training batch (the frozen encoder sees the new colours too)
    checkpoint_every: int = 100
    val_every: int = 1000
    val_size: int = 256
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        positive(self, ("steps", "batch_size", "crop", "checkpoint_every", "val_every", "val_size"))
        if self.crop % 8:
            raise ValueError(f"--decoder-crop must be a multiple of 8, got {self.crop}")


_DECODER_FLAGS = {"steps": "--decoder-steps", "seed": "--seed", "color_aug": "--color-aug"}
_DECODER_RESUME_KEYS = ("steps", "batch_size", "crop", "lr", "warmup", "min_lr_ratio", "l1_weight", "mse_weight",
                        "seed", "color_aug")
LOG_COLUMNS = ("step", "loss", "l1", "mse", "psnr_rgb_train", "lr", "seconds")


def finetune_decoder(out: Path | str, config: DecoderConfig | None = None, restart: bool = False,
                     extend: bool = False) -> dict:
    """Stage 1b: writes ``out/decoder/vae`` (stage-1 encoder + further-trained decoder) and its metrics.

    Resumable from the newest checkpoint of ``out/decoder``; a finished stage (metrics.json present) is skipped
    unless ``extend`` asks for more steps (a warm restart of the cosine schedule, as for the VAE). The encoder is
    frozen, so the latents the prior and the students were trained on stay valid: this stage never makes
    them stale.
    """
    from compress.data import validation_images
    from compress.io import atomic_dir

    config = config or DecoderConfig()
    out = Path(out)
    stage_dir = out / "decoder"
    settings_check = {key: getattr(config, key) for key in _DECODER_RESUME_KEYS}
    done = prepare_stage("decoder", out, stage_dir / "vae", settings_check, _DECODER_FLAGS, restart, extend)
    if done is not None:
        return done
    device = torch.device(config.device)
    vae = load_trained_vae(out, device)
    vae.decoder.requires_grad_(True)
    vae.decoder.train()
    params = list(vae.decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps, config.warmup,
                                                                           config.min_lr_ratio))
    run = StageRun(stage_dir, device, LOG_COLUMNS)
    vae, optimizer, scheduler = run.prepare(vae, optimizer, scheduler)
    stream = CropStream(config.crop, config.batch_size, seed=config.seed, degradation="bicubic")
    val_images = validation_images(config.val_size)
    start, saved = run.resume()
    if start:
        print(f"[decoder] resumed from {run.checkpoints.latest()} at step {start}/{config.steps}", flush=True)
    # PSNR of the stage-1 VAE, measured once when the stage starts and carried by every checkpoint.
    start_val = saved["start_val"] if "start_val" in saved else reconstruction_psnr(vae, val_images, config.device)
    seconds = float(saved.get("seconds", 0.0))
    val_log = list(saved.get("val", []))
    settings = asdict(config)
    bar = progress(config.steps, start, "decoder", config.progress)
    for step, batch in iterate_batches(stream, start, config.steps):
        tick = time.perf_counter()
        hr = color_augment(batch["hr"], config.seed, step) if config.color_aug else batch["hr"]
        x = to_model_range(hr.to(device))
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mode()
        recon = vae.decode(latent).sample
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        loss = config.l1_weight * l1 + config.mse_weight * mse
        optimizer.zero_grad(set_to_none=True)
        run.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - tick
        row = {"step": step + 1, "loss": float(loss.detach()), "l1": float(l1.detach()), "mse": float(mse.detach()),
               "psnr_rgb_train": float(-10 * math.log10(max(float(mse.detach()) / 4.0, 1e-12))),
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3)}
        run.log_row(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr_rgb_train']:.2f}", refresh=False)
        if (step + 1) % config.val_every == 0:
            val = reconstruction_psnr(vae, val_images, config.device)
            val_log.append({"step": step + 1, **val})
            bar.write(f"[decoder] step {step + 1}: validation Y-PSNR {val['mean']:.3f} dB")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            run.save(step + 1, seconds=seconds, start_val=start_val, val=val_log, settings=settings)
    bar.close()
    vae.eval().requires_grad_(False)
    final_val = reconstruction_psnr(vae, val_images, config.device)
    with atomic_dir(stage_dir / "vae", overwrite=True) as tmp:
        vae.to("cpu").save_pretrained(tmp)
    metrics = {
        "stage": "decoder",
        "steps": config.steps,
        "wall_seconds": seconds,
        "val_psnr_y_before": start_val["mean"],
        "val_psnr_y": final_val["mean"],
        "val_psnr_y_per_image": {k: v for k, v in final_val.items() if k != "mean"},
        "val_history": val_log,
        "final": {key: mean_tail(run.history, key) for key in ("loss", "l1", "mse", "psnr_rgb_train")},
        "settings": settings,
        "output": str(stage_dir / "vae"),
    }
    write_stage_metrics(stage_dir / METRICS_NAME, metrics)
    print(f"[decoder] done: validation Y-PSNR {metrics['val_psnr_y_before']:.2f} -> {final_val['mean']:.2f} dB", flush=True)
    return metrics
