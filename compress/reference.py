"""Training of the built-in miniature TSD-SR reference kit: stage 1 (VAE) and stage 2 (flow-matching prior).

The reference kit is a small SD3-topology model (preset ``reference``) trained for real on CPU from the
photos this toolkit ships (``compress.data``). It plays the part of SD3-medium in TSD-SR:

* stage 1, :func:`train_vae`: an ``AutoencoderKL`` trained on random HR crops (L1 + MSE + ST-LPIPS + tiny KL);
  its ``scaling_factor`` is then set to ``1 / std(latents)`` (posterior mode) over training crops;
* stage 2, :func:`train_prior`: an ``SD3Transformer2DModel`` trained from scratch as a rectified-flow
  text-to-image prior on scaled latents of the frozen VAE, with one fixed random "default prompt" embedding
  and a zero "null" embedding used 10% of the time (CFG dropout), so classifier-free guidance works;
* stage 3 (TSD distillation of the LoRA student) lives in the ``distill`` package and imports from here.

Outputs, under an output root ``out``::

    out/base/vae, out/base/transformer, out/base/scheduler      diffusers folders (save_pretrained)
    out/embeddings/{prompt_embeds,pool_embeds,null_prompt_embeds,null_pool_embeds}.pt   torch.save tensors
    out/<stage>/checkpoint.pt    resumable training state (model, optimizer, scheduler, step, RNG, history)
    out/<stage>/log.csv          one row per step: step, loss terms, lr, seconds
    out/<stage>/metrics.json     final losses, wall time, steps, settings, machine info

Every helper here is generic so that later stages can reuse it:

* data: :class:`CropStream` gives the batch of a given step as a pure function of (seed, step), so a
  resumed run sees exactly the batches an uninterrupted one would (:func:`iterate_batches`);
* checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` store any dict of modules, optimizers
  and LR schedulers plus the step, the loss history, torch/numpy/python RNG states and any extra
  ``torch.Generator`` states, atomically (``compress.io.atomic_path``);
* logging: :func:`write_log_csv`, :func:`write_stage_metrics`;
* loading: :func:`load_reference_base` returns what stage 3 needs (transformer, VAE, scheduler, embeddings).
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STAGES = ("vae", "prior")
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
METRICS_NAME = "metrics.json"
EMBEDDING_FILES = {
    "prompt_embeds": "prompt_embeds.pt",
    "pool_embeds": "pool_embeds.pt",
    "null_prompt_embeds": "null_prompt_embeds.pt",
    "null_pool_embeds": "null_pool_embeds.pt",
}


# ==============================================================================================================
# Data: seeded, step-addressable batches of HR crops and (LR, HR) pairs
# ==============================================================================================================


class CropStream:
    """Batches of random training crops; batch ``step`` is a pure function of ``(seed, step)``.

    Batch ``s`` holds items ``s * batch_size ... (s + 1) * batch_size - 1`` of an (unbounded)
    :class:`compress.data.SRPairDataset` over ``photos`` (default: ``list_photos("train")``), so the data
    never depend on how many steps ran before, on restarts or on worker counts.

    ``batch(step)`` returns ``{"hr": B x 3 x hr_size x hr_size, "lr": B x 3 x hr_size/scale x ...,
    "names": [photo names]}``, float32 in [0, 1]. ``degradation`` is ``"bicubic"`` (cheap; use it when only
    HR crops are needed) or ``"realesrgan"`` (the TSD-SR second-order pipeline).
    """

    def __init__(
        self,
        hr_size: int,
        batch_size: int,
        seed: int = 0,
        degradation: str = "bicubic",
        photos: Sequence[Any] | None = None,
        scale: int = 4,
    ) -> None:
        from compress.data import SRPairDataset, list_photos

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.hr_size = int(hr_size)
        self.seed = int(seed)
        photos = list_photos("train") if photos is None else list(photos)
        # SRPairDataset needs a length; 2**62 items are never exhausted.
        self.dataset = SRPairDataset(
            photos, hr_size=hr_size, degradation=degradation, seed=seed, length=2**62, scale=scale
        )

    def batch(self, step: int) -> dict:
        start = int(step) * self.batch_size
        return collate([self.dataset[start + i] for i in range(self.batch_size)])

    def __iter__(self) -> Iterator[dict]:
        return (batch for _, batch in iterate_batches(self))


def resolve_photos(names: Sequence[str] | None) -> list[Any]:
    """Photo objects for registry names (None: every training photo, ``list_photos("train")``)."""
    from compress.data import get_photo, list_photos

    if names is None:
        return list_photos("train")
    return [get_photo(name) for name in names]


def collate(items: Sequence[Mapping[str, Any]]) -> dict:
    """Stack a list of SRPairDataset items into ``{"hr": B x ..., "lr": B x ..., "names": [...]}``."""
    return {
        "hr": torch.stack([item["hr"] for item in items]),
        "lr": torch.stack([item["lr"] for item in items]),
        "names": [item["name"] for item in items],
    }


def iterate_batches(stream: CropStream, start_step: int = 0, stop_step: int | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(step, batch)`` for ``step = start_step, start_step + 1, ...`` (forever when stop_step is None)."""
    step = int(start_step)
    while stop_step is None or step < stop_step:
        yield step, stream.batch(step)
        step += 1


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1] (the VAE's input range)."""
    return images * 2.0 - 1.0


def color_augment(images: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Widen the colour gamut an autoencoder sees: per image, a random permutation of the RGB channels and a
    saturation factor in [0.5, 1.5] about the image's luma, clipped to [0, 1].

    Twelve training photos leave whole hues out (a fluorescent yellow cap comes back orange); permuting the
    channels turns an orange into a yellow-green or a blue. The draw is a pure function of ``(seed, step)``,
    so a resumed run sees the same augmented batches. ``images``: B x 3 x H x W in [0, 1].
    """
    from compress.quality.fidelity import rgb_to_luma

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"color_augment expects B x 3 x H x W images, got {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    batch = images.shape[0]
    orders = torch.stack([torch.randperm(3, generator=generator) for _ in range(batch)]).to(images.device)
    saturation = (0.5 + torch.rand(batch, generator=generator)).to(images)
    permuted = torch.gather(images, 1, orders[:, :, None, None].expand_as(images))
    luma = rgb_to_luma(permuted, "yiq")  # unit-sum Rec. 601 weights: the grey each saturation change pivots on
    return (luma + saturation[:, None, None, None] * (permuted - luma)).clamp(0.0, 1.0)


# ==============================================================================================================
# Checkpoints: atomic, resumable, RNG-exact
# ==============================================================================================================


def checkpoint_path(out: Path | str, stage: str) -> Path:
    """``<out>/<stage>/checkpoint.pt``."""
    return Path(out) / stage / CHECKPOINT_NAME


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """torch (CPU and every CUDA device), numpy-global, python ``random`` and named generator states."""
    state = {
        "torch": torch.random.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`; named generators missing from ``state`` are an error."""
    torch.random.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"checkpoint holds no state for generator {name!r} (has {sorted(saved)})")
        gen.set_state(saved[name].cpu())


def save_checkpoint(
    path: Path | str,
    *,
    step: int,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    history: Sequence[Mapping[str, float]] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the whole training state to ``path`` atomically (a crash never leaves a broken file).

    ``step`` is the number of completed steps (the next one to run). ``extra`` is any picklable dict
    (settings, elapsed seconds, ...) returned again by :func:`load_checkpoint`.
    """
    from compress.io import atomic_path

    payload = {
        "step": int(step),
        "modules": {name: module.state_dict() for name, module in modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in (optimizers or {}).items()},
        "schedulers": {name: sch.state_dict() for name, sch in (schedulers or {}).items()},
        "rng": capture_rng_state(generators),
        "history": [dict(row) for row in history],
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, str(tmp))
    return Path(path)


def load_checkpoint(
    path: Path | str,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[int, list[dict], dict]:
    """Restore a :func:`save_checkpoint` file into the given objects; returns ``(step, history, extra)``.

    Modules are loaded strictly; RNG states (global and named generators) are restored last, so the run
    continues exactly as an uninterrupted one would.
    """
    payload = torch.load(str(path), map_location=map_location, weights_only=False)
    for kind, targets in (("modules", modules), ("optimizers", optimizers or {}), ("schedulers", schedulers or {})):
        saved = payload[kind]
        missing = sorted(set(targets) - set(saved))
        if missing:
            raise KeyError(f"checkpoint {path} has no {kind} entry for {missing} (has {sorted(saved)})")
        for name, target in targets.items():
            target.load_state_dict(saved[name])
    restore_rng_state(payload["rng"], generators)
    return int(payload["step"]), list(payload["history"]), dict(payload["extra"])


def read_checkpoint_extra(path: Path | str) -> tuple[int, dict]:
    """``(step, extra)`` of a checkpoint without touching any model (e.g. to check its settings)."""
    payload = torch.load(str(path), map_location="cpu", weights_only=False)
    return int(payload["step"]), dict(payload["extra"])


# ==============================================================================================================
# Logs and metrics
# ==============================================================================================================


def write_log_csv(path: Path | str, history: Sequence[Mapping[str, float]]) -> None:
    """Write the per-step history (list of dicts with the same keys) as CSV, atomically."""
    from compress.io import atomic_path

    if not history:
        return
    columns = list(history[0].keys())
    for row in history:
        columns += [key for key in row if key not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow(row)


def write_stage_metrics(path: Path | str, payload: Mapping[str, Any]) -> None:
    """metrics.json of a stage, with machine info added."""
    from compress.io import write_json
    from compress.quality.cost import machine_info

    write_json(path, {**payload, "machine": machine_info()})


def _mean_tail(history: Sequence[Mapping[str, float]], key: str, count: int = 50) -> float | None:
    values = [row[key] for row in history[-count:] if key in row and row[key] is not None]
    return float(np.mean(values)) if values else None


def cosine_with_warmup(total_steps: int, warmup_steps: int, floor: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine down to ``floor`` at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _sync_lr(optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Set each group's lr to what the (possibly re-planned) LambdaLR gives at its current step."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=2.0)


def _check_settings(
    path: Path, saved: Mapping[str, Any], current: Mapping[str, Any], flag_of: Mapping[str, str],
    ignore: Sequence[str] = (),
) -> None:
    """A resumed run must use the settings of the run it continues (else the loss curve is not the same)."""
    import json

    def norm(value: Any) -> Any:  # tuples come back from metrics.json as lists
        return json.loads(json.dumps(value))

    for key, value in current.items():
        if key in ignore:
            continue
        if key in saved and norm(saved[key]) != norm(value):
            flag = flag_of.get(key, key)
            raise ValueError(
                f"{path} was written with {key}={saved[key]!r} but this run asks {key}={value!r}; "
                f"rerun with {flag} {saved[key]} to continue it, or delete {path.parent} (or pass --restart) to start over"
            )


def _prepare_stage(
    stage: str, out: Path, output_dir: Path, settings: Mapping[str, Any], flags: Mapping[str, str],
    restart: bool, extend: bool,
) -> dict | None:
    """Common start of a stage: --restart wipes it; a finished stage returns its metrics (skip) unless
    ``extend`` asks to continue it to more steps; settings of an existing run are checked."""
    import json

    stage_dir = out / stage
    if restart:
        _clear_stage(stage_dir, output_dir)
    metrics_path = stage_dir / METRICS_NAME
    ckpt = stage_dir / CHECKPOINT_NAME
    ignore = ("steps",) if extend else ()
    if metrics_path.is_file() and (output_dir / "config.json").is_file():
        done = json.loads(metrics_path.read_text())
        saved = done.get("settings", {})
        _check_settings(metrics_path, saved, settings, flags, ignore)
        if extend and int(saved.get("steps", 0)) < int(settings["steps"]) and ckpt.is_file():
            print(f"[{stage}] extending the finished run from {saved['steps']} to {settings['steps']} steps", flush=True)
            metrics_path.unlink()
            return None
        print(f"[{stage}] already trained ({metrics_path}); skipping (--restart trains it again, --extend with more "
              f"{flags['steps']} continues it)", flush=True)
        return done
    if ckpt.is_file():
        step, extra = read_checkpoint_extra(ckpt)
        _check_settings(ckpt, extra.get("settings", {}), settings, flags, ignore)
        if step > int(settings["steps"]):
            raise ValueError(f"{ckpt} is at step {step}, beyond {flags['steps']} {settings['steps']}")
    return None


# ==============================================================================================================
# Stage 1: VAE
# ==============================================================================================================


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
        _positive(self, ("steps", "batch_size", "crop", "checkpoint_every", "val_every", "val_size", "scaling_crops"))
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


def _positive(config: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def build_vae(preset: str = "reference", seed: int = 0) -> nn.Module:
    """A freshly initialised AutoencoderKL of a preset (seeded, global RNG left untouched)."""
    from diffusers import AutoencoderKL

    from compress.models.presets import get_preset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**get_preset(preset).vae)


def validation_images(size: int = 256) -> list[tuple[str, torch.Tensor]]:
    """The 7 validation photos as centred ``size`` crops (1 x 3 x size x size in [0, 1]), as the eval uses them."""
    from compress.data import fixed_validation_pairs

    return [(name, hr[None]) for name, _, hr in fixed_validation_pairs("bicubic", hr_size=size)]


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
    with torch.no_grad():
        for name, hr in images:
            x = to_model_range(hr.to(device))
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            scores[name] = float(psnr_y(((recon + 1) / 2).cpu().float(), hr.float())[0])
    for module, training in modes.items():
        module.training = training
    return {"mean": float(np.mean(list(scores.values()))), **scores}


def bicubic_psnr(images: Sequence[tuple[str, torch.Tensor]], scale: int = 4, degradation: str = "bicubic") -> float:
    """Mean Y-PSNR of bicubic x4 upsampling of the validation LR (the bar the student must beat), as the eval."""
    from compress.data import fixed_validation_pairs
    from compress.quality.fidelity import psnr_y

    scores = []
    size = images[0][1].shape[-1]
    for _, lr, hr in fixed_validation_pairs(degradation, hr_size=size):
        up = F.interpolate(lr[None], scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
        scores.append(float(psnr_y(up, hr[None])[0]))
    return float(np.mean(scores))


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
    """Stage 1: train the reference VAE; writes ``out/base/vae`` and ``out/vae/{checkpoint.pt,log.csv,metrics.json}``.

    Resumes from ``out/vae/checkpoint.pt`` when present (same loss curve as an uninterrupted run); returns
    the metrics dict (also written to metrics.json). A stage whose metrics.json exists is not rerun, unless
    ``extend`` and ``config.steps`` is larger: training then continues from the last step with the cosine
    schedule recomputed for the new total (a warm restart). ``restart`` discards the stage first. A
    retrained VAE makes a trained prior stale: train_prior refuses to skip and asks for a restart.
    """
    from compress.io import atomic_dir
    from compress.quality.perceptual import stlpips_module

    config = config or VAEConfig()
    out = Path(out)
    stage_dir = out / "vae"
    ckpt = stage_dir / CHECKPOINT_NAME
    metrics_path = stage_dir / METRICS_NAME
    settings = {key: getattr(config, key) for key in _VAE_RESUME_KEYS}
    done = _prepare_stage("vae", out, out / "base" / "vae", settings, _VAE_FLAGS, restart, extend)
    if done is not None:
        return done

    device = torch.device(config.device)
    vae = build_vae(config.preset, config.seed).to(device).train()
    lpips = stlpips_module("alex").to(device) if config.lpips_weight > 0 else None
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(config.steps, config.warmup, config.min_lr_ratio)
    )
    noise = torch.Generator().manual_seed(config.seed + 1)
    stream = CropStream(config.crop, config.batch_size, seed=config.seed, degradation="bicubic",
                        photos=resolve_photos(config.photos))
    val_images = validation_images(config.val_size)

    start, history, extra = 0, [], {"seconds": 0.0, "val": []}
    if ckpt.is_file():
        start, history, extra = load_checkpoint(
            ckpt, modules={"vae": vae}, optimizers={"opt": optimizer}, schedulers={"lr": scheduler},
            generators={"noise": noise}, map_location=device,
        )
        _sync_lr(optimizer, scheduler)  # new total steps after --extend: the schedule's value at this step
        print(f"[vae] resumed from {ckpt} at step {start}/{config.steps}", flush=True)
    seconds = float(extra.get("seconds", 0.0))
    val_log = list(extra.get("val", []))

    def save(step: int) -> None:
        save_checkpoint(
            ckpt, step=step, modules={"vae": vae}, optimizers={"opt": optimizer}, schedulers={"lr": scheduler},
            generators={"noise": noise}, history=history,
            extra={"seconds": seconds, "val": val_log, "settings": settings},
        )
        write_log_csv(stage_dir / LOG_NAME, history)

    bar = _progress(config.steps, start, "vae", config.progress)
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
        loss.backward()
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
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr_rgb_train']:.2f}")
        done = step + 1
        if done % config.val_every == 0 and done < config.steps:
            val = reconstruction_psnr(vae, val_images, config.device)
            val_log.append({"step": done, **val})
            bar.write(f"[vae] step {done}: validation Y-PSNR {val['mean']:.2f} dB")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
    bar.close()

    final_val = reconstruction_psnr(vae, val_images, config.device)
    val_log.append({"step": config.steps, **final_val})
    scaling = measure_scaling_factor(vae, stream, config.scaling_crops, config.device)
    vae.register_to_config(scaling_factor=scaling, shift_factor=0.0)
    vae.eval()
    with atomic_dir(out / "base" / "vae", overwrite=True) as tmp:
        vae.to("cpu").save_pretrained(tmp)
    bicubic = bicubic_psnr(val_images)
    bicubic_realesrgan = bicubic_psnr(val_images, degradation="realesrgan")
    metrics = {
        "stage": "vae",
        "steps": config.steps,
        "wall_seconds": seconds,
        "steps_per_second": config.steps / seconds if seconds > 0 else None,
        "final": {key: _mean_tail(history, key) for key in ("loss", "l1", "mse", "lpips", "kl", "psnr_rgb_train")},
        "val_psnr_y": final_val["mean"],
        "val_psnr_y_per_image": {k: v for k, v in final_val.items() if k != "mean"},
        "val_history": val_log,
        "bicubic_x4_val_psnr_y": bicubic,
        "bicubic_x4_val_psnr_y_realesrgan": bicubic_realesrgan,
        "scaling_factor": scaling,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "settings": settings,
        "config": asdict(config),
        "output": str(out / "base" / "vae"),
    }
    write_stage_metrics(metrics_path, metrics)
    print(
        f"[vae] done: {config.steps} steps in {seconds:.0f} s; validation Y-PSNR {final_val['mean']:.2f} dB "
        f"(bicubic x4 of the same crops: {bicubic:.2f} dB); scaling_factor {scaling:.4f}",
        flush=True,
    )
    return metrics


@dataclass
class DecoderConfig:
    """Stage 1b: more training for the decoder alone, on the frozen stage-1 encoder's posterior mode.

    The encoder (and so every latent the prior and the student see) is unchanged, so this stage can run
    beside stage 2 on the second core; it buys reconstruction PSNR, which bounds the student's PSNR.
    """

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
        _positive(self, ("steps", "batch_size", "crop", "checkpoint_every", "val_every", "val_size"))
        if self.crop % 8:
            raise ValueError(f"--decoder-crop must be a multiple of 8, got {self.crop}")


_DECODER_FLAGS = {"steps": "--decoder-steps", "seed": "--seed", "color_aug": "--color-aug"}
_DECODER_RESUME_KEYS = ("steps", "batch_size", "crop", "lr", "warmup", "min_lr_ratio", "l1_weight", "mse_weight",
                        "seed", "color_aug")


def finetune_decoder(out: Path | str, config: DecoderConfig | None = None, restart: bool = False,
                     extend: bool = False) -> dict:
    """Stage 1b: writes ``out/decoder/vae`` (stage-1 encoder + further-trained decoder) and its metrics.

    Resumable from ``out/decoder/checkpoint.pt``; a finished stage (metrics.json present) is skipped unless
    ``extend`` asks for more steps (a warm restart of the cosine schedule, as for the VAE). The encoder is
    frozen, so the latents the prior and the students were trained on stay valid: this stage never makes
    them stale.
    """
    from compress.io import atomic_dir

    config = config or DecoderConfig()
    out = Path(out)
    stage_dir = out / "decoder"
    ckpt, metrics_path = stage_dir / CHECKPOINT_NAME, stage_dir / METRICS_NAME
    settings_check = {key: getattr(config, key) for key in _DECODER_RESUME_KEYS}
    done = _prepare_stage("decoder", out, stage_dir / "vae", settings_check, _DECODER_FLAGS, restart, extend)
    if done is not None:
        return done
    device = torch.device(config.device)
    vae = load_trained_vae(out, device)
    vae.decoder.requires_grad_(True)
    vae.decoder.train()
    params = [p for p in vae.decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config.steps, config.warmup,
                                                                                config.min_lr_ratio))
    stream = CropStream(config.crop, config.batch_size, seed=config.seed, degradation="bicubic")
    val_images = validation_images(config.val_size)
    start_val = reconstruction_psnr(vae, val_images, config.device)
    start, history, extra = 0, [], {"seconds": 0.0, "start_val": start_val}
    if ckpt.is_file():
        start, history, extra = load_checkpoint(ckpt, modules={"vae": vae}, optimizers={"opt": optimizer},
                                                schedulers={"lr": scheduler}, map_location=device)
        _sync_lr(optimizer, scheduler)  # new total steps after --extend: the schedule's value at this step
        print(f"[decoder] resumed from {ckpt} at step {start}/{config.steps}", flush=True)
    seconds = float(extra.get("seconds", 0.0))
    val_log = list(extra.get("val", []))
    settings = asdict(config)
    bar = _progress(config.steps, start, "decoder", config.progress)
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
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - tick
        row = {"step": step + 1, "loss": float(loss.detach()), "l1": float(l1.detach()), "mse": float(mse.detach()),
               "psnr_rgb_train": float(-10 * math.log10(max(float(mse.detach()) / 4.0, 1e-12))),
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3)}
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr_rgb_train']:.2f}")
        if (step + 1) % config.val_every == 0:
            val = reconstruction_psnr(vae, val_images, config.device)
            val_log.append({"step": step + 1, **val})
            bar.write(f"[decoder] step {step + 1}: validation Y-PSNR {val['mean']:.3f} dB")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(ckpt, step=step + 1, modules={"vae": vae}, optimizers={"opt": optimizer},
                            schedulers={"lr": scheduler}, history=history,
                            extra={"seconds": seconds, "start_val": extra.get("start_val", start_val),
                                   "val": val_log, "settings": settings})
            write_log_csv(stage_dir / LOG_NAME, history)
    bar.close()
    vae.eval().requires_grad_(False)
    final_val = reconstruction_psnr(vae, val_images, config.device)
    with atomic_dir(stage_dir / "vae", overwrite=True) as tmp:
        vae.to("cpu").save_pretrained(tmp)
    metrics = {
        "stage": "decoder",
        "steps": config.steps,
        "wall_seconds": seconds,
        "val_psnr_y_before": extra.get("start_val", start_val)["mean"],
        "val_psnr_y": final_val["mean"],
        "val_psnr_y_per_image": {k: v for k, v in final_val.items() if k != "mean"},
        "val_history": val_log,
        "final": {key: _mean_tail(history, key) for key in ("loss", "l1", "mse", "psnr_rgb_train")},
        "settings": settings,
        "output": str(stage_dir / "vae"),
    }
    write_stage_metrics(metrics_path, metrics)
    print(f"[decoder] done: validation Y-PSNR {metrics['val_psnr_y_before']:.2f} -> {final_val['mean']:.2f} dB", flush=True)
    return metrics


def assemble_kit(out: Path | str, kit: Path | str | None = None) -> Path:
    """The prior folder stage 3 trains from: stage-2 transformer + VAE (stage-1b decoder when present) + embeddings."""
    import shutil

    from compress.io import atomic_dir

    out = Path(out)
    kit = Path(kit) if kit is not None else out / "kit"
    tuned = out / "decoder" / "vae"
    vae_src = tuned if (tuned / "config.json").is_file() else out / "base" / "vae"
    for required in (out / "base" / "transformer" / "config.json", vae_src / "config.json"):
        if not required.is_file():
            raise FileNotFoundError(f"{required} missing: run stages vae and prior first")
    with atomic_dir(kit, overwrite=True) as tmp:
        shutil.copytree(out / "base" / "transformer", tmp / "base" / "transformer")
        shutil.copytree(out / "base" / "scheduler", tmp / "base" / "scheduler")
        shutil.copytree(vae_src, tmp / "base" / "vae")
        shutil.copytree(out / "embeddings", tmp / "embeddings")
    return kit


# ==============================================================================================================
# Stage 2: flow-matching prior (the teacher)
# ==============================================================================================================


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
        _positive(self, ("steps", "batch_size", "crop", "checkpoint_every"))
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


def build_transformer(preset: str = "reference", seed: int = 0, zero_init: bool = True) -> nn.Module:
    """A freshly initialised SD3Transformer2DModel of a preset (seeded; global RNG untouched).

    ``zero_init`` zeroes every adaLN modulation Linear (block gates start at 0, so each block starts as the
    identity) and the output projection, as DiT / SD3 training does.
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


def save_embeddings(out: Path | str, embeddings: Mapping[str, torch.Tensor]) -> None:
    """``out/embeddings/<name>.pt`` for the four embeddings (torch.save, atomic)."""
    from compress.io import atomic_path

    for name, filename in EMBEDDING_FILES.items():
        with atomic_path(Path(out) / "embeddings" / filename) as tmp:
            torch.save(embeddings[name].detach().cpu().contiguous(), str(tmp))


def load_embeddings(out: Path | str) -> dict[str, torch.Tensor]:
    """Read ``out/embeddings/*.pt`` (see :data:`EMBEDDING_FILES`)."""
    folder = Path(out) / "embeddings"
    result = {}
    for name, filename in EMBEDDING_FILES.items():
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run stage 2 (scripts/train_reference.py --stage prior) first")
        result[name] = torch.load(str(path), map_location="cpu", weights_only=True)
    return result


def load_trained_vae(out: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """The stage-1 VAE from ``out/base/vae`` (eval mode, frozen)."""
    from diffusers import AutoencoderKL

    folder = Path(out) / "base" / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no trained VAE: run stage 1 (scripts/train_reference.py --stage vae) first")
    vae = AutoencoderKL.from_pretrained(str(folder)).to(device).eval()
    vae.requires_grad_(False)
    return vae


def load_reference_base(out: Path | str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything stages 1-2 produced: ``{"transformer", "vae", "scheduler", **embeddings}`` (models in eval mode)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    out = Path(out)
    folder = out / "base" / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no trained prior: run stage 2 (scripts/train_reference.py --stage prior) first")
    transformer = SD3Transformer2DModel.from_pretrained(str(folder)).to(device).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out / "base" / "scheduler"))
    return {"transformer": transformer, "vae": load_trained_vae(out, device), "scheduler": scheduler,
            **load_embeddings(out)}


def sample_sigmas(batch: int, generator: torch.Generator, shift: float = 3.0, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """SD3 training sigmas: u ~ N(mean, std), s = sigmoid(u), sigma = shift s / (1 + (shift - 1) s)."""
    s = torch.sigmoid(torch.randn(batch, generator=generator) * std + mean)
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_matching_loss(
    transformer: nn.Module,
    latents: torch.Tensor,
    prompt: torch.Tensor,
    pooled: torch.Tensor,
    null_prompt: torch.Tensor,
    null_pooled: torch.Tensor,
    generator: torch.Generator,
    shift: float = 3.0,
    cfg_dropout: float = 0.1,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Rectified-flow loss ``||v(z_t, 1000 sigma, c) - (eps - z0)||^2`` with CFG dropout to the null embedding.

    All randomness (sigma, noise, dropout) is drawn on the CPU from ``generator`` then moved, so results
    do not depend on the device's RNG. Returns (loss, {"sigma_mean": ..., "dropped": ...}).
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
    enc = torch.where(drop.view(-1, 1, 1), null_prompt.to(device, dtype), prompt.to(device, dtype))
    pool = torch.where(drop.view(-1, 1), null_pooled.to(device, dtype), pooled.to(device, dtype))
    pred = transformer(
        hidden_states=noisy, timestep=sigma * 1000.0, encoder_hidden_states=enc, pooled_projections=pool,
        return_dict=False,
    )[0]
    loss = F.mse_loss(pred.float(), target.float())
    return loss, {"sigma_mean": float(sigma.mean()), "dropped": int(drop.sum())}


class LatentBank:
    """Scaled VAE latents of the training photos, encoded once; batches of random latent crops per step.

    Encoding every crop at every step costs more than the prior's own step on CPU, so stage 2 encodes each
    photo once (posterior mode x scaling_factor) as non-overlapping ``tile`` px tiles (tiles keep the VAE's
    mid-block attention small; the last row/column is aligned to the photo's edge and may overlap) and samples
    ``crop / 8``-latent windows inside a tile, with a random horizontal flip. Batch ``step`` is a pure
    function of ``(seed, step)``, like :class:`CropStream`.
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


def _expand(embedding: torch.Tensor, batch: int) -> torch.Tensor:
    return embedding.expand(batch, *embedding.shape[1:])


def train_prior(out: Path | str, config: PriorConfig | None = None, restart: bool = False, extend: bool = False) -> dict:
    """Stage 2: train the flow-matching prior (teacher) on latents of the stage-1 VAE.

    Writes ``out/base/transformer``, ``out/base/scheduler``, ``out/embeddings/*.pt`` and
    ``out/prior/{checkpoint.pt,log.csv,metrics.json}``; resumable and extendable like :func:`train_vae`.
    Refuses to continue or skip a prior trained on a different VAE (scaling factor changed).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from compress.io import atomic_dir

    config = config or PriorConfig()
    out = Path(out)
    stage_dir = out / "prior"
    ckpt = stage_dir / CHECKPOINT_NAME
    metrics_path = stage_dir / METRICS_NAME
    settings = {key: getattr(config, key) for key in _PRIOR_RESUME_KEYS}
    vae_scaling = _saved_vae_scaling(out)
    for path, key in ((metrics_path, "latent_scaling_factor"), (ckpt, "scaling_factor")):
        if path.is_file() and not restart:
            saved = (json.loads(path.read_text()) if path.suffix == ".json" else read_checkpoint_extra(path)[1]).get(key)
            if saved is not None and not math.isclose(float(saved), vae_scaling, rel_tol=1e-6):
                raise ValueError(
                    f"{path} belongs to a prior trained on another VAE (scaling_factor {saved} vs {vae_scaling} now in "
                    f"{out / 'base' / 'vae'}); train the prior again with --restart"
                )
    done = _prepare_stage("prior", out, out / "base" / "transformer", settings, _PRIOR_FLAGS, restart, extend)
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
        optimizer, cosine_with_warmup(config.steps, config.warmup, config.min_lr_ratio)
    )
    noise = torch.Generator().manual_seed(config.seed + 2)
    if config.latent_cache:
        tick = time.perf_counter()
        bank = LatentBank(vae, config.crop, config.batch_size, seed=config.seed + 1, device=device,
                          posterior=config.posterior, photos=resolve_photos(config.photos))
        print(f"[prior] encoded {len(bank.tiles)} photo tiles in {time.perf_counter() - tick:.0f} s", flush=True)
        stream = None
    else:
        stream = CropStream(config.crop, config.batch_size, seed=config.seed + 1, degradation="bicubic",
                            photos=resolve_photos(config.photos))
    emb = {name: tensor.to(device) for name, tensor in embeddings.items()}

    start, history, extra = 0, [], {"seconds": 0.0}
    if ckpt.is_file():
        start, history, extra = load_checkpoint(
            ckpt, modules={"transformer": transformer}, optimizers={"opt": optimizer}, schedulers={"lr": scheduler},
            generators={"noise": noise}, map_location=device,
        )
        _sync_lr(optimizer, scheduler)  # new total steps after --extend: the schedule's value at this step
        print(f"[prior] resumed from {ckpt} at step {start}/{config.steps}", flush=True)
    seconds = float(extra.get("seconds", 0.0))

    def save(step: int) -> None:
        save_checkpoint(
            ckpt, step=step, modules={"transformer": transformer}, optimizers={"opt": optimizer},
            schedulers={"lr": scheduler}, generators={"noise": noise}, history=history,
            extra={"seconds": seconds, "settings": settings, "scaling_factor": scaling},
        )
        write_log_csv(stage_dir / LOG_NAME, history)

    bar = _progress(config.steps, start, "prior", config.progress)
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
        bsz = latents.shape[0]
        loss, info = flow_matching_loss(
            transformer, latents, _expand(emb["prompt_embeds"], bsz), _expand(emb["pool_embeds"], bsz),
            _expand(emb["null_prompt_embeds"], bsz), _expand(emb["null_pool_embeds"], bsz), noise,
            shift=config.shift, cfg_dropout=config.cfg_dropout, logit_mean=config.logit_mean,
            logit_std=config.logit_std,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), config.grad_clip)
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - tick
        row = {"step": step + 1, "loss": float(loss.detach()), "sigma_mean": info["sigma_mean"], "dropped": info["dropped"],
               "grad_norm": float(grad_norm), "lr": lr_now, "seconds": round(seconds, 3)}
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
    bar.close()

    transformer.eval()
    with atomic_dir(out / "base" / "transformer", overwrite=True) as tmp:
        transformer.to("cpu").save_pretrained(tmp)
    with atomic_dir(out / "base" / "scheduler", overwrite=True) as tmp:
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift).save_pretrained(tmp)
    metrics = {
        "stage": "prior",
        "steps": config.steps,
        "wall_seconds": seconds,
        "steps_per_second": config.steps / seconds if seconds > 0 else None,
        "final": {"loss": _mean_tail(history, "loss"), "loss_last": history[-1]["loss"] if history else None},
        "first_loss": _mean_tail(history[:50], "loss"),
        "latent_scaling_factor": scaling,
        "parameters": sum(p.numel() for p in transformer.parameters()),
        "settings": settings,
        "config": asdict(config),
        "output": str(out / "base" / "transformer"),
    }
    write_stage_metrics(metrics_path, metrics)
    print(f"[prior] done: {config.steps} steps in {seconds:.0f} s; loss (mean of last 50) {metrics['final']['loss']:.4f}",
          flush=True)
    return metrics


def _saved_vae_scaling(out: Path) -> float:
    import json

    config_path = out / "base" / "vae" / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path.parent} has no trained VAE: run stage 1 (--stage vae) first")
    return float(json.loads(config_path.read_text())["scaling_factor"])


def _clear_stage(stage_dir: Path, output_dir: Path) -> None:
    import shutil

    for path in (stage_dir, output_dir):
        if path.exists():
            shutil.rmtree(path)


# ==============================================================================================================
# Sampling (sanity check of the prior; also what stage 3's teacher does with CFG)
# ==============================================================================================================


@torch.no_grad()
def sample_prior(
    transformer: nn.Module,
    embeddings: Mapping[str, torch.Tensor],
    latent_size: int,
    batch: int = 1,
    steps: int = 28,
    guidance: float = 4.0,
    shift: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """Euler sampling of the prior from sigma = 1 to 0 with CFG; returns scaled latents B x C x s x s."""
    device = next(transformer.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    channels = transformer.config.in_channels
    z = torch.randn(batch, channels, latent_size, latent_size, generator=generator).to(device)
    s = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * s / (1 + (shift - 1) * s)
    cond = (_expand(embeddings["prompt_embeds"].to(device), batch), _expand(embeddings["pool_embeds"].to(device), batch))
    null = (_expand(embeddings["null_prompt_embeds"].to(device), batch),
            _expand(embeddings["null_pool_embeds"].to(device), batch))
    for i in range(steps):
        t = torch.full((batch,), float(sigmas[i]) * 1000.0, device=device)
        v_c = transformer(hidden_states=z, timestep=t, encoder_hidden_states=cond[0], pooled_projections=cond[1],
                          return_dict=False)[0]
        if guidance != 1.0:
            v_u = transformer(hidden_states=z, timestep=t, encoder_hidden_states=null[0], pooled_projections=null[1],
                              return_dict=False)[0]
            v_c = v_u + guidance * (v_c - v_u)
        z = z + (float(sigmas[i + 1]) - float(sigmas[i])) * v_c
    return z
