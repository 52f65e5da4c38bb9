"""Registry of real natural photos that ship inside installed PyPI dependencies.

Why: this toolkit must train and evaluate super-resolution models with no network access and
without committing third-party images. A handful of genuine colour photographs are installed as
package data by scikit-image, scikit-learn, matplotlib and pyiqa; this module names them, resolves
their paths at run time through ``importlib.metadata`` and records where each came from.

The train/validation split is fixed by the constant name lists ``TRAIN_PHOTO_NAMES`` and
``VAL_PHOTO_NAMES``. Validation = the five Kodak photos + ``grace_hopper`` (portrait, face detail)
+ ``chelsea`` (fur texture). The stereo pair ``motorcycle_left``/``motorcycle_right`` stays together
in train so that near-duplicate content never leaks across the split.

Versions, sizes and sha256 values below were checked against scikit-image 0.26.0,
scikit-learn 1.9.1, matplotlib 3.11.2 and pyiqa 0.1.16.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

# Distribution name -> version the registry was verified against (used in the fix hint).
VERIFIED_PACKAGE_VERSIONS: dict[str, str] = {
    "scikit-image": "0.26.0",
    "scikit-learn": "1.9.1",
    "matplotlib": "3.11.2",
    "pyiqa": "0.1.16",
}

_MIDDLEBURY = (
    "Middlebury 2014 stereo benchmark (Scharstein et al.), downsampled x4 by scikit-image; "
    "free for research use with citation"
)
_KODAK = (
    "Kodak Lossless True Color Image Suite photo (via TID2013 reference set, 512x384), "
    "released by Eastman Kodak for unrestricted use; shipped by pyiqa (PolyForm-Noncommercial-1.0.0 package)"
)
_PYIQA_TEST = (
    "pyiqa test image (SPAQ / video-quality dataset frame); licence not stated; "
    "package is PolyForm-Noncommercial-1.0.0 - research use only"
)

# name, distribution, path relative to the distribution's install root (site-packages), licence
_REGISTRY: tuple[tuple[str, str, str, str], ...] = (
    (
        "astronaut",
        "scikit-image",
        "skimage/data/astronaut.png",
        "NASA photo of Eileen Collins; public domain (skimage.data.astronaut docstring)",
    ),
    (
        "chelsea",
        "scikit-image",
        "skimage/data/chelsea.png",
        "CC0 by Stefan van der Walt (skimage.data.chelsea docstring)",
    ),
    (
        "coffee",
        "scikit-image",
        "skimage/data/coffee.png",
        "CC0 by Rachel Michetti, Pikolo Espresso Bar (skimage.data.coffee docstring)",
    ),
    (
        "rocket",
        "scikit-image",
        "skimage/data/rocket.jpg",
        "SpaceX DSCOVR launch photo; public domain (skimage.data.rocket docstring)",
    ),
    ("motorcycle_left", "scikit-image", "skimage/data/motorcycle_left.png", _MIDDLEBURY),
    ("motorcycle_right", "scikit-image", "skimage/data/motorcycle_right.png", _MIDDLEBURY),
    (
        "hubble_deep_field",
        "scikit-image",
        "skimage/data/hubble_deep_field.jpg",
        "NASA Hubble eXtreme Deep Field; public domain (skimage.data.hubble_deep_field docstring)",
    ),
    (
        "china",
        "scikit-learn",
        "sklearn/datasets/images/china.jpg",
        "CC BY 2.0, Flickr user danielbuechele (sklearn/datasets/images/README.txt)",
    ),
    (
        "flower",
        "scikit-learn",
        "sklearn/datasets/images/flower.jpg",
        "CC BY 2.0, Flickr user vultilion (sklearn/datasets/images/README.txt)",
    ),
    (
        "grace_hopper",
        "matplotlib",
        "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        "US Navy official portrait of Grace Hopper; public domain (matplotlib sample data)",
    ),
    ("kodak03_hats", "pyiqa", "ResultsCalibra/ref_dir/I03.bmp", _KODAK),
    ("kodak04_girl", "pyiqa", "ResultsCalibra/ref_dir/I04.bmp", _KODAK),
    ("kodak06_boat", "pyiqa", "ResultsCalibra/ref_dir/I06.bmp", _KODAK),
    ("kodak08_houses", "pyiqa", "ResultsCalibra/ref_dir/I08.bmp", _KODAK),
    ("kodak19_lighthouse", "pyiqa", "ResultsCalibra/ref_dir/I19.bmp", _KODAK),
    ("spaq_10241_night_street", "pyiqa", "tests/test_efficiency_img_dir/SPAQ_10241.jpg", _PYIQA_TEST),
    ("frame_4wrwr48c_garden", "pyiqa", "tests/test_efficiency_img_dir/frame_4wrwr48cdk6rbcjl.jpg", _PYIQA_TEST),
    ("frame_7gzdcz9s_sunset", "pyiqa", "tests/test_efficiency_img_dir/frame_7gzdcz9sif0ekg31.jpg", _PYIQA_TEST),
    ("frame_9ogwhvvy_snow_road", "pyiqa", "tests/test_efficiency_img_dir/frame_9ogwhvvy7gfj6jzh.jpg", _PYIQA_TEST),
)

VAL_PHOTO_NAMES: tuple[str, ...] = (
    "kodak03_hats",
    "kodak04_girl",
    "kodak06_boat",
    "kodak08_houses",
    "kodak19_lighthouse",
    "grace_hopper",
    "chelsea",
)
TRAIN_PHOTO_NAMES: tuple[str, ...] = tuple(name for name, *_ in _REGISTRY if name not in VAL_PHOTO_NAMES)

# (width, height) and sha256 of the file bytes, as verified with VERIFIED_PACKAGE_VERSIONS.
EXPECTED_FILES: dict[str, tuple[tuple[int, int], str]] = {
    "astronaut": ((512, 512), "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    "chelsea": ((451, 300), "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    "coffee": ((600, 400), "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    "rocket": ((640, 427), "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
    "motorcycle_left": ((741, 500), "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179"),
    "motorcycle_right": ((741, 500), "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797"),
    "hubble_deep_field": ((1000, 872), "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    "china": ((640, 427), "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29"),
    "flower": ((640, 427), "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638"),
    "grace_hopper": ((512, 600), "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"),
    "kodak03_hats": ((512, 384), "28441215ca5b6358e6267717250a02eeec4fa5ef73ae454870b8426320f980a8"),
    "kodak04_girl": ((512, 384), "c8500941a30397bc9e613a297e1286bdb955f49926148f58e7963d6e82b03c9f"),
    "kodak06_boat": ((512, 384), "445c2c0fcb47898e9cd8e6de640f2545621d27cbb248c69ef2c84d8204723061"),
    "kodak08_houses": ((512, 384), "b5d6738ece811f45f43c5bce425ad5d18d5c78466989001fe1129fcdd08efdab"),
    "kodak19_lighthouse": ((512, 384), "b8a2ede827d8db21c45f9ca1fb1c043bcec571b5a7243b4ea1aab3fb4feb7e0b"),
    "spaq_10241_night_street": ((810, 1080), "92e543ec9c71767b1faedbd0d1a1d84ab73de64baaf29c23916adc8e83e4aa12"),
    "frame_4wrwr48c_garden": ((1152, 864), "e7ee583b795f997f85b03a16aa797f3495e2fe025563fc34300bd09f6c16b3ae"),
    "frame_7gzdcz9s_sunset": ((1067, 800), "9897370815d5a363b232da26e1074acf1f07712bc2f1c273a33ce1b12a6d9dc0"),
    "frame_9ogwhvvy_snow_road": ((964, 1075), "5ede37d47e5defc0ef882eccfc0e1974a1a76e54b8409ca675fcc70ff046e240"),
}

_SPLITS = ("train", "val")


@dataclass(frozen=True)
class Photo:
    """One photo inside an installed distribution; nothing is copied into this repository."""

    name: str
    package: str  # distribution name as pip knows it, e.g. "scikit-image"
    relative_path: str  # path relative to the distribution's install root (site-packages)
    licence: str
    split: str  # "train" or "val"

    def _missing(self, looked_at: str, reason: str) -> FileNotFoundError:
        version = VERIFIED_PACKAGE_VERSIONS.get(self.package, "")
        pin = f"{self.package}=={version}" if version else self.package
        return FileNotFoundError(
            f"Photo {self.name!r} is not available: {reason}. Looked for {self.relative_path!r} "
            f"inside distribution {self.package!r} at {looked_at}. "
            f"Fix: pip install {pin}"
        )

    @property
    def path(self) -> Path:
        """Absolute path, resolved now so a moved or reinstalled environment is always honoured."""
        try:
            distribution = metadata.distribution(self.package)
        except metadata.PackageNotFoundError:
            raise self._missing("<not installed>", f"package {self.package!r} is not installed") from None
        resolved = Path(distribution.locate_file(self.relative_path))
        if not resolved.is_file():
            raise self._missing(
                str(resolved),
                f"{self.package} {distribution.version} is installed but the file is absent",
            )
        return resolved

    def load(self) -> np.ndarray:
        """Decode to an H x W x 3 uint8 RGB array (alpha or palette modes are converted)."""
        with Image.open(self.path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)


def _build_photos() -> tuple[Photo, ...]:
    val = set(VAL_PHOTO_NAMES)
    return tuple(
        Photo(name, package, rel, licence, "val" if name in val else "train")
        for name, package, rel, licence in _REGISTRY
    )


PHOTOS: tuple[Photo, ...] = _build_photos()


def list_photos(split: str | None = None) -> list[Photo]:
    """Photos of one split, ordered as ``TRAIN_PHOTO_NAMES``/``VAL_PHOTO_NAMES``, or all (None)
    in registry order."""
    if split is None:
        return list(PHOTOS)
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
    names = TRAIN_PHOTO_NAMES if split == "train" else VAL_PHOTO_NAMES
    return [get_photo(name) for name in names]


def get_photo(name: str) -> Photo:
    """Look a photo up by its registry name."""
    for photo in PHOTOS:
        if photo.name == name:
            return photo
    raise KeyError(f"No photo named {name!r}; known names: {', '.join(p.name for p in PHOTOS)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance_table() -> list[dict]:
    """Provenance of every photo as actually installed (version, size, sha256 computed now)."""
    rows = []
    for photo in PHOTOS:
        path = photo.path
        with Image.open(path) as image:
            width, height = image.size
        rows.append(
            {
                "name": photo.name,
                "package": photo.package,
                "version": metadata.version(photo.package),
                "relative_path": photo.relative_path,
                "size": f"{width}x{height}",
                "sha256": _sha256(path),
                "licence": photo.licence,
                "split": photo.split,
            }
        )
    return rows


def provenance_markdown() -> str:
    """The provenance table rendered as a Markdown table (for reports and READMEs)."""
    columns = ["name", "split", "package", "version", "relative_path", "size", "sha256", "licence"]
    headers = ["sha256 (first 16 hex)" if c == "sha256" else c for c in columns]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in provenance_table():
        cells = []
        for column in columns:
            value = str(row[column])
            if column == "sha256":
                value = value[:16]
            if column in ("relative_path", "sha256"):
                value = f"`{value}`"
            cells.append(value.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
