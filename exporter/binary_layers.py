"""Keras/Larq twins of ``trainer.binarize.BinaryConv2d``, built so LCE turns each into one ``LceBconv2d``.

W1A1 (this module's ``binary_conv``)::

    x --(+ threshold)--> QuantConv2D(input_quantizer=ste_sign, kernel_quantizer=ste_sign,
                                      padding=same with pad_values=1 | valid, no bias)
      --> * scale1[o]            (constant: fused into the bconv's post-activation multiplier)
      --> * K(mean_c|x|)         (XNOR/TBS: float conv on the channel mean, then a float MUL)
      --> * Gamma, + bias, RPReLU, + gamma * shortcut(x)   (float ops after the bconv)

Nothing sits between the sign and the convolution (LCE would silently fall back to float otherwise);
the threshold add comes before the sign. The kernel holds sign(W) (+-1); larq's ``ste_sign`` maps 0 to +1
exactly as the PyTorch side does.
"""

from __future__ import annotations

from functools import partial

import numpy as np

import bdmtool  # noqa: F401
import larq as lq
import tensorflow as tf

from .kernels import MULTIBIT_DEFAULT, NotExportableError, multibit_kernel  # noqa: F401 (re-exported)
from .keras_unet import UNetBuilder, keras_name

keras = tf.keras


def _const_op(fn, name: str):
    return keras.layers.Lambda(fn, name=name)


def binary_conv(builder: UNetBuilder, rec: dict, x, a8: str = MULTIBIT_DEFAULT["a8"], a4: str = MULTIBIT_DEFAULT["a4"],
                int8_ranges: dict | None = None, probes: dict | None = None):
    """Build the binary layer described by the bundle record ``rec`` on input ``x`` (NHWC).

    W1A8 / W1A4 layers become an int8 ``CONV_2D`` (``a8`` / ``a4`` = "int8"; ``int8_ranges`` holds each
    layer's calibrated output range, and while it is None the float outputs are collected in ``probes`` for
    calibration) or eight / four ``LceBconv2d`` bit planes ("bitplanes").
    """
    name, w = rec["name"], builder.w
    if rec["abits"] == 32:  # W1A32: LCE has no binary-weight / float-activation kernel
        return _float_binary_weight_conv(builder, rec, x)
    if multibit_kernel(rec["abits"], a8, a4) == "int8":
        return _int8_conv(builder, rec, x, int8_ranges, probes)
    if rec["abits"] != 1:
        return _bitplane_conv(builder, rec, x)
    if rec["act"] not in ("ste_sign", "approx_sign", "rsign", "reste"):
        raise NotExportableError(f"{name}: activation quantizer {rec['act']!r} has no LCE binary form "
                                 "(it is not a +-1 sign; e.g. DoReFa's {0,1} falls back to float ops)")
    if rec["two_bases"]:
        raise NotExportableError(f"{name}: EBB's second basis is still active; finish stage 2 before a W1A1 export")
    kn = keras_name(name)
    k, s, p = rec["kernel"], rec["stride"], rec["padding"]
    cout = rec["out_channels"]
    h = x
    if rec["threshold"]:
        thr = w.get(f"{name}.threshold").reshape(-1).astype(np.float32)
        h = _const_op(lambda v, c=thr: v + c, f"{kn}__threshold")(h)
    conv = lq.layers.QuantConv2D(cout, k, strides=s, padding="same" if p else "valid",
                                 pad_values=1.0 if p else 0.0, input_quantizer="ste_sign",
                                 kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False, name=kn)
    if p and p != (k - 1) // 2:
        raise NotExportableError(f"{name}: padding {p} with kernel {k} is not 'same'")
    y = conv(h)
    conv.set_weights([w.get(f"{name}.sign1").astype(np.float32).transpose(2, 3, 1, 0)])
    scale = w.get(f"{name}.scale1", (cout,)).astype(np.float32)
    y = _const_op(lambda v, c=scale: v * c, f"{kn}__scale")(y)
    if rec["act_scale"] != "none":
        a = _const_op(lambda v: tf.reduce_mean(tf.abs(v), axis=-1, keepdims=True), f"{kn}__absmean")(x)
        builder.float_layers[f"{name}.k_conv"] = "float K conv on mean|x| (activation scale)"
        kconv = keras.layers.Conv2D(1, k, strides=s, padding="same" if p else "valid",
                                    use_bias=w.has(f"{name}.k_conv.bias"), name=f"{kn}__k_conv")
        kmap = kconv(a)
        kw = [w.get(f"{name}.k_conv.weight").transpose(2, 3, 1, 0)]
        if w.has(f"{name}.k_conv.bias"):
            kw.append(w.get(f"{name}.k_conv.bias"))
        kconv.set_weights(kw)
        y = keras.layers.Multiply(name=f"{kn}__kmul")([y, kmap])
    if rec["output_scale"]:
        gamma = (w.get(f"{name}.gamma_o") * w.get(f"{name}.gamma_h") * w.get(f"{name}.gamma_w"))
        gamma = gamma.transpose(0, 2, 3, 1).astype(np.float32)  # NCHW -> NHWC
        y = _const_op(lambda v, c=gamma: v * c, f"{kn}__gamma")(y)
    if rec["bias"]:
        bias = w.get(f"{name}.bias", (cout,)).astype(np.float32)
        y = _const_op(lambda v, c=bias: v + c, f"{kn}__bias")(y)
    if rec["post"] == "rprelu":
        si = w.get(f"{name}.post.shift_in").reshape(-1)
        so = w.get(f"{name}.post.shift_out").reshape(-1)
        al = w.get(f"{name}.post.prelu.weight").reshape(-1)
        y = _const_op(lambda v, a=si, b=al, c=so: tf.where(v + a >= 0, v + a, b * (v + a)) + c, f"{kn}__rprelu")(y)
    if rec["shortcut"] != "none":
        sc = keras.layers.AveragePooling2D(s, name=f"{kn}__sc_pool")(x) if s > 1 else x
        if rec["shortcut_conv"]:
            builder.float_layers[f"{name}.shortcut_conv"] = "float 1x1 shortcut conv"
            scc = keras.layers.Conv2D(cout, 1, name=f"{kn}__sc_conv")
            sc = scc(sc)
            scc.set_weights([w.get(f"{name}.shortcut_conv.weight").transpose(2, 3, 1, 0),
                             w.get(f"{name}.shortcut_conv.bias")])
        oh, ow = y.shape[1], y.shape[2]
        if sc.shape[1] != oh or sc.shape[2] != ow:
            sc = keras.layers.Cropping2D(((0, sc.shape[1] - oh), (0, sc.shape[2] - ow)))(sc)
        if rec["shortcut"] == "bidm":
            gamma = float(w.get(f"{name}.shortcut_scale"))
            sc = _const_op(lambda v, g=gamma: v * g, f"{kn}__sc_scale")(sc)
        y = keras.layers.Add(name=f"{kn}__sc_add")([y, sc])
    return y


def _real_kernel(w, rec: dict) -> np.ndarray:
    """The binary filter as real numbers (OIHW): sign1 * scale1 [+ sign2 * scale2 while EBB's 2nd basis lives]."""
    name, cout = rec["name"], rec["out_channels"]
    kernel = w.get(f"{name}.sign1").astype(np.float32) * w.get(f"{name}.scale1", (cout,))[:, None, None, None]
    if w.has(f"{name}.sign2"):
        kernel = kernel + w.get(f"{name}.sign2").astype(np.float32) * w.get(f"{name}.scale2", (cout,))[:, None, None, None]
    return kernel


def _float_binary_weight_conv(builder: UNetBuilder, rec: dict, x):
    """W1A32 runs as a float CONV_2D whose kernel holds the binary weights (+-scale per output channel)."""
    name, w = rec["name"], builder.w
    kernel = _real_kernel(w, rec)
    k, s, p = rec["kernel"], rec["stride"], rec["padding"]
    layer = keras.layers.Conv2D(rec["out_channels"], k, strides=s, padding="same" if p else "valid",
                                use_bias=rec["bias"], name=keras_name(name))
    y = layer(x)
    layer.set_weights([kernel.transpose(2, 3, 1, 0)] + ([w.get(f"{name}.bias")] if rec["bias"] else []))
    return y


def _lsq_checks(rec: dict) -> None:
    name = rec["name"]
    if rec["lsq_mode"] not in ("learned", "log"):
        raise NotExportableError(f"{name}: LSQ step '{rec['lsq_mode']}' is computed from each batch at run time; "
                                 "export needs a learned (constant) step: train with binarize.lsq_step=log "
                                 "(the default) or learned")
    if rec["act_scale"] != "none" or rec["output_scale"] or rec["post"] != "none" or rec["shortcut"] != "none":
        raise NotExportableError(f"{name}: K/Gamma/RPReLU/shortcut extras are only exported for 1-bit activations")
    k, p = rec["kernel"], rec["padding"]
    if p and p != (k - 1) // 2:
        raise NotExportableError(f"{name}: padding {p} with kernel {k} is not 'same'")


def _int8_conv(builder: UNetBuilder, rec: dict, x, ranges: dict | None, probes: dict | None):
    """W1A8 / W1A4 as one int8 ``CONV_2D``: the LSQ grid is an int8 grid, the +-scale weights are int8 numbers.

    Exact parts: LSQ b-bit levels round(clip(x/s, Qn, Qp)) * s are int8 with scale s and zero point 0
    (a clamp to [Qn s, Qp s] when b < 8, then a fake-quant over [-128 s, 127 s]); each output channel's
    weights +-a_o are int8 +-127 with scale a_o/127 (per-channel, symmetric). The border is padded as in training: 0 (act_pad=zero) or Qp s. Approximate part:
    TFLite's int8 convolution writes int8, so each layer's output is re-quantized to 256 levels over its
    calibrated range (``ranges[name] = (lo, hi)``), which the parity report measures. Everything else
    (norms, SiLU, time MLP, attention, first/last conv) stays float around QUANTIZE/DEQUANTIZE pairs.
    """
    _lsq_checks(rec)
    name, w, kn = rec["name"], builder.w, keras_name(rec["name"])
    s, p, cout = rec["stride"], rec["padding"], rec["out_channels"]
    step = float(w.get(f"{name}.step"))
    qn, qp = -(2 ** (rec["abits"] - 1)), 2 ** (rec["abits"] - 1) - 1  # W1A4: -8..7, a sub-grid of int8
    kernel = _real_kernel(w, rec).transpose(2, 3, 1, 0)  # OIHW -> HWIO; two EBB bases: 4 levels, not exact
    amax = np.maximum(np.abs(kernel).max(axis=(0, 1, 2)), 1e-12).astype(np.float32)
    bias = (w.get(f"{name}.bias", (cout,)) if rec["bias"] else np.zeros(cout)).astype(np.float32)

    border = qp * step if rec.get("act_pad", "top") == "top" else 0.0  # both exact int8 levels

    def conv(v, kernel=kernel, amax=amax, bias=bias, border=border):
        if p:
            v = tf.pad(v, [[0, 0], [p, p], [p, p], [0, 0]], constant_values=border)
        if qp < 127:  # fewer bits: clamp to the LSQ range first, then the int8 grid holds exactly its levels
            v = tf.clip_by_value(v, qn * step, qp * step)
        v = tf.quantization.fake_quant_with_min_max_args(v, min=-128.0 * step, max=127.0 * step, num_bits=8)
        kq = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tf.constant(kernel), min=tf.constant(-amax), max=tf.constant(amax), num_bits=8, narrow_range=True)
        return tf.nn.bias_add(tf.nn.conv2d(v, kq, strides=s, padding="VALID"), tf.constant(bias))

    if ranges is None:  # calibration build: float output, recorded
        y = _const_op(conv, f"{kn}__int8")(x)
        if probes is not None:
            probes[name] = y
        return y
    lo, hi = ranges[name]
    if np.ndim(lo) == 0:  # one range for the whole output tensor
        y = _const_op(conv, f"{kn}__int8")(x)
        return _const_op(lambda v, lo=lo, hi=hi: tf.quantization.fake_quant_with_min_max_args(v, min=lo, max=hi,
                                                                                           num_bits=8),
                         f"{kn}__int8_out")(y)
    # Equalized output: channel o is written as (y_o - c_o) / r_o, so every channel spans the int8 range, then
    # rescaled in float. Folded into the filter and bias: the filter stays +-a_o / r_o, exact int8 per channel.
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    c, r = (hi + lo) / 2, (hi - lo) / 2
    y = _const_op(partial(conv, kernel=kernel / r, amax=amax / r, bias=(bias - c) / r), f"{kn}__int8")(x)
    y = _const_op(lambda v: tf.quantization.fake_quant_with_min_max_args(v, min=-1.0, max=1.0, num_bits=8),
                  f"{kn}__int8_out")(y)
    return _const_op(lambda v, r=r, c=c: v * tf.constant(r) + tf.constant(c), f"{kn}__int8_rescale")(y)


def _bitplane_conv(builder: UNetBuilder, rec: dict, x):
    """W1A4/W1A8: LSQ activations as +-1 bit planes through ONE same-one ``LceBconv2d`` per layer.

    With q = round(clip(x/s, -2^(b-1), 2^(b-1)-1)) and u = q + 2^(b-1) = sum_k 2^k b_k, s_k = 2 b_k - 1:
    q = sum_k 2^(k-1) s_k - 1/2. The PyTorch layer pads q with Qp = 2^(b-1) - 1, i.e. every plane with +1, so
    conv(q, W) = sum_k 2^(k-1) conv1(s_k, W) - 1/2 conv1(1, W) with conv1 = LCE 'same-one' padding, and
    conv1(1, W) = sum(W) per output channel: a constant that joins the bias.

    The b planes are stacked along the batch axis and the EBB bases (two sign tensors) along the output
    channels, so one bconv computes every conv1(s_k, W_j); a reshape, one multiply by 2^(k-1) s a_j and a sum
    over planes and bases recombine them. (Before: b x bases separate bconvs, e.g. 292 for the tiny W1A4 U-Net;
    one op per layer converts and runs faster and computes the same sums.)
    """
    _lsq_checks(rec)
    name, w = rec["name"], builder.w
    bits, kn = rec["abits"], keras_name(name)
    k, s, p = rec["kernel"], rec["stride"], rec["padding"]
    cout = rec["out_channels"]
    step = float(w.get(f"{name}.step"))
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    bases = [(w.get(f"{name}.sign1").astype(np.float32), w.get(f"{name}.scale1", (cout,)))]
    if rec["two_bases"]:
        bases.append((w.get(f"{name}.sign2").astype(np.float32), w.get(f"{name}.scale2", (cout,))))
    nb = len(bases)

    def planes(v):  # [N,H,W,C] -> the b planes of u = q - Qn in {-1,+1}, stacked: [b*N,H,W,C], plane-major
        u = tf.clip_by_value(tf.round(v / step), qn, qp) - qn  # 0..2^b-1
        return tf.concat([2.0 * tf.math.floormod(tf.floor(u / 2.0**kk), 2.0) - 1.0 for kk in range(bits)], axis=0)

    stacked = _const_op(planes, f"{kn}__planes")(x)
    conv = lq.layers.QuantConv2D(nb * cout, k, strides=s, padding="same" if p else "valid",
                                 pad_values=1.0 if p else 0.0, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                 kernel_constraint="weight_clip", use_bias=False, name=f"{kn}__bconv")
    y = conv(stacked)
    conv.set_weights([np.concatenate([sg for sg, _ in bases], axis=0).transpose(2, 3, 1, 0)])
    # mult[k, j*cout + o] = s * 2^(k-1) * a_j[o]
    mult = np.stack([np.concatenate([step * 2.0 ** (kk - 1) * sc for _, sc in bases]) for kk in range(bits)])
    # -1/2 * s * conv1(ones, W_j) summed over bases = -1/2 * s * sum(sum_j a_j W_j) per output channel (+ bias)
    wb = sum(sc[:, None, None, None] * sg for sg, sc in bases).astype(np.float32)
    const = (-0.5 * step) * wb.sum(axis=(1, 2, 3))
    if rec["bias"]:
        const = const + w.get(f"{name}.bias", (cout,))

    def combine(v, m=mult.astype(np.float32)[:, None, None, None, :], c=const.astype(np.float32)):
        h, wd = v.shape[1], v.shape[2]  # static: the export's resolution is fixed
        v = tf.reshape(v, [bits, -1, h, wd, nb * cout]) * m  # [b, N, H, W, bases*cout]
        v = tf.reduce_sum(v, axis=0)
        if nb > 1:
            v = tf.reduce_sum(tf.reshape(v, [-1, h, wd, nb, cout]), axis=3)
        return v + c

    return _const_op(combine, f"{kn}__combine")(y)
