"""TSD-SR release files: read (the loader a real TSD-SR download goes through) and write (tests, our kit).

Layout of the official release (TSD-SR README, github.com/Microtreei/TSD-SR; the release's Google Drive
folder), relative to a release root:

    checkpoint/tsdsr/transformer.safetensors    transformer LoRA, r64, keys "transformer.<path>.lora_A.weight"
    checkpoint/tsdsr/vae.safetensors            VAE-encoder LoRA, r64, keys also "transformer."-prefixed
    dataset/default/prompt_embeds.pt            torch.save tensor (1, 333, 4096)
    dataset/default/pool_embeds.pt              torch.save tensor (1, 2048)
    dataset/null/{prompt_embeds,pool_embeds}.pt the null (unconditional) embeddings, needed for training only

plus the SD3 base model in diffusers layout (transformer/, vae/, scheduler/), downloaded separately
(stabilityai/stable-diffusion-3-medium-diffusers). Our reference kit ships the base inside the root as `base/`.

A *prior folder* (what distillation trains from: the teacher score model, its VAE and the default and null
prompt embeddings) is this layout with the base inside the root; :func:`prior_paths` names its files, and both
the reference-kit stages (``distill/reference/kit.py``) and ``distill.recipe.load_prior`` go through it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.models.errors import ModelLoadError
from compress.models.layout import (  # noqa: F401  (the release layout's names, re-exported)
    BASE_CANDIDATES, BASE_PARTS, EMBEDDING_SUBDIR, HOW_TO_GET, LORA_SUBDIR, NULL_EMBEDDING_SUBDIR, POOLED_EMBEDS,
    PRIOR_BASE_SUBDIR, PROMPT_EMBEDS, TRANSFORMER_LORA, VAE_LORA, PriorPaths, ReleasePaths, check_release_files,
    is_release_root, prior_paths, release_paths,
)
from compress.models.student import OneStepSR, StudentSettings

def load_embedding(path: Path, what: str, width: int, token_axis: bool) -> torch.Tensor:
    """Read a torch.save'd embedding: (1, tokens, width) / (1, width); the leading batch axis is optional."""
    from compress.io import read_tensor_file

    value = read_tensor_file(path, what, ModelLoadError)
    want = 3 if token_axis else 2
    if value.dim() == want - 1:
        value = value[None]
    expected = "(1, tokens, %d)" % width if token_axis else "(1, %d)" % width
    if value.dim() != want or value.shape[0] != 1 or value.shape[-1] != width:
        raise ModelLoadError(f"{what}: {path} has shape {tuple(value.shape)}, expected {expected} for this base model")
    return value.float()


def load_tsdsr_release(
    root: Path | str | None = None,
    *,
    base: Path | str | None = None,
    lora_dir: Path | str | None = None,
    embedding_dir: Path | str | None = None,
    merge: bool = True,
    sample_posterior: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> OneStepSR:
    """Build the TSD-SR student from a release: SD3 base + transformer LoRA + VAE-encoder LoRA + embeddings.

    Either a release `root` (official layout) or the three folders explicitly, as TSD-SR's test script
    takes them (--pretrained_model_name_or_path, --lora_dir, --embedding_dir). `merge=True` folds the
    LoRAs into the weights (same function, faster, exportable).
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from compress.models.checks import load_diffusers_model
    from compress.models.lora import TRANSFORMER_LORA_TARGETS, load_lora_file, merge_lora, vae_encoder_lora_targets

    if root is not None:
        paths = release_paths(Path(root), Path(base) if base else None)
        if lora_dir is not None or embedding_dir is not None:
            paths = ReleasePaths(
                paths.base, Path(lora_dir or paths.lora_dir), Path(embedding_dir or paths.embedding_dir)
            )
    else:
        if base is None or lora_dir is None or embedding_dir is None:
            raise ValueError("give a release root, or all of base, lora_dir and embedding_dir")
        paths = ReleasePaths(Path(base), Path(lora_dir), Path(embedding_dir))
    check_release_files(paths)

    transformer = load_diffusers_model(SD3Transformer2DModel, paths.base / "transformer")
    vae = load_diffusers_model(AutoencoderKL, paths.base / "vae")
    load_lora_file(transformer, paths.lora_dir / TRANSFORMER_LORA, TRANSFORMER_LORA_TARGETS, "transformer LoRA")
    load_lora_file(vae, paths.lora_dir / VAE_LORA, vae_encoder_lora_targets(vae), "VAE-encoder LoRA")
    if merge:
        merge_lora(transformer)
        merge_lora(vae)
    prompt = load_embedding(
        paths.embedding_dir / PROMPT_EMBEDS, "prompt embedding", transformer.config.joint_attention_dim, True
    )
    pooled = load_embedding(
        paths.embedding_dir / POOLED_EMBEDS, "pooled prompt embedding", transformer.config.pooled_projection_dim, False
    )
    settings = StudentSettings(
        latent_scaling_factor=float(vae.config.scaling_factor),
        sample_posterior=sample_posterior,
        description=f"TSD-SR release {paths.lora_dir} on base {paths.base}",
    )
    model = OneStepSR(transformer, vae, prompt, pooled, settings)
    return model.to_runtime(device, dtype)


def write_tsdsr_release(
    root: Path | str,
    transformer,
    vae,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    *,
    base_dir: Path | str | None = None,
    half_precision: bool = False,
    null_prompt_embeds: torch.Tensor | None = None,
    null_pooled_prompt_embeds: torch.Tensor | None = None,
    transformer_adapter: str = "default",
) -> Path:
    """Write a release in the official layout from LoRA-carrying (unmerged) transformer and VAE.

    The base weights (LoRA excluded) go to `base_dir` (default root/base) in diffusers layout with an SD3
    scheduler config; the LoRAs and embeddings to the official paths. `half_precision` stores base weights
    in fp16, as the SD3 release does. `transformer_adapter` names the student's adapter where the transformer
    carries others too (distillation's fake score and teacher share it); only that one is written.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from compress.io import atomic_path
    from compress.models.lora import has_lora, save_lora_file
    from compress.models.presets import SD3_SCHEDULER

    root = Path(root)
    base_dir = Path(base_dir) if base_dir is not None else root / "base"
    for name, module in (("transformer", transformer), ("vae", vae)):
        if not has_lora(module):
            raise ValueError(f"{name} carries no LoRA adapter; a TSD-SR release is base + LoRA")
    dtype = torch.float16 if half_precision else torch.float32
    _save_base_without_lora(transformer, base_dir / "transformer", dtype)
    _save_base_without_lora(vae, base_dir / "vae", dtype)
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(base_dir / "scheduler")
    save_lora_file(transformer, root / LORA_SUBDIR / TRANSFORMER_LORA, adapter_name=transformer_adapter)
    save_lora_file(vae, root / LORA_SUBDIR / VAE_LORA)
    embeddings = {
        root / EMBEDDING_SUBDIR / PROMPT_EMBEDS: prompt_embeds,
        root / EMBEDDING_SUBDIR / POOLED_EMBEDS: pooled_prompt_embeds,
    }
    if null_prompt_embeds is not None and null_pooled_prompt_embeds is not None:
        embeddings[root / NULL_EMBEDDING_SUBDIR / PROMPT_EMBEDS] = null_prompt_embeds
        embeddings[root / NULL_EMBEDDING_SUBDIR / POOLED_EMBEDS] = null_pooled_prompt_embeds
    for path, tensor in embeddings.items():
        with atomic_path(path) as tmp:
            torch.save(tensor.detach().to("cpu", dtype).contiguous(), str(tmp))
    return root


def _save_base_without_lora(module, folder: Path, dtype: torch.dtype) -> None:
    """Save the base weights of a peft-wrapped diffusers model under their original names."""
    import copy

    from compress.models.lora import unwrap_lora

    unwrap_lora(copy.deepcopy(module).to("cpu"), merge=False).to(dtype).save_pretrained(folder)
