"""Real-ESRGAN second-order degradation and plain bicubic downsampling, in numpy/scipy/OpenCV.

Why: TSD-SR (and TinySR after it) trains on LR images synthesised from HR photos with the
Real-ESRGAN second-order pipeline (blur -> resize -> noise -> JPEG, twice, then a final
resize + sinc filter in random order with the last JPEG). The reference implementation lives in
``basicsr``, which is unmaintained and fails to import with current torchvision, so this module
re-implements the published procedure (``options/finetune_realesrgan_x4plus.yml`` of
xinntao/Real-ESRGAN and the paper, Wang et al. 2021) on a single image with:

* numpy / scipy (``scipy.special.j1``) for the blur and sinc kernels,
* OpenCV for filtering (``filter2D``, reflect-101 padding like the reference), resizing and
  JPEG encode/decode,
* numpy for Gaussian and Poisson noise.

All randomness comes from the ``numpy.random.Generator`` passed in, so the same seed gives a
bit-identical LR image on the same machine and library versions.

Known, deliberate differences from the GPU reference:

* The reference degrades a USM-sharpened copy of the HR crop; here the plain HR is degraded,
  because the HR target in this toolkit is the unsharpened photo (as in TSD-SR's data).
* JPEG uses libjpeg through OpenCV at an integer quality drawn from ``jpeg_range`` instead of
  the differentiable DiffJPEG at a real-valued quality.
* OpenCV ``INTER_AREA`` is used for the "area" mode; when enlarging it interpolates instead of
  replicating pixels as ``torch.nn.functional.interpolate(mode="area")`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import cv2
import numpy as np
from PIL import Image
from scipy import special

KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
_CV2_INTERPOLATION = {
    "area": cv2.INTER_AREA,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
}


@dataclass(frozen=True)
class DegradationConfig:
    """Real-ESRGAN x4plus settings; fields ending in ``2`` configure the second stage.

    ``resize_probs`` are the probabilities of (up, down, keep). ``second_order_prob`` is not a
    Real-ESRGAN option (there the second blur/resize/noise always run and only the second blur
    is skipped with probability ``1 - second_blur_prob``); it defaults to 1.0 to match, and some
    diffusion-SR recipes (ResShift-style) set it to 0.5. The final resize + sinc + JPEG always run.
    """

    # -- first stage --------------------------------------------------------------------------
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)
    # -- second stage -------------------------------------------------------------------------
    second_order_prob: float = 1.0
    second_blur_prob: float = 0.8
    kernel_types2: tuple[str, ...] = KERNEL_TYPES
    kernel_probs2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)
    # -- final step ---------------------------------------------------------------------------
    final_sinc_prob: float = 0.8

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            is_probability = f.name.endswith(("_prob", "_prob2"))
            if is_probability and not 0.0 <= value <= 1.0:
                raise ValueError(f"DegradationConfig.{f.name} must be in [0, 1], got {value}")
        for size in self.kernel_sizes:
            if size < 3 or size % 2 == 0:
                raise ValueError(f"DegradationConfig.kernel_sizes must be odd and >= 3, got {self.kernel_sizes}")
        for types_name, probs_name in (("kernel_types", "kernel_probs"), ("kernel_types2", "kernel_probs2")):
            types, probs = getattr(self, types_name), getattr(self, probs_name)
            unknown = set(types) - set(KERNEL_TYPES)
            if unknown:
                raise ValueError(
                    f"DegradationConfig.{types_name} has unknown kernel types {sorted(unknown)}; "
                    f"choose from {KERNEL_TYPES}"
                )
            if len(types) != len(probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(
                    f"DegradationConfig.{probs_name} must have one probability per entry of "
                    f"{types_name} and sum to 1, got {probs}"
                )
        for name in ("resize_probs", "resize_probs2"):
            probs = getattr(self, name)
            if len(probs) != 3 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(
                    f"DegradationConfig.{name} must be 3 probabilities (up, down, keep) summing to 1, got {probs}"
                )
        for name in ("resize_range", "resize_range2"):
            low, high = getattr(self, name)
            if not 0.0 < low <= 1.0 <= high:
                raise ValueError(f"DegradationConfig.{name} must satisfy 0 < low <= 1 <= high, got {(low, high)}")
        for name in ("jpeg_range", "jpeg_range2"):
            low, high = getattr(self, name)
            if not 1 <= low <= high <= 100:
                raise ValueError(f"DegradationConfig.{name} must satisfy 1 <= low <= high <= 100, got {(low, high)}")


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _mahalanobis_sq(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on a centred grid, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T."""
    offsets = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2.0
    xx, yy = np.meshgrid(offsets, offsets)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    rotation = np.array([[cos_t, -sin_t], [sin_t, cos_t]])
    covariance = rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T
    inverse = np.linalg.inv(covariance)
    return inverse[0, 0] * xx * xx + (inverse[0, 1] + inverse[1, 0]) * xx * yy + inverse[1, 1] * yy * yy


def gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Normalised (possibly anisotropic, rotated) bivariate Gaussian blur kernel."""
    kernel = np.exp(-0.5 * _mahalanobis_sq(kernel_size, sigma_x, sigma_y, theta))
    return kernel / kernel.sum()


def generalized_gaussian_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
    """Generalised Gaussian exp(-0.5 q^beta): beta < 1 heavier tails, beta > 1 flatter top."""
    kernel = np.exp(-0.5 * np.power(_mahalanobis_sq(kernel_size, sigma_x, sigma_y, theta), beta))
    return kernel / kernel.sum()


def plateau_kernel(kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Plateau-shaped kernel 1 / (1 + q^beta), as used by Real-ESRGAN."""
    kernel = 1.0 / (np.power(_mahalanobis_sq(kernel_size, sigma_x, sigma_y, theta), beta) + 1.0)
    return kernel / kernel.sum()


def circular_lowpass_kernel(cutoff: float, kernel_size: int) -> np.ndarray:
    """2-D circular sinc (ideal low-pass) kernel, cutoff in radians (pi = Nyquist).

    Why: it reproduces ringing and overshoot artefacts that Gaussian blur cannot.
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"sinc kernel_size must be odd, got {kernel_size}")
    offsets = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2.0
    xx, yy = np.meshgrid(offsets, offsets)
    radius = np.hypot(xx, yy)
    centre = (kernel_size - 1) // 2
    safe_radius = np.where(radius == 0.0, 1.0, radius)
    kernel = cutoff * special.j1(cutoff * safe_radius) / (2.0 * np.pi * safe_radius)
    kernel[centre, centre] = cutoff**2 / (4.0 * np.pi)  # limit of the expression at r -> 0
    return kernel / kernel.sum()


def _sample_shape_beta(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
    # Real-ESRGAN draws beta below or above 1 with equal chance (for plateau with [1, 2] this
    # gives beta == 1 half of the time, as in the reference).
    if rng.uniform() < 0.5:
        return float(rng.uniform(beta_range[0], 1.0))
    return float(rng.uniform(1.0, beta_range[1]))


def sample_blur_kernel(
    rng: np.random.Generator, cfg: DegradationConfig = DegradationConfig(), stage: int = 1
) -> tuple[np.ndarray, str]:
    """Draw one stage's blur kernel; returns (kernel, description) so callers can log it."""
    if stage == 1:
        types, probs, sinc_prob = cfg.kernel_types, cfg.kernel_probs, cfg.sinc_prob
        sigma_range, betag, betap = cfg.blur_sigma, cfg.betag_range, cfg.betap_range
    elif stage == 2:
        types, probs, sinc_prob = cfg.kernel_types2, cfg.kernel_probs2, cfg.sinc_prob2
        sigma_range, betag, betap = cfg.blur_sigma2, cfg.betag_range2, cfg.betap_range2
    else:
        raise ValueError(f"stage must be 1 or 2, got {stage}")

    kernel_size = int(rng.choice(np.asarray(cfg.kernel_sizes)))
    if rng.uniform() < sinc_prob:
        # Smaller kernels cannot represent low cutoffs, hence the size-dependent lower bound.
        low = np.pi / 3 if kernel_size < 13 else np.pi / 5
        cutoff = float(rng.uniform(low, np.pi))
        return circular_lowpass_kernel(cutoff, kernel_size), f"sinc k={kernel_size} cutoff={cutoff:.3f}"

    kind = types[int(rng.choice(len(types), p=np.asarray(probs, dtype=np.float64)))]
    sigma_x = float(rng.uniform(*sigma_range))
    if kind.endswith("aniso"):
        sigma_y = float(rng.uniform(*sigma_range))
        theta = float(rng.uniform(-np.pi, np.pi))
    else:
        sigma_y, theta = sigma_x, 0.0
    description = f"{kind} k={kernel_size} sx={sigma_x:.3f} sy={sigma_y:.3f} theta={theta:.3f}"
    if kind in ("iso", "aniso"):
        return gaussian_kernel(kernel_size, sigma_x, sigma_y, theta), description
    if kind.startswith("generalized"):
        beta = _sample_shape_beta(rng, betag)
        return generalized_gaussian_kernel(kernel_size, sigma_x, sigma_y, theta, beta), f"{description} beta={beta:.3f}"
    beta = _sample_shape_beta(rng, betap)
    return plateau_kernel(kernel_size, sigma_x, sigma_y, theta, beta), f"{description} beta={beta:.3f}"


def sample_final_sinc_kernel(
    rng: np.random.Generator, cfg: DegradationConfig = DegradationConfig()
) -> tuple[np.ndarray | None, str]:
    """Final sinc filter with probability ``final_sinc_prob``; None means identity."""
    if rng.uniform() < cfg.final_sinc_prob:
        kernel_size = int(rng.choice(np.asarray(cfg.kernel_sizes)))
        cutoff = float(rng.uniform(np.pi / 3, np.pi))
        return circular_lowpass_kernel(cutoff, kernel_size), f"sinc k={kernel_size} cutoff={cutoff:.3f}"
    return None, "identity"


# ---------------------------------------------------------------------------------------------
# Image operations (float32 H x W x 3 RGB)
# ---------------------------------------------------------------------------------------------


def apply_kernel(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filter every channel; reflect-101 borders match torch's 'reflect' padding in the reference.

    All kernels here are point-symmetric, so OpenCV's correlation equals convolution.
    """
    return cv2.filter2D(image, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def resize(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resize to (height, width) with 'area', 'bilinear' or 'bicubic' (no antialias, as torch)."""
    if mode not in _CV2_INTERPOLATION:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    resized = cv2.resize(image, (int(width), int(height)), interpolation=_CV2_INTERPOLATION[mode])
    return resized.reshape(int(height), int(width), image.shape[2])


def _sample_resize(
    rng: np.random.Generator, probs: tuple[float, float, float], value_range: tuple[float, float]
) -> float:
    direction = int(rng.choice(3, p=np.asarray(probs, dtype=np.float64)))
    if direction == 0:
        return float(rng.uniform(1.0, value_range[1]))
    if direction == 1:
        return float(rng.uniform(value_range[0], 1.0))
    return 1.0


def _sample_mode(rng: np.random.Generator) -> str:
    return RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]


def add_random_noise(
    image: np.ndarray,
    rng: np.random.Generator,
    gaussian_prob: float,
    sigma_range: tuple[float, float],
    poisson_scale_range: tuple[float, float],
    gray_prob: float,
) -> tuple[np.ndarray, str]:
    """Gaussian noise (sigma in 0..255 units) with probability ``gaussian_prob``, else Poisson.

    Gray noise (same noise in all three channels) is chosen with probability ``gray_prob``.
    Returns the clipped noisy image and a description.
    """
    height, width = image.shape[:2]
    if rng.uniform() < gaussian_prob:
        sigma = float(rng.uniform(*sigma_range))
        gray = bool(rng.uniform() < gray_prob)
        shape = (height, width, 1) if gray else (height, width, 3)
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma / 255.0)
        description = f"gaussian sigma={sigma:.2f} gray={gray}"
    else:
        scale = float(rng.uniform(*poisson_scale_range))
        gray = bool(rng.uniform() < gray_prob)
        source = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None] if gray else image
        # Count distinct 8-bit levels to set the photon count, as skimage.util.random_noise does.
        quantised = np.clip(np.round(source * 255.0), 0, 255) / 255.0
        levels = 2.0 ** math.ceil(math.log2(max(len(np.unique(quantised)), 1)))
        noise = ((rng.poisson(quantised * levels) / levels - quantised) * scale).astype(np.float32)
        description = f"poisson scale={scale:.3f} gray={gray}"
    return np.clip(image + noise, 0.0, 1.0).astype(np.float32), description


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through libjpeg (OpenCV) at ``quality``; input is clipped to [0, 1] first."""
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    )
    if not ok:
        raise RuntimeError(f"OpenCV failed to JPEG-encode an image of shape {pixels.shape} at quality {quality}")
    decoded = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return decoded.astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def _to_float_rgb(hr: np.ndarray, scale: int) -> np.ndarray:
    hr = np.asarray(hr)
    if hr.ndim != 3 or hr.shape[2] != 3:
        raise ValueError(f"HR image must be H x W x 3 RGB, got shape {hr.shape}")
    height, width = hr.shape[:2]
    if scale < 1 or height % scale or width % scale:
        raise ValueError(
            f"HR size {height}x{width} (HxW) must be divisible by scale={scale}; "
            f"crop it to {height - height % scale}x{width - width % scale} first"
        )
    if hr.dtype == np.uint8:
        return hr.astype(np.float32) / 255.0
    if np.issubdtype(hr.dtype, np.floating):
        low, high = float(hr.min()), float(hr.max())
        if low < -1e-6 or high > 1.0 + 1e-6:
            raise ValueError(
                f"float HR image must lie in [0, 1], got range [{low:.4g}, {high:.4g}]; pass uint8 or divide by 255"
            )
        return hr.astype(np.float32)
    raise ValueError(f"HR image must be uint8 or float in [0, 1], got dtype {hr.dtype}")


def degrade_realesrgan(
    hr: np.ndarray,
    rng: np.random.Generator,
    cfg: DegradationConfig = DegradationConfig(),
    scale: int = 4,
    *,
    trace: list[str] | None = None,
) -> np.ndarray:
    """Synthesise a realistic LR image from ``hr`` with the Real-ESRGAN second-order model.

    Args:
        hr: H x W x 3 RGB, uint8 or float in [0, 1]; H and W divisible by ``scale``.
        rng: the only source of randomness (same state -> bit-identical output).
        cfg: degradation settings (defaults = Real-ESRGAN x4plus).
        scale: SR factor; the LR is exactly (H // scale, W // scale).
        trace: if given, a human-readable record of every sampled step is appended to it.

    Returns:
        LR as float32 H/scale x W/scale x 3 in [0, 1], quantised to 8-bit levels like the reference.
    """
    image = _to_float_rgb(hr, scale)
    height, width = image.shape[:2]
    lr_height, lr_width = height // scale, width // scale
    log = trace if trace is not None else []

    # Kernels are drawn up front, as the reference dataset does, whether used or not.
    kernel1, kernel1_text = sample_blur_kernel(rng, cfg, stage=1)
    kernel2, kernel2_text = sample_blur_kernel(rng, cfg, stage=2)
    final_sinc, final_sinc_text = sample_final_sinc_kernel(rng, cfg)

    # First degradation: blur -> random resize -> noise -> JPEG.
    out = apply_kernel(image, kernel1)
    log.append(f"blur1: {kernel1_text}")
    factor, mode = _sample_resize(rng, cfg.resize_probs, cfg.resize_range), _sample_mode(rng)
    out = resize(out, max(1, int(height * factor)), max(1, int(width * factor)), mode)
    log.append(f"resize1: x{factor:.3f} {mode} -> {out.shape[0]}x{out.shape[1]}")
    out, noise_text = add_random_noise(
        out, rng, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range, cfg.gray_noise_prob
    )
    log.append(f"noise1: {noise_text}")
    quality = int(rng.integers(cfg.jpeg_range[0], cfg.jpeg_range[1], endpoint=True))
    out = jpeg_compress(out, quality)
    log.append(f"jpeg1: q={quality}")

    # Second degradation: (blur) -> random resize relative to the LR size -> noise.
    if rng.uniform() < cfg.second_order_prob:
        if rng.uniform() < cfg.second_blur_prob:
            out = apply_kernel(out, kernel2)
            log.append(f"blur2: {kernel2_text}")
        else:
            log.append("blur2: skipped")
        factor, mode = _sample_resize(rng, cfg.resize_probs2, cfg.resize_range2), _sample_mode(rng)
        out = resize(out, max(1, int(height / scale * factor)), max(1, int(width / scale * factor)), mode)
        log.append(f"resize2: x{factor:.3f} of LR {mode} -> {out.shape[0]}x{out.shape[1]}")
        out, noise_text = add_random_noise(
            out, rng, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2, cfg.gray_noise_prob2
        )
        log.append(f"noise2: {noise_text}")
    else:
        log.append("second order: skipped")

    # Final: [resize to LR + sinc] and JPEG, in random order.
    resize_first = bool(rng.uniform() < 0.5)
    mode = _sample_mode(rng)
    quality = int(rng.integers(cfg.jpeg_range2[0], cfg.jpeg_range2[1], endpoint=True))
    steps = ("resize+sinc", "jpeg") if resize_first else ("jpeg", "resize+sinc")
    for step in steps:
        if step == "jpeg":
            out = jpeg_compress(out, quality)
            log.append(f"jpeg2: q={quality}")
        else:
            out = resize(out, lr_height, lr_width, mode)
            if final_sinc is not None:
                out = apply_kernel(out, final_sinc)
            log.append(f"final: resize {mode} -> {lr_height}x{lr_width}, {final_sinc_text}")

    # Via uint8 so the result holds exact 8-bit levels (and no negative zeros).
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8).astype(np.float32) / 255.0


def degrade_bicubic(hr: np.ndarray, scale: int = 4) -> np.ndarray:
    """Classic bicubic x``scale`` downsampling with PIL (antialiased), as SR benchmarks use.

    Float input is quantised to 8 bits first because PIL resizes RGB images as uint8.
    Returns float32 (H/scale, W/scale, 3) in [0, 1].
    """
    image = _to_float_rgb(hr, scale)
    pixels = hr if np.asarray(hr).dtype == np.uint8 else np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    height, width = image.shape[:2]
    lr = Image.fromarray(np.ascontiguousarray(pixels)).resize(
        (width // scale, height // scale), Image.Resampling.BICUBIC
    )
    return np.asarray(lr, dtype=np.float32) / 255.0
