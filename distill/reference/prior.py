"""Stage 2 of the reference kit: the flow-matching prior (the teacher score model of stage 3).

An ``SD3Transformer2DModel`` trained from scratch as a rectified-flow text-to-image prior on scaled latents of
the frozen stage-1 VAE (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
ICML 2024: the velocity target eps - z0 of Sec. 3, logit-normal timestep sampling of Sec. 3.1, the timestep
shift of Sec. 5.3.2), conditioned on one fixed random "default prompt" embedding, with a zero "null" embedding
used 10% of the time (CFG dropout; Ho and Salimans, "Classifier-Free Diffusion Guidance", 2022) so that
classifier-free guidance works, as TSD-SR's teacher and fake score use it. Writes ``out/base/transformer``,
``out/base/scheduler`` and the embeddings (``distill/reference/kit.py``) and the stage folder ``out/prior``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.flow import Conditioning, ScoreModel, VelocityFn
from distill.reference.data import CropStream, resolve_photos, to_model_range
from distill.reference.kit import load_trained_vae, save_embeddings
from distill.reference.stage import (
    METRICS_NAME,
    StageRun,
    mean_tail,
    positive,
    prepare_stage,
    progress,
    write_stage_metrics,
)
from distill.training import latest_trainer_state, warmup_cosine


@dataclass
class PriorConfig:
    """Settings of stage 2 (rectified flow, SD3 timestep sampling: logit-normal, shift 3)."""

    steps: int = 3000
    batch_size: int = 16
    crop: int = 128
    lr: float = 3e-4
    warmup: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cfg_dropout: float = 0.1
    posterior: str = "mode"  # VAE latent of the crops: "mode" or "sample"
    grad_clip: float = 1.0
    seed: int = 0
    preset: str = "reference"
    checkpoint_every: int = 100
    device: str = "cpu"
    progress: bool = True
    zero_init: bool = True  # adaLN-Zero + zero output projection (DiT recipe), for stable from-scratch training
    latent_cache: bool = True  # encode the photos once (LatentBank) instead of every crop at every step
    photos: tuple[str, ...] | None = None  # training photo names (default: all of list_photos("train"))

    def __post_init__(self) -> None:
        positive(self, ("steps", "batch_size", "crop", "checkpoint_every"))
        if self.crop % 16:
            raise ValueError(f"--prior-crop must be a multiple of 16 (8x VAE, 2x2 patches), got {self.crop}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.posterior not in ("mode", "sample"):
            raise ValueError(f"posterior must be 'mode' or 'sample', got {self.posterior!r}")
        if self.lr <= 0:
            raise ValueError(f"--prior-lr must be > 0, got {self.lr}")


_PRIOR_FLAGS = {"steps": "--prior-steps", "batch_size": "--prior-batch", "crop": "--prior-crop", "seed": "--seed",
                "preset": "--preset", "lr": "--prior-lr"}
_PRIOR_RESUME_KEYS = ("steps", "batch_size", "crop", "seed", "preset", "lr", "warmup", "shift", "cfg_dropout",
                      "posterior", "logit_mean", "logit_std", "zero_init", "latent_cache", "photos")
LOG_COLUMNS = ("step", "loss", "sigma_mean", "dropped", "grad_norm", "lr", "seconds")
# Sanity samples of the finished prior (metrics.json): Euler steps and the CFG scale of the guided set.
SAMPLE_STEPS, SAMPLE_GUIDANCE, SAMPLE_BATCH = 28, 4.0, 4


def build_transformer(preset: str = "reference", seed: int = 0, zero_init: bool = True) -> nn.Module:
    """A freshly initialised SD3Transformer2DModel of a preset (seeded; global RNG untouched).

    ``zero_init`` zeroes every adaLN modulation Linear (block gates start at 0, so each block starts as the
    identity) and the output projection, as DiT trains (Peebles and Xie, "Scalable Diffusion Models with
    Transformers", ICCV 2023, Sec. 3.2, adaLN-Zero).
    """
    from diffusers import SD3Transformer2DModel

    from compress.models.presets import get_preset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**get_preset(preset).transformer)
    if zero_init:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear) and (
                    name.endswith(("norm1.linear", "norm1_context.linear")) or name == "norm_out.linear"
                ):
                    module.weight.zero_()
                    module.bias.zero_()
            model.proj_out.weight.zero_()
            model.proj_out.bias.zero_()
    return model


def make_embeddings(preset: str = "reference", seed: int = 0) -> dict[str, torch.Tensor]:
    """The fixed random default-prompt embedding (1, tokens, joint_dim), pooled (1, pooled_dim), and zero nulls."""
    from compress.models.presets import get_preset

    geometry = get_preset(preset)
    generator = torch.Generator().manual_seed(10_000 + seed)
    prompt = torch.randn(geometry.prompt_shape, generator=generator)
    pooled = torch.randn(geometry.pooled_shape, generator=generator)
    return {
        "prompt_embeds": prompt,
        "pool_embeds": pooled,
        "null_prompt_embeds": torch.zeros_like(prompt),
        "null_pool_embeds": torch.zeros_like(pooled),
    }


def sample_sigmas(batch: int, generator: torch.Generator, shift: float = 3.0, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """SD3 training sigmas: u ~ N(mean, std), s = sigmoid(u), sigma = shift s / (1 + (shift - 1) s)."""
    s = torch.sigmoid(torch.randn(batch, generator=generator) * std + mean)
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_matching_loss(
    velocity: VelocityFn,
    latents: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    generator: torch.Generator,
    shift: float = 3.0,
    cfg_dropout: float = 0.1,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Rectified-flow loss ``||v(z_t, 1000 sigma, c) - (eps - z0)||^2`` with CFG dropout to ``uncond``.

    ``velocity`` is a :data:`distill.flow.VelocityFn` (the trainee wrapped in :class:`distill.flow.ScoreModel`);
    ``cond`` / ``uncond`` have batch 1 or B. All randomness (sigma, noise, dropout) is drawn on the CPU from
    ``generator`` then moved, so results do not depend on the device's RNG.
    Returns (loss, {"sigma_mean": ..., "dropped": ...}).
    """
    batch = latents.shape[0]
    device, dtype = latents.device, latents.dtype
    sigma = sample_sigmas(batch, generator, shift, logit_mean, logit_std)
    noise = torch.randn(latents.shape, generator=generator)
    drop = torch.rand(batch, generator=generator) < cfg_dropout
    sigma, noise, drop = sigma.to(device, dtype), noise.to(device, dtype), drop.to(device)
    sig = sigma.view(-1, 1, 1, 1)
    noisy = (1.0 - sig) * latents + sig * noise
    target = noise - latents
    cond, uncond = cond.expand(batch).to(device=device, dtype=dtype), uncond.expand(batch).to(device=device, dtype=dtype)
    mixed = Conditioning(torch.where(drop.view(-1, 1, 1), uncond.prompt_embeds, cond.prompt_embeds),
                         torch.where(drop.view(-1, 1), uncond.pooled, cond.pooled))
    pred = velocity(noisy, sigma * 1000.0, mixed)
    loss = F.mse_loss(pred.float(), target.float())
    return loss, {"sigma_mean": float(sigma.mean()), "dropped": int(drop.sum())}


class LatentBank:
    """Scaled VAE latents of the training photos, encoded once; batches of random latent crops per step.

    Encoding every crop at every step costs more than the prior's own step on CPU, so stage 2 encodes each
    photo once (posterior mode x scaling_factor) as non-overlapping ``tile`` px tiles (tiles keep the VAE's
    mid-block attention small; the last row/column is aligned to the photo's edge and may overlap) and samples
    ``crop / 8``-latent windows inside a tile, with a random horizontal flip. Batch ``step`` is a pure
    function of ``(seed, step)``, like :class:`distill.reference.data.CropStream`.
    """

    def __init__(
        self,
        vae: nn.Module,
        crop: int,
        batch_size: int,
        seed: int = 0,
        photos: Sequence[Any] | None = None,
        tile: int = 512,
        device: str | torch.device = "cpu",
        posterior: str = "mode",
    ) -> None:
        from compress.data import list_photos

        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if crop % factor or tile % factor or crop > tile:
            raise ValueError(f"crop={crop} and tile={tile} must be multiples of {factor} with crop <= tile")
        self.latent_crop = crop // factor
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        scaling = float(vae.config.scaling_factor)
        photos = list_photos("train") if photos is None else list(photos)
        generator = torch.Generator().manual_seed(seed + 7)
        self.tiles: list[torch.Tensor] = []
        with torch.no_grad():
            for photo in photos:
                image = torch.from_numpy(photo.load()).permute(2, 0, 1).float().div(255.0)
                height, width = image.shape[-2:]
                for top in _tile_starts(height, tile, factor):
                    for left in _tile_starts(width, tile, factor):
                        patch = image[:, top : top + tile, left : left + tile]
                        patch = patch[:, : patch.shape[1] // factor * factor, : patch.shape[2] // factor * factor]
                        if min(patch.shape[-2:]) < crop:
                            continue
                        dist = vae.encode(to_model_range(patch[None]).to(device)).latent_dist
                        if posterior == "sample":
                            latent = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(device)
                        else:
                            latent = dist.mode()
                        self.tiles.append((latent[0] * scaling).float().cpu())
        if not self.tiles:
            raise ValueError(f"no training photo is at least {crop} px on both sides")

    def batch(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, int(step)])
        size = self.latent_crop
        out = []
        for _ in range(self.batch_size):
            tile = self.tiles[int(rng.integers(len(self.tiles)))]
            top = int(rng.integers(tile.shape[1] - size + 1))
            left = int(rng.integers(tile.shape[2] - size + 1))
            crop = tile[:, top : top + size, left : left + size]
            if rng.uniform() < 0.5:
                crop = crop.flip(-1)
            out.append(crop)
        return torch.stack(out)


def _tile_starts(length: int, tile: int, multiple: int) -> list[int]:
    """Start offsets of tiles covering ``length`` (last one aligned to the end, on a ``multiple`` grid)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile))
    last = (length - tile) // multiple * multiple
    if starts[-1] != last:
        starts.append(last)
    return starts


@torch.no_grad()
def sample_prior(
    transformer: nn.Module,
    embeddings: Mapping[str, torch.Tensor],
    latent_size: int,
    batch: int = 1,
    steps: int = SAMPLE_STEPS,
    guidance: float = SAMPLE_GUIDANCE,
    shift: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """Euler sampling of the prior from sigma = 1 to 0 with CFG; returns scaled latents B x C x s x s.

    ``embeddings``: the four tensors of :func:`make_embeddings` / ``distill.reference.kit.load_embeddings``.
    The sigmas are SD3's shifted schedule on ``steps + 1`` uniform points; ``guidance == 1`` makes one
    conditional call per step, otherwise two (``distill.flow.cfg_velocity``).
    """
    from distill.flow import cfg_velocity

    device = next(transformer.parameters()).device
    velocity = ScoreModel(transformer)
    generator = torch.Generator().manual_seed(seed)
    channels = transformer.config.in_channels
    z = torch.randn(batch, channels, latent_size, latent_size, generator=generator).to(device)
    s = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * s / (1 + (shift - 1) * s)
    cond = Conditioning(embeddings["prompt_embeds"], embeddings["pool_embeds"]).to(device)
    null = Conditioning(embeddings["null_prompt_embeds"], embeddings["null_pool_embeds"]).to(device)
    for i in range(steps):
        t = torch.full((batch,), float(sigmas[i]) * 1000.0, device=device)
        v = cfg_velocity(velocity, z, t, cond, null, guidance, batched=False)
        z = z + (float(sigmas[i + 1]) - float(sigmas[i])) * v
    return z


def train_prior(out: Path | str, config: PriorConfig | None = None, restart: bool = False, extend: bool = False) -> dict:
    """Stage 2: train the flow-matching prior (teacher) on latents of the stage-1 VAE.

    Writes ``out/base/transformer``, ``out/base/scheduler``, the embeddings (``dataset/default``,
    ``dataset/null``) and ``out/prior/{log.csv,checkpoints/,metrics.json}``; resumable and extendable like
    :func:`distill.reference.vae.train_vae`. Refuses to continue or skip a prior trained on a different VAE
    (scaling factor changed). ``metrics.json`` also records the standard deviation of a few sampled latents
    (:func:`sample_prior`, unguided and with CFG): the training latents have unit standard deviation by
    construction of the VAE's scaling_factor, so a prior far from 1 has not learned their distribution.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from compress.io import atomic_dir
    from compress.models.release import prior_paths

    config = config or PriorConfig()
    out = Path(out)
    layout = prior_paths(out)
    stage_dir = out / "prior"
    metrics_path = stage_dir / METRICS_NAME
    settings = {key: getattr(config, key) for key in _PRIOR_RESUME_KEYS}
    vae_scaling = _saved_vae_scaling(out)
    if not restart:
        saved_runs = [(metrics_path, "latent_scaling_factor",
                       json.loads(metrics_path.read_text()) if metrics_path.is_file() else None),
                      (stage_dir / "checkpoints", "scaling_factor", latest_trainer_state(stage_dir))]
        for path, key, saved_state in saved_runs:
            saved = (saved_state or {}).get(key)
            if saved is not None and not math.isclose(float(saved), vae_scaling, rel_tol=1e-6):
                raise ValueError(
                    f"{path} belongs to a prior trained on another VAE (scaling_factor {saved} vs {vae_scaling} now in "
                    f"{layout.vae}); train the prior again with --restart"
                )
    done = prepare_stage("prior", out, layout.transformer, settings, _PRIOR_FLAGS, restart, extend)
    if done is not None:
        return done

    device = torch.device(config.device)
    vae = load_trained_vae(out, device)
    scaling = float(vae.config.scaling_factor)
    embeddings = make_embeddings(config.preset, config.seed)
    save_embeddings(out, embeddings)
    transformer = build_transformer(config.preset, config.seed, config.zero_init).to(device).train()
    optimizer = torch.optim.AdamW(
        transformer.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.steps, config.warmup, config.min_lr_ratio)
    )
    run = StageRun(stage_dir, device, LOG_COLUMNS)
    transformer, optimizer, scheduler = run.prepare(transformer, optimizer, scheduler)
    noise = torch.Generator().manual_seed(config.seed + 2)
    run.register_generators(noise=noise)
    if config.latent_cache:
        tick = time.perf_counter()
        bank = LatentBank(vae, config.crop, config.batch_size, seed=config.seed + 1, device=device,
                          posterior=config.posterior, photos=resolve_photos(config.photos))
        print(f"[prior] encoded {len(bank.tiles)} photo tiles in {time.perf_counter() - tick:.0f} s", flush=True)
        stream = None
    else:
        stream = CropStream(config.crop, config.batch_size, seed=config.seed + 1, degradation="bicubic",
                            photos=resolve_photos(config.photos))
    cond = Conditioning(embeddings["prompt_embeds"], embeddings["pool_embeds"]).to(device)
    uncond = Conditioning(embeddings["null_prompt_embeds"], embeddings["null_pool_embeds"]).to(device)
    velocity = ScoreModel(transformer)

    start, saved = run.resume()
    if start:
        print(f"[prior] resumed from {run.checkpoints.latest()} at step {start}/{config.steps}", flush=True)
    seconds = float(saved.get("seconds", 0.0))

    bar = progress(config.steps, start, "prior", config.progress)
    for step in range(start, config.steps):
        tick = time.perf_counter()
        if stream is None:
            latents = bank.batch(step).to(device)
        else:
            with torch.no_grad():
                posterior = vae.encode(to_model_range(stream.batch(step)["hr"].to(device))).latent_dist
                if config.posterior == "sample":
                    eps = torch.randn(posterior.mean.shape, generator=noise).to(device)
                    latents = posterior.mean + posterior.std * eps
                else:
                    latents = posterior.mode()
                latents = latents * scaling
        loss, info = flow_matching_loss(
            velocity, latents, cond, uncond, noise, shift=config.shift, cfg_dropout=config.cfg_dropout,
            logit_mean=config.logit_mean, logit_std=config.logit_std,
        )
        optimizer.zero_grad(set_to_none=True)
        run.accelerator.backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), config.grad_clip)
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - tick
        row = {"step": step + 1, "loss": float(loss.detach()), "sigma_mean": info["sigma_mean"], "dropped": info["dropped"],
               "grad_norm": float(grad_norm), "lr": lr_now, "seconds": round(seconds, 3)}
        run.log_row(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            run.save(done, seconds=seconds, settings=settings, scaling_factor=scaling)
    bar.close()

    history = run.history
    transformer.eval()
    with atomic_dir(layout.transformer, overwrite=True) as tmp:
        transformer.to("cpu").save_pretrained(tmp)
    with atomic_dir(layout.scheduler, overwrite=True) as tmp:
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift).save_pretrained(tmp)
    latent_size = config.crop // 2 ** (len(vae.config.block_out_channels) - 1)
    sample_std = {
        f"guidance_{guidance:g}": float(sample_prior(transformer, embeddings, latent_size, batch=SAMPLE_BATCH,
                                                     guidance=guidance, shift=config.shift, seed=config.seed).std())
        for guidance in (1.0, SAMPLE_GUIDANCE)
    }
    metrics = {
        "stage": "prior",
        "steps": config.steps,
        "wall_seconds": seconds,
        "steps_per_second": config.steps / seconds if seconds > 0 else None,
        "final": {"loss": mean_tail(history, "loss"), "loss_last": history[-1]["loss"] if history else None},
        "first_loss": mean_tail(history[:50], "loss"),
        "latent_scaling_factor": scaling,
        "sample_latent_std": sample_std,
        "parameters": sum(p.numel() for p in transformer.parameters()),
        "settings": settings,
        "config": asdict(config),
        "output": str(layout.transformer),
    }
    write_stage_metrics(metrics_path, metrics)
    print(f"[prior] done: {config.steps} steps in {seconds:.0f} s; loss (mean of last 50) {metrics['final']['loss']:.4f}; "
          f"std of sampled latents {sample_std} (training latents: 1)", flush=True)
    return metrics


def _saved_vae_scaling(out: Path) -> float:
    from compress.models.release import prior_paths

    config_path = prior_paths(out).vae / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path.parent} has no trained VAE: run stage 1 (--stage vae) first")
    return float(json.loads(config_path.read_text())["scaling_factor"])
