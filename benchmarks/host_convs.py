"""Host per-convolution latency, binary (LceBconv2d) vs FP (CONV_2D), for every conv shape of U-Net presets.

    python benchmarks/host_convs.py [--presets tiny,cifar10] [--method bidm] [--threads 1] [--runs 30]

For each preset: one binary + one FP micro-model per distinct conv shape (``bdmtool export --target convs``),
timed side by side in one run with the android_bench host protocol (LCE interpreter: indirect BGEMM for
binary, XNNPACK for float). Prints a Markdown table per preset (shape, how many layers use it, whether the
method binarizes them, FP ms, binary ms, FP/binary) and the layer-weighted totals. These are x86 host
numbers; LCE's optimized kernels are for ARM, so a phone (``bdmtool bench --device adb:SERIAL``) is the
real target.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,cifar10")
    ap.add_argument("--method", default="bidm", help="method preset deciding which layers are binary")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="keep micro-models and results here (default: a temp dir)")
    a = ap.parse_args()

    from bdmtool.android_bench.bench import run_bench
    from bdmtool.android_bench.options import BenchOptions
    from bdmtool.tools.export import export_convs

    root = Path(a.out or tempfile.mkdtemp(prefix="bdm_convs_"))
    opts = BenchOptions(threads=a.threads, runs=a.runs, repeats=a.repeats, warmup_runs=3)
    for preset in a.presets.split(","):
        index = export_convs(None, root / preset, preset=preset, method=a.method, log=lambda s: None)
        res = run_bench(None, None, "local", root / preset / "bench", opts, convs=index, log=lambda s: None)
        uses, binary, rows = Counter(), {}, {}
        for c in res["convs"]:
            uses[c["shape"]] += 1
            binary[c["shape"]] = binary.get(c["shape"], False) or c["binary_in_model"]
            rows[c["shape"]] = c
        print(f"\n### {preset} ({a.method} decides binary layers; {res['target']['cpu']}, {a.threads} thread(s), "
              f"median of {a.runs} x {a.repeats} invokes)\n")
        print("| conv shape HxWxCin-Cout-k s p | layers | binary in model | FP ms | binary ms | FP / binary |")
        print("|---|---:|:-:|---:|---:|---:|")
        for shape, c in rows.items():
            print(f"| {shape} | {uses[shape]} | {'yes' if binary[shape] else 'no'} | {c['fp']['median_ms']:.4f} | "
                  f"{c['binary']['median_ms']:.4f} | {c['speedup']:.2f}x |")
        sel = [c for c in res["convs"] if c["binary_in_model"]]
        fp_t = sum(c["fp"]["median_ms"] for c in sel)
        bin_t = sum(c["binary"]["median_ms"] for c in sel)
        big = [c for c in sel if c["shape"].split("-")[-1].startswith("k3")]
        fp3 = sum(c["fp"]["median_ms"] for c in big)
        bin3 = sum(c["binary"]["median_ms"] for c in big)
        print(f"\nsum over the {len(sel)} binarized layers: FP {fp_t:.3f} ms, binary {bin_t:.3f} ms, "
              f"ratio {fp_t / bin_t:.2f}x; 3x3 convs only ({len(big)}): {fp3 / bin3:.2f}x. Results: "
              f"{root / preset / 'bench' / 'results.json'}")


if __name__ == "__main__":
    main()
