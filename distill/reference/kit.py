"""The prior folder the reference stages write and stage 3 (``python -m distill``) trains from.

Its layout is the TSD-SR release layout with the base inside the root, named once in
``compress.models.release`` (:func:`~compress.models.release.prior_paths`)::

    base/transformer, base/vae, base/scheduler                  diffusers folders (save_pretrained)
    dataset/default/{prompt_embeds,pool_embeds}.pt              the fixed "default prompt" (torch.save tensors)
    dataset/null/{prompt_embeds,pool_embeds}.pt                 zero "null" embeddings (CFG's unconditional branch)

The stages write it under the output root ``out`` itself (stage 1: ``base/vae``; stage 2: ``base/transformer``,
``base/scheduler``, ``dataset/``); :func:`assemble_kit` copies it to ``out/kit`` with the stage-1b decoder
when there is one. ``distill.recipe.load_prior`` reads exactly this layout, as does the shipped
``compress/assets/reference`` (prior ``builtin``).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def save_embeddings(out: Path | str, embeddings: Mapping[str, torch.Tensor]) -> None:
    """The four embeddings (``prompt_embeds``, ``pool_embeds``, ``null_prompt_embeds``, ``null_pool_embeds``) into
    the prior folder ``out`` (torch.save, each file atomically)."""
    from compress.io import atomic_path
    from compress.models.release import prior_paths

    for name, path in prior_paths(out).embeddings.items():
        with atomic_path(path) as tmp:
            torch.save(embeddings[name].detach().cpu().contiguous(), str(tmp))


def load_embeddings(out: Path | str) -> dict[str, torch.Tensor]:
    """The four embeddings of the prior folder ``out``, keyed as :func:`save_embeddings` writes them."""
    from compress.models.release import prior_paths

    result = {}
    for name, path in prior_paths(out).embeddings.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run stage 2 (scripts/train_reference.py --stage prior) first")
        result[name] = torch.load(str(path), map_location="cpu", weights_only=True)
    return result


def load_trained_vae(out: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """The stage-1 VAE of the prior folder ``out`` (``base/vae``; eval mode, frozen)."""
    from diffusers import AutoencoderKL

    from compress.models.release import prior_paths

    folder = prior_paths(out).vae
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no trained VAE: run stage 1 (scripts/train_reference.py --stage vae) first")
    vae = AutoencoderKL.from_pretrained(str(folder)).to(device).eval()
    vae.requires_grad_(False)
    return vae


def load_reference_base(out: Path | str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything stages 1-2 wrote: ``{"transformer", "vae", "scheduler", **embeddings}`` (models in eval mode)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from compress.models.release import prior_paths

    layout = prior_paths(out)
    if not (layout.transformer / "config.json").is_file():
        raise FileNotFoundError(
            f"{layout.transformer} has no trained prior: run stage 2 (scripts/train_reference.py --stage prior) first"
        )
    transformer = SD3Transformer2DModel.from_pretrained(str(layout.transformer)).to(device).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(layout.scheduler))
    return {"transformer": transformer, "vae": load_trained_vae(out, device), "scheduler": scheduler,
            **load_embeddings(out)}


def assemble_kit(out: Path | str, kit: Path | str | None = None) -> Path:
    """The prior folder stage 3 trains from (default ``out/kit``): the stage-2 transformer and scheduler, the VAE
    (the stage-1b decoder's when present, else stage 1's) and the embeddings, in the layout of this module."""
    from compress.io import atomic_dir
    from compress.models.release import prior_paths

    source = prior_paths(out)
    kit = Path(kit) if kit is not None else Path(out) / "kit"
    tuned = Path(out) / "decoder" / "vae"
    vae_src = tuned if (tuned / "config.json").is_file() else source.vae
    required = [source.transformer / "config.json", source.scheduler / "scheduler_config.json",
                vae_src / "config.json", *source.embeddings.values()]
    missing = [str(path) for path in required if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: run stages vae and prior first")
    with atomic_dir(kit, overwrite=True) as tmp:
        target = prior_paths(tmp)
        shutil.copytree(source.transformer, target.transformer)
        shutil.copytree(source.scheduler, target.scheduler)
        shutil.copytree(vae_src, target.vae)
        for name, path in source.embeddings.items():
            target.embeddings[name].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target.embeddings[name])
    return kit
