"""Model cost: parameters, MACs, latency, peak memory, and the machine/version record every benchmark needs.

Why these choices:

* MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2): it sees every matmul,
  convolution and attention call, functional ones included, and runs on ``meta`` tensors, so multi-GB models can
  be counted without computing anything. It counts only those "heavy" ops: element-wise work (norms,
  activations, residual adds, resizes) is not counted. TinySR's 427 G MACs were counted with ``thop``, which
  hooks nn.Module leaves instead: thop misses functional matmuls/attention and adds norm/activation costs, so the
  two tools differ; :class:`MacCount` keeps a per-operator split so either convention can be reconstructed.
* PyTorch's CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula in
  FlopCounterMode and would silently count as zero; it is registered here with the standard SDPA formula.
* Latency is wall-clock of the whole call (median of repeats after warm-up), synchronising the accelerator
  before starting and after each call, as TinySR's test script does with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "LatencyResult",
    "MacCount",
    "count_macs",
    "count_params",
    "machine_info",
    "measure_latency",
    "peak_memory",
    "profile_macs",
    "reset_peak_memory",
]


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once, as ``module.parameters()`` deduplicates them)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """Attention kernels FlopCounterMode does not know; without them attention costs 0 on CPU."""
    aten = torch.ops.aten
    formulas = {}
    for op_name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        if hasattr(aten, op_name):
            formulas[getattr(aten, op_name)] = _sdpa_flops
    return formulas


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one call: total, per module (fully qualified names, nested), per aten operator."""

    total: int
    by_module: dict[str, int]
    by_operator: dict[str, int]

    def top_modules(self, depth: int) -> dict[str, int]:
        """Per-module MACs for modules exactly ``depth`` levels below the root (root = depth 0)."""
        return {name: macs for name, macs in self.by_module.items() if name.count(".") == depth}


def profile_macs(fn_or_module: Callable[..., Any], *inputs: Any, **kwargs: Any) -> MacCount:
    """Run ``fn_or_module(*inputs, **kwargs)`` once under FlopCounterMode (in no_grad) and return the MACs.

    Pass a module and inputs on the ``meta`` device (``module.to('meta')``) to count without computing.
    Module names are the FlopCounterMode names: the root module's class name, then attribute paths
    (e.g. ``SD3Transformer2DModel.transformer_blocks.0.attn``).
    """
    with torch.no_grad(), FlopCounterMode(display=False, depth=None, custom_mapping=_extra_flop_formulas()) as counter:
        fn_or_module(*inputs, **kwargs)
    counts = counter.get_flop_counts()
    global_counts = counts.get("Global", {})
    total = sum(global_counts.values()) // 2
    by_module = {name: sum(ops.values()) // 2 for name, ops in counts.items() if name != "Global"}
    by_operator = {str(op): flops // 2 for op, flops in global_counts.items()}
    return MacCount(total=total, by_module=by_module, by_operator=by_operator)


def count_macs(fn_or_module: Callable[..., Any], *inputs: Any, **kwargs: Any) -> int:
    """Total MACs (FLOPs / 2) of one call; see :func:`profile_macs` for the per-module breakdown."""
    return profile_macs(fn_or_module, *inputs, **kwargs).total


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock seconds of ``repeats`` timed calls (after warm-up)."""

    median_s: float
    min_s: float
    max_s: float
    all_s: list[float] = field(repr=False)
    repeats: int

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.all_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _synchronize_accelerators() -> None:
    """Wait for queued GPU work so the timer measures execution, not kernel launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.synchronize()


def measure_latency(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> LatencyResult:
    """Time ``fn()`` (no arguments; wrap inputs in a lambda) ``repeats`` times after ``warmup`` untimed calls.

    Runs under ``torch.no_grad`` and synchronises CUDA/MPS around every timed call. The median is the headline
    number because it ignores one-off stalls (allocation, page faults, other processes).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    timings: list[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _synchronize_accelerators()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _synchronize_accelerators()
            timings.append(time.perf_counter() - start)
    return LatencyResult(
        median_s=statistics.median(timings),
        min_s=min(timings),
        max_s=max(timings),
        all_s=timings,
        repeats=repeats,
    )


def peak_memory() -> dict[str, int | None]:
    """Peak memory so far: process CPU RSS peak (never resets) and CUDA peak allocated (see reset_peak_memory).

    ``cuda_max_allocated_bytes`` counts tensors allocated by PyTorch on the current device (not the caching
    allocator's reserve or the CUDA context); it is None without CUDA.
    """
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    cpu_rss_peak_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024
    cuda_max_allocated_bytes = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_max_allocated_bytes = int(torch.cuda.max_memory_allocated())
    return {"cpu_rss_peak_bytes": int(cpu_rss_peak_bytes), "cuda_max_allocated_bytes": cuda_max_allocated_bytes}


def reset_peak_memory() -> None:
    """Reset the CUDA peak counter before a measurement (the CPU RSS peak is per process and cannot be reset)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_RECORDED_PACKAGES: Sequence[str] = (
    "torch",
    "torchvision",
    "diffusers",
    "peft",
    "numpy",
    "transformers",
    "pyiqa",
    "onnxruntime",
    "coremltools",
)


def machine_info() -> dict[str, Any]:
    """Hardware, OS and package versions to store next to every benchmark number (no hostname or user).

    Package versions come from installed metadata, so nothing heavy is imported.
    """
    try:
        cores_available = len(os.sched_getaffinity(0))
    except AttributeError:
        cores_available = os.cpu_count()
    cuda_devices = []
    if torch.cuda.is_available():
        cuda_devices = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    mps_available = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if cuda_devices:
        device_name = cuda_devices[torch.cuda.current_device()] if torch.cuda.is_initialized() else cuda_devices[0]
    else:
        device_name = "Apple MPS" if mps_available else f"CPU: {_cpu_model()}"
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_available": cores_available,
        "torch_num_threads": torch.get_num_threads(),
        "ram_total_bytes": _total_ram_bytes(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "packages": {name: _package_version(name) for name in _RECORDED_PACKAGES},
        "torch_cuda_version": torch.version.cuda,
        "cuda_devices": cuda_devices,
        "mps_available": mps_available,
        "device_name": device_name,
    }
