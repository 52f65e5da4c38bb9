"""Offline data: real photos from installed packages, Real-ESRGAN degradations, (LR, HR) pairs."""

from .degradations import DegradationConfig, degrade_bicubic, degrade_realesrgan
from .pairs import (
    SRPairDataset,
    bicubic_psnr,
    fixed_validation_pairs,
    validation_images,
)
from .photos import (
    TRAIN_PHOTO_NAMES,
    VAL_PHOTO_NAMES,
    Photo,
    get_photo,
    list_photos,
    provenance_markdown,
    provenance_table,
)

__all__ = [
    "TRAIN_PHOTO_NAMES",
    "VAL_PHOTO_NAMES",
    "DegradationConfig",
    "Photo",
    "SRPairDataset",
    "bicubic_psnr",
    "degrade_bicubic",
    "degrade_realesrgan",
    "fixed_validation_pairs",
    "get_photo",
    "list_photos",
    "provenance_markdown",
    "provenance_table",
    "validation_images",
]
