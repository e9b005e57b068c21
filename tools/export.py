"""``bdmtool export``: checkpoint -> bundle (PyTorch side) -> exporter pipeline (TensorFlow side)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path


from bdmtool.exporter.kernels import MULTIBIT_DEFAULT  # TensorFlow-free

_SAFE_NAME = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,100}")  # no separators, no '..' escape, no hidden files

INT8_OUT_DEFAULT = "channel"  # int8 layers: one output range per channel (docs/methods.md, equalized int8 outputs)


def export_checkpoint(ckpt: str | Path, out: str | Path, target: str = "lce", name: str | None = None,
                      tol: float | None = None, a8: str | None = None, a4: str | None = None,
                      log: Callable[[str], None] = print, allow_float_layers: bool = False, per_layer: bool = False,
                      int8_out: str | None = None):
    """``a8`` / ``a4``: the kernel of W1A8 / W1A4 layers (None = bit planes, the exact path); given for a checkpoint
    without such layers, or for a float target, they are refused rather than ignored. ``int8_out``: the int8
    layers' output range per ``channel`` (equalized; None = that) or per ``tensor``, refused without int8 layers."""
    from bdmtool.trainer.bundle import write_bundle

    log = timed(log)
    given = [f for f, v in (("--a8", a8), ("--a4", a4), ("--int8-out", int8_out)) if v is not None]
    if given and target != "lce":
        raise ValueError(f"{given[0]} chooses the kernel of binary layers; --target {target} has none: drop it")
    if int8_out not in (None, "channel", "tensor"):
        raise ValueError(f"--int8-out must be channel or tensor, not {int8_out!r}")
    a8, a4 = a8 or MULTIBIT_DEFAULT["a8"], a4 or MULTIBIT_DEFAULT["a4"]
    if target == "convs":
        return export_convs(ckpt, out, log=log)
    if target == "fp":
        ckpt = fp_source(ckpt)
    if tol is not None and not tol >= 0:
        raise ValueError(f"--tol must be >= 0, got {tol}")
    if name is not None and not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"--name {name!r} is not a plain file name: use letters, digits, '.', '_' or '-' (the files "
                         "go into --out; pass a different --out to write elsewhere)")
    if target == "lce":  # refuse in a second what the exporter would refuse (or silently accept) after minutes
        preflight(ckpt, a8, a4, allow_float_layers, log, given=tuple(given))
        log("[preflight] checkpoint is exportable")
    log("[bundle] weights, binary-layer records and certified reference inputs ...")
    bundle = write_bundle(ckpt, Path(out) / "bundle")
    log(f"[bundle] {bundle}")
    if target == "fp":
        from bdmtool.exporter.pipeline import export_onnx2tf

        log("[onnx] torch.onnx.export + onnxsim ...")
        onnx_path = write_onnx(ckpt, bundle / "model.onnx")
        log(f"[onnx] {onnx_path}")
        return export_onnx2tf(bundle, onnx_path, out, name=name or "fp", tol=1e-4 if tol is None else tol, log=log)
    from bdmtool.exporter.pipeline import export_lce

    return export_lce(bundle, out, name=name, tol=tol, target=target, a8=a8, a4=a4, log=log, per_layer=per_layer,
                      int8_out=int8_out or INT8_OUT_DEFAULT)


def timed(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` with the seconds since the export started in front of every line."""
    import time

    t0 = time.perf_counter()
    return lambda msg: log(f"{time.perf_counter() - t0:6.1f} s  {msg}")


def preflight(ckpt: str | Path, a8: str = MULTIBIT_DEFAULT["a8"], a4: str = MULTIBIT_DEFAULT["a4"],
              allow_float_layers: bool = False,
              log: Callable[[str], None] = print, given: tuple[str, ...] = ()) -> None:
    """Everything decidable from the checkpoint alone, checked before the bundle: an FP checkpoint, a kernel flag
    (``given``: "--a8" / "--a4") for activations the checkpoint does not have, activation codes with no LCE
    form, per-batch LSQ steps, a padding mode the kernel path cannot reproduce, EBB's second basis on 1-bit
    layers, and binary layers that are still float (an unfinished progressive schedule)."""
    from bdmtool.exporter.kernels import NotExportableError, padding_refusal
    from bdmtool.trainer.checkpoint import checkpoint_spec, inference_weights, load_checkpoint

    ck = load_checkpoint(ckpt)
    b = checkpoint_spec(ck).binarize
    if b is None:
        raise NotExportableError(f"{ckpt} is a full-precision checkpoint: --target lce would write a float model "
                                 "with no LceBconv2d; use --target fp (or keras-fp), or export a binarized student")
    for flag in (f for f in given if f in ("--a8", "--a4")):
        if b.abits != int(flag[3:]):
            raise NotExportableError(f"{flag} chooses the kernel of W1A{flag[3:]} layers, but {ckpt} is "
                                     f"W{b.wbits}A{b.abits}" + (f": use --a{b.abits}" if b.abits in (4, 8) else
                                                                 ": drop it"))
    if b.abits == 1 and b.act not in ("ste_sign", "approx_sign", "rsign", "reste"):
        raise NotExportableError(f"{ckpt}: its 1-bit activation quantizer {b.act!r} has no LCE binary form (it is "
                                 "not a +-1 sign; DoReFa's {0,1} codes would run as float ops); train with a sign "
                                 "activation (e.g. --method xnor) to export to LCE, or export --target fp")
    if b.abits in (4, 8) and b.act == "lsq" and b.lsq_step == "per_batch":
        raise NotExportableError(f"{ckpt}: LSQ step {b.lsq_step!r} is computed from each batch at run time; export "
                                 "needs a learned (constant) step: train with --set binarize.lsq_step=log (the "
                                 "default) or learned")
    if why := padding_refusal(b.to_dict(), a8, a4):
        raise NotExportableError(why)
    if "--int8-out" in given and {8: a8, 4: a4}.get(b.abits) != "int8":
        raise NotExportableError(f"--int8-out sets the output range of int8 layers, but {ckpt} is W{b.wbits}A{b.abits}"
                                 + (f" on bit planes: add --a{b.abits} int8 or drop it" if b.abits in (4, 8) else
                                    ", which has none: drop it"))
    w = inference_weights(ck)
    bad_steps = [(k[:-5], float(v.min())) for k, v in w.items() if k.endswith(".step") and float(v.min()) <= 0]
    if bad_steps:
        raise NotExportableError(
            f"{ckpt}: {len(bad_steps)} layers have a non-positive learned LSQ step ({bad_steps[0][0]}: "
            f"{bad_steps[0][1]:.3g}, ...): the trained quantizer is degenerate there and no int8/bit-plane kernel "
            "reproduces it; retrain with --set binarize.lsq_step=log (the default: steps stay positive), "
            "see docs/methods.md")
    layers = sorted({k.rsplit(".", 1)[0] for k in w if k.endswith(".active")})
    floating = [n for n in layers if not bool(w[f"{n}.active"])]
    two = [n for n in layers if b.abits == 1 and bool(w.get(f"{n}.second_basis", False)) and f"{n}.sigma2" in w]
    if two:
        raise NotExportableError(f"{ckpt}: EBB's second basis is still active in {len(two)} 1-bit layers "
                                 f"({two[0]}, ...) at step {ck['step']}: train past binarize.ebb_stage2_step first")
    if floating:
        msg = (f"{ckpt}: {len(floating)} of {len(layers)} binary layers are still float at step {ck['step']} (the "
               f"progressive schedule has not reached {floating[0]}, ...)")
        if not allow_float_layers:
            raise NotExportableError(msg + ": train longer, or pass --allow-float-layers to export them as float "
                                           "convs on purpose")
        log(f"WARNING: {msg}; exporting them as float convs because --allow-float-layers was given")


def fp_source(ckpt: str | Path) -> str:
    """The FP model behind ``ckpt``: itself when full precision, else the teacher it was trained from."""
    from bdmtool.trainer.checkpoint import read_spec

    spec = read_spec(ckpt)
    if spec.binarize is None:
        return str(ckpt)
    if not spec.teacher or not Path(spec.teacher).exists():
        raise FileNotFoundError(f"--target fp needs the FP teacher of {ckpt}, but {spec.teacher!r} is missing; "
                                "pass the FP checkpoint itself")
    return spec.teacher


def write_onnx(ckpt: str | Path, path: Path) -> Path:
    """torch.onnx.export (opset 17, static batch 1) + onnxsim constant folding (onnx2tf needs the GroupNorm
    scales of torch's InstanceNormalization pattern as constants). onnxsim runs in a subprocess: it
    segfaults in a process that has imported TensorFlow (a clash of their native libraries)."""
    import subprocess
    import sys

    import torch

    from bdmtool.trainer.train import load_model

    model, spec, _ = load_model(ckpt)
    u = spec.unet
    x = torch.zeros(1, u.in_channels, u.resolution, u.resolution)

    class TwoDimT(torch.nn.Module):  # t as [1, 1] like the LCE exports: one input contract for every .tflite
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            return self.inner(x, t.reshape(-1))

    torch.onnx.export(TwoDimT(model), (x, torch.tensor([[1.0]])), str(path), input_names=["x", "t"],
                      output_names=["eps"], opset_version=17, dynamo=False)
    r = subprocess.run([sys.executable, "-m", "onnxsim", str(path), str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"onnxsim failed on {path} (rc={r.returncode}): {r.stderr.strip()[-500:]}")
    return path


def model_layers(ckpt: str | Path | None = None, preset: str | None = None, method: str | None = None) -> list[dict]:
    """Layer shapes of a checkpoint's network, or of a preset (random weights, binarized by ``method``)."""
    from bdmtool.trainer.layers import unet_layer_shapes
    from bdmtool.trainer.spec import BinarizeConfig, DataConfig, TrainSpec, UNetConfig
    from bdmtool.trainer.train import build_model, load_model

    if ckpt is not None:
        model, spec, _ = load_model(ckpt)
    else:
        unet = UNetConfig.from_name(preset)
        spec = TrainSpec(unet=unet, data=DataConfig(channels=unet.in_channels, resolution=unet.resolution),
                         binarize=BinarizeConfig.from_method(method) if method else None,
                         teacher="(random weights)" if method else "")
        model = build_model(spec)
    return [r.to_dict() for r in unet_layer_shapes(model, spec.unet)]


def export_convs(ckpt: str | Path | None, out: str | Path, preset: str | None = None, method: str | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """One binary + one FP micro-model per distinct conv shape of the network (``--target convs``)."""
    from bdmtool.exporter.microconv import write_conv_models

    layers = model_layers(ckpt, preset, method)
    index = write_conv_models(layers, Path(out) / "convs", log=log)
    log(f"[convs] {len(layers)} layers -> {index}")
    return index
