"""``bdmtool export``: checkpoint -> bundle (PyTorch side) -> exporter pipeline (TensorFlow side)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def export_checkpoint(ckpt: str | Path, out: str | Path, target: str = "lce", name: str | None = None,
                      tol: float | None = None, a8: str = "int8", a4: str = "bitplanes",
                      log: Callable[[str], None] = print):
    from bdmtool.trainer.bundle import write_bundle

    if target == "convs":
        return export_convs(ckpt, out, log=log)
    if target == "fp":
        ckpt = fp_source(ckpt)
    if target == "lce":  # refuse in a second what the exporter would refuse after the bundle
        from bdmtool.exporter.binary_layers import NotExportableError, padding_refusal
        from bdmtool.trainer.checkpoint import read_spec

        b = read_spec(ckpt).binarize
        if b is None:
            raise NotExportableError(f"{ckpt} is a full-precision checkpoint: --target lce would write a float model "
                                     "with no LceBconv2d; use --target fp (or keras-fp), or export a binarized student")
        if why := padding_refusal(b.to_dict() if b else None, a8, a4):
            raise NotExportableError(why)
    bundle = write_bundle(ckpt, Path(out) / "bundle")
    log(f"[bundle] {bundle}")
    if target == "fp":
        from bdmtool.exporter.pipeline import export_onnx2tf

        onnx_path = write_onnx(ckpt, bundle / "model.onnx")
        log(f"[onnx] {onnx_path}")
        return export_onnx2tf(bundle, onnx_path, out, name=name or "fp", tol=1e-4 if tol is None else tol, log=log)
    from bdmtool.exporter.pipeline import export_lce

    return export_lce(bundle, out, name=name, tol=tol, target=target, a8=a8, a4=a4, log=log)


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
    torch.onnx.export(model, (x, torch.tensor([1.0])), str(path), input_names=["x", "t"], output_names=["eps"],
                      opset_version=17, dynamo=False)
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
