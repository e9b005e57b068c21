"""The host runner: the benchmark protocol on this machine through the LCE Python interpreter.

Binary models run with ``use_indirect_bgemm=True`` (LCE's fast bconv kernel on x86; the default kernel
has no x86 assembly), float models with XNNPACK. The interpreter has no op profiler, so per-layer
timings on the host come from the per-convolution micro-models. Results are labelled as host results.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from .options import BenchOptions, summarize


def host_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import larq_compute_engine as lce

    return {"kind": "host", "label": "HOST (x86 LCE interpreter, not a phone)", "cpu": cpu,
            "machine": platform.machine(), "cores": os.cpu_count(), "os": platform.platform(),
            "runtime": f"larq-compute-engine {lce.__version__} Python interpreter"}


def _random_inputs(interp, rng: np.random.Generator) -> list[np.ndarray]:
    """Like lce_benchmark_model's defaults: float U(-0.5, 0.5), ints in a small range."""
    out = []
    for shape, dtype in zip(interp.input_shapes, interp.input_types):
        if np.issubdtype(dtype, np.floating):
            out.append(rng.uniform(-0.5, 0.5, shape).astype(dtype))
        else:
            out.append(rng.integers(-127, 128, shape).astype(dtype))
    return out


class HostRunner:
    kind = "host"

    def __init__(self, opts: BenchOptions):
        self.opts = opts

    def info(self) -> dict:
        return host_info()

    def measure(self, path: str | Path, binary: bool, profile: bool = True) -> dict:
        from larq_compute_engine.tflite.python.interpreter import Interpreter

        o = self.opts
        fb = Path(path).read_bytes()
        interp = Interpreter(fb, num_threads=o.threads, use_indirect_bgemm=binary, use_xnnpack=o.xnnpack)
        rng = np.random.default_rng(0)
        feeds = _random_inputs(interp, rng)
        x = feeds if len(feeds) > 1 else feeds[0]
        per_invoke: list[float] = []
        for rep in range(o.repeats):
            for _ in range(o.warmup_runs):
                interp.predict(x)
            for _ in range(o.runs):
                t0 = time.perf_counter()
                interp.predict(x)
                per_invoke.append((time.perf_counter() - t0) * 1000.0)
            if o.cooldown_s and rep + 1 < o.repeats:
                time.sleep(o.cooldown_s)
        return {"latency": summarize(per_invoke, "per invoke"),
                "kernel": "indirect_bgemm" if binary else ("xnnpack" if o.xnnpack else "builtin")}
