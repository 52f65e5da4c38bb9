"""Tests for compress.imaging: every input flavour we promise to read, round-trips, and errors."""

from __future__ import annotations

import stat

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from compress import imaging
from compress.imaging import (
    ImageInputError,
    LoadedImage,
    iter_image_paths,
    load_image,
    save_image,
    upscale_alpha,
)

RNG = np.random.default_rng(1234)


def _u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def _u16(*shape: int) -> np.ndarray:
    return RNG.integers(0, 65536, size=shape, dtype=np.uint16)


def _chw(arr: np.ndarray, max_value: float) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.astype(np.float32) / max_value).permute(2, 0, 1)


def _check_common(img: LoadedImage, h: int, w: int) -> None:
    assert isinstance(img, LoadedImage)
    assert img.rgb.shape == (3, h, w)
    assert img.rgb.dtype == torch.float32
    assert float(img.rgb.min()) >= 0.0 and float(img.rgb.max()) <= 1.0
    if img.alpha is not None:
        assert img.alpha.shape == (1, h, w)
        assert float(img.alpha.min()) >= 0.0 and float(img.alpha.max()) <= 1.0


# ------------------------------------------------------------------------------------------
# Loading every supported flavour
# ------------------------------------------------------------------------------------------


def test_png_16bit_gray(tmp_path):
    g = _u16(21, 30)
    p = tmp_path / "g16.png"
    cv2.imwrite(str(p), g)
    img = load_image(p)
    _check_common(img, 21, 30)
    assert (img.mode, img.bit_depth, img.alpha) == ("gray", 16, None)
    expected = _chw(g, 65535.0)
    for c in range(3):
        torch.testing.assert_close(img.rgb[c : c + 1], expected, rtol=0, atol=1e-7)
    assert img.source == p


def test_png_16bit_rgb_and_rgba_via_cv2(tmp_path):
    rgb = _u16(17, 23, 3)
    p = tmp_path / "rgb16.png"
    cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    img = load_image(p)
    _check_common(img, 17, 23)
    assert (img.mode, img.bit_depth, img.alpha) == ("rgb", 16, None)
    torch.testing.assert_close(img.rgb, _chw(rgb, 65535.0), rtol=0, atol=1e-7)

    rgba = _u16(17, 23, 4)
    p = tmp_path / "rgba16.png"
    cv2.imwrite(str(p), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    img = load_image(p)
    assert (img.mode, img.bit_depth) == ("rgb", 16)
    torch.testing.assert_close(img.rgb, _chw(rgba[..., :3], 65535.0), rtol=0, atol=1e-7)
    torch.testing.assert_close(
        img.alpha, _chw(rgba[..., 3], 65535.0), rtol=0, atol=1e-7
    )


def test_tiff_16bit_rgb_via_cv2(tmp_path):
    rgb = _u16(12, 19, 3)
    p = tmp_path / "rgb16.tif"
    cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    img = load_image(p)
    assert (img.mode, img.bit_depth) == ("rgb", 16)
    torch.testing.assert_close(img.rgb, _chw(rgb, 65535.0), rtol=0, atol=1e-7)


def test_png_8bit_rgba(tmp_path):
    rgba = _u8(37, 53, 4)
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    img = load_image(p)
    _check_common(img, 37, 53)
    assert (img.mode, img.bit_depth) == ("rgb", 8)
    torch.testing.assert_close(img.rgb, _chw(rgba[..., :3], 255.0), rtol=0, atol=1e-7)
    torch.testing.assert_close(img.alpha, _chw(rgba[..., 3], 255.0), rtol=0, atol=1e-7)


def test_palette_with_and_without_transparency(tmp_path):
    base = Image.fromarray(_u8(16, 20, 3), "RGB").quantize(colors=16)
    idx = np.asarray(base)
    transparent_index = int(idx[0, 0])
    p = tmp_path / "pal_t.png"
    base.save(p, transparency=transparent_index)
    img = load_image(p)
    _check_common(img, 16, 20)
    assert img.mode == "rgb" and img.alpha is not None
    assert float(img.alpha[0, 0, 0]) == 0.0
    assert torch.all(img.alpha[0][torch.from_numpy(idx != transparent_index)] == 1.0)

    p2 = tmp_path / "pal.png"
    base.save(p2)
    img2 = load_image(p2)
    assert img2.alpha is None and img2.mode == "rgb"
    torch.testing.assert_close(img2.rgb, _chw(np.asarray(base.convert("RGB")), 255.0))


def test_la_l_and_1bit(tmp_path):
    la = _u8(11, 13, 2)
    p = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(p)
    img = load_image(p)
    _check_common(img, 11, 13)
    assert (img.mode, img.bit_depth) == ("gray", 8)
    assert torch.equal(img.rgb[0], img.rgb[1]) and torch.equal(img.rgb[1], img.rgb[2])
    torch.testing.assert_close(img.rgb[:1], _chw(la[..., 0], 255.0), rtol=0, atol=1e-7)
    torch.testing.assert_close(img.alpha, _chw(la[..., 1], 255.0), rtol=0, atol=1e-7)

    p = tmp_path / "l.png"
    Image.fromarray(la[..., 0], "L").save(p, transparency=int(la[0, 0, 0]))
    img = load_image(p)
    assert (
        img.mode == "gray"
        and img.alpha is not None
        and float(img.alpha[0, 0, 0]) == 0.0
    )

    bits = _u8(9, 10) > 127
    p = tmp_path / "one.png"
    Image.fromarray(bits).convert("1").save(p)
    img = load_image(p)
    assert (img.mode, img.bit_depth) == ("gray", 8)
    assert torch.equal(img.rgb[0], torch.from_numpy(bits.astype(np.float32)))


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.fromarray(_u8(24, 32, 3), "RGB").convert("CMYK")
    p = tmp_path / "cmyk.jpg"
    cmyk.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    img = load_image(p)
    _check_common(img, 24, 32)
    assert (img.mode, img.bit_depth, img.alpha) == ("rgb", 8, None)


def test_exif_rotated_jpeg_swaps_sides(tmp_path):
    arr = _u8(20, 40, 3)
    im = Image.fromarray(arr, "RGB")
    exif = im.getexif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    img = load_image(p)
    _check_common(img, 40, 20)  # width and height swapped
    expected = np.asarray(ImageOps.exif_transpose(Image.open(p)))
    torch.testing.assert_close(img.rgb, _chw(expected, 255.0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_of_cv2_decoded_arrays_matches_pil(tmp_path, orientation):
    arr = _u8(5, 7, 3)
    im = Image.fromarray(arr, "RGB")
    exif = im.getexif()
    exif[0x0112] = orientation
    p = tmp_path / "o.png"
    im.save(p, exif=exif.tobytes())
    with Image.open(p) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored))
    assert np.array_equal(imaging._orient_array(arr, orientation), expected)


@pytest.mark.parametrize("ext", ["bmp", "webp", "tif", "jpeg"])
def test_other_formats_odd_size(tmp_path, ext):
    arr = _u8(37, 53, 3)
    p = tmp_path / f"odd.{ext.upper()}"
    kwargs = {"lossless": True} if ext == "webp" else {}
    Image.fromarray(arr, "RGB").save(p, **kwargs)
    img = load_image(p)
    _check_common(img, 37, 53)
    assert (img.mode, img.bit_depth) == ("rgb", 8)
    if ext != "jpeg":
        torch.testing.assert_close(img.rgb, _chw(arr, 255.0), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------


def _max_lsb(a: torch.Tensor, b: torch.Tensor, bits: int) -> float:
    return float((a - b).abs().max()) * (2**bits - 1)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("mode", ["rgb", "gray"])
@pytest.mark.parametrize("with_alpha", [False, True])
@pytest.mark.parametrize("ext", ["png", "tif"])
def test_save_round_trip(tmp_path, bits, mode, with_alpha, ext):
    h, w = 19, 27
    generator = torch.Generator().manual_seed(0)  # the same pixels whatever ran before
    rgb = torch.rand(3, h, w, generator=generator)
    if mode == "gray":
        rgb = rgb[:1].expand(3, -1, -1).contiguous()
    alpha = torch.rand(1, h, w, generator=generator) if with_alpha else None
    p = tmp_path / f"out.{ext}"
    assert save_image(p, rgb, alpha, mode=mode, bit_depth=bits) == p
    img = load_image(p)
    assert img.bit_depth == bits
    # 16-bit grey+alpha TIFF is stored as RGBA (OpenCV cannot write two channels).
    expected_mode = (
        "rgb"
        if (ext == "tif" and bits == 16 and mode == "gray" and with_alpha)
        else mode
    )
    assert img.mode == expected_mode
    # exact after quantisation: half an LSB, plus float32 rounding of the grey image's luma (0.299 + 0.587 +
    # 0.114 is not exactly 1 in float32: measured 0.0039 LSB at 16 bits, seen once as 0.5039)
    assert _max_lsb(img.rgb, rgb, bits) <= 0.5 + 2e-7 * (2**bits - 1)
    if with_alpha:
        assert img.alpha is not None and _max_lsb(img.alpha, alpha, bits) <= 0.5 + 1e-3
    else:
        assert img.alpha is None
    # saving what was loaded reproduces the file's pixels exactly
    p2 = tmp_path / f"again.{ext}"
    save_image(p2, img.rgb, img.alpha, mode=img.mode, bit_depth=img.bit_depth)
    again = load_image(p2)
    assert torch.equal(again.rgb, img.rgb)
    if with_alpha:
        assert torch.equal(again.alpha, img.alpha)


def test_save_gray_uses_bt601_luma(tmp_path):
    rgb = torch.rand(3, 8, 9)
    p = tmp_path / "luma.png"
    save_image(p, rgb, mode="gray")
    with Image.open(p) as im:
        assert im.mode == "L"
        stored = np.asarray(im).astype(np.float32)
    luma = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) * 255
    assert np.abs(stored - luma.numpy()).max() <= 0.5 + 1e-3


def test_save_16bit_png_is_really_16bit(tmp_path):
    rgb = torch.rand(3, 10, 11)
    p = tmp_path / "deep.png"
    save_image(p, rgb, bit_depth=16)
    arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    assert arr.dtype == np.uint16 and arr.shape == (10, 11, 3)
    assert (
        np.abs(
            arr[..., ::-1].astype(np.float64) / 65535 - rgb.permute(1, 2, 0).numpy()
        ).max()
        < 1e-5
    )


def test_save_jpeg_drops_alpha_and_webp_keeps_it(tmp_path):
    rgb = torch.full((3, 16, 16), 0.5)
    alpha = torch.rand(1, 16, 16)
    pj = tmp_path / "o.jpg"
    save_image(
        pj, rgb, alpha, bit_depth=16
    )  # JPEG is 8-bit only: written at 8 bits, no alpha
    img = load_image(pj)
    assert img.alpha is None and img.bit_depth == 8
    assert _max_lsb(img.rgb, rgb, 8) <= 2
    pw = tmp_path / "o.webp"
    save_image(pw, rgb, alpha)
    img = load_image(pw)
    assert img.alpha is not None and img.bit_depth == 8


def test_save_accepts_batch_of_one_and_clamps(tmp_path):
    rgb = torch.rand(1, 3, 9, 9) * 2 - 0.5
    p = tmp_path / "b.png"
    save_image(p, rgb)
    img = load_image(p)
    torch.testing.assert_close(
        img.rgb, rgb[0].clamp(0, 1), rtol=0, atol=0.5 / 255 + 1e-6
    )


def test_save_is_atomic_and_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "x.png"
    rgb = torch.rand(3, 8, 8)
    save_image(out, rgb)  # missing parent folders are created
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode & stat.S_IRGRP or imaging._umask() & 0o040  # not left at mkstemp's 0600
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(imaging.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_image(out, torch.rand(3, 8, 8))
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]
    assert out.read_bytes() == before  # the old file is untouched

    monkeypatch.undo()
    monkeypatch.setattr(imaging.os, "fsync", boom)
    with pytest.raises(OSError):
        save_image(tmp_path / "sub" / "y.png", rgb)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]


def test_save_rejects_bad_arguments(tmp_path):
    rgb = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match=r"\.gif"):
        save_image(tmp_path / "x.gif", rgb)
    with pytest.raises(ValueError, match="alpha"):
        save_image(tmp_path / "x.png", rgb, alpha=torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="3xHxW"):
        save_image(tmp_path / "x.png", torch.rand(8, 8))
    assert list(tmp_path.iterdir()) == []


def test_upscale_alpha():
    a = torch.zeros(1, 8, 10)
    a[:, 3:5, 4:6] = 1.0
    up = upscale_alpha(a, 4)
    assert up.shape == (1, 32, 40)
    assert float(up.min()) >= 0.0 and float(up.max()) <= 1.0
    assert float(up[0, 15, 19]) > 0.9 and float(up[0, 0, 0]) == 0.0
    assert upscale_alpha(a.unsqueeze(0), 2).shape == (1, 1, 16, 20)
    assert upscale_alpha(a, 4, size=(33, 41)).shape == (1, 33, 41)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def _expect_error(path, match, **kwargs):
    with pytest.raises(ImageInputError) as info:
        load_image(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg
    assert match.lower() in msg.lower(), msg
    assert isinstance(info.value, ValueError)
    return msg


def test_missing_file_and_folder(tmp_path):
    _expect_error(tmp_path / "nope.png", "not found")
    _expect_error(tmp_path, "folder")


def test_corrupt_and_text_files(tmp_path):
    p = tmp_path / "noise.png"
    p.write_bytes(bytes(RNG.integers(0, 256, 500, dtype=np.uint8)))
    _expect_error(p, "not a readable image")
    t = tmp_path / "notes.png"
    t.write_text("this is not an image\n")
    _expect_error(t, "not a readable image")
    e = tmp_path / "empty.jpg"
    e.write_bytes(b"")
    _expect_error(e, "not a readable image")


def test_truncated_png_and_jpeg(tmp_path):
    src = tmp_path / "full.png"
    Image.fromarray(_u8(64, 64, 3), "RGB").save(src)
    data = src.read_bytes()
    p = tmp_path / "trunc.png"
    p.write_bytes(data[: len(data) // 2])
    _expect_error(p, "truncated")

    src16 = tmp_path / "full16.png"
    cv2.imwrite(str(src16), _u16(64, 64, 3))
    data = src16.read_bytes()
    p16 = tmp_path / "trunc16.png"
    p16.write_bytes(data[: len(data) // 2])
    _expect_error(p16, "truncated")

    srcj = tmp_path / "full.jpg"
    Image.fromarray(_u8(64, 64, 3), "RGB").save(srcj, quality=90)
    data = srcj.read_bytes()
    pj = tmp_path / "trunc.jpg"
    pj.write_bytes(data[: len(data) // 2])
    _expect_error(pj, "truncated")


def test_png_with_bad_crc(tmp_path):
    src = tmp_path / "ok.png"
    Image.fromarray(_u8(32, 32, 3), "RGB").save(src)
    data = bytearray(src.read_bytes())
    idat = data.find(b"IDAT")
    data[idat + 10] ^= 0xFF
    p = tmp_path / "crc.png"
    p.write_bytes(bytes(data))
    _expect_error(p, "damaged")


def test_too_small(tmp_path):
    p = tmp_path / "tiny.png"
    Image.fromarray(_u8(5, 40, 3), "RGB").save(p)
    msg = _expect_error(p, "at least 8")
    assert "40x5" in msg
    assert load_image(p, min_side=4).rgb.shape == (3, 5, 40)


def test_too_large(tmp_path):
    p = tmp_path / "big.png"
    Image.fromarray(_u8(40, 50, 3), "RGB").save(p)
    msg = _expect_error(p, "--max-megapixels", max_output_pixels=10_000)
    assert "50x40" in msg and "200x160" in msg and "split" in msg.lower()
    assert load_image(p, max_output_pixels=32_000).rgb.shape == (3, 40, 50)
    assert load_image(p, scale=2, max_output_pixels=10_000).rgb.shape == (3, 40, 50)
    assert load_image(p, max_output_pixels=None).rgb.shape == (3, 40, 50)


def test_decompression_bomb_becomes_input_error(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    Image.fromarray(_u8(40, 50, 3), "RGB").save(p)
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 100
    )  # 2000 px > 2 * 100 -> DecompressionBombError
    _expect_error(p, "too large", max_output_pixels=None)


def test_unsupported_mode(tmp_path):
    p = tmp_path / "float.tif"
    Image.fromarray(RNG.random((10, 10)).astype(np.float32), "F").save(p)
    _expect_error(p, "unsupported pixel format")


# ------------------------------------------------------------------------------------------
# Path expansion
# ------------------------------------------------------------------------------------------


def test_iter_image_paths(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in [
        "b.png",
        "a.JPG",
        "c.webp",
        "d.TIFF",
        "e.bmp",
        "f.jpeg",
        "g.tif",
        ".hidden.png",
        "notes.txt",
    ]:
        (d / name).write_bytes(b"x")
    (d / "sub" / "z.png").write_bytes(b"x")
    (d / "folder.png").mkdir()  # a folder named like an image is not a file
    loose = tmp_path / "no_extension"
    loose.write_bytes(b"x")

    got = iter_image_paths([loose, d])
    assert got == [loose] + [
        d / n
        for n in ["a.JPG", "b.png", "c.webp", "d.TIFF", "e.bmp", "f.jpeg", "g.tif"]
    ]

    rec = iter_image_paths([str(d)], recursive=True)
    assert rec[-1] == d / "sub" / "z.png" and len(rec) == 8

    # explicit file plus its folder: listed once, at its first position
    assert iter_image_paths([d / "c.webp", d])[:2] == [d / "c.webp", d / "a.JPG"]

    with pytest.raises(ImageInputError, match="missing"):
        iter_image_paths([d, tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageInputError, match="no image files"):
        iter_image_paths([empty])
