"""ONNX graphs of a student: export, fp16 with a measured fp32 fallback, ONNX Runtime optimization, save.

Exporter: `torch.onnx.export(dynamo=False)` (TorchScript tracing, opset 17 by default). On torch 2.14.1 the
dynamo exporter took 70-90 s for the built-in student's five graphs (the TorchScript one 5 s) and its
graphs failed in ONNX Runtime at any size but the example's: it fixes the length of SD3's cropped
position-embedding table (`Attempting to broadcast an axis by a dimension other than 1. 12 by 16`).
Traced graphs keep batch, height and width dynamic; every side must be a multiple of the graph's
`multiple` (stated in the manifest; compress.runtime pads to it).

fp16: each component (VAE decoder first: fp16 overflow in VAE decoders is the known failure, black or NaN
images) is traced alone in fp16 and compared with the fp32 PyTorch student on real photos; a component
below the fp16 parity floor stays fp32. The graphs are then traced from a student whose components run at
the precisions found (export.graphs.with_precisions), so casts sit only at component boundaries; inputs and
outputs stay float32. The fallback is measured, never assumed. (ONNX Runtime's `convert_float_to_float16`
with a node block list was tried first: it casts to fp16 between every pair of blocked nodes, so a
"kept fp32" decoder still overflowed; tests/test_export_onnx.py has the overflowing decoder.)

Saved graphs are ONNX Runtime's `ORT_ENABLE_BASIC` optimization of the export (constant folding and
redundant-node removal: portable across execution providers; the fusions of the higher levels are
hardware-specific and are applied when a session loads). A graph whose weights exceed 2 GB (protobuf's
limit) is saved with its tensors in one external `<name>.onnx.data` file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.graphs import GraphSpec, example_input

DEFAULT_OPSET = 17
EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GiB limit, with room for the graph itself
FP16_TRIAL_ORDER = ("vae_decoder", "transformer", "vae_encoder")  # the upsample graph follows the transformer


def trace_to_onnx(spec: GraphSpec, folder: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Trace the graph into `folder/<name>.onnx` (the exporter puts the tensors of a > 2 GB graph in files
    beside it). The graph is never held in Python: ONNX Runtime reads it from disk, so a 2 B-parameter
    student needs its own weights plus ONNX Runtime's copy, not a third one in a ModelProto."""
    dynamic = {spec.input_name: {0: "batch", 2: "height", 3: "width"},
               spec.output_name: {0: "batch", 2: "out_height", 3: "out_width"}}
    path = Path(folder) / f"{spec.name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            spec.module, (example_input(spec),), str(path), dynamo=False, opset_version=opset,
            input_names=[spec.input_name], output_names=[spec.output_name], dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    return path


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).parent.iterdir() if f.is_file())


def save_optimized(raw: Path, path: Path) -> list[str]:
    """ONNX Runtime's basic optimization of the traced graph `raw`, saved at `path` (one external
    `<name>.onnx.data` file when the weights pass 2 GB); returns the names of the files written."""
    import onnxruntime as ort

    path = Path(path)
    external = folder_bytes(raw) > EXTERNAL_DATA_BYTES
    data_name = path.name + ".data"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    return [path.name, data_name] if external else [path.name]


def run_onnx(path: Path, tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """The graph at `path` on each float32 tensor, in one ONNX Runtime CPU session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: tensor.float().numpy()})[0] for tensor in tensors]
