"""Quality measurement for the toolkit: paper-exact fidelity metrics, an offline-safe perceptual/NR metric
registry, model cost (parameters, MACs, latency, memory, machine info) and report writing.

Importing this package is cheap: pyiqa, stlpips and timm are only imported when a metric that needs them is
built.
"""

from .cost import (
    LatencyResult,
    count_macs,
    count_params,
    machine_info,
    measure_latency,
    peak_memory,
)
from .fidelity import (
    psnr,
    psnr_y,
    quantize_to_uint8_levels,
    read_image_as_tensor,
    ssim,
    ssim_y,
)
from .perceptual import (
    Metric,
    MetricUnavailableError,
    SkippedMetric,
    available_metrics,
    build_metric,
    metric_status,
    registered_metrics,
    required_files,
    stlpips_module,
)
from .report import format_table, write_metrics_json

__all__ = [
    "LatencyResult",
    "Metric",
    "MetricUnavailableError",
    "SkippedMetric",
    "available_metrics",
    "build_metric",
    "count_macs",
    "count_params",
    "format_table",
    "machine_info",
    "measure_latency",
    "metric_status",
    "peak_memory",
    "psnr",
    "psnr_y",
    "quantize_to_uint8_levels",
    "read_image_as_tensor",
    "registered_metrics",
    "required_files",
    "ssim",
    "ssim_y",
    "stlpips_module",
    "write_metrics_json",
]
