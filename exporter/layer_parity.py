"""Per-layer parity: where, layer by layer, the ``.tflite`` departs from PyTorch (``bdmtool export --per-layer``).

The LCE interpreter exposes no intermediate tensors, so the exporter builds a *probe* twin of the exported
graph: the same Keras/Larq rebuild with every binary layer's output added as a model output (``probe_<i>``),
converted by the same LCE converter, and runs it on the bundle's first reference input (a first sampling
step: BiDM caches empty). Each probe is compared with the PyTorch output of that layer that ``write_bundle``
recorded on the same input (``reference_io.npz``: ``layer_out::<name>``): max |d|, max |d| relative to the
layer's output range, and the cosine similarity. The probe twin's own eps is compared with the exported
file's, so a reader knows the extra outputs did not change the computation. This module imports no torch.
"""

from __future__ import annotations

import numpy as np

from .convert import convert
from .inspect_tflite import max_abs
from .keras_unet import UNetBuilder
from .runtime import TFLiteDenoiser

PREFIX = "layer_out::"


def layer_metrics(tflite: np.ndarray, torch: np.ndarray) -> dict:
    """max |d|, max |d| / (max |torch| + 1e-12), cosine similarity of two outputs of one layer (any layout with
    the same number of elements; PyTorch NCHW is transposed to NHWC by the caller)."""
    a, b = np.asarray(tflite, np.float64).ravel(), np.asarray(torch, np.float64).ravel()
    d = float(np.abs(a - b).max())
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cos = float(a @ b / denom) if denom > 0 else (1.0 if not a.any() and not b.any() else 0.0)
    return {"max_abs": d, "max_rel": d / (float(np.abs(b).max()) + 1e-12), "cosine": cos}


def to_nhwc(torch_out: np.ndarray) -> np.ndarray:
    return torch_out.transpose(0, 2, 3, 1) if torch_out.ndim == 4 else torch_out


def per_layer_parity(meta: dict, weights, ref: dict, factory, deployed_fb: bytes, log=print) -> tuple[list[dict], bytes]:
    """(one record per binary layer in graph order, the probe twin's flatbuffer)."""
    probes: dict = {}

    def probing(builder, rec, x):
        y = factory(builder, rec, x)
        probes[rec["name"]] = y
        return y

    import bdmtool  # noqa: F401  (TF_USE_LEGACY_KERAS)
    import tensorflow as tf

    model = UNetBuilder(meta, weights, probing).build()
    names = [n for n in probes if PREFIX + n in ref]
    outs = [tf.keras.layers.Activation("linear", name=f"probe_{i}")(probes[n]) for i, n in enumerate(names)]
    twin = tf.keras.Model(model.inputs, [*model.outputs, *outs])
    log(f"[per-layer] converting a probe twin with {len(names)} layer outputs ...")
    fb = convert(twin, log)
    got = _first_step(fb, ref)
    want_eps = _first_step(deployed_fb, ref)["eps"]
    records = []
    for i, n in enumerate(names):
        if f"probe_{i}" not in got:
            raise RuntimeError(f"the probe twin has no output probe_{i} ({n}); outputs: {sorted(got)}")
        records.append({"layer": n, **layer_metrics(got[f"probe_{i}"], to_nhwc(ref[PREFIX + n]))})
    twin_vs_deployed = max_abs(got["eps"], want_eps)
    worst = max(records, key=lambda r: r["max_rel"]) if records else None
    if worst:
        log(f"[per-layer] {len(records)} binary layers; largest relative error {worst['max_rel']:.2e} at "
            f"{worst['layer']} (cosine {worst['cosine']:.6f}); probe twin eps vs exported file {twin_vs_deployed:.1e}")
    return [*records, {"layer": "(probe twin eps vs exported .tflite)", "max_abs": twin_vs_deployed}], fb


def _first_step(fb: bytes, ref: dict) -> dict[str, np.ndarray]:
    """Every output of a .tflite on the first reference input, by model-level name (caches empty)."""
    return TFLiteDenoiser.from_bytes(fb).first_step(ref["x"][:1].transpose(0, 2, 3, 1), float(ref["t"][0]))
