"""int8 ONNX graphs for the CPU through ONNX Runtime's quantization tools, each component's precision measured.

- VAE encoder and decoder: static QDQ (`onnxruntime.quantization.quantize_static`): int8 weights per output
  channel and uint8 activations around every convolution, the activation ranges calibrated (MinMax) on LR
  crops of the *training* photos (never the validation ones the budget scores). ONNX Runtime fuses each
  DequantizeLinear -> Conv -> QuantizeLinear into an integer convolution when the session loads.
- transformer: dynamic int8 for its linear layers (`quantize_dynamic` on the MatMul nodes whose second
  input is a weight): int8 weights, activation scales computed per call, no calibration.
- never quantized: the bicubic upsample (an exact interpolation; quantized alone it cost the built-in student
  7 dB of end-to-end parity and ran slower), the transformer's patch-embedding convolution, and matmuls
  between activations (attention scores).

Which components run int8 is measured, not chosen by hand, as for fp16 (export.onnx): each component's own
graph is quantized alone and compared with PyTorch on the parity photos; it stays int8 when its worst PSNR
is at or above the budget's `[parity] int8` floor, else it stays fp32. The shipped graphs are then validated
against the same budget (parity and quality limits) like any other artifact. ONNX Runtime's dynamic
convolutions (ConvInteger) were measured 5x slower than fp32 on this project's CPU
(docs/export/onnx-int8.md), which is why convolutions get static QDQ instead.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch

# A node belongs to a component by the first part of its scope name in the traced graph.
SCOPE_COMPONENTS = {"encoder": "vae_encoder", "decoder": "vae_decoder", "transformer": "transformer"}
INT8_COMPONENTS = ("vae_decoder", "vae_encoder", "transformer")  # trial order: the decoder costs the most time
STATIC_OPS = {"vae_encoder": ("Conv",), "vae_decoder": ("Conv",)}
# MatMul only: ORT's dynamic quantizer has no integer Gemm (the 2-D linear layers of the conditioning, which
# pre-caching folds away in a pruned student, stay fp32)
DYNAMIC_OPS = {"transformer": ("MatMul",)}
DEFAULT_CALIBRATION_IMAGES = 8
CALIBRATION_HR_SIZE = 256  # LR crops of 64 x 64
CALIBRATION_SEED = 0


def calibration_lr(count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED) -> list[torch.Tensor]:
    """LR crops (1 x 3 x 64 x 64, Real-ESRGAN degradation) of the training photos that calibrate activations."""
    from compress.prune.steps import calibration_pairs

    return [lr for lr, _ in calibration_pairs(count, seed, hr_size=CALIBRATION_HR_SIZE)]


def component_of(node_name: str) -> str | None:
    parts = node_name.split("/")
    return SCOPE_COMPONENTS.get(parts[1]) if len(parts) > 2 else None


def quantizable_nodes(path: Path, components) -> tuple[list[str], list[str]]:
    """(static Conv node names, dynamic linear node names) of `components` in the graph at `path`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    static, dynamic = [], []
    for node in model.graph.node:
        component = component_of(node.name)
        if component not in components:
            continue
        if node.op_type in STATIC_OPS.get(component, ()):
            static.append(node.name)
        elif node.op_type in DYNAMIC_OPS.get(component, ()) and len(node.input) > 1 and node.input[1] in weights:
            dynamic.append(node.name)
    return static, dynamic


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of float32 inputs."""

    def __init__(self, input_name: str, inputs: list[torch.Tensor]):
        self._items = iter([{input_name: tensor.float().numpy()} for tensor in inputs])

    def get_next(self):
        return next(self._items, None)

    def __len__(self):  # quantize_static asks some readers for their length
        return 0


def quantize_graph(fp32: Path, output: Path, components, calibration: list[torch.Tensor],
                   external_data: bool = False) -> dict:
    """Write `output`: the fp32 graph at `fp32` with `components` quantized as the module docstring says;
    returns how many nodes of each kind were quantized. Raises when a component asked for has no node to
    quantize (a graph that does not contain it), so nothing is labelled int8 that is not."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # absolute: the tools run inside a scratch folder (below), where a relative path would name nothing
    fp32, output = Path(fp32).resolve(), Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    static, dynamic = quantizable_nodes(fp32, components)
    found = {component_of(name) for name in static + dynamic}
    missing = [c for c in components if c not in found]
    if missing:
        raise ValueError(f"{fp32.name}: no node of {', '.join(missing)} to quantize")
    # ORT's tools write temporary files into the working directory when shape inference gives up: work in
    # a scratch folder so that nothing is left behind
    with tempfile.TemporaryDirectory(prefix=".quantize.", dir=output.parent) as scratch, contextlib.chdir(scratch):
        scratch = Path(scratch)
        prepared = scratch / "prepared.onnx"
        # symbolic shape inference fails on the dynamic height and width; ONNX's own shape inference runs
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True, save_as_external_data=external_data)
        current = prepared
        if static:
            target = scratch / "static.onnx"
            quantize_static(str(current), str(target), _Reader(input_name, calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv"], nodes_to_quantize=static, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external_data)
            current = target
        if dynamic:
            target = scratch / "dynamic.onnx"
            quantize_dynamic(str(current), str(target), op_types_to_quantize=["MatMul"],
                             nodes_to_quantize=dynamic, weight_type=QuantType.QInt8,
                             use_external_data_format=external_data)
            current = target
        if external_data:
            model = onnx.load(str(current))
            onnx.save(model, str(output), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=output.name + ".data")
        else:
            shutil.move(str(current), output)
    return {"static_conv_nodes": len(static), "dynamic_linear_nodes": len(dynamic)}


def precision_label(int8_components) -> str:
    """The manifest's precision of an end-to-end graph: "int8", "int8+fp32:vae_encoder", or "fp32"."""
    kept = [c for c in INT8_COMPONENTS if c not in int8_components]
    if len(kept) == len(INT8_COMPONENTS):
        return "fp32"
    return "int8" + (f"+fp32:{','.join(kept)}" if kept else "")
