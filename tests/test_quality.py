"""Tests for compress.quality: paper-exact PSNR/SSIM, the offline metric registry, cost helpers and reports.

Reference values: pyiqa's calibration table (``ResultsCalibra/calibration_summary.csv`` in the IQA-PyTorch
repository, "(ours)" rows = pyiqa's own outputs) on the five image pairs the pyiqa wheel installs as top-level
``ResultsCalibra/{ref_dir,dist_dir}`` in site-packages. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from compress.quality import cost, fidelity, perceptual, report

REPO_ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_IMAGES = ("I03", "I04", "I06", "I08", "I19")
# calibration_summary.csv, rows "psnr(ours)", "ssim(ours)", "niqe(ours)" (pyiqa defaults: PSNR on RGB, SSIM on
# YIQ luma, NIQE on YIQ luma).
PUBLISHED_PSNR_RGB = (21.1136, 20.9872, 27.0139, 23.3002, 21.6186)
PUBLISHED_SSIM_YIQ = (0.6997, 0.9978, 0.9989, 0.9671, 0.6522)
PUBLISHED_NIQE = (15.6538, 3.6549, 3.2342, 3.1921, 9.0722)
PYIQA_PSNR_EPS = 1e-8  # pyiqa's psnr adds this to the MSE; ours does not (identical images -> inf)


@pytest.fixture(scope="module")
def pyiqa():
    import pyiqa as pyiqa_module

    return pyiqa_module


@pytest.fixture(scope="module")
def calibration_pairs(pyiqa):
    """(name, dist, ref) tensors, loaded the way pyiqa loads image paths."""
    root = Path(pyiqa.__file__).resolve().parent.parent / "ResultsCalibra"
    if not (root / "ref_dir").is_dir():
        pytest.skip(f"pyiqa's calibration images are not installed at {root}")
    return [
        (
            name,
            fidelity.read_image_as_tensor(root / "dist_dir" / f"{name}.bmp"),
            fidelity.read_image_as_tensor(root / "ref_dir" / f"{name}.bmp"),
        )
        for name in CALIBRATION_IMAGES
    ]


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point torch hub and the HF hub cache at empty temporary folders."""
    import huggingface_hub.constants

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return perceptual.CacheLocations.current()


# ------------------------------------------------------------------------------------------------------------
# fidelity
# ------------------------------------------------------------------------------------------------------------


def test_psnr_ssim_reproduce_pyiqa_published_calibration(calibration_pairs):
    for (name, dist, ref), psnr_expected, ssim_expected in zip(
        calibration_pairs, PUBLISHED_PSNR_RGB, PUBLISHED_SSIM_YIQ
    ):
        assert float(fidelity.psnr(dist, ref, y_channel=False)) == pytest.approx(psnr_expected, abs=1e-3), name
        assert float(fidelity.ssim(dist, ref, color_space="yiq")) == pytest.approx(ssim_expected, abs=1e-3), name


def test_psnr_ssim_match_pyiqa_computed_here(calibration_pairs, pyiqa):
    """Ours against pyiqa itself: its calibration settings and the papers' Y-of-YCbCr settings."""
    pyiqa_psnr_rgb = pyiqa.create_metric("psnr", device="cpu")
    pyiqa_ssim_yiq = pyiqa.create_metric("ssim", device="cpu")
    pyiqa_psnr_y = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    pyiqa_ssim_y = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", device="cpu")
    for (name, dist, ref), published_psnr, published_ssim in zip(
        calibration_pairs, PUBLISHED_PSNR_RGB, PUBLISHED_SSIM_YIQ
    ):
        theirs_psnr_rgb = float(pyiqa_psnr_rgb(dist, ref))
        theirs_ssim_yiq = float(pyiqa_ssim_yiq(dist, ref))
        assert theirs_psnr_rgb == pytest.approx(published_psnr, abs=1e-3), f"pyiqa itself drifted on {name}"
        assert theirs_ssim_yiq == pytest.approx(published_ssim, abs=1e-3), f"pyiqa itself drifted on {name}"
        assert float(fidelity.psnr(dist, ref, y_channel=False)) == pytest.approx(theirs_psnr_rgb, abs=1e-3)
        assert float(fidelity.ssim(dist, ref, color_space="yiq")) == pytest.approx(theirs_ssim_yiq, abs=1e-4)

        ours_psnr_y = float(fidelity.psnr_y(dist, ref))
        theirs_psnr_y = float(pyiqa_psnr_y(dist, ref))
        # Undo pyiqa's MSE epsilon exactly; it only matters for near-lossless pairs (I04, I06 are ~57 dB).
        theirs_without_eps = -10 * math.log10(10 ** (-theirs_psnr_y / 10) - PYIQA_PSNR_EPS)
        assert ours_psnr_y == pytest.approx(theirs_without_eps, abs=1e-3), name
        # pyiqa's epsilon moves PSNR by < 1e-3 dB below 40 dB (there both agree directly) and visibly above
        # (I04, I06 are ~57 dB): agreement must hold exactly where the epsilon is negligible.
        agree = ours_psnr_y == pytest.approx(theirs_psnr_y, abs=1e-3)
        assert agree == (theirs_psnr_y < 40), (name, ours_psnr_y, theirs_psnr_y)
        assert float(fidelity.ssim_y(dist, ref)) == pytest.approx(float(pyiqa_ssim_y(dist, ref)), abs=1e-4), name


def test_fidelity_crop_batch_and_uint8_inputs_match_pyiqa(pyiqa):
    generator = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 48, 56, generator=generator)
    sr = fidelity.quantize_to_uint8_levels(hr + 0.05 * torch.randn(hr.shape, generator=generator))
    hr = fidelity.quantize_to_uint8_levels(hr)
    for crop in (0, 4):
        theirs_psnr = pyiqa.create_metric(
            "psnr", test_y_channel=True, color_space="ycbcr", crop_border=crop, device="cpu"
        )(sr, hr)
        theirs_ssim = pyiqa.create_metric(
            "ssim", test_y_channel=True, color_space="ycbcr", crop_border=crop, device="cpu"
        )(sr, hr)
        ours_psnr, ours_ssim = fidelity.psnr_y(sr, hr, crop), fidelity.ssim_y(sr, hr, crop)
        assert ours_psnr.shape == (2,) and ours_ssim.shape == (2,)
        torch.testing.assert_close(ours_psnr, theirs_psnr.float().reshape(2), atol=1e-3, rtol=0)
        torch.testing.assert_close(ours_ssim, theirs_ssim.float().reshape(2), atol=1e-4, rtol=0)
    # batch elements are independent
    assert float(fidelity.psnr_y(sr[1:], hr[1:])) == pytest.approx(float(fidelity.psnr_y(sr, hr)[1]), abs=1e-5)


def test_identical_images_psnr_is_inf_and_ssim_is_one():
    image = torch.rand(2, 3, 32, 32)
    assert torch.isinf(fidelity.psnr_y(image, image)).all()
    assert torch.isinf(fidelity.psnr(image, image, y_channel=False)).all()
    torch.testing.assert_close(fidelity.ssim_y(image, image), torch.ones(2))


def test_fidelity_rejects_inputs_that_would_give_wrong_numbers():
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fidelity.psnr_y(image * 255, image)
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity.ssim_y(image, image[..., :16])
    with pytest.raises(ValueError, match="at least"):
        fidelity.ssim_y(image[..., :8, :8], image[..., :8, :8])


def test_luma_is_bt601_studio_swing():
    white, black = torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)
    assert float(fidelity.rgb_to_luma(white)) * 255 == pytest.approx(235.0, abs=1e-3)
    assert float(fidelity.rgb_to_luma(black)) * 255 == pytest.approx(16.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# perceptual registry
# ------------------------------------------------------------------------------------------------------------


def test_stlpips_behaves_like_a_perceptual_distance(calibration_pairs):
    metric = perceptual.build_metric("stlpips")
    assert isinstance(metric, perceptual.Metric)
    assert (metric.kind, metric.lower_is_better) == ("fr", True)
    _, _, photo = calibration_pairs[0]
    _, _, other_photo = calibration_pairs[1]
    photo, other_photo = photo[..., :256, :256], other_photo[..., :256, :256]
    noise = 0.05 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(0))
    noisy = (photo + noise).clamp(0, 1)
    batch_sr = torch.cat([photo, noisy, other_photo])
    distances = metric(batch_sr, photo.expand_as(batch_sr))
    assert distances.shape == (3,)
    identical, noisy_distance, different_distance = distances.tolist()
    assert abs(identical) < 1e-6
    assert 0.05 < noisy_distance < different_distance


def test_stlpips_matches_pyiqa_implementation_with_the_same_weights(calibration_pairs):
    """pyiqa's own ST-LPIPS code, fed the wheel's weights, must give our number (0.5798 on I03)."""
    _, dist, ref = calibration_pairs[0]
    ours = float(perceptual.build_metric("stlpips")(dist, ref))
    caches = perceptual.CacheLocations.current()
    with perceptual._pyiqa_offline(caches) as pyiqa:
        theirs_model = pyiqa.create_metric(
            "stlpips", pretrained_model_path=str(perceptual.stlpips_weights_path("alex")), device="cpu"
        )
    theirs = float(theirs_model(dist, ref))
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert ours == pytest.approx(0.5798, abs=1e-3)


def test_stlpips_module_is_differentiable_and_frozen():
    module = perceptual.stlpips_module("alex")
    assert not any(parameter.requires_grad for parameter in module.parameters())
    reference = torch.rand(1, 3, 64, 64)
    candidate = torch.rand(1, 3, 64, 64, requires_grad=True)
    module(candidate, reference, normalize=True).sum().backward()
    assert candidate.grad is not None and candidate.grad.abs().sum() > 0


def test_stlpips_imports_without_ipython_or_torchsummary(monkeypatch):
    for name in list(sys.modules):
        if name.startswith("stlpips_pytorch"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "IPython", None)  # makes `import IPython` raise ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "torchsummary", None)
    stlpips = perceptual._import_stlpips()
    assert hasattr(stlpips, "LPIPS")
    assert sys.modules["IPython"] is None and sys.modules["torchsummary"] is None  # stand-ins removed again


def test_fidelity_metrics_through_registry(calibration_pairs):
    _, dist, ref = calibration_pairs[0]
    psnr_metric = perceptual.build_metric("psnr_y")
    assert psnr_metric(dist, ref).item() == pytest.approx(fidelity.psnr_y(dist, ref).item(), abs=1e-6)
    with pytest.raises(ValueError, match="full-reference"):
        psnr_metric(dist)


def test_missing_weights_give_skipped_metrics_naming_the_file(empty_caches):
    expected_files = {
        "lpips": ["alexnet-owt-7be5be79.pth", "LPIPS_v0.1_alex-df73285e.pth"],
        "dists": ["vgg16-397923af.pth", "DISTS_weights-f5e65c96.pth"],
        "niqe": ["niqe_modelparameters.mat"],
        "musiq": ["musiq_koniq_ckpt-e95806b9.pth"],
        "maniqa": ["models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k", "ckpt_koniq10k.pt"],
        "maniqa-pipal": ["models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k", "MANIQA_PIPAL-ae6d356b.pth"],
        "clipiqa": ["RN50.pt"],
    }
    for name, filenames in expected_files.items():
        started = time.perf_counter()
        metric = perceptual.build_metric(name)
        assert time.perf_counter() - started < 5, f"{name}: the availability check must not wait on a network"
        assert isinstance(metric, perceptual.SkippedMetric), name
        assert not metric.available
        assert len(metric.missing) == len(filenames)
        for filename in filenames:
            assert filename in metric.reason, (name, metric.reason)
        root = str(empty_caches.hf_hub) if "models--" in filenames[0] else str(empty_caches.torch_hub)
        assert root in metric.reason, metric.reason  # the full path looked at
        assert "place it at" in metric.reason or "copy" in metric.reason  # how to get it
        with pytest.raises(perceptual.MetricUnavailableError, match=name):
            metric(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    available = perceptual.available_metrics()
    assert {"psnr_y", "ssim_y", "stlpips", "stlpips-vgg"} <= set(available)
    assert not set(expected_files) & set(available)
    assert str(empty_caches.pyiqa / "niqe_modelparameters.mat") in perceptual.metric_status()["niqe"]
    assert "install_niqe_params.py" in perceptual.metric_status()["niqe"]


def test_clip_weights_with_wrong_hash_count_as_missing(empty_caches):
    fake = empty_caches.clip / "RN50.pt"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"not the CLIP checkpoint")
    metric = perceptual.build_metric("clipiqa")
    assert isinstance(metric, perceptual.SkippedMetric)
    assert "SHA256" in metric.reason and str(fake) in metric.reason


def test_required_file_table_agrees_with_installed_pyiqa(pyiqa):
    import importlib

    import timm.models

    def url_basenames(module_name):
        urls = importlib.import_module(f"pyiqa.archs.{module_name}").default_model_urls
        return {url.rsplit("/", 1)[-1] for url in urls.values()}

    files = perceptual.PYIQA_WEIGHT_FILES
    assert files["lpips"] in url_basenames("lpips_arch")
    assert files["dists"] in url_basenames("dists_arch")
    assert files["niqe"] in url_basenames("niqe_arch")
    assert files["musiq"] in url_basenames("musiq_arch")
    assert {files["maniqa"], files["maniqa-pipal"]} <= url_basenames("maniqa_arch")
    assert importlib.import_module("pyiqa.archs.clip_model")._MODELS["RN50"] == perceptual.CLIP_RN50_URL
    assert timm.models.get_pretrained_cfg("vit_base_patch8_224").hf_hub_id == perceptual.MANIQA_TIMM_REPO
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    for name in ("lpips", "dists", "niqe", "musiq", "maniqa", "maniqa-pipal", "clipiqa"):
        spec = perceptual._REGISTRY[name]
        assert spec.kind == DEFAULT_CONFIGS[name]["metric_mode"].lower(), name
        assert spec.lower_is_better == DEFAULT_CONFIGS[name].get("lower_better", False), name


def test_downloads_are_blocked_while_building_pyiqa_metrics(tmp_path):
    import urllib.request

    caches = perceptual.CacheLocations(torch_hub=tmp_path / "torch", hf_hub=tmp_path / "hf")
    original_urlopen = urllib.request.urlopen
    with perceptual._pyiqa_offline(caches):
        from pyiqa.utils import download_util

        assert download_util.DEFAULT_CACHE_DIR == str(caches.pyiqa)
        with pytest.raises(perceptual.OfflineDownloadBlockedError):
            download_util.load_file_from_url("https://example.invalid/weights.pth")
        with pytest.raises(perceptual.OfflineDownloadBlockedError):
            torch.hub.download_url_to_file("https://example.invalid/weights.pth", str(tmp_path / "w.pth"))
        with pytest.raises(perceptual.OfflineDownloadBlockedError):
            urllib.request.urlopen("https://example.invalid/")
    assert urllib.request.urlopen is original_urlopen
    assert download_util.DEFAULT_CACHE_DIR != str(caches.pyiqa)
    assert not (tmp_path / "w.pth").exists()


def test_niqe_reproduces_pyiqa_calibration_when_installed(calibration_pairs):
    metric = perceptual.build_metric("niqe")
    if isinstance(metric, perceptual.SkippedMetric):
        pytest.skip(metric.reason)
    assert (metric.kind, metric.lower_is_better) == ("nr", True)
    for (name, dist, _), expected in zip(calibration_pairs, PUBLISHED_NIQE):
        assert float(metric(dist)) == pytest.approx(expected, abs=0.01), name


# ------------------------------------------------------------------------------------------------------------
# scripts/install_niqe_params.py (conversion part; the pip download itself needs the package index)
# ------------------------------------------------------------------------------------------------------------


def _load_install_script():
    spec = importlib.util.spec_from_file_location(
        "install_niqe_params", REPO_ROOT / "scripts" / "install_niqe_params.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_niqe_npz_to_mat_conversion_is_what_pyiqa_reads(tmp_path):
    import io

    import scipy.io

    script = _load_install_script()
    mu = np.arange(36, dtype=np.float64)
    cov = np.eye(36) * 2.0
    buffer = io.BytesIO()
    np.savez(buffer, mu_pris_param=mu.reshape(1, 36), cov_pris_param=cov, gaussian_window=np.ones((7, 7)))
    arrays = script.npz_to_mat_arrays(buffer.getvalue())
    destination = tmp_path / "pyiqa" / script.MAT_FILENAME
    script.write_mat_atomically(arrays, destination)
    loaded = scipy.io.loadmat(destination)
    # pyiqa's NIQE: np.ravel(params['mu_prisparam']), params['cov_prisparam']
    np.testing.assert_array_equal(np.ravel(loaded["mu_prisparam"]), mu)
    np.testing.assert_array_equal(loaded["cov_prisparam"], cov)
    assert [p.name for p in destination.parent.iterdir()] == [script.MAT_FILENAME]  # no temp file left


# ------------------------------------------------------------------------------------------------------------
# cost
# ------------------------------------------------------------------------------------------------------------


def test_count_macs_linear_is_exactly_in_out_batch():
    layer = torch.nn.Linear(32, 16)
    assert cost.count_macs(layer, torch.randn(8, 32)) == 32 * 16 * 8
    assert cost.count_macs(layer, torch.randn(2, 5, 32)) == 32 * 16 * 2 * 5


def test_count_macs_conv_attention_and_breakdown():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert cost.count_macs(conv, torch.randn(2, 3, 10, 12)) == 8 * 3 * 3 * 3 * 10 * 12 * 2

    query = torch.randn(1, 2, 5, 8)
    attention_macs = cost.count_macs(torch.nn.functional.scaled_dot_product_attention, query, query, query)
    assert attention_macs == 2 * (1 * 2 * 5 * 5 * 8)  # QK^T and AV, each B*H*L*S*D

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(16, 4)))
    profile = cost.profile_macs(model, torch.randn(3, 8))
    assert profile.total == 3 * (8 * 16 + 16 * 4)
    assert profile.by_module["Sequential.0"] == 3 * 8 * 16
    assert profile.by_module["Sequential.2.0"] == 3 * 16 * 4
    assert profile.top_modules(1) == {"Sequential.0": 3 * 8 * 16, "Sequential.2": 3 * 16 * 4}
    # counting on the meta device gives the same answer without computing anything
    assert cost.count_macs(model.to("meta"), torch.randn(3, 8, device="meta")) == profile.total


def test_count_params_counts_shared_weights_once():
    layer = torch.nn.Linear(32, 16)
    assert cost.count_params(layer) == 32 * 16 + 16
    shared = torch.nn.Sequential(layer, torch.nn.ReLU(), layer)
    assert cost.count_params(shared) == 32 * 16 + 16
    layer.bias.requires_grad_(False)
    assert cost.count_params(layer, trainable_only=True) == 32 * 16


def test_measure_latency_returns_sane_values():
    calls = []

    def sleep_10ms():
        calls.append(torch.is_grad_enabled())
        time.sleep(0.01)

    result = cost.measure_latency(sleep_10ms, warmup=2, repeats=5)
    assert len(calls) == 7 and not any(calls)
    assert result.repeats == 5 and len(result.all_s) == 5
    assert 0.009 <= result.min_s <= result.median_s <= result.max_s < 1.0
    assert result.median_s == pytest.approx(sorted(result.all_s)[2])
    with pytest.raises(ValueError):
        cost.measure_latency(sleep_10ms, repeats=0)


def test_peak_memory_and_machine_info():
    memory = cost.peak_memory()
    assert memory["cpu_rss_peak_bytes"] > 50 * 2**20  # torch alone is bigger than this
    info = cost.machine_info()
    for key in ("cpu_model", "cpu_cores_logical", "ram_total_bytes", "os", "python", "device_name", "date_utc"):
        assert info[key], key
    for package in ("torch", "diffusers", "peft", "numpy"):
        assert package in info["packages"]
    assert (
        info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"] == torch.__version__
    )
    hostname = socket.gethostname()

    def strings(value):
        if isinstance(value, dict):
            return [s for k, v in value.items() for s in [str(k), *strings(v)]]
        if isinstance(value, (list, tuple)):
            return [s for v in value for s in strings(v)]
        return [str(value)]

    # The record names the machine's kind, never the machine: the host name appears in no field, whole or
    # as a word inside one.
    import re

    pattern = re.compile(rf"(?<![\w-]){re.escape(hostname)}(?![\w-])")
    assert not any(pattern.search(text) for text in strings(info)), hostname


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------


def test_write_metrics_json_is_atomic_and_handles_tensors_and_inf(tmp_path):
    target = tmp_path / "run" / "metrics.json"
    target.parent.mkdir()
    target.write_text("old")
    payload = {
        "psnr_y": torch.tensor([float("inf"), 24.5]),
        "ssim_y": np.float32(0.75),
        "latency": cost.LatencyResult(0.1, 0.09, 0.2, [0.09, 0.1, 0.2], 3),
        "path": Path("/x/y"),
    }
    report.write_metrics_json(target, payload)
    loaded = json.loads(target.read_text())
    assert loaded["psnr_y"] == ["inf", 24.5]
    assert loaded["ssim_y"] == pytest.approx(0.75)
    assert loaded["latency"]["median_s"] == 0.1 and loaded["path"] == "/x/y"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    with pytest.raises(TypeError):
        report.write_metrics_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == loaded  # a failed write leaves the previous file intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_format_table_is_aligned_markdown():
    rows = [
        {"model": "tsdsr", "psnr_y": 24.51234, "params_m": 2048, "note": None},
        {"model": "tinysr-vae", "psnr_y": float("inf"), "params_m": 341},
    ]
    table = report.format_table(rows, ["model", ("psnr_y", "PSNR-Y"), "params_m", "note"], float_digits={"psnr_y": 2})
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" model      ", " PSNR-Y ", " params_m ", " note "]
    assert lines[1] == "| ---------- | -----: | -------: | ---- |"
    assert "24.51" in lines[2] and "inf" in lines[3] and lines[2].rstrip().endswith("| -    |")
    assert len({len(line) for line in lines}) == 1
