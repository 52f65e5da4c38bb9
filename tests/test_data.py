"""Tests for compress.data: offline photo registry, Real-ESRGAN degradation, SR pair datasets."""

from __future__ import annotations

import dataclasses
from importlib import metadata

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data import degradations as deg
from compress.data import photos as photos_module
from compress.data.degradations import DegradationConfig, degrade_bicubic, degrade_realesrgan
from compress.data.pairs import SRPairDataset, fixed_validation_pairs
from compress.data.photos import (
    TRAIN_PHOTO_NAMES,
    VAL_PHOTO_NAMES,
    Photo,
    get_photo,
    list_photos,
    provenance_markdown,
    provenance_table,
)

EXPECTED_VAL = [
    "kodak03_hats",
    "kodak04_girl",
    "kodak06_boat",
    "kodak08_houses",
    "kodak19_lighthouse",
    "grace_hopper",
    "chelsea",
]
EXPECTED_TRAIN = [
    "astronaut",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "china",
    "flower",
    "spaq_10241_night_street",
    "frame_4wrwr48c_garden",
    "frame_7gzdcz9s_sunset",
    "frame_9ogwhvvy_snow_road",
]


@pytest.fixture(scope="module")
def hr_crop() -> np.ndarray:
    return get_photo("kodak03_hats").load()[64:192, 128:256].copy()


# --------------------------------------------------------------------------------- photos


def test_split_is_fixed_disjoint_and_complete():
    assert [p.name for p in list_photos("val")] == EXPECTED_VAL == list(VAL_PHOTO_NAMES)
    assert [p.name for p in list_photos("train")] == EXPECTED_TRAIN == list(TRAIN_PHOTO_NAMES)
    assert not set(EXPECTED_VAL) & set(EXPECTED_TRAIN)
    assert sorted(p.name for p in list_photos()) == sorted(EXPECTED_VAL + EXPECTED_TRAIN)
    assert {p.split for p in list_photos("val")} == {"val"}
    with pytest.raises(ValueError, match="split"):
        list_photos("test")


def test_every_photo_is_found_and_loads_as_rgb_uint8():
    for photo in list_photos():
        assert photo.path.is_file(), photo
        image = photo.load()
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, photo.name
        expected_size, _ = photos_module.EXPECTED_FILES[photo.name]
        assert (image.shape[1], image.shape[0]) == expected_size, photo.name
        assert image.std() > 10, f"{photo.name} looks blank"


def test_provenance_table_and_hashes():
    rows = provenance_table()
    assert [r["name"] for r in rows] == [p.name for p in list_photos()]
    for row in rows:
        assert set(row) == {"name", "package", "version", "relative_path", "size", "sha256", "licence", "split"}
        assert row["licence"]
        size, sha256 = photos_module.EXPECTED_FILES[row["name"]]
        assert row["size"] == f"{size[0]}x{size[1]}"
        if row["version"] == photos_module.VERIFIED_PACKAGE_VERSIONS[row["package"]]:
            assert row["sha256"] == sha256, row["name"]
    markdown = provenance_markdown()
    assert markdown.count("\n") == len(rows) + 2 and "kodak03_hats" in markdown


def test_missing_file_error_names_photo_path_and_fix():
    ghost = Photo("ghost", "scikit-image", "skimage/data/does_not_exist.png", "n/a", "train")
    with pytest.raises(FileNotFoundError) as info:
        ghost.load()
    message = str(info.value)
    assert "ghost" in message and "skimage/data/does_not_exist.png" in message
    assert "pip install scikit-image==0.26.0" in message


def test_missing_package_error_names_photo_and_fix(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(photos_module.metadata, "distribution", not_installed)
    photo = get_photo("kodak03_hats")
    with pytest.raises(FileNotFoundError) as info:
        _ = photo.path
    message = str(info.value)
    assert "kodak03_hats" in message and "ResultsCalibra/ref_dir/I03.bmp" in message
    assert "pip install pyiqa==0.1.16" in message


# --------------------------------------------------------------------------- degradations


def test_realesrgan_same_seed_is_bit_identical_and_seeds_differ(hr_crop):
    first = degrade_realesrgan(hr_crop, np.random.default_rng(123))
    again = degrade_realesrgan(hr_crop, np.random.default_rng(123))
    other = degrade_realesrgan(hr_crop, np.random.default_rng(124))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("shape", [(128, 128), (64, 96), (32, 48)])
def test_realesrgan_sizes_and_range(shape):
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    for seed in range(12):  # many seeds -> every resize/noise/order branch gets hit
        lr = degrade_realesrgan(hr, np.random.default_rng(seed))
        assert lr.shape == (shape[0] // 4, shape[1] // 4, 3)
        assert lr.dtype == np.float32
        assert 0.0 <= lr.min() and lr.max() <= 1.0
        assert np.array_equal(np.round(lr * 255) / 255, lr)  # quantised to 8-bit levels


def test_float_input_matches_uint8_input(hr_crop):
    from_uint8 = degrade_realesrgan(hr_crop, np.random.default_rng(5))
    from_float = degrade_realesrgan(hr_crop.astype(np.float32) / 255.0, np.random.default_rng(5))
    assert np.array_equal(from_uint8, from_float)


def test_scale_divisibility_and_bad_inputs_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="divisible by scale=4"):
        degrade_realesrgan(np.zeros((130, 128, 3), np.uint8), rng)
    with pytest.raises(ValueError, match="divisible by scale=4"):
        degrade_bicubic(np.zeros((128, 126, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade_realesrgan(np.full((64, 64, 3), 200.0, np.float32), rng)
    with pytest.raises(ValueError, match="H x W x 3"):
        degrade_bicubic(np.zeros((64, 64), np.uint8))


def test_trace_records_both_stages(hr_crop):
    trace: list[str] = []
    degrade_realesrgan(hr_crop, np.random.default_rng(1), trace=trace)
    prefixes = [line.split(":")[0] for line in trace]
    for step in ("blur1", "resize1", "noise1", "jpeg1", "blur2", "resize2", "noise2", "jpeg2", "final"):
        assert step in prefixes, trace


def test_gray_noise_branch_is_identical_across_channels():
    flat = np.full((48, 48, 3), 0.5, np.float32)
    for gaussian_prob in (1.0, 0.0):  # Gaussian, then Poisson
        gray, text = deg.add_random_noise(
            flat, np.random.default_rng(0), gaussian_prob, (20, 20.001), (2.0, 2.001), gray_prob=1.0
        )
        assert "gray=True" in text
        noise = gray - flat
        assert np.abs(noise).max() > 0
        assert np.array_equal(noise[..., 0], noise[..., 1]) and np.array_equal(noise[..., 1], noise[..., 2])
        colour, text = deg.add_random_noise(
            flat, np.random.default_rng(0), gaussian_prob, (20, 20.001), (2.0, 2.001), gray_prob=0.0
        )
        assert "gray=False" in text
        assert not np.array_equal(colour[..., 0], colour[..., 1])


def test_gray_noise_forced_through_config(hr_crop):
    cfg = DegradationConfig(gray_noise_prob=1.0, gray_noise_prob2=1.0)
    trace: list[str] = []
    degrade_realesrgan(hr_crop, np.random.default_rng(2), cfg, trace=trace)
    noise_lines = [line for line in trace if line.startswith("noise")]
    assert len(noise_lines) == 2 and all("gray=True" in line for line in noise_lines)


def test_sinc_branches_forced_through_config(hr_crop):
    cfg = DegradationConfig(sinc_prob=1.0, sinc_prob2=1.0, second_blur_prob=1.0, final_sinc_prob=1.0)
    trace: list[str] = []
    with_sinc = degrade_realesrgan(hr_crop, np.random.default_rng(3), cfg, trace=trace)
    assert sum("sinc" in line for line in trace) == 3, trace
    kernel, _ = deg.sample_blur_kernel(np.random.default_rng(0), cfg, stage=1)
    assert kernel.min() < 0 and np.isclose(kernel.sum(), 1.0)  # sinc ringing lobes
    no_final = dataclasses.replace(cfg, final_sinc_prob=0.0)
    without = degrade_realesrgan(hr_crop, np.random.default_rng(3), no_final)
    assert not np.array_equal(with_sinc, without)


def test_blur_kernels_are_normalised_and_symmetric():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(200):
        kernel, text = deg.sample_blur_kernel(rng, DegradationConfig(), stage=2)
        kinds.add(text.split()[0])
        assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] in range(7, 22, 2)
        assert np.isclose(kernel.sum(), 1.0)
        assert np.allclose(kernel, kernel[::-1, ::-1])  # point symmetric: correlation == convolution
    assert kinds == set(deg.KERNEL_TYPES) | {"sinc"}


def test_config_validation():
    with pytest.raises(ValueError, match="kernel_probs"):
        DegradationConfig(kernel_probs=(0.5, 0.5))
    with pytest.raises(ValueError, match="resize_probs"):
        DegradationConfig(resize_probs=(0.5, 0.6, 0.1))
    with pytest.raises(ValueError, match="sinc_prob"):
        DegradationConfig(sinc_prob=1.5)


def test_bicubic_matches_pil(hr_crop):
    lr = degrade_bicubic(hr_crop)
    reference = (
        np.asarray(
            Image.fromarray(hr_crop).resize((hr_crop.shape[1] // 4, hr_crop.shape[0] // 4), Image.Resampling.BICUBIC)
        ).astype(np.float32)
        / 255.0
    )
    assert lr.dtype == np.float32 and lr.shape == (32, 32, 3)
    assert np.array_equal(lr, reference)
    assert np.array_equal(degrade_bicubic(hr_crop.astype(np.float32) / 255.0), reference)


# ---------------------------------------------------------------------------------- pairs


def test_dataset_items_are_deterministic_across_instances():
    train = list_photos("train")[:3]
    a = SRPairDataset(train, hr_size=64, degradation="realesrgan", seed=7, length=6)
    b = SRPairDataset(train, hr_size=64, degradation="realesrgan", seed=7, length=6)
    c = SRPairDataset(train, hr_size=64, degradation="realesrgan", seed=8, length=6)
    for index in (5, 0, 3):  # order of access must not matter
        item_a, item_b = a[index], b[index]
        assert item_a["name"] == item_b["name"]
        assert torch.equal(item_a["lr"], item_b["lr"]) and torch.equal(item_a["hr"], item_b["hr"])
    assert not torch.equal(a[0]["hr"], c[0]["hr"])
    item = a[1]
    assert item["lr"].shape == (3, 16, 16) and item["hr"].shape == (3, 64, 64)
    assert item["lr"].dtype == torch.float32 and item["hr"].dtype == torch.float32
    assert 0 <= item["lr"].min() and item["hr"].max() <= 1
    with pytest.raises(IndexError):
        a[6]


def test_bicubic_dataset_lr_is_bicubic_of_hr():
    dataset = SRPairDataset(list_photos("val")[:2], hr_size=64, degradation="bicubic", seed=0, length=2)
    item = dataset[0]
    hr = (item["hr"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(item["lr"].permute(1, 2, 0).numpy(), degrade_bicubic(hr))


def test_dataset_rejects_bad_arguments():
    val = list_photos("val")
    with pytest.raises(ValueError, match="multiple of scale"):
        SRPairDataset(val[:1], hr_size=66)
    with pytest.raises(ValueError, match="degradation"):
        SRPairDataset(val[:1], degradation="gaussian")
    with pytest.raises(ValueError, match="chelsea"):
        SRPairDataset([get_photo("chelsea")], hr_size=320)


def test_fixed_validation_pairs_are_deterministic_and_64_aligned():
    first = fixed_validation_pairs("realesrgan", seed=0, hr_size=128)
    again = fixed_validation_pairs("realesrgan", seed=0, hr_size=128)
    assert [name for name, _, _ in first] == EXPECTED_VAL
    for (name, lr, hr), (_, lr2, hr2) in zip(first, again):
        assert hr.shape == (3, 128, 128) and lr.shape == (3, 32, 32), name
        assert torch.equal(lr, lr2) and torch.equal(hr, hr2)
    full = fixed_validation_pairs("bicubic", hr_size=None)
    for name, lr, hr in full:
        assert hr.shape[1] % 64 == 0 and hr.shape[2] % 64 == 0, name
        assert lr.shape[1:] == (hr.shape[1] // 4, hr.shape[2] // 4)
    assert {n: tuple(h.shape) for n, _, h in full}["kodak03_hats"] == (3, 384, 512)
    with pytest.raises(ValueError, match="multiple of 64"):
        fixed_validation_pairs("bicubic", hr_size=100)
