"""Run an exported denoiser step by step, carrying BiDM's timestep caches: Keras or the LCE interpreter.

``Denoiser.step(x_nhwc, t) -> eps_nhwc``; ``reset()`` starts a new sampling run (empty cache). The cache
I/O convention is the one the sidecar documents: inputs ``cache_valid`` [1,1] (0 on a run's first step)
and ``cache_in_<i>``; outputs ``eps`` then the mixed site tensors, which are the next step's cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def ddim_schedule(spec: dict, steps: int) -> tuple[list[int], np.ndarray, int]:
    """(DDIM timesteps high -> low with uniform skip, alphas_cumprod [T], T) of a checkpoint spec, numpy only."""
    from bdmtool.trainer.schedules import beta_schedule  # numpy only: the exporter never imports torch
    from bdmtool.trainer.spec import DiffusionConfig

    dcfg = DiffusionConfig.from_dict(spec["diffusion"])
    T = dcfg.timesteps
    return list(range(0, T, max(T // steps, 1)))[::-1], np.cumprod(1.0 - beta_schedule(dcfg)), T


def ddim_step(x: np.ndarray, eps: np.ndarray, a: float, a_prev: float, clip_x0: bool = True) -> np.ndarray:
    """One deterministic DDIM step (eta = 0) in numpy, as the sidecar's ``sampler.update`` states it.

    x0 = (x - sqrt(1-a) eps) / sqrt(a), clamped to [-1, 1] with eps re-derived from it when ``clip_x0``;
    x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps.
    """
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip_x0:
        x0 = np.clip(x0, -1.0, 1.0)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    return (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)


class Denoiser:
    """Common stepping logic; subclasses implement ``_run(feeds: dict) -> list[np.ndarray]`` (outputs in
    ``output_names`` order)."""

    def __init__(self, input_names: list[str], input_shapes: dict[str, tuple], output_names: list[str]):
        self.input_names = input_names
        self.input_shapes = input_shapes
        self.output_names = output_names  # per output position: "eps" or "cache_out_<i>"
        self.reset()

    def reset(self) -> None:
        self.caches = {n: np.zeros(self.input_shapes[n], np.float32) for n in self.input_names
                       if n.startswith("cache_in_")}
        self.valid = 0.0

    def step(self, x_nhwc: np.ndarray, t: float) -> np.ndarray:
        feeds = {"x": x_nhwc.astype(np.float32), "t": np.full((1, 1), t, np.float32),
                 "cache_valid": np.full((1, 1), self.valid, np.float32), **self.caches}
        outs = dict(zip(self.output_names, self._run(feeds)))
        for name, value in outs.items():
            if name.startswith("cache_out_"):
                self.caches[name.replace("cache_out_", "cache_in_")] = value
                self.valid = 1.0
        return outs["eps"]

    def _run(self, feeds: dict) -> list[np.ndarray]:
        raise NotImplementedError


class KerasDenoiser(Denoiser):
    """``graph=True`` runs the model as one traced ``tf.function`` (a few seconds to trace, then ~3x faster per
    step than eager: worth it from ~10 steps on, e.g. calibration trajectories)."""

    def __init__(self, model, graph: bool = False):
        if graph:
            import tensorflow as tf

            self._call = tf.function(model)
        else:
            self._call = model
        names = [i.name.split(":")[0] for i in model.inputs]
        shapes = {n: tuple(i.shape) for n, i in zip(names, model.inputs)}
        super().__init__(names, shapes, list(model.output_names))

    def _run(self, feeds):
        out = self._call({n: feeds[n] for n in self.input_names})
        out = out if isinstance(out, (list, tuple)) else [out]
        return [o.numpy() for o in out]


def check_sidecar_matches(tflite: str | Path, side: dict, side_path: str | Path) -> None:
    """Refuse a sidecar written for another .tflite (its ``model_sha256``; sidecars from before that field pass):
    a swapped or stale sidecar would run the model with another schedule, cache protocol or I/O order."""
    from bdmtool.files import FileFormatError, file_sha256

    want = side.get("model_sha256") if isinstance(side, dict) else None
    have = file_sha256(tflite) if want else None
    if want and have != want:
        raise FileFormatError(f"{side_path} describes another .tflite (sha256 {want[:12]}…, {Path(tflite).name} is "
                              f"{have[:12]}…): keep each .tflite with the .json exported with it, or re-export")


class TFLiteDenoiser(Denoiser):
    """The LCE interpreter (bconvs with ``use_indirect_bgemm``, fast on x86) on a flatbuffer + its sidecar."""

    def __init__(self, fb: bytes, output_names: list[str] | None = None, threads: int = 1):
        from larq_compute_engine.tflite.python.interpreter import Interpreter

        from .inspect_tflite import inspect_model, io_names

        inv = inspect_model(fb)
        names = io_names(inv.inputs)
        shapes = {n: tuple(d["shape"]) for n, d in zip(names, inv.inputs)}
        self.interp = Interpreter(fb, num_threads=threads, use_indirect_bgemm=True)
        outs = io_names(inv.outputs)
        super().__init__(names, shapes, output_names or (outs if len(outs) > 1 else ["eps"]))

    @classmethod
    def from_file(cls, path: str | Path, threads: int = 1) -> "TFLiteDenoiser":
        path = Path(path)
        side = path.with_suffix(".json")
        if not side.exists():
            raise FileNotFoundError(f"{side} (the sidecar written by `bdmtool export`) is needed to run {path.name}")
        from bdmtool.files import FileFormatError, read_json

        from .inspect_tflite import check_tflite_file

        meta = read_json(side, "sidecar written by `bdmtool export`")
        try:
            outputs = meta["tflite_io_order"]["outputs"]
        except (KeyError, TypeError):
            raise FileFormatError(f"{side} has no tflite_io_order.outputs: not a sidecar of this bdmtool; "
                                  "re-export the model") from None
        try:
            den = cls(check_tflite_file(path), outputs, threads)
        except FileFormatError:
            raise
        except Exception as e:  # flatbuffers/interpreter errors on a truncated or damaged file
            raise FileFormatError(f"{path} is a truncated or damaged .tflite ({type(e).__name__}); re-export it "
                                  "with `bdmtool export`") from None
        check_sidecar_matches(path, meta, side)  # after the damage check: a truncated copy is named as such
        return den

    @classmethod
    def from_bytes(cls, fb: bytes, threads: int = 1) -> "TFLiteDenoiser":
        """A flatbuffer whose outputs are all named by its signature (no sidecar needed)."""
        from .inspect_tflite import inspect_model, io_names

        outs = io_names(inspect_model(fb).outputs)
        return cls(fb, outs if len(outs) > 1 else ["eps"], threads)

    def first_step(self, x_nhwc: np.ndarray, t: float) -> dict[str, np.ndarray]:
        """Every output of one first sampling step (caches empty), by model-level name."""
        self.reset()
        feeds = {"x": x_nhwc.astype(np.float32), "t": np.full((1, 1), t, np.float32),
                 "cache_valid": np.zeros((1, 1), np.float32), **self.caches}
        return dict(zip(self.output_names, self._run(feeds)))

    def _run(self, feeds):  # noqa: D401 - TFLite input order is the flatbuffer's, fed by name
        args = [feeds[n].reshape(self.input_shapes[n]) for n in self.input_names]  # t: [1, 1] or [1]
        out = self.interp.predict(args if len(args) > 1 else args[0])
        return list(out) if isinstance(out, list) else [out]
