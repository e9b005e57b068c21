"""Benchmark protocol settings and the summary statistics every runner reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BenchOptions:
    """How each model is timed; the same protocol on a phone and on the host.

    threads: interpreter threads (LCE's indirect bconv kernel is single-threaded whatever this says);
    runs / warmup_runs: timed and untimed invocations per repetition; repeats: repetitions per model
    (median and spread are taken over them); cooldown_s: pause between repetitions (thermal throttling);
    pin_big_cores: on a phone, ``taskset`` to the CPUs with the highest max frequency; xnnpack: XNNPACK for
    float ops (``--use_xnnpack``); op_profiling: per-op tables on the phone (the host cannot profile ops);
    timeout_s: the longest one benchmark invocation on the phone may take before it counts as hung.
    """

    threads: int = 1
    runs: int = 20
    warmup_runs: int = 3
    repeats: int = 3
    cooldown_s: float = 0.0
    pin_big_cores: bool = True
    xnnpack: bool = True
    op_profiling: bool = True
    timeout_s: float = 300.0

    def __post_init__(self):
        for f, flag in (("threads", "--threads"), ("runs", "--runs"), ("repeats", "--repeats")):
            if getattr(self, f) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, f)}")
        if self.warmup_runs < 0 or not 0 <= self.cooldown_s < float("inf"):
            raise ValueError(f"--warmup and --cooldown must be >= 0, got {self.warmup_runs} and {self.cooldown_s}")
        if not 0 < self.timeout_s < float("inf"):
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout_s}")

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples_ms: list[float], kind: str) -> dict:
    """Median and spread of timings in ms; ``kind`` says what one sample is (per invoke, per repeat avg)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    q1, q3 = np.percentile(a, [25, 75])
    return {"median_ms": float(np.median(a)), "min_ms": float(a.min()), "max_ms": float(a.max()),
            "iqr_ms": float(q3 - q1), "n": int(a.size), "sample": kind, "samples_ms": [float(v) for v in a]}
