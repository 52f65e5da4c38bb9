"""Core ML packages of the exported graphs (export.graphs), their spec-level checks and, on macOS, their parity.

Conversion goes through `torch.export` (coremltools' `torch.jit.trace` route breaks on numpy 2) into an
ML Program for iOS 17 / macOS 14, optionally with palettized (k-means LUT) or int8 weights. On Linux
coremltools converts, saves and reads packages but cannot run them, so `inspect_mlpackage` and
`check_mlpackage` read only the protobuf spec, and `coreml_parity` / `coreml_latency` report "skipped"
there (never "passed") unless a `predictor` is injected.

`compress_mlpackage` compresses an already saved package, so one conversion serves several compressions.
Several LR shapes become `ct.EnumeratedShapes`. The graph is then exported with symbolic H and W; three
rewrites make that graph convertible, all checked before conversion (see `_export_dynamic`).
"""

from __future__ import annotations

import math
import operator
import os
import shutil
import statistics
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.models.student import OneStepSR
from export.graphs import GRAPH_NAMES, GraphSpec, graph_specs
from export.parity import parity_psnr

PRECISIONS = ("fp16", "fp32")
PALETTIZE_BITS = (1, 2, 3, 4, 6, 8)
SKIPPED_WHY = "Core ML runs models only on macOS; coremltools on Linux converts and inspects them but cannot predict"

# MIL DataType enum values (coremltools.proto.MIL_pb2.DataType) used below.
_MIL_DTYPES = {10: "fp16", 11: "fp32", 12: "fp64", 13: "bf16", 21: "int8", 22: "int16", 23: "int32",
               24: "int64", 25: "int4", 31: "uint8", 35: "uint4", 1: "bool", 2: "string"}
_FLOAT_DTYPES = ("fp16", "fp32", "fp64", "bf16")
_LUT_OPS = ("constexpr_lut_to_dense",)
_QUANT_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
_NOT_COMPUTE = ("const", "cast") + _LUT_OPS + _QUANT_OPS + ("constexpr_sparse_to_dense", "constexpr_cast")


# -- conversion -------------------------------------------------------------------------------------------

def convert_coreml(
    student: OneStepSR,
    out_dir: Path | str,
    *,
    graphs: Iterable[str] = ("end_to_end",),
    precision: str = "fp16",
    palettize_bits: int | None = None,
    int8: bool = False,
    shapes: Sequence[tuple[int, int]] = ((64, 64),),
) -> dict[str, dict[str, Any]]:
    """Convert each named graph to `out_dir/<graph>.mlpackage` for the given LR shapes (H, W); one shape is a
    fixed input, several are `ct.EnumeratedShapes` (batch 1). All arguments are checked before any work.
    Returns {graph: record}; `check_mlpackage(path, record)` re-checks a saved package against it."""
    graphs = tuple(graphs)
    lr_shapes = _normalise_shapes(shapes)
    unknown = [name for name in graphs if name not in GRAPH_NAMES]
    if unknown or not graphs:
        raise ValueError(f"unknown graph(s) {unknown or '(none given)'}; known: {list(GRAPH_NAMES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if palettize_bits is not None and int8:
        raise ValueError("choose one weight compression: palettize_bits or int8, not both")
    if palettize_bits is not None and palettize_bits not in PALETTIZE_BITS:
        raise ValueError(f"palettize_bits must be one of {PALETTIZE_BITS}, got {palettize_bits!r}")
    if student.dtype != torch.float32 or student.device.type != "cpu":
        raise ValueError(f"convert_coreml needs a float32 CPU student, got {student.dtype} on {student.device}; "
                         "use student.to_runtime('cpu', torch.float32)")
    specs = graph_specs(student, graphs)
    plans = [(spec, _graph_shapes(student, spec, lr_shapes)) for spec in specs]  # raises on a bad shape

    import coremltools as ct

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compression = (f"palettize-{palettize_bits}bit" if palettize_bits is not None else "int8" if int8 else None)
    records: dict[str, dict[str, Any]] = {}
    for spec, graph_shapes in plans:
        started = time.perf_counter()
        program = _exported_program(student, spec, graph_shapes)
        full = [(1, spec.channels, h, w) for h, w in graph_shapes]
        shape = full[0] if len(full) == 1 else ct.EnumeratedShapes(shapes=full, default=full[0])
        mlmodel = ct.convert(
            program,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS17,
            inputs=[ct.TensorType(name=spec.input_name, shape=shape, dtype=np.float32)],
            outputs=[ct.TensorType(name=spec.output_name, dtype=np.float32)],
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            skip_model_load=True,  # loading compiles the model, which only macOS can do; the package is enough
        )
        mlmodel = _compress(mlmodel, palettize_bits, int8)
        mlmodel.short_description = f"tinysr-toolkit {spec.name} graph ({precision}, {compression or 'no compression'})"
        final = out_dir / f"{spec.name}.mlpackage"
        _save_atomically(mlmodel, final)
        records[spec.name] = {
            "file": final.name,
            "input": spec.input_name,
            "output": spec.output_name,
            "shapes": [list(s) for s in full],
            "precision": precision,
            "compression": compression,
            "bytes": package_bytes(final),
            "seconds": round(time.perf_counter() - started, 2),
        }
    return records


def _normalise_shapes(shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for shape in shapes:
        if len(tuple(shape)) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
            raise ValueError(f"each shape must be a (height, width) pair of positive ints, got {shape!r}")
        pair = (int(shape[0]), int(shape[1]))
        if pair not in out:
            out.append(pair)
    if not out:
        raise ValueError("give at least one LR shape")
    return out


def _graph_shapes(student: OneStepSR, spec: GraphSpec, lr_shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The graph's input (H, W) for each LR shape, each checked against the graph's multiple and, for graphs
    with the transformer, its position table."""
    scale, down = student.settings.upscale, student.vae_downsample
    factor = {"vae_encoder": scale, "transformer": scale / down, "vae_decoder": scale / down}.get(spec.name, 1)
    out = []
    for h, w in lr_shapes:
        gh, gw = int(h * factor), int(w * factor)
        if gh != h * factor or gw != w * factor or gh % spec.multiple or gw % spec.multiple:
            via = "" if factor == 1 else f" (the {spec.name} input {h * factor:g}x{w * factor:g})"
            raise ValueError(f"LR shape {h}x{w}{via} is not a multiple of {spec.multiple}, which graph "
                             f"'{spec.name}' needs")
        limit = student.max_latent_side
        if limit is not None and spec.name in ("end_to_end", "transformer"):
            latent = (h * scale // down, w * scale // down)
            if max(latent) > limit:
                raise ValueError(f"LR shape {h}x{w} gives a {latent[0]}x{latent[1]} latent, over the transformer's "
                                 f"limit of {limit}; tile it (compress.pipeline) or export the components")
        out.append((gh, gw))
    return out


def _example(spec: GraphSpec, hw: tuple[int, int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (1, spec.channels, *hw)
    if spec.input_name == "lr":
        return torch.rand(shape, generator=generator)
    if spec.input_name == "image":
        return torch.rand(shape, generator=generator) * 2 - 1
    return torch.randn(shape, generator=generator)


# Exported programs of the last few (student, graph, shapes), so converting one graph at several precisions
# or compressions exports once. A hit needs the same live student with untouched parameters and buffers.
_EXPORTS: OrderedDict[tuple, tuple[weakref.ref, tuple, Any]] = OrderedDict()
_EXPORTS_KEPT = 2


def _fingerprint(module: torch.nn.Module) -> tuple:
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return tuple((name, t.data_ptr(), t._version, tuple(t.shape)) for name, t in tensors)


def _exported_program(student: OneStepSR, spec: GraphSpec, graph_shapes: list[tuple[int, int]]):
    key = (id(student), spec.name, tuple(graph_shapes))
    fingerprint = _fingerprint(student)
    hit = _EXPORTS.get(key)
    if hit is not None and hit[0]() is student and hit[1] == fingerprint:
        _EXPORTS.move_to_end(key)
        return hit[2]
    if len(graph_shapes) == 1:
        program = torch.export.export(spec.module, (_example(spec, graph_shapes[0]),)).run_decompositions({})
    else:
        program = _export_dynamic(spec, graph_shapes)
    _EXPORTS[key] = (weakref.ref(student), fingerprint, program)
    while len(_EXPORTS) > _EXPORTS_KEPT:
        _EXPORTS.popitem(last=False)
    return program


def _export_dynamic(spec: GraphSpec, graph_shapes: list[tuple[int, int]]):
    """Export with symbolic H/W over the enumerated shapes, then make the graph convertible by coremltools 9:

    1. the exporter's shape guards (e.g. "H divisible by 4", which it could only express as derived dims that
       coremltools rejects as input sizes) stay as runtime asserts; the program is run on every enumerated shape
       with those asserts in place, so they hold for every shape Core ML will accept, and are then removed;
       after the rewrites below it is run again and must give the same outputs;
    2. coremltools turns Python `//` on sizes into fp32, which then breaks integer slicing (the position-table
       crop): each such result is cast back with `int`;
    3. Core ML tensors have rank <= 5; SD3's unpatchify reshapes to rank 6 with a leading batch of 1, which
       coremltools folds away only for static shapes: that unit axis is dropped (batch is always 1 here).
    """
    heights = sorted({h for h, _ in graph_shapes})
    widths = sorted({w for _, w in graph_shapes})
    axes = {}
    if len(heights) > 1:
        axes[2] = torch.export.Dim(f"{spec.input_name}_height", min=heights[0], max=heights[-1])
    if len(widths) > 1:
        axes[3] = torch.export.Dim(f"{spec.input_name}_width", min=widths[0], max=widths[-1])
    example = _example(spec, graph_shapes[0])
    program = torch.export.export(
        spec.module, (example,), dynamic_shapes={spec.input_name: axes},
        prefer_deferred_runtime_asserts_over_guards=True,
    ).run_decompositions({})
    examples = [_example(spec, hw) for hw in graph_shapes]
    with torch.no_grad():
        runnable = program.module()
        expected = []
        for hw, x in zip(graph_shapes, examples):
            try:
                expected.append(runnable(x))
            except Exception as error:  # an assert the exporter derived, or a shape the graph cannot take
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ValueError(f"graph '{spec.name}' cannot take input {hw[0]}x{hw[1]} with the other "
                                 f"enumerated shapes {graph_shapes}: {first}") from error
    graph = program.graph
    asserts = (torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_tensor_metadata.default)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in asserts:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is operator.floordiv:
            with graph.inserting_after(node):
                as_int = graph.call_function(int, (node,))
            node.replace_all_uses_with(as_int, delete_user_cb=lambda user, keep=as_int: user is not keep)
    _drop_unit_batch_from_rank6(graph)
    program.graph_module.recompile()
    with torch.no_grad():  # the rewrites must not change what the graph computes
        runnable = program.module()
        for hw, x, want in zip(graph_shapes, examples, expected):
            got = runnable(x)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"rewriting graph '{spec.name}' for enumerated shapes changed its output at "
                                   f"{hw[0]}x{hw[1]}; convert the shapes one at a time")
    return program


_RESHAPES = ("aten::view", "aten::reshape", "aten::_unsafe_view")


def _op_name(node) -> str:
    return node.target.name() if hasattr(node.target, "name") else str(node.target)


def _drop_unit_batch_from_rank6(graph) -> None:
    """view(x, [1, a..f]) -> einsum('n...->n...') / permute(0, ...) becomes view(x, [a..f]) -> permute without
    the unit axis; what follows (clone, the reshape back to rank 4) takes either. Anything else is left for
    coremltools to reject with its own message."""
    for node in list(graph.nodes):
        if node.op != "call_function" or _op_name(node).split(".")[0] not in _RESHAPES:
            continue
        sizes = node.args[1]
        if not isinstance(sizes, (list, tuple)) or len(sizes) <= 5 or not (isinstance(sizes[0], int) and sizes[0] == 1):
            continue
        users = list(node.users)
        rewrites = []
        for user in users:
            name = _op_name(user).split(".")[0]
            if name == "aten::einsum" and len(user.args[1]) == 1:
                source, target = user.args[0].replace(" ", "").split("->")
                if len(source) != len(sizes) or not target or target[0] != source[0]:
                    break
                perm = [source[1:].index(letter) for letter in target[1:]]
            elif name == "aten::permute" and user.args[1][0] == 0:
                perm = [axis - 1 for axis in list(user.args[1])[1:]]
            else:
                break
            rewrites.append((user, perm))
        else:
            node.args = (node.args[0], list(sizes[1:]))
            for user, perm in rewrites:
                with graph.inserting_before(user):
                    permuted = graph.call_function(torch.ops.aten.permute.default, (node, perm))
                user.replace_all_uses_with(permuted)
                graph.erase_node(user)


def _compress(mlmodel, palettize_bits: int | None, int8: bool):
    if palettize_bits is None and not int8:
        return mlmodel
    import coremltools.optimize.coreml as cto

    if palettize_bits is not None:
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=palettize_bits, mode="kmeans"))
        return cto.palettize_weights(mlmodel, config)
    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
    return cto.linear_quantize_weights(mlmodel, config)


def compress_mlpackage(
    source: Path | str,
    out_dir: Path | str,
    *,
    palettize_bits: int | None = None,
    int8: bool = False,
) -> dict[str, Any]:
    """Compress the weights of a saved, uncompressed package into `out_dir/<same name>`, so one conversion can
    be tried at several compressions without exporting and converting again. Returns a `convert_coreml` record."""
    import coremltools as ct

    source, out_dir = Path(source), Path(out_dir)
    if palettize_bits is None and not int8:
        raise ValueError("give palettize_bits or int8")
    if palettize_bits is not None and int8:
        raise ValueError("choose one weight compression: palettize_bits or int8, not both")
    if palettize_bits is not None and palettize_bits not in PALETTIZE_BITS:
        raise ValueError(f"palettize_bits must be one of {PALETTIZE_BITS}, got {palettize_bits!r}")
    info = inspect_mlpackage(source)
    if info["compression"] is not None:
        raise ValueError(f"{source} already has {info['compression']} weights; compress the uncompressed package")
    if len(info["inputs"]) != 1 or len(info["outputs"]) != 1:
        raise ValueError(f"{source}: expected one input and one output")
    if source.resolve() == (out_dir / source.name).resolve():
        raise ValueError(f"compress_mlpackage would overwrite its source {source}; give another out_dir")
    mlmodel = _compress(ct.models.MLModel(str(source), skip_model_load=True), palettize_bits, int8)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / source.name
    _save_atomically(mlmodel, final)
    return {
        "file": final.name,
        "input": info["inputs"][0]["name"],
        "output": info["outputs"][0]["name"],
        "shapes": info["inputs"][0]["shapes"],
        "precision": info["precision"],
        "compression": f"palettize-{palettize_bits}bit" if palettize_bits is not None else "int8",
        "bytes": package_bytes(final),
    }


def _save_atomically(mlmodel, final: Path) -> None:
    """Save beside `final` under a temporary name and swap it in, so a reader never sees half a package."""
    partial = final.with_name(f".{final.stem}.partial-{os.getpid()}.mlpackage")
    old = final.with_name(f".{final.stem}.old-{os.getpid()}.mlpackage")
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        mlmodel.save(str(partial))
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def package_bytes(path: Path | str) -> int:
    """Total size of the files in a package (or one file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- inspection -------------------------------------------------------------------------------------------

def inspect_mlpackage(path: Path | str) -> dict[str, Any]:
    """Spec-level facts of a saved package, read from its protobuf without compiling or running it.

    Keys: path, bytes (the whole package), weights_bytes (its weight blobs), spec_version, is_mlprogram, opset,
    inputs and outputs (name, dtype, shapes: the fixed shape or the enumerated list, flexibility: fixed /
    enumerated / range / unspecified), precision (fp16 / fp32 / mixed: from the float dtypes the compute ops
    produce, casts and constants left out), op_dtypes (those counts), compression (None, "palettize-<n>bit",
    "int8", or a '+'-joined mix), palettized_ops, lut_bits,
    quantized_ops, quantized_dtypes, num_ops, op_types (count per MIL op type), metadata (user-defined).
    """
    import coremltools as ct

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Core ML package at {path}")
    spec = ct.utils.load_spec(str(path))
    report: dict[str, Any] = {
        "path": str(path),
        "bytes": package_bytes(path),
        "weights_bytes": package_bytes(path / "Data" / "com.apple.CoreML" / "weights")
        if (path / "Data" / "com.apple.CoreML" / "weights").exists() else 0,
        "spec_version": int(spec.specificationVersion),
        "is_mlprogram": spec.WhichOneof("Type") == "mlProgram",
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output],
        "metadata": dict(spec.description.metadata.userDefined),
    }
    if not report["is_mlprogram"]:
        report.update(opset=None, precision="unknown", op_dtypes={}, compression=None, palettized_ops=0,
                      lut_bits=[], quantized_ops=0, quantized_dtypes=[], num_ops=0, op_types={})
        return report

    operations = []
    opsets = set()
    for function in spec.mlProgram.functions.values():
        opsets.add(function.opset)
        block = function.block_specializations[function.opset]
        operations.extend(_walk(block))
    const_types = {}
    for op in operations:
        if op.type == "const" and op.outputs:
            const_types[op.outputs[0].name] = op.outputs[0].type.tensorType
    op_types: dict[str, int] = {}
    dtype_counts = {"fp16": 0, "fp32": 0}
    lut_bits: set[int] = set()
    quantized_dtypes: set[str] = set()
    palettized = quantized = 0
    for op in operations:
        op_types[op.type] = op_types.get(op.type, 0) + 1
        if op.type in _LUT_OPS:
            palettized += 1
            lut = _argument_type(op, "lut", const_types)
            if lut is not None and lut.dimensions:
                # iOS16: lut is [2^n]; iOS18: [..., 2^n, vector size]
                size = lut.dimensions[0 if len(lut.dimensions) == 1 else -2].constant.size
                if size > 0:
                    lut_bits.add(round(math.log2(size)))
        elif op.type in _QUANT_OPS:
            quantized += 1
            data = _argument_type(op, "quantized_data" if op.type == "constexpr_affine_dequantize" else "data",
                                  const_types)
            if data is not None:
                quantized_dtypes.add(_MIL_DTYPES.get(data.dataType, str(data.dataType)))
        if op.type in _NOT_COMPUTE or op.type.startswith("constexpr"):
            continue
        floats = {_MIL_DTYPES.get(o.type.tensorType.dataType) for o in op.outputs if o.type.HasField("tensorType")}
        floats &= set(_FLOAT_DTYPES)
        if "fp16" in floats:
            dtype_counts["fp16"] += 1
        elif "fp32" in floats:
            dtype_counts["fp32"] += 1
    if dtype_counts["fp16"] and not dtype_counts["fp32"]:
        precision = "fp16"
    elif dtype_counts["fp32"] and not dtype_counts["fp16"]:
        precision = "fp32"
    elif dtype_counts["fp16"]:
        precision = "mixed"
    else:
        precision = "unknown"
    kinds = [f"palettize-{bits}bit" for bits in sorted(lut_bits)]
    if palettized and not lut_bits:
        kinds.append("palettize")
    kinds += sorted(quantized_dtypes) if quantized_dtypes else (["quantized"] if quantized else [])
    report.update(
        opset=next(iter(opsets)) if len(opsets) == 1 else sorted(opsets),
        precision=precision,
        op_dtypes=dtype_counts,
        compression="+".join(kinds) if kinds else None,
        palettized_ops=palettized,
        lut_bits=sorted(lut_bits),
        quantized_ops=quantized,
        quantized_dtypes=sorted(quantized_dtypes),
        num_ops=len(operations),
        op_types=dict(sorted(op_types.items())),
    )
    return report


def _walk(block) -> list:
    """All operations of a MIL block, nested blocks (cond, while) included."""
    found = []
    for op in block.operations:
        found.append(op)
        for inner in op.blocks:
            found.extend(_walk(inner))
    return found


def _argument_type(op, name: str, const_types: dict):
    """The tensor type of an op's argument: an attribute (iOS16/17 constexpr ops) or a bound const (iOS18)."""
    if name in op.attributes:
        return op.attributes[name].type.tensorType
    if name in op.inputs:
        for argument in op.inputs[name].arguments:
            if argument.name in const_types:
                return const_types[argument.name]
    return None


def _feature(feature) -> dict[str, Any]:
    kind = feature.type.WhichOneof("Type")
    entry: dict[str, Any] = {"name": feature.name, "kind": kind}
    if kind != "multiArrayType":
        return entry
    array = feature.type.multiArrayType
    from coremltools.proto import FeatureTypes_pb2

    entry["dtype"] = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType).lower()
    default = [int(s) for s in array.shape]
    flexibility = array.WhichOneof("ShapeFlexibility")
    if flexibility == "enumeratedShapes":
        entry["flexibility"] = "enumerated"
        entry["shapes"] = [[int(s) for s in shape.shape] for shape in array.enumeratedShapes.shapes]
    elif flexibility == "shapeRange":
        entry["flexibility"] = "range"
        entry["ranges"] = [[int(r.lowerBound), int(r.upperBound)] for r in array.shapeRange.sizeRanges]
        entry["shapes"] = [default] if default else []
    elif default:
        entry["flexibility"] = "fixed"
        entry["shapes"] = [default]
    else:  # e.g. the output of a model with enumerated inputs: Core ML infers it per prediction
        entry["flexibility"] = "unspecified"
        entry["shapes"] = []
    entry["default_shape"] = default
    return entry


def check_mlpackage(path: Path | str, expected: Mapping[str, Any]) -> list[str]:
    """One line per way the saved package differs from the record `convert_coreml` returned (empty: it matches):
    an ML Program, the input and output names, the input shapes, the compute precision and the compression."""
    found = inspect_mlpackage(path)
    problems = []
    if not found["is_mlprogram"]:
        problems.append(f"{path}: not an ML Program")
    inputs = {f["name"]: f for f in found["inputs"]}
    outputs = [f["name"] for f in found["outputs"]]
    if expected.get("input") not in inputs:
        problems.append(f"input: expected {expected.get('input')!r}, package has {sorted(inputs)}")
    compared = inputs.get(expected.get("input")) or (found["inputs"][0] if len(found["inputs"]) == 1 else None)
    if compared is not None:
        want = sorted(list(map(int, s)) for s in expected.get("shapes", []))
        have = sorted(compared.get("shapes", []))
        if want != have:
            problems.append(f"input shapes: expected {want}, package has {have}")
    if expected.get("output") not in outputs:
        problems.append(f"output: expected {expected.get('output')!r}, package has {outputs}")
    if expected.get("precision") != found["precision"]:
        problems.append(f"precision: expected {expected.get('precision')}, package computes in {found['precision']} "
                        f"(fp16 ops {found['op_dtypes'].get('fp16', 0)}, fp32 ops {found['op_dtypes'].get('fp32', 0)})")
    if expected.get("compression") != found["compression"]:
        problems.append(f"compression: expected {expected.get('compression')}, package has {found['compression']} "
                        f"({found['palettized_ops']} LUT ops, {found['quantized_ops']} quantized ops)")
    return problems


# -- running (macOS, or an injected predictor) ------------------------------------------------------------

Predictor = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]


def _predictor(path: Path | str, predictor: Predictor | None) -> Predictor | None:
    if predictor is not None:
        return predictor
    if sys.platform != "darwin":
        return None
    import coremltools as ct

    return ct.models.MLModel(str(path)).predict


def _io(path: Path | str) -> tuple[str, str, list[list[int]]]:
    """(input name, output name, the input shapes the package takes; empty when it declares a range)."""
    report = inspect_mlpackage(path)
    if len(report["inputs"]) != 1 or len(report["outputs"]) != 1:
        raise ValueError(f"{path}: expected one input and one output, found {len(report['inputs'])} and "
                         f"{len(report['outputs'])}")
    feature = report["inputs"][0]
    takes = [] if feature.get("flexibility") == "range" else feature.get("shapes", [])
    return feature["name"], report["outputs"][0]["name"], takes


def _check_shape(path: Path | str, x: np.ndarray, takes: list[list[int]]) -> None:
    if takes and list(x.shape) not in takes:
        raise ValueError(f"input shape {list(x.shape)} is not one {path} takes: {takes}")


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float64)


def coreml_parity(
    path: Path | str,
    reference_fn: Callable[[np.ndarray], Any],
    inputs: Sequence[np.ndarray],
    *,
    predictor: Predictor | None = None,
    peak: float = 1.0,
) -> dict[str, Any]:
    """PSNR (dB, against `peak`: 1.0 for outputs in [0, 1], 2.0 for [-1, 1]) and max abs diff of the package's
    output against `reference_fn(x)` for each float32 input. Runs the package on macOS or through an injected
    `predictor` (called like `MLModel.predict`); elsewhere returns status "skipped" with the reason, never a pass."""
    run = _predictor(path, predictor)
    if run is None:
        return {"status": "skipped", "why": SKIPPED_WHY}
    input_name, output_name, takes = _io(path)
    inputs = [np.ascontiguousarray(x, dtype=np.float32) for x in inputs]
    for x in inputs:
        _check_shape(path, x, takes)
    results = []
    for x in inputs:
        got = _as_numpy(run({input_name: x})[output_name])
        want = _as_numpy(reference_fn(x))
        if got.shape != want.shape:
            raise ValueError(f"Core ML output {output_name} has shape {list(got.shape)}, the reference "
                             f"{list(want.shape)}, for input {list(x.shape)}")
        results.append({"shape": list(x.shape), **parity_psnr(got, want, peak)})
    return {
        "status": "measured",
        "runner": "injected predictor" if predictor is not None else "Core ML",
        "peak": peak,
        "results": results,
        # a non-finite output counts as the worst possible parity
        "min_psnr_db": min(r["psnr_db"] if r["finite"] else -math.inf for r in results) if results else None,
        "max_abs_diff": max(r["max_abs_diff"] if r["finite"] else math.inf for r in results) if results else None,
    }


def coreml_latency(
    path: Path | str,
    input: np.ndarray,
    repeats: int = 10,
    *,
    predictor: Predictor | None = None,
    warmup: int = 1,
) -> dict[str, Any]:
    """Seconds per prediction (median and spread over `repeats`, after `warmup` runs), with the same skip rule
    as `coreml_parity`: no macOS and no injected predictor -> status "skipped"."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    run = _predictor(path, predictor)
    if run is None:
        return {"status": "skipped", "why": SKIPPED_WHY}
    input_name, _, takes = _io(path)
    feed = {input_name: np.ascontiguousarray(input, dtype=np.float32)}
    _check_shape(path, feed[input_name], takes)
    for _ in range(warmup):
        run(feed)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(feed)
        seconds.append(time.perf_counter() - started)
    ordered = sorted(seconds)
    return {
        "status": "measured",
        "runner": "injected predictor" if predictor is not None else "Core ML",
        "repeats": repeats,
        "median_s": statistics.median(seconds),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "stdev_s": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
    }
