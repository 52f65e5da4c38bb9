"""Training pairs from a user's folder of HR images (DIV2K, LSDIR, FFHQ or any tree of image files).

Every file is checked once at set-up (PIL's header and `verify`); unreadable files are listed and skipped,
and images smaller than the crop on a side are counted and skipped, so a run never stops on a bad file
halfway. Images are decoded when an item needs them, a few kept in memory, so a 100 GB folder costs no
more memory than a small one. Items follow `SRPairDataset`'s recipe (`compress.data.pairs.crop_pair`):
item i draws its image, crop, flip and degradation from `numpy.random.default_rng([seed, i])`, so the same
seed gives the same pairs in any process, after any resume.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .degradations import DegradationConfig
from .pairs import _DEFAULT_CONFIG, _check_degradation, crop_pair


@dataclass
class FolderScan:
    """What `scan_hr_folder` found: the usable images and what it skipped, and why."""

    root: Path
    images: list[Path] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason
    too_small: list[str] = field(default_factory=list)

    def summary(self, hr_size: int) -> str:
        total = len(self.images) + len(self.unreadable) + len(self.too_small)
        line = f"data: {len(self.images)} of {total} image(s) under {self.root} used"
        if self.too_small:
            line += f"; {len(self.too_small)} smaller than {hr_size} px on a side skipped"
        if self.unreadable:
            shown = "; ".join(f"{path} ({why})" for path, why in list(self.unreadable.items())[:5])
            more = f" and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
            line += f"; {len(self.unreadable)} unreadable skipped: {shown}{more}"
        return line


def scan_hr_folder(root: Path | str, hr_size: int) -> FolderScan:
    """Check every image file under `root` (any depth, hidden files and folders skipped)."""
    from PIL import Image

    from compress.imaging import ImageInputError, iter_image_paths

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder; give a folder of HR images (any depth)")
    try:
        paths = iter_image_paths([root], recursive=True)
    except ImageInputError as err:
        raise FileNotFoundError(f"--data {root}: {err}") from None
    scan = FolderScan(root)
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.verify()  # reads the whole file: a truncated or corrupt body is found now, not mid-run
        except Exception as err:  # PIL raises many kinds for a bad file
            scan.unreadable[str(path)] = f"{type(err).__name__}: {err}"[:120]
            continue
        if min(width, height) >= hr_size:
            scan.images.append(path)
        else:
            scan.too_small.append(str(path))
    if not scan.images:
        raise ValueError(f"--data {root}: no usable image: {scan.summary(hr_size)}")
    return scan


@functools.lru_cache(maxsize=8)
def _decode(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        array = np.array(image.convert("RGB"), dtype=np.uint8)
    array.flags.writeable = False  # shared cache: crops must never modify it
    return array


class FolderPairDataset(Dataset):
    """(LR, HR) training pairs cropped from the images `scan_hr_folder` accepted; ``length`` items."""

    def __init__(self, scan: FolderScan, hr_size: int, degradation: str = "realesrgan", seed: int = 0,
                 length: int = 1000, scale: int = 4, config: DegradationConfig = _DEFAULT_CONFIG) -> None:
        _check_degradation(degradation)
        if scale < 1 or hr_size < scale or hr_size % scale:
            raise ValueError(f"hr_size={hr_size} must be a positive multiple of scale={scale}")
        self.images = [str(p) for p in scan.images]
        self.hr_size, self.degradation, self.seed = int(hr_size), degradation, int(seed)
        self.length, self.scale, self.config = int(length), int(scale), config

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for FolderPairDataset of length {self.length}")
        rng = np.random.default_rng([self.seed, index])
        path = self.images[int(rng.integers(len(self.images)))]
        lr, hr = crop_pair(_decode(path), rng, self.hr_size, self.degradation, self.config, self.scale)
        return {"lr": lr, "hr": hr, "name": Path(path).stem}
