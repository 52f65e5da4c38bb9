"""Per-image prompt embeddings for training: the HQ prompt TSD-SR's teacher and fake score are conditioned on.

TSD-SR (train/train.py, data/process.py) encodes a caption of every training image with SD3's three text
encoders once, offline, and conditions the teacher and the fake score on it (the student always sees the fixed
default prompt). This toolkit never runs a text encoder; it reads what the user's encoder wrote, in either layout:

    DIR/<image name>.safetensors           tensors "prompt_embeds" (tokens, width) and "pool_embeds" (pooled width),
                                           a leading batch axis of 1 allowed
    DIR/prompt_embeds/<image name>.pt      TSD-SR's own layout (data/process.py): torch.save'd tensors,
    DIR/pool_embeds/<image name>.pt        (333, 4096) and (2048,) for SD3-medium

`<image name>` is the training image's file name without extension (an HR file of `--data` or of `--pairs`, or
a bundled photo's name). Every image must have its file: the scan at set-up lists the missing ones.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_KEYS = ("prompt_embeds", "pool_embeds")
TSDSR_SUBDIRS = ("prompt_embeds", "pool_embeds")


class PromptEmbeddingError(ValueError):
    """A per-image prompt embedding is missing or does not fit the prior."""


@dataclass(frozen=True)
class PromptShape:
    tokens: int  # every file must have this many (CFG batches them with the null prompt's)
    width: int  # the transformer's joint_attention_dim
    pooled_width: int  # its pooled_projection_dim


class PromptEmbeddings:
    """The per-image embedding files of a folder, checked for every image name at construction."""

    def __init__(self, folder: Path | str, names: list[str], shape: PromptShape):
        self.folder, self.shape = Path(folder), shape
        if not self.folder.is_dir():
            raise PromptEmbeddingError(f"train.prompt_embeds: {self.folder} is not a folder of per-image embeddings")
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        if duplicates:
            raise PromptEmbeddingError(
                f"train.prompt_embeds: {len(duplicates)} training image name(s) occur twice in the data "
                f"(e.g. {', '.join(duplicates[:3])}), so their embeddings would be ambiguous; rename the images"
            )
        self.tsdsr_layout = all((self.folder / sub).is_dir() for sub in TSDSR_SUBDIRS)
        missing = [n for n in names if not all(p.is_file() for p in self.files(n))]
        if missing:
            where = ("prompt_embeds/NAME.pt and pool_embeds/NAME.pt" if self.tsdsr_layout else "NAME.safetensors")
            raise PromptEmbeddingError(
                f"train.prompt_embeds: {len(missing)} of {len(names)} training image(s) have no embedding under "
                f"{self.folder} (looked for {where}), e.g. {', '.join(missing[:5])}; encode their captions with "
                "SD3's text encoders (TSD-SR's data/process.py) or leave train.prompt_embeds unset to use the fixed prompt"
            )
        self.get(names[0])  # a width or token-count mismatch is found at set-up, not at the first step

    def files(self, name: str) -> tuple[Path, ...]:
        if self.tsdsr_layout:
            return tuple(self.folder / sub / f"{name}.pt" for sub in TSDSR_SUBDIRS)
        return (self.folder / f"{name}.safetensors",)

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (tokens, width), pooled (pooled width,)) of one image, as float32."""
        files = self.files(name)
        if self.tsdsr_layout:
            from compress.io import read_tensor_file

            tensors = {key: read_tensor_file(path, "train.prompt_embeds", PromptEmbeddingError)
                       for key, path in zip(SAFETENSORS_KEYS, files)}
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(files[0]))
            absent = [k for k in SAFETENSORS_KEYS if k not in tensors]
            if absent:
                raise PromptEmbeddingError(
                    f"train.prompt_embeds: {files[0]} has no tensor {' or '.join(absent)} (it has {sorted(tensors)})")
        prompt, pooled = tensors["prompt_embeds"].float(), tensors["pool_embeds"].float()
        prompt = prompt[0] if prompt.dim() == 3 and prompt.shape[0] == 1 else prompt
        pooled = pooled[0] if pooled.dim() == 2 and pooled.shape[0] == 1 else pooled
        want = self.shape
        if tuple(prompt.shape) != (want.tokens, want.width) or tuple(pooled.shape) != (want.pooled_width,):
            raise PromptEmbeddingError(
                f"train.prompt_embeds: {name}: prompt {tuple(prompt.shape)} and pooled {tuple(pooled.shape)}; this "
                f"prior needs ({want.tokens}, {want.width}) and ({want.pooled_width},) (the token count of its null "
                "prompt, which CFG batches with it)"
            )
        if not (torch.isfinite(prompt).all() and torch.isfinite(pooled).all()):
            raise PromptEmbeddingError(f"train.prompt_embeds: {name}: the embedding holds NaN or inf values")
        return prompt, pooled

    def batch(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, tokens, width) and (B, pooled width) for the images of a batch, in order."""
        pairs = [self.get(name) for name in names]
        return torch.stack([p for p, _ in pairs]), torch.stack([q for _, q in pairs])

