"""How many threads a bdmtool command uses when other processes already keep cores busy (no torch import).

Two CPU-bound processes that each run an OpenMP pool over every core, spin-waiting between parallel regions,
slow each other 4-30x (benchmarks/contention.py); one that takes only the cores left idle costs ~1.1x. So the
command line measures, for a fraction of a second before torch or TensorFlow load, how many of the cores it may
run on are busy with other processes, and when at least half a core is, it takes the rest: ``OMP_NUM_THREADS``
(torch), ``TF_NUM_INTRAOP_THREADS`` (TensorFlow) and, when it still runs more than one thread, libgomp's
``OMP_WAIT_POLICY=PASSIVE`` (sleep instead of spin). On an idle machine nothing is set: torch's defaults are the
fastest alone. ``BDMTOOL_THREADS=N`` or an ``OMP_NUM_THREADS`` already set turn the choice off.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpu_times(cpus: list[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat; None where there is no /proc/stat."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    want = {f"cpu{c}" for c in cpus}
    busy = total = 0.0
    for ln in lines:
        f = ln.split()
        if f and f[0] in want:
            v = [float(x) for x in f[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
            busy, total = busy + sum(v[:8]) - idle, total + sum(v[:8])
    return (busy, total) if total else None


def busy_cores(interval: float = 0.2, cpus: list[int] | None = None) -> float | None:
    """Cores of ``cpus`` (default: this process's affinity) kept busy by other processes over ``interval``
    seconds while this one sleeps; None where it cannot be measured."""
    cpus = cpus or allowed_cpus()
    a = _cpu_times(cpus)
    time.sleep(interval)
    b = _cpu_times(cpus)
    if a is None or b is None or b[1] <= a[1]:
        return None
    return len(cpus) * (b[0] - a[0]) / (b[1] - a[1])


@dataclass(frozen=True)
class ThreadChoice:
    env: dict[str, str]  # what to set before torch / TensorFlow load (empty: leave the defaults)
    note: str  # one line for the user ("" when nothing was decided)


def _threads_env(n: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(n), "TF_NUM_INTRAOP_THREADS": str(n), "TF_NUM_INTEROP_THREADS": "1"}


def decide(cores: int, busy: float | None, environ: dict[str, str]) -> ThreadChoice:
    """The policy as a pure function (tested without a busy machine)."""
    if environ.get("BDMTOOL_THREADS"):
        n = environ["BDMTOOL_THREADS"]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"BDMTOOL_THREADS={n!r}: give a whole number of threads >= 1")
        return ThreadChoice(_threads_env(int(n)), "")
    if environ.get("OMP_NUM_THREADS") or busy is None or busy < 0.5:
        return ThreadChoice({}, "")
    n = max(1, int(cores - busy + 0.5))
    env = _threads_env(n)
    if n > 1 and "OMP_WAIT_POLICY" not in environ:  # the user's own wait policy stays
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return ThreadChoice(env, f"[bdmtool] {busy:.1f} of {cores} cores are busy with other processes: running on "
                             f"{n} thread{'s' if n > 1 else ''} (set BDMTOOL_THREADS=N to choose)")


def choose_threads(environ=os.environ, interval: float = 0.2) -> ThreadChoice:
    """Measure, decide and export the choice into ``environ``; call before torch or TensorFlow is imported."""
    measure = not (environ.get("BDMTOOL_THREADS") or environ.get("OMP_NUM_THREADS"))
    cpus = allowed_cpus()
    choice = decide(len(cpus), busy_cores(interval, cpus) if measure else None, dict(environ))
    environ.update(choice.env)
    return choice
