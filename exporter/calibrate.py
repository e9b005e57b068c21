"""Output ranges of the int8 W1A8 convolutions, measured on what the model really sees when it samples.

TFLite's int8 ``CONV_2D`` writes int8, so every W1A8 layer needs an output range. ``int8_ranges`` runs the
Keras model (float outputs at those layers) on the bundle's reference inputs and on a few seeded DDIM
trajectories through the model's own schedule, and returns each layer's output range: per tensor, (min, max)
widened by ``margin`` and always containing 0 (a TFLite zero point must be representable); per channel (the
default), a (min, max) for every output channel, widened by ``margin`` about its centre, which the exporter
turns into an equalized int8 output (exporter/binary_layers.py ``_int8_conv``). This module imports no torch.
"""

from __future__ import annotations

import numpy as np

from .runtime import KerasDenoiser, ddim_schedule, ddim_step


def int8_ranges(model, probes: dict, meta: dict, ref: dict, trajectories: int = 2, steps: int = 20,
                seed: int = 0, margin: float = 0.05, per_channel: bool = True) -> dict[str, tuple]:
    """``probes``: layer name -> float Keras tensor of ``model``'s graph. Returns name -> (lo, hi): floats per
    tensor, or lists with one entry per output channel when ``per_channel``."""
    import bdmtool  # noqa: F401
    import tensorflow as tf

    names = list(probes)
    n_main = len(model.outputs)
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)

    class Recorder(KerasDenoiser):  # steps the model's own outputs, records the probes on the side
        def __init__(self, m):
            super().__init__(m, graph=True)  # 44 steps: tracing once pays (13 s -> 5 s on the tiny W1A4 student)
            self.output_names = self.output_names[:n_main]

        def _run(self, feeds):
            outs = super()._run(feeds)
            for n, v in zip(names, outs[n_main:]):
                v = np.asarray(v).reshape(-1, v.shape[-1])
                lo[n], hi[n] = np.minimum(lo[n], v.min(axis=0)), np.maximum(hi[n], v.max(axis=0))
            return outs[:n_main]

    den = Recorder(tf.keras.Model(model.inputs, [*model.outputs, *(probes[n] for n in names)]))
    for i in range(len(ref["t"])):
        den.reset()
        den.step(ref["x"][i:i + 1].transpose(0, 2, 3, 1), float(ref["t"][i]))
    timesteps, abar, _ = ddim_schedule(meta["spec"], steps)
    u = meta["spec"]["unet"]
    rng = np.random.default_rng(seed)
    for _ in range(trajectories):
        den.reset()
        x = rng.standard_normal((1, u["resolution"], u["resolution"], u["in_channels"])).astype(np.float32)
        for j, t in enumerate(timesteps):
            eps = den.step(x, float(t))
            a_prev = abar[timesteps[j + 1]] if j + 1 < len(timesteps) else 1.0
            x = ddim_step(x, eps, abar[t], a_prev, clip_x0=True)  # what the sidecar tells an app to run
    out = {}
    for n in names:
        if per_channel:  # centre +- (1 + margin) half-widths; a dead channel gets a tiny range about its value
            c, r = (hi[n] + lo[n]) / 2, np.maximum((hi[n] - lo[n]) / 2 * (1 + margin), 1e-3)
            out[n] = ([float(v) for v in c - r], [float(v) for v in c + r])
            continue
        a, b = min(0.0, float(lo[n].min())) * (1 + margin), max(0.0, float(hi[n].max())) * (1 + margin)
        if b - a < 1e-6:  # a dead layer: any tiny range around 0
            a, b = -1e-3, 1e-3
        out[n] = (float(a), float(b))
    return out
