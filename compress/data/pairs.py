"""(LR, HR) training pairs and a fixed validation set built from the offline photo registry.

Why: distillation and fine-tuning need an endless, reproducible stream of degraded crops, and
evaluation needs the same pairs every run. Every sample is a pure function of (seed, index), so
results do not depend on DataLoader worker count, epoch order or process restarts.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .degradations import DegradationConfig, degrade_bicubic, degrade_realesrgan
from .photos import Photo, list_photos

DEGRADATIONS = ("realesrgan", "bicubic")
# HR sides are multiples of this in the validation set: LR = HR/4 is then a multiple of 16, and an
# 8x VAE followed by 2x2 patchify tiles the HR-sized input exactly (HR/16 tokens per side).
VALIDATION_MULTIPLE = 64
_DEFAULT_CONFIG = DegradationConfig()


def _check_degradation(degradation: str) -> None:
    if degradation not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {DEGRADATIONS}, got {degradation!r}")


def _degrade(
    hr: np.ndarray, degradation: str, rng: np.random.Generator, config: DegradationConfig, scale: int
) -> np.ndarray:
    if degradation == "realesrgan":
        return degrade_realesrgan(hr, rng, config, scale)
    return degrade_bicubic(hr, scale)


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 (uint8 or float in [0, 1]) -> float32 3 x H x W tensor in [0, 1]."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


class SeededPairs(Dataset):
    """``length`` training pairs, item ``i`` drawn from ``np.random.default_rng([seed, i])``: the same seed gives
    the same items in any process and after any resume. Subclasses say where the images come from."""

    def __init__(self, hr_size: int, seed: int, length: int, scale: int) -> None:
        if scale < 1 or hr_size < scale or hr_size % scale:
            raise ValueError(f"hr_size={hr_size} must be a positive multiple of scale={scale}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {seed}")
        self.hr_size, self.seed, self.length, self.scale = int(hr_size), int(seed), int(length), int(scale)

    def __len__(self) -> int:
        return self.length

    def item_rng(self, index: int) -> np.random.Generator:
        """The generator of item `index` (an IndexError outside the dataset)."""
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {self.length}")
        return np.random.default_rng([self.seed, index])


class SRPairDataset(SeededPairs):
    """Random HR crops (with random horizontal flip) and their degraded LR, ``length`` per epoch.

    Item ``i`` uses ``np.random.default_rng([seed, i])`` for the photo choice, the crop, the flip
    and the degradation, so two instances with the same arguments return identical items.
    Decoded photos are kept in memory (about 30 MB for the whole registry).

    Returns dicts ``{"lr": 3 x hr_size/scale x hr_size/scale, "hr": 3 x hr_size x hr_size,
    "name": photo name}``, float32 tensors in [0, 1].
    """

    def __init__(
        self,
        photos: Sequence[Photo],
        hr_size: int = 128,
        degradation: str = "realesrgan",
        seed: int = 0,
        length: int = 1000,
        scale: int = 4,
        config: DegradationConfig = _DEFAULT_CONFIG,
    ) -> None:
        _check_degradation(degradation)
        if not photos:
            raise ValueError("photos is empty; pass e.g. compress.data.list_photos('train')")
        super().__init__(hr_size, seed, length, scale)
        self.photos = list(photos)
        self.degradation = degradation
        self.config = config
        self._images: list[np.ndarray] = []
        for photo in self.photos:
            image = photo.load()
            if min(image.shape[:2]) < self.hr_size:
                raise ValueError(
                    f"photo {photo.name!r} is {image.shape[1]}x{image.shape[0]} (WxH), smaller than "
                    f"hr_size={self.hr_size}; use a smaller hr_size or drop the photo"
                )
            image.flags.writeable = False  # shared cache: crops must never modify it
            self._images.append(image)

    def __getitem__(self, index: int) -> dict:
        rng = self.item_rng(index)
        photo_index = int(rng.integers(len(self.photos)))
        lr, hr = crop_pair(self._images[photo_index], rng, self.hr_size, self.degradation, self.config, self.scale)
        return {"lr": lr, "hr": hr, "name": self.photos[photo_index].name}


def crop_pair(image: np.ndarray, rng: np.random.Generator, hr_size: int, degradation: str,
              config: DegradationConfig = _DEFAULT_CONFIG, scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `hr_size` crop of `image` (H x W x 3 uint8), flipped half the time, and its degraded LR, all
    drawn from `rng`: the training pair recipe of every dataset here. Returns (LR, HR) 3 x h x w in [0, 1]."""
    height, width = image.shape[:2]
    top = int(rng.integers(height - hr_size + 1))
    left = int(rng.integers(width - hr_size + 1))
    hr = image[top : top + hr_size, left : left + hr_size]
    if rng.uniform() < 0.5:
        hr = hr[:, ::-1]
    hr = np.ascontiguousarray(hr)
    lr = _degrade(hr, degradation, rng, config, scale)
    return _to_chw_tensor(lr), _to_chw_tensor(hr)


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    top = (image.shape[0] - height) // 2
    left = (image.shape[1] - width) // 2
    return np.ascontiguousarray(image[top : top + height, left : left + width])


def fixed_validation_pairs(
    degradation: str = "realesrgan",
    seed: int = 0,
    hr_size: int | None = 256,
    scale: int = 4,
    config: DegradationConfig = _DEFAULT_CONFIG,
    photos: Sequence[Photo] | None = None,
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Deterministic (name, lr, hr) evaluation pairs, one per validation photo.

    The HR is a centred ``hr_size`` x ``hr_size`` crop, or with ``hr_size=None`` the largest centred
    crop whose sides are multiples of 64. Sides stay multiples of 64 so that models with an 8x VAE
    and 2x2 patches run without padding (LR = HR/4 is a multiple of 16). Each photo's degradation
    is seeded from (seed, crc32(name)), so a pair does not change when photos are added or reordered.
    Tensors are float32, 3 x H x W, in [0, 1].
    """
    _check_degradation(degradation)
    if hr_size is not None and (hr_size <= 0 or hr_size % VALIDATION_MULTIPLE):
        raise ValueError(f"hr_size must be a positive multiple of {VALIDATION_MULTIPLE} or None, got {hr_size}")
    if VALIDATION_MULTIPLE % scale:
        raise ValueError(f"scale={scale} must divide {VALIDATION_MULTIPLE}")
    photos = list_photos("val") if photos is None else list(photos)
    pairs = []
    for photo in photos:
        image = photo.load()
        height, width = image.shape[:2]
        if hr_size is None:
            crop_h = height - height % VALIDATION_MULTIPLE
            crop_w = width - width % VALIDATION_MULTIPLE
        else:
            crop_h = crop_w = hr_size
        if crop_h == 0 or crop_w == 0 or crop_h > height or crop_w > width:
            raise ValueError(
                f"validation photo {photo.name!r} is {width}x{height} (WxH), too small for a "
                f"{crop_w}x{crop_h} crop; lower hr_size"
            )
        hr = _center_crop(image, crop_h, crop_w)
        rng = np.random.default_rng([seed, zlib.crc32(photo.name.encode("utf-8"))])
        lr = _degrade(hr, degradation, rng, config, scale)
        pairs.append((photo.name, _to_chw_tensor(lr), _to_chw_tensor(hr)))
    return pairs


def validation_images(size: int = 256) -> list[tuple[str, torch.Tensor]]:
    """The validation photos as centred ``size`` crops, ``[(name, 1 x 3 x size x size in [0, 1]), ...]``.

    The HR side of :func:`fixed_validation_pairs` (any degradation: the HR crop does not depend on it), with a
    batch axis, as reconstruction and upscaling evaluations feed them to a model one at a time.
    """
    return [(name, hr[None]) for name, _, hr in fixed_validation_pairs("bicubic", hr_size=size)]


def bicubic_psnr(
    images: Sequence[tuple[str, torch.Tensor]], scale: int = 4, degradation: str = "bicubic"
) -> float:
    """Mean Y-PSNR (dB) of bicubic x``scale`` upsampling of the validation LR: the bar a student must beat.

    ``images`` are :func:`validation_images` (their side picks the crop size); the LR inputs are those of
    :func:`fixed_validation_pairs` with ``degradation``, as the evaluation uses them.
    """
    import torch.nn.functional as F

    from compress.quality.fidelity import psnr_y

    if not images:
        raise ValueError("bicubic_psnr needs at least one validation image (see validation_images)")
    size = images[0][1].shape[-1]
    scores = []
    for _, lr, hr in fixed_validation_pairs(degradation, hr_size=size, scale=scale):
        up = F.interpolate(lr[None], scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
        scores.append(float(psnr_y(up, hr[None])[0]))
    return float(np.mean(scores))
