"""Image input/output for super-resolution.

Why this module exists: an upscaler is fed whatever users have on disk (phone JPEGs with EXIF
rotation, palette PNGs with transparency, 16-bit scans, CMYK prints, broken downloads). Every
such file is turned here into one predictable form -- an RGB float tensor in [0, 1] plus an
optional alpha plane -- and every failure becomes a single exception type,
:class:`ImageInputError`, whose message names the file and says what to do about it.

Saving mirrors loading: grey inputs give grey outputs, alpha is reattached, 16-bit inputs keep
16 bits, and files are written atomically so an interrupted run never leaves a half-written
image under the final name.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_OUTPUT_PIXELS",
    "DEFAULT_MIN_SIDE",
    "DEFAULT_SCALE",
    "IMAGE_EXTENSIONS",
    "ImageInputError",
    "LoadedImage",
    "iter_image_paths",
    "load_image",
    "save_image",
    "to_luma",
    "upscale_alpha",
]

#: Extensions picked up when a folder is expanded (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)
DEFAULT_MIN_SIDE = 8
DEFAULT_MAX_OUTPUT_PIXELS = 100_000_000
DEFAULT_SCALE = 4

_SUPPORTED_HINT = "PNG, JPEG, BMP, TIFF or WebP"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# BT.601 luma weights (what PIL's convert("L") uses as well).
_LUMA_601 = (0.299, 0.587, 0.114)
# PIL modes that hold a single 16-bit (or wider integer) grey channel.
_GRAY16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# What PIL's EXIF parser raises on malformed metadata.
_EXIF_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    SyntaxError,
    struct.error,
)


class ImageInputError(ValueError):
    """An input image cannot be used; the message names the file and the fix."""


@dataclass
class LoadedImage:
    """A decoded image ready for the model.

    ``rgb`` is always 3xHxW float32 in [0, 1] (grey images are replicated to three channels so the
    model sees one layout); ``mode`` and ``bit_depth`` record what the file held so the output can
    be saved the same way.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    mode: str
    bit_depth: int
    source: Path

    @property
    def height(self) -> int:
        return int(self.rgb.shape[-2])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[-1])

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _png_ihdr(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG header, or None if the file is not a PNG.

    Needed because PIL silently reduces 16-bit colour PNGs to 8 bits, so we must know the real
    depth before choosing a decoder.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(33)
    except OSError:
        return None
    if len(head) < 33 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _check_size(
    path: Path,
    width: int,
    height: int,
    *,
    scale: float,
    min_side: int,
    max_output_pixels: int | None,
) -> None:
    """Reject images too small to process or whose output would not fit the pixel budget."""
    if min(width, height) < min_side:
        raise ImageInputError(
            f"{path}: image is {width}x{height} pixels; both sides must be at least {min_side} "
            f"pixels. Use a larger image."
        )
    if max_output_pixels is not None:
        out_w, out_h = round(width * scale), round(height * scale)
        if out_w * out_h > max_output_pixels:
            raise ImageInputError(
                f"{path}: a {width}x{height} input gives a {out_w}x{out_h} output "
                f"({out_w * out_h / 1e6:.1f} MP) at {scale:g}x, above the limit of "
                f"{max_output_pixels / 1e6:.1f} MP. Split the image into smaller parts, or raise "
                f"the limit with --max-megapixels."
            )


def _orient_array(arr: np.ndarray, orientation: int | None) -> np.ndarray:
    """Apply an EXIF orientation to an HxW[xC] array exactly as ImageOps.exif_transpose does.

    Used for files decoded with OpenCV, which ignores EXIF under IMREAD_UNCHANGED.
    """
    if orientation == 2:
        arr = arr[:, ::-1]
    elif orientation == 3:
        arr = arr[::-1, ::-1]
    elif orientation == 4:
        arr = arr[::-1]
    elif orientation == 5:
        arr = arr.swapaxes(0, 1)
    elif orientation == 6:
        arr = np.rot90(arr, k=-1)
    elif orientation == 7:
        arr = arr[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        arr = np.rot90(arr, k=1)
    return np.ascontiguousarray(arr)


def _exif_orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(0x0112)
    except _EXIF_ERRORS:  # malformed EXIF must not make the image unreadable
        return None
    return int(value) if isinstance(value, int) else None


def _decode_with_cv2(path: Path) -> np.ndarray:
    """Decode a 16-bit colour file at full depth (PIL cannot). Returns RGB(A) uint16 HxWxC."""
    # np.fromfile + imdecode (rather than imread) also copes with non-ASCII paths on Windows.
    data = np.fromfile(str(path), dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageInputError(
            f"{path}: the 16-bit image data could not be decoded (damaged or truncated file). "
            f"Re-export or re-download it."
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    elif arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    return arr


def _to_tensor(arr: np.ndarray, max_value: float) -> torch.Tensor:
    """HxW or HxWxC integer array -> CxHxW float32 in [0, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32, copy=False))
    t = t.permute(2, 0, 1).contiguous()
    t.mul_(1.0 / max_value).clamp_(0.0, 1.0)
    return t


def _split(
    planes: torch.Tensor, gray: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Separate colour and alpha planes; grey colour is replicated to 3 channels."""
    n_color = 1 if gray else 3
    color, alpha = planes[:n_color], planes[n_color:]
    if gray:
        color = color.expand(3, -1, -1).contiguous()
    return color.contiguous(), (alpha[:1].contiguous() if alpha.shape[0] else None)


def _pil_to_planes(
    im: Image.Image, path: Path
) -> tuple[torch.Tensor, torch.Tensor | None, str, int]:
    """Normalise any PIL mode to (rgb, alpha, mode, bit_depth)."""
    mode = im.mode
    has_trns = im.info.get("transparency") is not None
    if mode in _GRAY16_MODES:
        arr = np.asarray(im)
        if arr.dtype != np.uint16:
            # Mode "I" is int32; a 16-bit source fits in 0..65535.
            arr = np.clip(arr, 0, 65535)
        rgb, _ = _split(_to_tensor(arr, 65535.0), gray=True)
        return rgb, None, "gray", 16
    if mode == "1":
        im, gray = im.convert("L"), True
    elif mode in ("L", "LA", "La"):
        gray = True
        if mode == "La" or mode == "L" and has_trns:
            im = im.convert("LA")
    elif mode in ("P", "PA"):
        im, gray = im.convert("RGBA" if (mode == "PA" or has_trns) else "RGB"), False
    elif mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        gray = False
        if mode == "RGBa" or (mode == "RGB" and has_trns):
            im = im.convert("RGBA")
        elif mode == "RGBX":
            im = im.convert("RGB")
    elif mode in ("CMYK", "YCbCr"):
        im, gray = im.convert("RGB"), False
    else:
        raise ImageInputError(
            f"{path}: unsupported pixel format {mode!r}. Convert the image to 8- or 16-bit RGB or "
            f"greyscale PNG first."
        )
    rgb, alpha = _split(_to_tensor(np.asarray(im), 255.0), gray=gray)
    return rgb, alpha, ("gray" if gray else "rgb"), 8


def load_image(
    path: str | os.PathLike,
    *,
    scale: float = DEFAULT_SCALE,
    min_side: int = DEFAULT_MIN_SIDE,
    max_output_pixels: int | None = DEFAULT_MAX_OUTPUT_PIXELS,
) -> LoadedImage:
    """Decode ``path`` into a :class:`LoadedImage`, or raise :class:`ImageInputError`.

    The size limits are checked from the header, before the pixels are decoded, so an oversized
    file is rejected cheaply. The pixel data is then fully decoded (not lazily), so damaged or
    truncated files fail here rather than halfway through a batch. EXIF orientation is applied.
    ``max_output_pixels=None`` disables the output-size check.
    """
    path = Path(path)
    if not path.exists():
        raise ImageInputError(
            f"{path}: file not found. Check the path and its spelling."
        )
    if path.is_dir():
        raise ImageInputError(
            f"{path}: is a folder, not an image file. Pass the image files inside it."
        )

    damaged = f"{path}: image data is damaged or truncated. Re-export or re-download the file."
    ihdr = _png_ihdr(path)
    try:
        with warnings.catch_warnings():
            # We enforce our own size limit; PIL's bomb *warning* would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if ihdr is not None:
                # PNG: verify() walks every chunk and checks its CRC, catching truncation and
                # corruption even for the files we later decode with OpenCV.
                with Image.open(path) as probe:
                    probe.verify()
            with Image.open(path) as im:
                width, height = im.size
                _check_size(
                    path,
                    width,
                    height,
                    scale=scale,
                    min_side=min_side,
                    max_output_pixels=max_output_pixels,
                )
                bits = None
                if im.format == "TIFF":
                    bits = getattr(im, "tag_v2", {}).get(258)
                    bits = max(bits) if isinstance(bits, tuple) and bits else bits
                use_cv2 = (
                    ihdr is not None and ihdr[0] == 16 and ihdr[1] in (2, 4, 6)
                ) or (
                    im.format == "TIFF" and bits == 16 and im.mode not in _GRAY16_MODES
                )
                if use_cv2:
                    orientation = _exif_orientation(im)
                    png_gray = ihdr is not None and ihdr[1] == 4
                else:
                    im.load()  # full decode: truncation/corruption surfaces now
                    try:
                        oriented = ImageOps.exif_transpose(im)
                    except _EXIF_ERRORS:  # broken EXIF: keep the pixels as stored
                        oriented = im
                    rgb, alpha, mode, depth = _pil_to_planes(oriented, path)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError(
            f"{path}: image is too large to open safely: it exceeds Pillow's "
            f"decompression-bomb limit ({exc}). Split it into smaller parts."
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageInputError(
            f"{path}: not a readable image (unknown or damaged format). Use a {_SUPPORTED_HINT} "
            f"file, re-exporting it if it is damaged."
        ) from exc
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
        zlib.error,
    ) as exc:
        raise ImageInputError(f"{damaged} ({type(exc).__name__}: {exc})") from exc

    if use_cv2:
        arr = _orient_array(_decode_with_cv2(path), orientation)
        planes = _to_tensor(arr, 65535.0 if arr.dtype == np.uint16 else 255.0)
        depth = 16 if arr.dtype == np.uint16 else 8
        if png_gray and planes.shape[0] == 4:
            # 16-bit grey+alpha PNG comes back from OpenCV as RGBA with equal colour planes.
            planes = torch.cat([planes[:1], planes[3:]], dim=0)
        gray = planes.shape[0] in (1, 2)
        rgb, alpha = _split(planes, gray=gray)
        mode = "gray" if gray else "rgb"

    return LoadedImage(rgb=rgb, alpha=alpha, mode=mode, bit_depth=depth, source=path)


def iter_image_paths(
    inputs: Iterable[str | os.PathLike], *, recursive: bool = False
) -> list[Path]:
    """Expand CLI inputs to a list of image files.

    Files are kept as given, whatever their extension (an unreadable one is reported when it is
    loaded). Folders are expanded to their image files by extension, sorted, skipping hidden
    files; ``recursive`` includes subfolders. Duplicates are dropped (first occurrence wins) so a
    file named both directly and through its folder is processed once.
    """
    result: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            result.append(p)

    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            candidates = p.rglob("*") if recursive else p.iterdir()
            found = sorted(
                c
                for c in candidates
                if c.suffix.lower() in IMAGE_EXTENSIONS
                and not c.name.startswith(".")
                and not any(
                    part.startswith(".") for part in c.relative_to(p).parts[:-1]
                )
                and c.is_file()
            )
            if not found:
                extra = (
                    ""
                    if recursive
                    else " (subfolders are not searched; use --recursive)"
                )
                exts = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
                raise ImageInputError(
                    f"{p}: folder contains no image files ({exts}){extra}."
                )
            for c in found:
                add(c)
        elif p.exists():
            add(p)
        else:
            raise ImageInputError(
                f"{p}: no such file or folder. Check the path and its spelling."
            )
    return result


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

_FORMATS = {
    "": "PNG",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read once (mkstemp creates 0600 files; outputs should look normal)."""
    global _UMASK
    if _UMASK is None:
        current = os.umask(0o022)
        os.umask(current)
        _UMASK = current
    return _UMASK


def to_luma(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of a ...x3xHxW tensor, keeping a channel dim of 1."""
    r, g, b = rgb.unbind(dim=-3)
    # Written as g + wr*(r-g) + wb*(b-g) (same value, since the weights sum to 1) so that a grey
    # image (r == g == b) maps to itself exactly and 16-bit grey round-trips bit for bit.
    return (g + _LUMA_601[0] * (r - g) + _LUMA_601[2] * (b - g)).unsqueeze(-3)


def _quantize(t: torch.Tensor, bit_depth: int) -> np.ndarray:
    """CxHxW float in [0,1] -> HxWxC uint8/uint16 with round-to-nearest."""
    max_value = 65535.0 if bit_depth == 16 else 255.0
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    q = t.detach().to("cpu", torch.float32).clamp(0.0, 1.0)  # the one full-size float copy
    q.mul_(max_value).round_()
    return q.permute(1, 2, 0).numpy().astype(dtype)


def _png16_gray_alpha(arr: np.ndarray) -> bytes:
    """Minimal PNG encoder for 16-bit grey+alpha (colour type 4), which neither PIL nor OpenCV
    can write. Rows use the 'Up' filter, which is cheap to compute and compresses well."""
    h, w, _ = arr.shape
    rows = np.ascontiguousarray(arr, dtype=">u2").view(np.uint8).reshape(h, w * 4)
    filtered = np.empty((h, w * 4 + 1), dtype=np.uint8)
    filtered[:, 0] = 2
    filtered[0, 1:] = rows[0]
    filtered[1:, 1:] = (
        rows[1:] - rows[:-1]
    )  # uint8 arithmetic wraps modulo 256, as PNG requires

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def _cv2_encode(arr: np.ndarray, ext: str) -> bytes:
    if arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(ext, arr)
    if not ok:
        raise OSError(
            f"OpenCV could not encode a {arr.shape} {arr.dtype} image as {ext}"
        )
    return buf.tobytes()


def _encode(arr: np.ndarray, fmt: str, bit_depth: int) -> bytes:
    """Encode an HxWxC array (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) in ``fmt``."""
    channels = arr.shape[2]
    if bit_depth == 16:
        if fmt == "PNG":
            if channels == 2:
                return _png16_gray_alpha(arr)
            return _cv2_encode(arr, ".png")
        # TIFF: OpenCV cannot write 2 channels, so 16-bit grey+alpha is stored as RGBA.
        if channels == 2:
            arr = np.concatenate([arr[:, :, :1]] * 3 + [arr[:, :, 1:]], axis=2)
        return _cv2_encode(arr, ".tiff")

    pil_mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    im = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=pil_mode)
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=95, subsampling=0)
    elif fmt == "WEBP":
        im.save(buf, "WEBP", quality=95)
    elif fmt == "TIFF":
        im.save(buf, "TIFF", compression="tiff_deflate")
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the target folder + os.replace, so readers never see a partial
    file and a failure leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_image(
    path: str | os.PathLike,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None = None,
    mode: str = "rgb",
    bit_depth: int = 8,
) -> Path:
    """Save a 3xHxW (or 1x3xHxW) float image in [0, 1] atomically; returns the path.

    The extension picks the format: ``.png`` (also used when there is no extension), ``.jpg`` /
    ``.jpeg``, ``.webp``, ``.tif`` / ``.tiff``. ``mode="gray"`` stores the BT.601 luma as one
    channel. ``alpha`` (1xHxW) is reattached where the format allows it. ``bit_depth=16`` is kept
    for PNG and TIFF; JPEG and WebP are 8-bit formats, so they are written at 8 bits. JPEG has no
    alpha channel: alpha is dropped (not composited). Values outside [0, 1] are clamped. Missing
    parent folders are created. Raises ValueError for bad arguments; filesystem errors propagate
    after the temp file is removed.
    """
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unsupported output extension {path.suffix!r}; use .png, .jpg, .jpeg, .webp, "
            f".tif or .tiff."
        )
    if mode not in ("rgb", "gray"):
        raise ValueError(f"{path}: mode must be 'rgb' or 'gray', got {mode!r}.")
    if bit_depth not in (8, 16):
        raise ValueError(f"{path}: bit_depth must be 8 or 16, got {bit_depth!r}.")
    if rgb.dim() == 4 and rgb.shape[0] == 1:
        rgb = rgb[0]
    if rgb.dim() != 3 or rgb.shape[0] not in (1, 3):
        raise ValueError(
            f"{path}: expected a 3xHxW image tensor, got shape {tuple(rgb.shape)}."
        )
    if fmt in ("JPEG", "WEBP"):
        bit_depth = 8
    if fmt == "JPEG":
        alpha = None

    color = rgb.detach().float()
    if mode == "gray" and color.shape[0] == 3:
        color = to_luma(color)
    elif mode == "rgb" and color.shape[0] == 1:
        color = color.expand(3, -1, -1)
    planes = [color]
    if alpha is not None:
        a = alpha.detach().float()
        while a.dim() > 3 and a.shape[0] == 1:
            a = a[0]
        if a.dim() == 2:
            a = a.unsqueeze(0)
        if a.dim() != 3 or a.shape[0] != 1 or a.shape[-2:] != color.shape[-2:]:
            raise ValueError(
                f"{path}: alpha of shape {tuple(alpha.shape)} does not match the image size "
                f"{tuple(color.shape[-2:])}; upscale it with upscale_alpha() first."
            )
        planes.append(a.to(color.device))
    arr = _quantize(torch.cat(planes, dim=0) if len(planes) > 1 else planes[0], bit_depth)
    _atomic_write(path, _encode(arr, fmt, bit_depth))
    return path


def upscale_alpha(
    alpha: torch.Tensor, scale: float, *, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Bicubic-upsample an alpha plane (1xHxW or Bx1xHxW) and clamp to [0, 1].

    Bicubic keeps soft edges smooth; the clamp removes its overshoot. ``size`` (H, W) overrides
    ``scale`` so the alpha can be made to match the SR output exactly.
    """
    squeeze = alpha.dim() == 3
    a = alpha.unsqueeze(0) if squeeze else alpha
    if a.dim() != 4:
        raise ValueError(
            f"alpha must be 1xHxW or Bx1xHxW, got shape {tuple(alpha.shape)}"
        )
    if size is None:
        size = (round(a.shape[-2] * scale), round(a.shape[-1] * scale))
    out = F.interpolate(
        a.float(), size=size, mode="bicubic", align_corners=False
    ).clamp_(0.0, 1.0)
    return out[0] if squeeze else out


# Truncated files must fail loudly; refuse to run with PIL's global "load truncated" switch on.
if (
    ImageFile.LOAD_TRUNCATED_IMAGES
):  # pragma: no cover - depends on what else was imported
    warnings.warn(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled by another module; truncated JPEGs will "
        "not be detected by compress.imaging.load_image.",
        RuntimeWarning,
        stacklevel=2,
    )
