"""Export as a chain of explicit stages, each checked against the previous one:

    bundle (PyTorch reference I/O) -> Keras/Larq model -> LCE flatbuffer -> verified (ops + interpreter)

``export_lce(bundle_dir, out_dir)`` writes ``<name>.tflite``, ``<name>.json`` (the sidecar an app needs)
and ``export_report.json`` (parity per stage, op inventory, sizes), and raises when a stage's parity is
above tolerance or a binary layer did not become an ``LceBconv2d``. This module imports no torch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bdmtool  # noqa: F401

from .convert import convert, convert_float
from .inspect_tflite import inspect_model, io_names, max_abs, verify_binary_layers
from .kernels import (A8_KERNELS, KERNEL_FIDELITY, MULTIBIT_DEFAULT, NotExportableError, multibit_kernel,
                      padding_refusal)
from .runtime import KerasDenoiser, TFLiteDenoiser, ddim_schedule
from ..files import atomic_write, file_sha256


class ParityError(ValueError):
    """A stage's outputs differ from the previous stage's by more than the tolerance (shown as a one-line
    error by the CLI: the export is refused, the files of the failed stage are left for inspection)."""


# Two float implementations of the same graph agree to a few 1e-6 before quantization; a reference input
# whose every pre-quantization value stays this far from a decision boundary must quantize identically.
CERTIFY_MARGIN = 3e-6
# 8-bit activations have 255 decision boundaries per value: the ~1e-6 float differences between frameworks flip
# a few levels on almost every input (no input certifies), each flip moving eps by ~1e-2. The gate for W1A8
# is therefore this looser bound on every input (measured: 0.04-0.05 max |d eps| on the tiny preset).
A8_TOL = 0.1
# The int8 W1A8 path re-quantizes every binary conv's output to 256 levels over its calibrated range (TFLite's
# int8 CONV_2D writes int8): an approximation of the trained model, gated at this bound on every input.
INT8_TOL = 0.25


# An uncertified input may differ by up to this many times its flip envelope: how far PyTorch itself moves when
# every quantizer input moves by <= CERTIFY_MARGIN (trainer/bundle.py flip_envelope, a lower bound from 16 draws).
ENVELOPE_FACTOR = 2.0


def _gate(stage: str, errors: list[float], margins: list[float], envelopes: list[float], tol: float, report: dict,
          log) -> None:
    """Record a stage's parity; fail when a certified sample (margin >= CERTIFY_MARGIN) exceeds ``tol``, or when
    fewer than half of all samples are within their allowance: ``tol``, or for an uncertified sample
    max(tol, ENVELOPE_FACTOR x its flip envelope) -- a level flip that PyTorch itself makes under float-sized
    perturbations is not an export error."""
    cert = [e for e, m in zip(errors, margins) if m >= CERTIFY_MARGIN]
    other = [(e, v) for e, m, v in zip(errors, margins, envelopes) if m < CERTIFY_MARGIN]
    allowance = [tol if m >= CERTIFY_MARGIN else max(tol, ENVELOPE_FACTOR * v)
                 for m, v in zip(margins, envelopes)]
    report["stages"][stage] = max(cert) if cert else sorted(errors)[len(errors) // 2]
    report.setdefault("certified", {})[stage] = bool(cert)
    if other:
        report.setdefault("uncertified", {})[stage] = [e for e, _ in other]
    log(f"[{stage}] max |d eps| on {len(cert)} certified inputs = {max(cert) if cert else float('nan'):.2e}"
        + (f"; uncertified (margin < {CERTIFY_MARGIN:g}): " + ", ".join(f"{e:.1e} (envelope {v:.1e})" for e, v in other)
           if other else ""))
    if not cert:
        log(f"WARNING [{stage}]: no reference input kept every decision {CERTIFY_MARGIN:g} from its boundary "
            "(common with multi-bit activations); each input is held to max(tol, "
            f"{ENVELOPE_FACTOR:g} x how far PyTorch itself moves when its quantizer inputs move by {CERTIFY_MARGIN:g}) "
            "and the median is reported")
    elif max(cert) > tol:
        raise ParityError(f"{stage}: outputs differ by {max(cert):.3e} > {tol} on an input where no bit may flip")
    if sum(e <= a for e, a in zip(errors, allowance)) * 2 < len(errors):
        why = ("" if cert else
               f"; none of the {len(errors)} reference inputs certifies (each has a pre-quantization value closer "
               f"than {CERTIFY_MARGIN:g} to a level boundary, usual for multi-bit activations in a large network) and "
               f"most differ by more than {ENVELOPE_FACTOR:g} x PyTorch's own spread under such perturbations "
               f"({', '.join(f'{v:.3g}' for v in envelopes)}). If the op inventory passed and you accept that, re-run "
               "with a --tol above these numbers; compare the .tflite's samples with `bdmtool eval`")
        raise ParityError(f"{stage}: most reference inputs differ by more than {tol}: "
                          f"{', '.join(f'{e:.3g}' for e in errors)}{why}")


@dataclass
class ExportResult:
    tflite: Path
    sidecar: Path
    report: dict


def read_bundle(bundle_dir: str | Path):
    from .keras_unet import Weights

    d = Path(bundle_dir)
    meta = json.loads((d / "spec.json").read_text())
    with np.load(d / "weights.npz") as z:
        weights = Weights({k: z[k] for k in z.files})
    with np.load(d / "reference_io.npz") as z:
        ref = {k: z[k] for k in z.files}
    return meta, weights, ref


def _inputs_nhwc(ref: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
    return ref["x"][i:i + 1].transpose(0, 2, 3, 1).astype(np.float32), ref["t"][i:i + 1].reshape(1, 1).astype(np.float32)


def _reference_outputs(den, ref: dict) -> list[np.ndarray]:
    """eps (NCHW) for each reference input from an empty cache, then the cached second step if present."""
    outs = []
    for i in range(len(ref["t"])):
        den.reset()
        x, t = _inputs_nhwc(ref, i)
        outs.append(den.step(x, float(t[0, 0])).transpose(0, 3, 1, 2))
    if "eps2" in ref:
        den.reset()
        x0, t0 = _inputs_nhwc(ref, 0)
        den.step(x0, float(t0[0, 0]))
        outs.append(den.step(ref["x2"].transpose(0, 2, 3, 1), float(ref["t2"][0])).transpose(0, 3, 1, 2))
    return outs


def _expected(ref: dict) -> list[np.ndarray]:
    return [ref["eps"][i:i + 1] for i in range(len(ref["t"]))] + ([ref["eps2"]] if "eps2" in ref else [])


def sidecar(meta: dict, inv, name: str, target: str, steps: int = 50, out_names: list[str] = ("eps",),
            cache_shapes: dict | None = None, model_sha256: str | None = None) -> dict:
    """What an app embedding the model needs to know, as JSON (``model_sha256``: the .tflite it describes)."""
    spec = meta["spec"]
    dcfg = spec["diffusion"]
    ddim, abar, T = ddim_schedule(spec, steps)
    b = spec.get("binarize")
    return {
        "model": f"{name}.tflite", "model_sha256": model_sha256, "target": target, "format": "bdmtool-sidecar",
        "version": 1,
        "method": b["method"] if b else "fp", "bits": {"weights": 1 if b else 32, "activations": b["abits"] if b else 32},
        "source_checkpoint_sha256": meta["source_sha256"], "source_step": meta["step"],
        "inputs": [{"name": "x", "tflite_name": inv.inputs[[d["shape"] for d in inv.inputs].index(
                        [1, spec["unet"]["resolution"], spec["unet"]["resolution"], spec["unet"]["in_channels"]])]["name"],
                    "shape": [1, spec["unet"]["resolution"], spec["unet"]["resolution"], spec["unet"]["in_channels"]],
                    "dtype": "float32", "layout": "NHWC",
                    "meaning": "noisy image x_t; pixels scaled as u8 / 127.5 - 1 (range [-1, 1])"},
                   {"name": "t", "shape": [1, 1], "dtype": "float32",
                    "meaning": "the integer timestep t in [0, T-1] as a float (not normalised); the graph computes "
                               "the sinusoidal embedding"}],
        "outputs": [{"name": "eps", "output_index": list(out_names).index("eps"),
                     "shape": inv.outputs[list(out_names).index("eps")]["shape"],
                     "dtype": "float32", "layout": "NHWC", "meaning": "predicted noise epsilon"}],
        "tflite_io_order": {"inputs": io_names(inv.inputs), "outputs": list(out_names)},
        "signature": ("serving_default: inputs and outputs by these names through TFLite's signature runner"
                      if any("signature_name" in d for d in inv.outputs) else None),
        "schedule": {"name": dcfg["schedule"], "beta_start": dcfg["beta_start"], "beta_end": dcfg["beta_end"], "timesteps": T,
                     "alphas_cumprod": [float(v) for v in abar]},
        "sampler": {"name": "ddim", "eta": 0.0, "steps": steps, "skip": "uniform", "timesteps": ddim,
                    "clip_x0": True,
                    "update": "x0 = clip((x - sqrt(1-a_t) eps) / sqrt(a_t), -1, 1); "
                              "eps = (x - sqrt(a_t) x0) / sqrt(1-a_t); "
                              "x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps; a_prev = 1 after the last step; "
                              "the final x0 in [-1, 1] maps to pixels as (x0 + 1) * 127.5",
                    "why_clip": "a small error in the mean of eps is multiplied by sqrt((1-a_t)/a_t) (~100 at high t) "
                                "in x0; clamping x0 keeps it from saturating the image (bdmtool samples this way)"},
        "cache_tensors": [
            {"input": o.replace("cache_out_", "cache_in_"), "output_index": k,
             "shape": (cache_shapes or {}).get(o.replace("cache_out_", "cache_in_")),
             "site": meta["timestep_cache"]["sites"][int(o.rsplit("_", 1)[1])]}
            for k, o in enumerate(out_names) if o.startswith("cache_out_")],
        "cache_protocol": ("" if len(out_names) == 1 else
                           "Per sampling run: set cache_valid=0 and every cache_in_<i> to zeros for the first step; "
                           "after each step copy output[output_index] into cache_in_<i> and set cache_valid=1."),
        "runtime": "LCE custom ops (LceBconv2d, LceQuantize): link the LCE TFLite AAR or use lce_benchmark_model"
                   if inv.histogram.get("LceBconv2d") else "builtin TFLite ops only",
    }


def export_lce(bundle_dir: str | Path, out_dir: str | Path, name: str | None = None, tol: float | None = None,
               target: str = "lce", a8: str = MULTIBIT_DEFAULT["a8"], a4: str = MULTIBIT_DEFAULT["a4"], log=print,
               per_layer: bool = False, int8_out: str = "channel") -> ExportResult:
    """Bundle -> Keras (+ parity) -> LCE flatbuffer -> verified ops + interpreter parity -> files.

    ``a8`` / ``a4`` pick the kernel of W1A8 / W1A4 layers: ``int8`` (one int8 CONV_2D per layer, output
    re-quantized over a calibrated range) or ``bitplanes`` (eight / four LceBconv2d per layer, exact up to
    level flips). ``int8_out``: the int8 output range per ``channel`` (equalized, the default) or per ``tensor``.
    """
    from functools import partial

    from .binary_layers import binary_conv
    from .keras_unet import UNetBuilder

    for flag, value in (("a8", a8), ("a4", a4)):
        if value not in A8_KERNELS:
            raise ValueError(f"{flag}={value!r}: choose one of {A8_KERNELS}")
    meta, weights, ref = read_bundle(bundle_dir)
    if target == "lce" and (why := padding_refusal(meta["spec"].get("binarize"), a8, a4)):
        raise NotExportableError(why)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = meta["spec"].get("binarize")
    abits = b["abits"] if (target == "lce" and b) else None
    kernel = multibit_kernel(abits, a8, a4) if abits else None  # W1A8 / W1A4: "int8" or "bitplanes"
    int8 = kernel == "int8" and any(r["active"] and r["abits"] == abits for r in meta["binary_layers"])
    if tol is None:  # default: 1e-4, or the multi-bit bounds
        tol = INT8_TOL if int8 else A8_TOL if abits == 8 else 1e-4
        if kernel:
            log(f"[lce] W1A{abits} ({kernel}): parity tolerance {tol} (see "
                f"{'INT8_TOL' if int8 else 'A8_TOL' if abits == 8 else 'the default'} in exporter/pipeline.py)")
    if kernel:
        log(f"[lce] W1A{abits} on {kernel}: {KERNEL_FIDELITY[kernel]}")
    name = name or (f"{b['method']}_w1a{b['abits']}" + ("_int8" if int8 else "") if b else "fp")
    if target == "keras-fp" and meta["binary_layers"]:
        meta = {**meta, "binary_layers": []}  # the same Keras rebuild, every layer float (cross-check)
    report: dict = {"name": name, "target": target, "stages": {},
                    "reference": {"timesteps": [float(v) for v in ref["t"]],
                                  "decision_margin": [float(v) for v in ref.get("margin", [])]}}

    if target == "keras-fp":
        meta = {**meta, "timestep_cache": None}
        ref = {k: v for k, v in ref.items() if k not in ("x2", "t2", "eps2")}
    factory = partial(binary_conv, a8=a8, a4=a4)
    if int8:
        from .calibrate import int8_ranges

        log(f"[lce] W1A{abits} int8: calibrating output ranges (reference inputs + 2 DDIM-20 trajectories) ...")
        probes: dict = {}
        calib = UNetBuilder(meta, weights, partial(binary_conv, a8=a8, a4=a4, probes=probes)).build()
        if int8_out not in ("channel", "tensor"):
            raise ValueError(f"int8_out must be 'channel' or 'tensor', not {int8_out!r}")
        ranges = int8_ranges(calib, probes, meta, ref, per_channel=int8_out == "channel")
        report["int8_output_ranges"] = ranges
        report["int8_out"] = int8_out
        log(f"[lce] W1A{abits} int8: calibrated the output range of {len(ranges)} layers on the reference inputs "
            "and 2 DDIM-20 trajectories")
        factory = partial(binary_conv, a8=a8, a4=a4, int8_ranges=ranges)
    report["a8_kernel"] = kernel if abits == 8 else None
    report["a4_kernel"] = kernel if abits == 4 else None
    log(f"[keras] rebuilding the U-Net in Keras/Larq ({len(meta['binary_layers'])} binary layers) ...")
    builder = UNetBuilder(meta, weights, factory)
    model = builder.build()
    keras_out = _reference_outputs(KerasDenoiser(model), ref)
    want = _expected(ref)
    margins = [float(m) for m in ref.get("margin", [np.inf] * len(ref["t"]))]
    margins += [min(margins[:2])] if "eps2" in ref else []  # the cached step reuses samples 0 and 1
    envelopes = [float(v) for v in ref.get("envelope", [0.0] * len(margins))]
    report["reference"]["flip_envelope"] = envelopes

    def gate(stage: str, got: list[np.ndarray], expected: list[np.ndarray]) -> None:
        _gate(stage, [max_abs(a, b) for a, b in zip(got, expected)], margins, envelopes, tol, report, log)

    if target == "lce":
        gate("keras_vs_pytorch", keras_out, want)

    log("[lce] converting with the LCE converter ...")
    fb = convert(model, log)
    path = out / f"{name}.tflite"
    atomic_write(path, fb)
    expected = [r["name"] for r in meta["binary_layers"] if r["active"] and r["abits"] != 32]
    inv = inspect_model(fb, layer_names=[r["name"] for r in meta["binary_layers"]])
    a8_layers = [r["name"] for r in meta["binary_layers"] if r["active"] and r["abits"] == abits] if int8 else []
    verify_binary_layers(inv, [n for n in expected if n not in a8_layers], int8=a8_layers)
    report["ops"] = dict(inv.histogram)
    report["binary_layers"] = len(expected)
    report["bconv_ops"] = inv.histogram.get("LceBconv2d", 0)
    report["int8_conv_ops"] = sum(inv.int8_layers.values())
    report["float_layers"] = builder.float_layers  # first/last conv, time MLP, norms, attention, W1A32, ...
    kinds = Counter(builder.float_layers.values())
    log("[lce] stays float: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()) + " (export_report.json)")
    fp32 = meta.get("fp32_weight_bytes")
    report["fp32_weight_bytes"] = fp32
    log(f"[lce] {path.name}: {inv.file_bytes / 1024:,.1f} KiB, {report['bconv_ops']} LceBconv2d"
        + (f" + {report['int8_conv_ops']} int8 CONV_2D" if int8 else "") + f" for {len(expected)} binary layers"
        + (f"; the FP32 weights of this U-Net are {fp32 / 1024:,.0f} KiB ({fp32 / inv.file_bytes:.1f}x this file)"
           if fp32 and expected else ""))

    # Output order: the flatbuffer's signature names each output; parity below checks the mapping.
    # (LCE's graphdef fallback writes no signature and orders the outputs by name.)
    signed = all("signature_name" in d for d in inv.outputs)
    out_names = ["eps"] if len(model.outputs) == 1 else io_names(inv.outputs) if signed else sorted(model.output_names)
    tfl = _reference_outputs(TFLiteDenoiser(fb, out_names), ref)
    gate("tflite_vs_keras", tfl, keras_out)
    if target == "lce":
        gate("tflite_vs_pytorch", tfl, want)
        if "eps2" in ref and margins[-1] >= CERTIFY_MARGIN:
            report["stages"]["cached_step_tflite_vs_pytorch"] = max_abs(tfl[-1], want[-1])
    report["file_bytes"] = inv.file_bytes
    report["binary_param_bytes"], report["float_param_bytes"] = inv.binary_param_bytes, inv.float_param_bytes
    report["int8_param_bytes"] = inv.int8_param_bytes
    side = sidecar(meta, inv, name, target, out_names=out_names,
                   cache_shapes={c.name.split(":")[0]: list(c.shape) for c in builder.cache_inputs},
                   model_sha256=file_sha256(path))
    if kernel:
        side["bits"][f"a{abits}_kernel"] = kernel
        side["bits"]["fidelity"] = KERNEL_FIDELITY[kernel]
    if "cached_step_tflite_vs_pytorch" in report["stages"]:
        log(f"[lce] cached second step vs PyTorch: max |d eps| = {report['stages']['cached_step_tflite_vs_pytorch']:.2e}")
    if per_layer and target == "lce" and expected:
        from .layer_parity import per_layer_parity

        report["per_layer"], probe_fb = per_layer_parity(meta, weights, ref, factory, fb, log)
        atomic_write(out / f"{name}.probes.tflite", probe_fb)
    side_path = out / f"{name}.json"
    atomic_write(side_path, json.dumps(side, indent=2))
    atomic_write(out / "export_report.json", json.dumps(report, indent=2))
    return ExportResult(path, side_path, report)


def onnx_to_keras(onnx_path: str | Path, memoize: bool = True, log=print):
    """onnx2tf's Keras model of ``onnx_path`` (strict mode: every ambiguous layout checked numerically).

    With ``memoize`` its checks share one evaluation of the graph (exporter/onnx2tf_memo.py; the same model,
    3-4x faster on the tiny U-Net); if that path raises, or any of its check evaluations did (onnx2tf swallows
    some and carries on without the check), the conversion is redone without it.
    """
    import tempfile

    import onnx2tf

    from .onnx2tf_memo import memoized_validation

    def run():
        with tempfile.TemporaryDirectory() as tmp:  # onnx2tf's own saves and float16 file are skipped
            return onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=tmp,
                                   non_verbose=True, disable_model_save=True)

    if not memoize:
        return run()
    ev, error = None, None
    try:
        with memoized_validation(onnx_path) as ev:
            model = run()
    except Exception as e:  # noqa: BLE001 - onnx2tf's own conversion below decides
        error = f"{type(e).__name__}: {e}"
    if ev is not None and ev.failure:  # the root cause, also when onnx2tf swallowed it and failed later
        error = f"a check's evaluation raised {ev.failure}"
    if error is None:
        if ev is not None:
            log(f"[onnx2tf] {ev.checks} layout checks, {ev.layer_calls} layer evaluations (memoized)")
        return model
    log(f"[onnx2tf] memoized checks failed ({error}); converting without them ...")
    return run()


def export_onnx2tf(bundle_dir: str | Path, onnx_path: str | Path, out_dir: str | Path, name: str = "fp",
                   tol: float = 1e-4, log=print) -> ExportResult:
    """Float baseline: a (simplified) ONNX file -> onnx2tf -> float32 .tflite, checked against PyTorch.

    Refuses Flex (TF-select) ops: ``lce_benchmark_model`` and the LCE runtime link none.
    """
    meta, _, ref = read_bundle(bundle_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log("[onnx2tf] rebuilding the ONNX graph in Keras ...")
    model = onnx_to_keras(onnx_path, log=log)
    log("[onnx2tf] converting to a float32 .tflite (TFLite builtins) ...")
    fb = convert_float(model, log)
    path = out / f"{name}.tflite"
    atomic_write(path, fb)
    inv = inspect_model(fb)
    flex = sorted(k for k in inv.histogram if k.startswith("Flex"))
    if flex:
        raise RuntimeError(f"onnx2tf produced Flex ops {flex}; they do not run in LCE / lce_benchmark_model")
    in_names = io_names(inv.inputs)
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    interp = Interpreter(fb, num_threads=1, use_xnnpack=True)
    errs = []
    for i in range(len(ref["t"])):
        x, t = _inputs_nhwc(ref, i)
        feeds = {"x": x, "t": t}  # [1, 1], as in the LCE exports
        y = interp.predict([feeds[n] for n in in_names])
        errs.append(max_abs(y.transpose(0, 3, 1, 2), ref["eps"][i:i + 1]))
    err = max(errs)
    log(f"[onnx2tf] {path.name}: {inv.file_bytes / 1024:.1f} KiB; parity vs PyTorch: max |d eps| = {err:.2e}")
    if not err <= tol:
        raise ParityError(f"onnx2tf .tflite differs from PyTorch by {err:.3e} > {tol}")
    report = {"name": name, "target": "fp", "stages": {"tflite_vs_pytorch": err}, "ops": dict(inv.histogram),
              "bconv_ops": 0, "binary_layers": 0, "file_bytes": inv.file_bytes,
              "binary_param_bytes": 0, "float_param_bytes": inv.float_param_bytes}
    side = sidecar({**meta, "spec": {**meta["spec"], "binarize": None}}, inv, name, "fp",
                   model_sha256=file_sha256(path))
    side["inputs"][0]["tflite_name"] = inv.inputs[in_names.index("x")]["name"]
    t_shape = inv.inputs[in_names.index("t")]["shape"]
    if list(t_shape) != [1, 1]:
        raise RuntimeError(f"onnx2tf gave t the shape {t_shape}; every bdmtool .tflite takes t as [1, 1]")
    side["tflite_io_order"] = {"inputs": in_names, "outputs": ["eps"]}
    side_path = out / f"{name}.json"
    atomic_write(side_path, json.dumps(side, indent=2))
    atomic_write(out / "export_report.json", json.dumps(report, indent=2))
    return ExportResult(path, side_path, report)
