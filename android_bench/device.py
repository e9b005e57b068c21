"""The phone runner: ``lce_benchmark_model`` over adb, with the same protocol and result fields as the host.

Set-up (``prepare``): the device must be in the ``device`` state; its ABI (``ro.product.cpu.abi``) must
match the benchmark binary's ELF machine; ``/data/local/tmp`` must have room for what is pushed. Files are
pushed only when the remote sha256 differs. Each measurement runs the binary ``repeats`` times (optionally
pinned with ``taskset`` to the highest-frequency cores, with a cool-down between runs) and parses the
summary line and the op-profiling table.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from ..files import file_sha256
from .adb import REMOTE_DIR, AdbDevice, DeviceError
from .options import BenchOptions, summarize
from .parse import BenchmarkParseError, parse_benchmark_output

BINARY_ENV = "BDMTOOL_LCE_BENCHMARK"
_ELF_ABI = {183: "arm64-v8a", 40: "armeabi-v7a", 62: "x86_64", 3: "x86"}


def elf_abi(path: str | os.PathLike) -> str:
    """The Android ABI an ELF executable was built for (from its e_machine field)."""
    head = Path(path).read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        raise DeviceError(f"{path} is not an ELF executable; pass the lce_benchmark_model built for Android "
                          "(release asset lce_benchmark_model_android_arm64)")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_ABI.get(machine, f"e_machine={machine}")


def cpu_mask(freqs: list[int]) -> str | None:
    """Hex taskset mask of the CPUs with the highest max frequency (None when all are equal or unknown)."""
    if not freqs or len(set(freqs)) == 1:
        return None
    top = max(freqs)
    return format(sum(1 << i for i, f in enumerate(freqs) if f == top), "x")


class DeviceRunner:
    kind = "adb"

    def __init__(self, serial: str, opts: BenchOptions, benchmark_binary: str | None = None,
                 adb: str | None = None):
        self.opts = opts
        binary = benchmark_binary or os.environ.get(BINARY_ENV)
        if not binary:
            raise DeviceError(f"--device adb:{serial} needs lce_benchmark_model: pass --benchmark-binary PATH or set "
                              f"{BINARY_ENV} (README: 'Benchmark on a phone' says where to get it)")
        if not Path(binary).is_file():
            raise DeviceError(f"benchmark binary {binary} does not exist")
        self.binary = Path(binary)
        self.dev = AdbDevice(serial, adb=adb)
        self.mask: str | None = None
        self.props: dict = {}

    def info(self) -> dict:
        return {"kind": "adb", "label": f"{self.props.get('model', '?')} ({self.props.get('soc', '?')})",
                "serial": self.dev.serial, **self.props, "cpu_mask": self.mask,
                "benchmark_binary": {"path": str(self.binary), "sha256": file_sha256(self.binary)}}

    def prepare(self, files: list[Path]) -> None:
        self.props = self.dev.properties()
        abi, need = self.props["abi"], elf_abi(self.binary)
        if not abi:
            raise DeviceError(f"[adb:{self.dev.serial}] check ABI: getprop ro.product.cpu.abi returned nothing; is the "
                              "device fully booted? (adb shell getprop ro.product.cpu.abi)")
        if abi != need and not (abi == "arm64-v8a" and need == "armeabi-v7a"):
            raise DeviceError(f"[adb:{self.dev.serial}] check ABI: the device is {abi} but {self.binary.name} is "
                              f"built for {need}; use the lce_benchmark_model for {abi}")
        self.dev.shell(["mkdir", "-p", REMOTE_DIR], "mkdir")
        total = sum(p.stat().st_size for p in [self.binary, *files])
        free = self.dev.free_bytes(REMOTE_DIR)
        if free < total * 1.1:
            raise DeviceError(f"[adb:{self.dev.serial}] check space: {REMOTE_DIR} has {free / 2**20:.1f} MiB free, "
                              f"{total / 2**20:.1f} MiB are needed; delete files there")
        self.remote_binary = f"{REMOTE_DIR}/lce_benchmark_model"
        self.dev.push(self.binary, self.remote_binary)
        self.dev.shell(["chmod", "755", self.remote_binary], "chmod lce_benchmark_model")
        for f in files:
            self.dev.push(f, self._remote(f))
        if self.opts.pin_big_cores:
            self.mask = cpu_mask(self.dev.max_cpu_freqs())

    @staticmethod
    def _remote(path: Path) -> str:
        """One device path per local file: two models with the same file name from different folders must not
        overwrite each other (the tag is a hash of the absolute local path)."""
        tag = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:10]
        return f"{REMOTE_DIR}/{tag}_{path.name}"

    def measure(self, path: str | Path, binary: bool, profile: bool = True) -> dict:
        o, path = self.opts, Path(path)
        argv = (["taskset", self.mask] if self.mask else []) + [
            self.remote_binary, f"--graph={self._remote(path)}", f"--num_threads={o.threads}",
            f"--num_runs={o.runs}", f"--warmup_runs={o.warmup_runs}", "--min_secs=0",
            f"--use_xnnpack={'true' if o.xnnpack else 'false'}"]
        if profile and o.op_profiling:
            argv.append("--enable_op_profiling=true")
        avgs, runs = [], []
        for rep in range(o.repeats):
            text = self.dev.shell(argv, f"benchmark {path.name} (repeat {rep + 1}/{o.repeats})", timeout=o.timeout_s)
            try:
                runs.append(parse_benchmark_output(text))
            except BenchmarkParseError as e:
                raise DeviceError(f"[adb:{self.dev.serial}] benchmark {path.name}: {e}") from None
            avgs.append(runs[-1].avg_ms)
            if o.cooldown_s and rep + 1 < o.repeats:
                time.sleep(o.cooldown_s)
        best = runs[avgs.index(sorted(avgs)[len(avgs) // 2])]  # the median repetition's op table
        return {"latency": summarize(avgs, f"avg of {o.runs} runs per repeat"),
                "kernel": "ruy_bgemm" if binary else ("xnnpack" if o.xnnpack else "builtin"),
                "init_ms": best.init_us / 1000.0, "first_ms": best.first_us / 1000.0,
                "memory_mb": best.memory_mb, "ops": [
                    {"type": r.node_type, "avg_ms": r.avg_ms, "name": r.name, "outputs": r.outputs} for r in best.ops]}
