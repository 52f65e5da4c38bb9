"""Data of the reference-kit stages: seeded, step-addressable batches of HR crops and (LR, HR) pairs.

Batch ``step`` is a pure function of ``(seed, step)``, so a resumed run sees exactly the batches an
uninterrupted one would, whatever ran before (restarts, worker counts).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch


class CropStream:
    """Batches of random training crops; batch ``step`` is a pure function of ``(seed, step)``.

    Batch ``s`` holds items ``s * batch_size ... (s + 1) * batch_size - 1`` of an (unbounded)
    :class:`compress.data.SRPairDataset` over ``photos`` (default: ``list_photos("train")``), so the data
    never depend on how many steps ran before, on restarts or on worker counts.

    ``batch(step)`` returns ``{"hr": B x 3 x hr_size x hr_size, "lr": B x 3 x hr_size/scale x ...,
    "names": [photo names]}``, float32 in [0, 1]. ``degradation`` is ``"bicubic"`` (cheap; use it when only
    HR crops are needed) or ``"realesrgan"`` (the second-order pipeline TSD-SR trains on).
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
