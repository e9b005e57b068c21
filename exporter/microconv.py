"""One micro-model per convolution shape, binary and float twins, so each conv can be timed alone.

This reproduces the protocol of BiDM's Table 16 (one convolution timed by hand on a phone) for every
convolution of a U-Net. ``write_conv_models(layers, out_dir)`` takes layer-shape records (``trainer.layers``;
dicts with h, w, cin, cout, k, stride, padding, name, binary) and writes, per distinct shape,

- ``conv_<key>_bin.tflite``: ``LceBconv2d`` (sign input, sign kernel, same-one padding, per-channel scale);
- ``conv_<key>_fp.tflite``: a float ``CONV_2D`` with bias,

plus ``convs.json`` mapping every layer to its pair. The binary twin is checked to hold exactly one
``LceBconv2d`` and no float conv (the same no-silent-fallback rule as the model export).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import bdmtool  # noqa: F401
import larq as lq
import tensorflow as tf

from .binary_layers import NotExportableError
from .inspect_tflite import inspect_model
from ..files import atomic_write

keras = tf.keras

INDEX = "convs.json"


def shape_key(r: dict) -> str:
    return f"{r['h']}x{r['w']}x{r['cin']}-{r['cout']}-k{r['k']}s{r['stride']}p{r['padding']}"


def _model(r: dict, binary: bool, seed: int):
    rng = np.random.default_rng(seed)
    k, s, p = r["k"], r["stride"], r["padding"]
    if p not in (0, (k - 1) // 2):
        raise NotExportableError(f"{r['name']}: padding {p} with kernel {k} is neither 'valid' nor 'same'")
    x = keras.Input((r["h"], r["w"], r["cin"]), batch_size=1, name="x")
    pad = "same" if p else "valid"
    kernel = rng.standard_normal((k, k, r["cin"], r["cout"])).astype(np.float32)
    if binary:
        conv = lq.layers.QuantConv2D(r["cout"], k, strides=s, padding=pad, pad_values=1.0 if p else 0.0,
                                     input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                     kernel_constraint="weight_clip", use_bias=False, name="bconv")
        y = conv(x)
        conv.set_weights([np.sign(kernel) + (kernel == 0)])
        scale = rng.uniform(0.5, 1.5, r["cout"]).astype(np.float32)
        y = keras.layers.Lambda(lambda v, c=scale: v * c, name="scale")(y)
    else:
        conv = keras.layers.Conv2D(r["cout"], k, strides=s, padding=pad, name="conv")
        y = conv(x)
        conv.set_weights([kernel * 0.05, rng.standard_normal(r["cout"]).astype(np.float32)])
    return keras.Model(x, y, name="c")


def write_conv_models(layers: list[dict], out_dir: str | Path, log=print) -> Path:
    """Write the binary/FP micro-model pairs and ``convs.json``; returns the index path."""
    from .convert import convert

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes: dict[str, dict] = {}
    for r in layers:
        shapes.setdefault(shape_key(r), r)
    for i, (key, r) in enumerate(shapes.items()):
        for binary, suffix in ((True, "bin"), (False, "fp")):
            path = out / f"conv_{key}_{suffix}.tflite"
            if path.exists():
                continue
            fb = convert(_model(r, binary, seed=i), log)
            hist = inspect_model(fb).histogram
            if binary and (hist.get("LceBconv2d", 0) != 1 or hist.get("CONV_2D", 0)):
                raise NotExportableError(f"micro-model {key}: expected one LceBconv2d, got ops {dict(hist)}")
            if not binary and hist.get("CONV_2D", 0) != 1:
                raise NotExportableError(f"micro-model {key}: expected one float CONV_2D, got ops {dict(hist)}")
            atomic_write(path, fb)
        log(f"[convs] {i + 1}/{len(shapes)} {key}")
    index = {"format": "bdmtool-convs", "version": 1,
             "shapes": {key: {"binary": f"conv_{key}_bin.tflite", "fp": f"conv_{key}_fp.tflite",
                              **{f: r[f] for f in ("h", "w", "cin", "cout", "k", "stride", "padding")}}
                        for key, r in shapes.items()},
             "layers": [{"name": r["name"], "shape": shape_key(r), "binary_in_model": bool(r["binary"])}
                        for r in layers]}
    path = out / INDEX
    atomic_write(path, json.dumps(index, indent=2))
    return path
