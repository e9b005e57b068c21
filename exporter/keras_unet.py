"""Keras (tf-keras 2) rebuild of bdmtool's U-Net from a bundle, NHWC, batch 1, static shapes.

Inputs: ``x`` [1, H, W, C] float32 in [-1, 1] (NHWC) and ``t`` [1, 1] float32 (the integer timestep as a
float). Output: ``eps`` [1, H, W, C_out]. The sinusoidal timestep features are computed in the graph.

Layer names are the PyTorch module names with ``.`` replaced by ``__`` so every TFLite tensor maps back
to its U-Net layer (``keras_name`` / ``torch_name``). Float layers take PyTorch weights transposed
OIHW -> HWIO. Binary layers are built by ``binary_conv`` (``exporter.binary_layers``), given the layer's
bundle record and deployable weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

import bdmtool  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

keras = tf.keras


def keras_name(torch_name: str) -> str:
    return torch_name.replace(".", "__")


def torch_name(k_name: str) -> str:
    return k_name.replace("__", ".")


class Weights:
    """PyTorch-named numpy arrays with shape checks on every read (a bad mapping fails loudly)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.used: set[str] = set()

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self.arrays:
            raise KeyError(f"bundle has no tensor {key!r}; was it written from the same checkpoint?")
        a = self.arrays[key]
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"bundle tensor {key} has shape {a.shape}, the Keras layer needs {shape}")
        self.used.add(key)
        return a

    def has(self, key: str) -> bool:
        return key in self.arrays


def float_conv(w: Weights, name: str, x, k: int, stride: int = 1, padding: str = "same"):
    kernel = w.get(f"{name}.weight")
    cout = kernel.shape[0]
    layer = keras.layers.Conv2D(cout, k, strides=stride, padding=padding, name=keras_name(name))
    y = layer(x)
    layer.set_weights([kernel.transpose(2, 3, 1, 0), w.get(f"{name}.bias", (cout,))])
    return y


def float_dense(w: Weights, name: str, x):
    kernel = w.get(f"{name}.weight")
    layer = keras.layers.Dense(kernel.shape[0], name=keras_name(name))
    y = layer(x)
    layer.set_weights([kernel.T, w.get(f"{name}.bias", (kernel.shape[0],))])
    return y


def group_norm(w: Weights, name: str, x, groups: int, eps: float):
    ch = x.shape[-1]
    layer = keras.layers.GroupNormalization(groups=groups, epsilon=eps, name=keras_name(name))
    y = layer(x)
    layer.set_weights([w.get(f"{name}.weight", (ch,)), w.get(f"{name}.bias", (ch,))])
    return y


def timestep_bucket(t, buckets: int, timesteps: int):
    """int32 index floor(t * buckets / T), clipped to the table (the graph twin of trainer.binarize's)."""
    return tf.cast(tf.clip_by_value(tf.floor(t * float(buckets) / float(timesteps)), 0.0, buckets - 1.0), tf.int32)


def silu(x):
    return keras.layers.Activation(tf.nn.silu)(x)


ConvFactory = Callable[..., object]


class UNetBuilder:
    """Builds the functional model; ``conv(name, x, k, stride, padding)`` dispatches float vs binary."""

    def __init__(self, meta: dict, weights: Weights, binary_conv: ConvFactory | None = None):
        self.meta, self.w = meta, weights
        self.u = meta["spec"]["unet"]
        self.binary = {r["name"]: r for r in meta.get("binary_layers", []) if r["active"]}
        self.binary_conv = binary_conv
        if self.binary and binary_conv is None:
            raise ValueError("this bundle has binary layers; build it with a binary_conv factory")
        cache = meta.get("timestep_cache")
        self.sites = list(cache["sites"]) if cache else []
        self.cache_inputs: list = []
        self.cache_outputs: list = []
        self._visited: set[str] = set()
        self.float_layers: dict[str, str] = {}  # U-Net layer -> what it runs as, when it is not binary
        self._t = self._valid = None

    def conv(self, name: str, x, k: int, stride: int = 1, padding: str = "same"):
        if name in self.binary:
            if self.binary[name]["abits"] == 32:
                self.float_layers[name] = "float conv holding the binary weights (W1A32)"
            return self.binary_conv(self, self.binary[name], x)
        self.float_layers[name] = "float conv"
        return float_conv(self.w, name, x, k, stride, padding)

    def linear(self, name: str, x):
        """A Linear on [1, C]: binary layers run as a 1x1 conv on [1, 1, 1, C] (LCE never binarizes Dense)."""
        if name in self.binary:
            y = self.binary_conv(self, self.binary[name], keras.layers.Reshape((1, 1, x.shape[-1]))(x))
            return keras.layers.Reshape((y.shape[-1],))(y)
        self.float_layers[name] = "float dense"
        return float_dense(self.w, name, x)

    def site(self, name: str, h):
        """BiDM cross-timestep connection at module ``name``: h <- (1 - a) h + a * cache_in, a = alpha[bucket(t)]
        times ``cache_valid`` (0 on the first sampling step); the mixed tensor is also a model output."""
        if name not in self.sites:
            return h
        i = self.sites.index(name)
        self._visited.add(name)
        buckets, T = self.meta["timestep_cache"]["buckets"], self.meta["spec"]["diffusion"]["timesteps"]
        alpha = self.w.get("tbs_cache.alpha")[:, i].astype(np.float32)
        cache_in = keras.Input(h.shape[1:], batch_size=1, name=f"cache_in_{i}")
        self.cache_inputs.append(cache_in)

        def mix(z, alpha=alpha, buckets=buckets, T=T):
            h_, c_, t_, v_ = z
            b = timestep_bucket(t_, buckets, T)
            a = tf.reshape(tf.gather(tf.constant(alpha), tf.reshape(b, [-1])), [-1, 1, 1, 1]) * tf.reshape(v_, [-1, 1, 1, 1])
            return (1.0 - a) * h_ + a * c_

        mixed = keras.layers.Lambda(mix, name=f"{keras_name(name)}__cache_mix")([h, cache_in, self._t, self._valid])
        self.cache_outputs.append(keras.layers.Activation("linear", name=f"cache_out_{i}")(mixed))
        return mixed

    def dc_bypass(self, eps, x, t):
        """bdmtool's float DC path (``binarize.dc_bypass``, see trainer.binarize.DCBypass): per timestep bucket,
        eps + g * mean_hw(x) (gain), eps - h * mean_hw(eps) + g * mean_hw(x) + c (affine), and the affine path
        - r * (eps - mean_hw(eps)) + s * (x - mean_hw(x)) (skip)."""
        b = self.meta["spec"].get("binarize") or {}
        mode = b.get("dc_bypass", "none")
        if mode == "none":
            return eps
        buckets, T = b["dc_bypass_buckets"], self.meta["spec"]["diffusion"]["timesteps"]

        # the bundle holds the deployed tables (trainer.bundle: DCBypass.tables(), the lr scales applied)
        keys = {"timestep_gain": ["gain"], "timestep_affine": ["gain", "remove", "offset"],
                "timestep_skip": ["gain", "remove", "offset", "shrink", "skip"]}[mode]
        tabs = [self.w.get(f"dc_bypass.{k}", (buckets,)).astype(np.float32) for k in keys]
        self.float_layers["dc_bypass"] = (
            "float MEAN over H, W, GATHER of the timestep gain, MUL, ADD" if len(tabs) == 1
            else "float MEANs over H, W, GATHERs of the timestep tables, MUL, SUB, ADD")

        def add(z, tabs=tabs, buckets=buckets, T=T):
            e_, x_, t_ = z
            idx = tf.reshape(timestep_bucket(t_, buckets, T), [-1])
            g, *rest = [tf.reshape(tf.gather(tf.constant(v), idx), [-1, 1, 1, 1]) for v in tabs]
            x_dc, e_dc = tf.reduce_mean(x_, axis=[1, 2], keepdims=True), tf.reduce_mean(e_, axis=[1, 2], keepdims=True)
            out = e_ + g * x_dc
            if rest:
                h, c, *skip = rest
                out = out - h * e_dc + c
                if skip:
                    r, s = skip
                    out = out - r * (e_ - e_dc) + s * (x_ - x_dc)
            return out

        return keras.layers.Lambda(add, name="dc_bypass")([eps, x, t])

    def norm(self, name: str, x):
        self.float_layers[name] = "float GroupNorm"
        return group_norm(self.w, name, x, self.u["num_groups"], self.u["norm_eps"])

    def resblock(self, name: str, x, temb):
        h = self.conv(f"{name}.conv1", silu(self.norm(f"{name}.norm1", x)), 3)
        proj = self.linear(f"{name}.temb_proj", silu(temb))
        h = keras.layers.Add()([h, keras.layers.Reshape((1, 1, proj.shape[-1]))(proj)])
        h = self.conv(f"{name}.conv2", silu(self.norm(f"{name}.norm2", h)), 3)
        sc = self.conv(f"{name}.nin_shortcut", x, 1) if self.w.has(f"{name}.nin_shortcut.weight") else x
        return keras.layers.Add()([sc, h])

    def attn(self, name: str, x):
        _, hh, ww, c = x.shape
        h = self.norm(f"{name}.norm", x)
        q, k, v = (keras.layers.Reshape((hh * ww, c))(self.conv(f"{name}.{p}", h, 1)) for p in ("q", "k", "v"))
        self.float_layers[f"{name}.matmuls"] = "float QK^T, softmax, AV"
        scores = keras.layers.Lambda(lambda qk: tf.matmul(qk[0], qk[1], transpose_b=True) * (c ** -0.5))([q, k])
        probs = keras.layers.Softmax(axis=-1)(scores)
        o = keras.layers.Lambda(lambda pv: tf.matmul(pv[0], pv[1]))([probs, v])
        o = self.conv(f"{name}.proj_out", keras.layers.Reshape((hh, ww, c))(o), 1)
        return keras.layers.Add()([x, o])

    def timestep_embedding(self, t):
        ch = self.u["ch"]
        half = ch // 2
        freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - 1)).astype(np.float32)
        args = keras.layers.Lambda(lambda v: v * tf.constant(freqs[None]))(t)  # [1, half]
        emb = keras.layers.Concatenate()([keras.layers.Lambda(lambda v: tf.sin(v))(args), keras.layers.Lambda(lambda v: tf.cos(v))(args)])
        self.float_layers.update({"temb.dense.0": "float dense", "temb.dense.1": "float dense"})
        return float_dense(self.w, "temb.dense.1", silu(float_dense(self.w, "temb.dense.0", emb)))

    def build(self, name: str = "u") -> "keras.Model":  # short: TFLite truncates tensor names to ~50 chars
        u = self.u
        res, cin = u["resolution"], u["in_channels"]
        x_in = keras.Input((res, res, cin), batch_size=1, name="x")
        t_in = keras.Input((1,), batch_size=1, name="t")
        self._t = t_in
        if self.sites:
            self._valid = keras.Input((1,), batch_size=1, name="cache_valid")
        temb = self.timestep_embedding(t_in)
        hs = [self.conv("conv_in", x_in, 3)]
        levels, nrb = len(u["ch_mult"]), u["num_res_blocks"]
        cur = res
        for i in range(levels):
            for j in range(nrb):
                h = self.site(f"down.{i}.block.{j}", self.resblock(f"down.{i}.block.{j}", hs[-1], temb))
                if cur in u["attn_resolutions"]:
                    h = self.site(f"down.{i}.attn.{j}", self.attn(f"down.{i}.attn.{j}", h))
                hs.append(h)
            if i != levels - 1:
                padded = keras.layers.ZeroPadding2D(((0, 1), (0, 1)))(hs[-1])
                d = self.conv(f"down.{i}.downsample.conv", padded, 3, stride=2, padding="valid")
                hs.append(self.site(f"down.{i}.downsample", d))
                cur //= 2
        h = self.site("mid.block_1", self.resblock("mid.block_1", hs[-1], temb))
        h = self.site("mid.attn_1", self.attn("mid.attn_1", h))
        h = self.site("mid.block_2", self.resblock("mid.block_2", h, temb))
        for i in reversed(range(levels)):
            for j in range(nrb + 1):
                h = self.resblock(f"up.{i}.block.{j}", keras.layers.Concatenate()([h, hs.pop()]), temb)
                h = self.site(f"up.{i}.block.{j}", h)
                if cur in u["attn_resolutions"]:
                    h = self.site(f"up.{i}.attn.{j}", self.attn(f"up.{i}.attn.{j}", h))
            if i != 0:
                h = self.conv(f"up.{i}.upsample.conv", keras.layers.UpSampling2D(2, interpolation="nearest")(h), 3)
                h = self.site(f"up.{i}.upsample", h)
                cur *= 2
        h = silu(self.norm("norm_out", h))
        out = self.dc_bypass(self.conv("conv_out", h, 3), x_in, t_in)
        out = keras.layers.Activation("linear", name="eps")(out)
        missing = sorted(set(self.sites) - self._visited)
        if missing:
            raise ValueError(f"timestep-cache sites not found in the Keras rebuild: {missing}")
        if self.sites:
            return keras.Model([x_in, t_in, self._valid, *self.cache_inputs], [out, *self.cache_outputs], name=name)
        return keras.Model([x_in, t_in], out, name=name)
