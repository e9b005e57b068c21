"""Read a ``.tflite`` flatbuffer: operators, which U-Net layer each binary conv implements, parameter bytes.

``inspect_model(bytes) -> ModelInventory``; ``format_inventory`` is what ``bdmtool inspect`` prints.
A silent LCE fallback shows up here as a float ``CONV_2D`` fed by an ``LceDequantize`` (or as a binary
layer with no ``LceBconv2d``); ``verify_binary_layers`` turns that into an error naming the layers.
"""

from __future__ import annotations

import re
from pathlib import Path
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .keras_unet import keras_name, torch_name

_DTYPE_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8, 16: 4}  # TensorType -> bytes/element


@dataclass
class OpRecord:
    index: int
    name: str
    inputs: list[str]
    outputs: list[str]
    options: dict | None = None


@dataclass
class ModelInventory:
    ops: list[OpRecord]
    histogram: Counter
    file_bytes: int
    binary_param_bytes: int  # bit-packed LceBconv2d filters
    float_param_bytes: int  # every other constant buffer
    bconv_layers: dict[str, int] = field(default_factory=dict)  # torch layer name -> number of bconvs
    fallbacks: list[str] = field(default_factory=list)  # float convs/matmuls fed by LceDequantize
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    int8_layers: dict[str, int] = field(default_factory=dict)  # torch layer name -> int8 CONV_2D (W1A8 int8)
    int8_param_bytes: int = 0  # int8 filters of those convolutions


_SUFFIXES = ("__scale", "__kmul", "__gamma", "__bias", "__rprelu", "__sc_add", "__threshold")


def layer_of(tensor_name: str, known: list[str] | None = None) -> str | None:
    """``u/down__0__block__0__conv1__scale/mul;...`` -> ``down.0.block.0.conv1``.

    TFLite keeps at most ~50 characters of a tensor name, so with ``known`` layer names the longest one
    whose Keras name the (possibly truncated) segment starts with, followed by ``__`` or the end, wins.
    """
    parts = tensor_name.split(";")[0].split("/")
    if len(parts) < 2:
        return None
    seg = parts[1]
    if known:
        hits = [n for n in known if seg == keras_name(n) or seg.startswith(keras_name(n) + "__")]  # incl. __bconv
        return max(hits, key=len) if hits else None
    for suffix in _SUFFIXES:
        if seg.endswith(suffix):
            seg = seg[: -len(suffix)]
    seg = re.sub(r"__(b\d+p\d+|bconv|planes|combine)$", "", seg)  # the bit-plane parts of one W1A4/W1A8 layer
    return torch_name(seg)


def check_tflite_file(path: str | Path) -> bytes:
    """The bytes of a .tflite file, or a one-line FileFormatError when it is not a TFLite flatbuffer."""
    from bdmtool.files import FileFormatError

    data = Path(path).read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        what = "it is empty" if not data else "no TFL3 file identifier"
        raise FileFormatError(f"{path} is not a .tflite flatbuffer ({what}); pass a file written by `bdmtool export`")
    return data


def inspect_file(path: str | Path, layer_names: list[str] | None = None) -> ModelInventory:
    """``inspect_model`` of a file, with truncated or damaged flatbuffers reported as one line."""
    from bdmtool.files import FileFormatError

    data = check_tflite_file(path)
    try:
        return inspect_model(data, layer_names)
    except Exception as e:  # flatbuffers raise struct.error, IndexError... on damaged bytes
        raise FileFormatError(f"{path} is a truncated or damaged .tflite ({type(e).__name__}); re-export it "
                              "with `bdmtool export`") from None


def inspect_model(fb: bytes, layer_names: list[str] | None = None) -> ModelInventory:
    import flatbuffers.flexbuffers as fx
    from tensorflow.lite.python import schema_py_generated as s

    m = s.Model.GetRootAsModel(fb, 0)
    sg = m.Subgraphs(0)
    builtin = {v: k for k, v in s.BuiltinOperator.__dict__.items() if not k.startswith("_")}

    def tname(i: int) -> str:
        return sg.Tensors(i).Name().decode() if i >= 0 else ""

    ops, producers = [], {}
    for j in range(sg.OperatorsLength()):
        op = sg.Operators(j)
        oc = m.OperatorCodes(op.OpcodeIndex())
        custom = oc.CustomCode()
        name = custom.decode() if custom else builtin[max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())]
        opts = None
        if custom and op.CustomOptionsLength():
            opts = fx.Loads(bytes(op.CustomOptionsAsNumpy()))
        rec = OpRecord(j, name, [tname(op.Inputs(i)) for i in range(op.InputsLength())],
                       [tname(op.Outputs(i)) for i in range(op.OutputsLength())], opts)
        ops.append(rec)
        for o in range(op.OutputsLength()):
            producers[op.Outputs(o)] = rec
        rec._input_ids = [op.Inputs(i) for i in range(op.InputsLength())]  # type: ignore[attr-defined]

    binary_buffers, int8_buffers, bconv_layers, int8_layers, fallbacks = set(), set(), Counter(), Counter(), []
    for rec in ops:
        if rec.name == "LceBconv2d":
            binary_buffers.add(sg.Tensors(rec._input_ids[1]).Buffer())  # type: ignore[attr-defined]
            # The output carries the layer's name (its per-channel scale is fused into the bconv); the input
            # may not: layers reading the same tensor (attention q, k, v) share one LceQuantize.
            layer = layer_of(rec.outputs[0], layer_names) or layer_of(rec.inputs[0], layer_names)
            if layer:
                bconv_layers[layer] += 1
        elif rec.name == "CONV_2D" and sg.Tensors(rec._input_ids[0]).Type() == 9:  # type: ignore[attr-defined]
            int8_buffers.add(sg.Tensors(rec._input_ids[1]).Buffer())  # type: ignore[attr-defined]
            layer = layer_of(rec.outputs[0], layer_names)
            if layer:
                int8_layers[layer] += 1
        elif rec.name in ("CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "DEPTHWISE_CONV_2D"):
            src = producers.get(rec._input_ids[0])  # type: ignore[attr-defined]
            if src is not None and src.name == "LceDequantize":
                fallbacks.append(layer_of(rec.inputs[0], layer_names) or rec.outputs[0])
    binary_bytes = float_bytes = int8_bytes = 0
    for b in range(m.BuffersLength()):
        size = m.Buffers(b).DataLength()
        if b in binary_buffers:
            binary_bytes += size
        elif b in int8_buffers:
            int8_bytes += size
        else:
            float_bytes += size

    # The saved-model conversion path writes a 'serving_default' signature naming every input and output
    # (x, t, eps, cache_in_<i>, ...); the subgraph's own I/O order is not the Keras order, so names come from it.
    sig_names: dict[int, str] = {}
    for k in range(m.SignatureDefsLength()):
        sd = m.SignatureDefs(k)
        for j in range(sd.InputsLength()):
            sig_names[sd.Inputs(j).TensorIndex()] = sd.Inputs(j).Name().decode()
        for j in range(sd.OutputsLength()):
            sig_names[sd.Outputs(j).TensorIndex()] = sd.Outputs(j).Name().decode()

    def io(indices) -> list[dict]:
        out = []
        for i in indices:
            t = sg.Tensors(i)
            out.append({"name": t.Name().decode(), "shape": [int(v) for v in t.ShapeAsNumpy()],
                        "dtype": {0: "float32", 2: "int32", 9: "int8"}.get(t.Type(), str(t.Type())),
                        **({"signature_name": sig_names[i]} if i in sig_names else {})})
        return out

    return ModelInventory(ops, Counter(o.name for o in ops), len(fb), binary_bytes, float_bytes,
                          dict(bconv_layers), fallbacks,
                          io(sg.Inputs(i) for i in range(sg.InputsLength())),
                          io(sg.Outputs(i) for i in range(sg.OutputsLength())),
                          int8_layers=dict(int8_layers), int8_param_bytes=int8_bytes)


def canonical_form(fb: bytes) -> bytes:
    """The flatbuffer re-packed in a form in which two models that compute the same thing from the same
    weights with the same operators in the same order compare equal byte for byte, whatever their layers were
    called: tensor and subgraph names blanked, no signatures or metadata (the converter's CONVERSION_METADATA
    holds a per-conversion id), and tensors and buffers renumbered in order of first use (the converter orders
    constants by name)."""
    import flatbuffers
    import numpy as np
    from tensorflow.lite.python import schema_py_generated as s

    m = s.ModelT.InitFromObj(s.Model.GetRootAsModel(fb, 0))
    for md in m.metadata or []:
        m.buffers[md.buffer].data = None
    m.signatureDefs = m.metadata = None
    buffer_order = [0]  # buffer 0 is the schema's empty sentinel
    for sg in m.subgraphs:
        order: list[int] = []
        seen: set[int] = set()
        uses = [*sg.inputs] + [i for op in sg.operators for i in [*op.inputs, *op.outputs]] + [*sg.outputs]
        for i in [*uses, *range(len(sg.tensors))]:
            if i >= 0 and i not in seen:
                seen.add(i)
                order.append(i)
        new = {old: k for k, old in enumerate(order)}
        sg.tensors = [sg.tensors[i] for i in order]
        remap = lambda ids: np.array([new[i] if i >= 0 else i for i in ids], dtype=np.int32)  # noqa: E731
        sg.inputs, sg.outputs = remap(sg.inputs), remap(sg.outputs)
        for op in sg.operators:
            op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
        sg.name = b""
        for t in sg.tensors:
            t.name = b""
            buffer_order.append(t.buffer)
    seen_b: set[int] = set()
    order_b = [b for b in [*buffer_order, *range(len(m.buffers))] if not (b in seen_b or seen_b.add(b))]
    new_b = {old: k for k, old in enumerate(order_b)}
    m.buffers = [m.buffers[b] for b in order_b]
    for sg in m.subgraphs:
        for t in sg.tensors:
            t.buffer = new_b[t.buffer]
    b = flatbuffers.Builder(len(fb))
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def io_names(tensors: list[dict]) -> list[str]:
    """Model-level names of inputs/outputs in flatbuffer order: the signature's ('x', 'eps', 'cache_in_0'), or the
    tensor name without onnx2tf's 'serving_default_' prefix and ':0' suffix."""
    return [d.get("signature_name") or d["name"].replace("serving_default_", "").split(":")[0] for d in tensors]


def verify_binary_layers(inv: ModelInventory, expected: list[str], int8: list[str] = ()) -> None:
    """Fail loudly when a layer the checkpoint marks binary did not become an ``LceBconv2d`` (or, for the
    ``int8`` W1A8 layers, an int8 ``CONV_2D``)."""
    from .binary_layers import NotExportableError

    missing = [n for n in expected if inv.bconv_layers.get(n, 0) == 0]
    not_int8 = [n for n in int8 if inv.int8_layers.get(n, 0) != 1]
    if missing or inv.fallbacks or not_int8:
        reasons = []
        if missing:
            reasons.append(f"{len(missing)} binary layer(s) have no LceBconv2d: {missing[:8]}")
        if not_int8:
            reasons.append(f"{len(not_int8)} W1A8 layer(s) are not one int8 CONV_2D: {not_int8[:8]}")
        if inv.fallbacks:
            reasons.append(f"float convolution fed by LceDequantize (an op between the sign and the conv, "
                           f"or a non-binary filter) at: {inv.fallbacks[:8]}")
        raise NotExportableError("LCE did not produce binary kernels where the checkpoint requires them; "
                                 + "; ".join(reasons))


def _io_text(d: dict) -> str:
    sig = f"{d['signature_name']} = " if "signature_name" in d else ""
    return f"{sig}{d['name']} {d['shape']} {d['dtype']}"


def format_inventory(inv: ModelInventory) -> str:
    lines = [f"file size: {inv.file_bytes / 1024:.1f} KiB",
             f"parameters: binary (bit-packed) {inv.binary_param_bytes / 1024:.1f} KiB, "
             f"float/other {inv.float_param_bytes / 1024:.1f} KiB",
             "inputs:  " + ", ".join(_io_text(d) for d in inv.inputs),
             "outputs: " + ", ".join(_io_text(d) for d in inv.outputs),
             f"LceBconv2d: {inv.histogram.get('LceBconv2d', 0)} ops over {len(inv.bconv_layers)} layers",
             *([f"int8 CONV_2D: {sum(inv.int8_layers.values())} ops over {len(inv.int8_layers)} layers, "
                f"{inv.int8_param_bytes / 1024:.1f} KiB int8 filters"] if inv.int8_layers else []),
             "op histogram:"]
    width = max((len(k) for k in inv.histogram), default=4)
    lines += [f"  {k:<{width}}  {v}" for k, v in inv.histogram.most_common()]
    if inv.fallbacks:
        lines.append(f"WARNING: float convolutions fed by LceDequantize: {inv.fallbacks}")
    return "\n".join(lines)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
