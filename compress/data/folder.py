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

from .degradations import DegradationConfig
from .pairs import _DEFAULT_CONFIG, SeededPairs, _check_degradation, _to_chw_tensor, crop_pair


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
            line += f"; {len(self.unreadable)} unreadable skipped: {_listed(self.unreadable)}"
        return line


def _listed(reasons: dict[str, str], shown: int = 5) -> str:
    """'path (why); path (why) and N more': the first skipped files of a report line."""
    text = "; ".join(f"{path} ({why})" for path, why in list(reasons.items())[:shown])
    return text + (f" and {len(reasons) - shown} more" if len(reasons) > shown else "")


def _image_files(root: Path, flag: str, hint: str = "") -> list[Path]:
    """Every image file under `root` (any depth, hidden files and folders skipped); a missing or empty folder
    is one error naming the flag."""
    from compress.imaging import ImageInputError, iter_image_paths

    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {root}: no such folder{hint}")
    try:
        return iter_image_paths([root], recursive=True)
    except ImageInputError as err:
        raise FileNotFoundError(f"{flag} {root}: {err}") from None


def _size(path: Path) -> tuple[int, int] | str:
    """(width, height) of a readable image, read with PIL's `verify` (the whole file: a truncated or corrupt
    body is found at set-up, not mid-run); else why it is unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        return size
    except Exception as err:  # PIL raises many kinds for a bad file
        return f"{type(err).__name__}: {err}"[:120]


def scan_hr_folder(root: Path | str, hr_size: int) -> FolderScan:
    """Check every image file under `root` (any depth, hidden files and folders skipped)."""
    root = Path(root)
    scan = FolderScan(root)
    for path in _image_files(root, "--data", "; give a folder of HR images (any depth)"):
        size = _size(path)
        if isinstance(size, str):
            scan.unreadable[str(path)] = size
        elif min(size) >= hr_size:
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


class FolderPairDataset(SeededPairs):
    """(LR, HR) training pairs cropped from the images `scan_hr_folder` accepted; ``length`` items."""

    def __init__(self, scan: FolderScan, hr_size: int, degradation: str = "realesrgan", seed: int = 0,
                 length: int = 1000, scale: int = 4, config: DegradationConfig = _DEFAULT_CONFIG) -> None:
        _check_degradation(degradation)
        super().__init__(hr_size, seed, length, scale)
        self.images = [str(p) for p in scan.images]
        self.degradation, self.config = degradation, config

    def __getitem__(self, index: int) -> dict:
        rng = self.item_rng(index)
        path = self.images[int(rng.integers(len(self.images)))]
        lr, hr = crop_pair(_decode(path), rng, self.hr_size, self.degradation, self.config, self.scale)
        return {"lr": lr, "hr": hr, "name": Path(path).stem}


@dataclass
class PairScan:
    """What `scan_pair_folders` found: matched (LR, HR) files and what it skipped, and why."""

    lr_root: Path
    hr_root: Path
    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason

    def summary(self, hr_size: int) -> str:
        line = f"data: {len(self.pairs)} LR/HR pair(s) from {self.lr_root} and {self.hr_root} used"
        if self.skipped:
            line += f"; {len(self.skipped)} skipped: {_listed(self.skipped)}"
        return line


def _pair_key(path: Path, root: Path, scale: int | None) -> str:
    """The name files are matched by: the path under its root without extension, an LR name's DIV2K-style
    `x4` suffix dropped."""
    key = path.relative_to(root).with_suffix("").as_posix()
    return key[: -len(f"x{scale}")] if scale and key.endswith(f"x{scale}") else key


def scan_pair_folders(lr_root: Path | str, hr_root: Path | str, hr_size: int, scale: int = 4) -> PairScan:
    """Match the files of two folder trees by name and check each pair: both readable, HR exactly `scale` x LR,
    HR at least `hr_size` on a side. Unmatched files, unreadable ones and wrong sizes are listed and skipped."""
    lr_root, hr_root = Path(lr_root), Path(hr_root)
    found = {flag: _image_files(root, f"--pairs {flag}") for root, flag in ((lr_root, "LR_DIR"), (hr_root, "HR_DIR"))}
    lr_by_key = {_pair_key(p, lr_root, scale): p for p in found["LR_DIR"]}
    scan = PairScan(lr_root, hr_root)
    matched = set()
    for hr in found["HR_DIR"]:
        key = _pair_key(hr, hr_root, None)
        lr = lr_by_key.get(key)
        if lr is None:
            scan.skipped[str(hr)] = f"no LR file named {key}.* or {key}x{scale}.* under {lr_root}"
            continue
        matched.add(key)
        hr_size_found, lr_size_found = _size(hr), _size(lr)
        if isinstance(hr_size_found, str) or isinstance(lr_size_found, str):
            bad, why = (hr, hr_size_found) if isinstance(hr_size_found, str) else (lr, lr_size_found)
            scan.skipped[str(bad)] = why
        elif hr_size_found != (lr_size_found[0] * scale, lr_size_found[1] * scale):
            scan.skipped[str(hr)] = f"{hr_size_found[0]}x{hr_size_found[1]} is not {scale}x its LR's " \
                                    f"{lr_size_found[0]}x{lr_size_found[1]}"
        elif min(hr_size_found) < hr_size:
            scan.skipped[str(hr)] = f"smaller than {hr_size} px on a side"
        else:
            scan.pairs.append((lr, hr))
    for key, lr in lr_by_key.items():
        if key not in matched:
            scan.skipped[str(lr)] = f"no HR file named {key}.* under {hr_root}"
    if not scan.pairs:
        raise ValueError(f"--pairs {lr_root} {hr_root}: no usable pair: {scan.summary(hr_size)}")
    return scan


class PairedFolderDataset(SeededPairs):
    """Aligned random crops of pre-degraded (LR, HR) pairs: an HR crop of `hr_size` at a multiple of `scale` and
    the LR crop it came from, flipped together half the time."""

    def __init__(self, scan: PairScan, hr_size: int, seed: int = 0, length: int = 1000, scale: int = 4) -> None:
        super().__init__(hr_size, seed, length, scale)
        self.pairs = [(str(lr), str(hr)) for lr, hr in scan.pairs]

    def __getitem__(self, index: int) -> dict:
        rng = self.item_rng(index)
        lr_path, hr_path = self.pairs[int(rng.integers(len(self.pairs)))]
        lr_image, hr_image = _decode(lr_path), _decode(hr_path)
        side = self.hr_size // self.scale
        top = int(rng.integers(lr_image.shape[0] - side + 1))
        left = int(rng.integers(lr_image.shape[1] - side + 1))
        lr = lr_image[top : top + side, left : left + side]
        hr = hr_image[top * self.scale : (top + side) * self.scale, left * self.scale : (left + side) * self.scale]
        if rng.uniform() < 0.5:
            lr, hr = lr[:, ::-1], hr[:, ::-1]
        return {"lr": _to_chw_tensor(lr), "hr": _to_chw_tensor(hr), "name": Path(hr_path).stem}
